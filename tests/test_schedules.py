"""Sampling schedules: exact probabilities at given steps, and masks drawn from them."""
import math

import pytest
import torch

from transmem.training.schedules import SamplingSchedule, reverse_time


def test_linear_scheduled_sampling_probabilities():
    s = SamplingSchedule("linear", t_in=4, frames=10, stop_step=1000)
    p0, p250, p1000, p5000 = (s.probabilities(k) for k in (0, 250, 1000, 5000))
    assert p0.shape == (9,)
    assert torch.all(p0[:3] == 1) and torch.all(p250[:3] == 1) and torch.all(p5000[:3] == 1)
    assert torch.all(p0[3:] == 1.0)
    assert torch.allclose(p250[3:], torch.full((6,), 0.75, dtype=torch.float64))
    assert torch.all(p1000[3:] == 0) and torch.all(p5000[3:] == 0)


def test_reverse_scheduled_sampling_probabilities():
    s = SamplingSchedule("reverse", t_in=5, frames=10, start_step=100, stop_step=300)
    before, mid, after = s.probabilities(50), s.probabilities(200), s.probabilities(400)
    assert torch.all(before[:4] == 0.5) and torch.all(before[4:] == 0.5)
    assert torch.allclose(mid[:4], torch.full((4,), 0.75, dtype=torch.float64))
    assert torch.allclose(mid[4:], torch.full((5,), 0.25, dtype=torch.float64))
    assert torch.all(after[:4] == 1.0) and torch.all(after[4:] == 0.0)
    e = SamplingSchedule("reverse", t_in=5, frames=10, start_step=100, stop_step=300, exp_alpha=50)
    assert math.isclose(float(e.probabilities(150)[0]), 1 - 0.5 * math.exp(-1.0), rel_tol=1e-12)
    assert float(e.probabilities(300)[0]) == 1.0


def test_none_schedule_is_a_plain_rollout():
    p = SamplingSchedule("none", t_in=3, frames=8).probabilities(123)
    assert p.tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_masks_follow_the_probabilities():
    s = SamplingSchedule("linear", t_in=2, frames=6, stop_step=100)
    g = torch.Generator().manual_seed(0)
    m = s.mask(30, 20000, generator=g)
    assert m.shape == (20000, 5) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(m[:, 0] == 1)
    assert abs(m[:, 1:].mean().item() - 0.7) < 0.01
    # deterministic by generator seed
    assert torch.equal(s.mask(30, 8, generator=torch.Generator().manual_seed(1)),
                       s.mask(30, 8, generator=torch.Generator().manual_seed(1)))


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule: expected one of linear, reverse, none"):
        SamplingSchedule("cosine")
    with pytest.raises(ValueError, match="t_in"):
        SamplingSchedule(t_in=10, frames=10)


def test_time_reversal_flips_whole_sequences():
    x = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 5, 1, 1, 1).expand(4, 5, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    y, _ = reverse_time(x, 0.5, g)
    flipped = [bool(torch.equal(y[i], x[i].flip(0))) for i in range(4)]
    kept = [bool(torch.equal(y[i], x[i])) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept))
    y_all, _ = reverse_time(x, 1.0, g)
    assert torch.equal(y_all, x.flip(1))
    assert reverse_time(x, 0.0)[0] is x

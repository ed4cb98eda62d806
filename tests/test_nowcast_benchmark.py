"""benchmarks/nowcast.py's learned combination (recipe:stack): it starts as the equal mean of the
model and sprog_log, and its soft-CSI loss term sends a gradient to every layer it should train."""
import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("nowcast")


def _inputs(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    members = torch.rand(n, 3, size, size, generator=g) * 0.6
    last = torch.rand(n, 1, size, size, generator=g) * 0.6
    return members, last, torch.full((n,), 0.5)


def test_the_combination_starts_as_the_equal_mean_of_the_model_and_sprog_log(bench):
    members, last, lead = _inputs()
    out = bench.Combiner()(members, last, lead)
    w = torch.softmax(torch.tensor([0.0, 0.0, -4.0]), 0)  # the start the head's bias sets
    assert out.shape == (2, 1, 32, 32)
    assert torch.allclose(out, (w[:, None, None] * members).sum(1, keepdim=True), atol=1e-6)


def test_the_soft_csi_term_reaches_every_layer_of_the_combination(bench):
    members, last, lead = _inputs()
    obs = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.6)
    valid = torch.ones_like(obs)
    net = bench.Combiner()
    with torch.no_grad():  # off the zero start, so that the body's gradient is not blocked by the head
        net.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    loss = bench.soft_csi_loss(net(members, last, lead), obs, valid, tau=0.02)
    assert 0 < float(loss) < 2  # 1 - CSI at each of the two thresholds
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a perfect forecast scores (nearly) zero: the term rewards hits, not smoothness
    assert float(bench.soft_csi_loss(obs.clamp(0, 1), obs, valid, tau=1e-4)) < 0.05


def test_the_band_keeps_the_combination_inside_the_rain_areas_drawn(bench):
    """The banded forecast has exactly the drawn rain areas at 1 and 5 mm/h, and the
    combination's value everywhere it already agrees with them."""
    members, _, _ = _inputs(n=3)
    value = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.6
    sprog = members[:, 1:2]
    reach = torch.cat([sprog >= u for u in bench._levels()], 1)
    out = bench.banded(value, reach)
    for u in bench._levels():
        assert torch.equal(out >= u, sprog >= u)
    same_class = sum((value >= u).int() for u in bench._levels()) == sum((sprog >= u).int() for u in bench._levels())
    assert same_class.any() and torch.equal(out[same_class], value[same_class])
    assert ((out - value).abs()[~same_class] > 0).all()
    # reaching 5 mm/h implies reaching 1 mm/h, whatever the area at 1 mm/h says
    contradictory = torch.stack([torch.zeros(32, 32, dtype=torch.bool), torch.ones(32, 32, dtype=torch.bool)])[None]
    assert (bench.banded(value[:1], contradictory) >= bench._levels()[1]).all()


def test_the_areas_are_picked_on_the_other_events_only(bench):
    """pick_areas takes, per threshold, the candidate with the best mean CSI over the events it is
    given, and never looks at the held-out one."""
    good, bad = [8, 1, 1], [1, 8, 8]
    counts = {e: {"sprog_log|1.0|0.8": good, "sprog_log|1.0|1.0": bad,
                  "sprog_blend|5.0|4.0": bad, "sprog_blend|5.0|5.0": good} for e in ("a", "b")}
    counts["held"] = {"sprog_log|1.0|0.8": bad, "sprog_log|1.0|1.0": good,
                      "sprog_blend|5.0|4.0": good, "sprog_blend|5.0|5.0": bad}
    assert bench.pick_areas(counts, ["a", "b"]) == {1.0: ("sprog_log", 0.8), 5.0: ("sprog_blend", 5.0)}
    assert bench.pick_areas(counts, ["held"]) == {1.0: ("sprog_log", 1.0), 5.0: ("sprog_blend", 4.0)}

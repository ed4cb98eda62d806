"""Persistence and extrapolation baselines (transmem.baselines)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import transmem.baselines as bl
from transmem.baselines import (BASELINES, BaselineForecaster, BaselineUnavailable, create_baseline, extrapolate,
                                extrapolation_available, persistence)
from transmem.data.radar import rain_to_unit, unit_to_rain

N = 64
T, T_IN = 12, 6
TOL_RANGE = 0.025   # extrapolation MAE in the interior < 2.5 % of the field's range ...
TOL_PERSIST = 0.25  # ... and < 1/4 of persistence's MAE there (measured: <= 0.7 % and <= 0.06)


def needs_pysteps():
    reason = extrapolation_available()
    if reason is not None:
        pytest.skip(f"could not import pysteps: {reason}")


# ------------------------------------------------------------------------------------- fields
def blobs(v, seed, t=T, n=N, count=10) -> np.ndarray:
    """(t, n, n) sum of Gaussian blobs (some centred outside the frame) moving at v = (dy, dx)
    pixels per frame, evaluated analytically at every time (no interpolation in the truth)."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(-16, n + 16, count), rng.uniform(-16, n + 16, count)
    s, a = rng.uniform(4, 8, count), rng.uniform(0.3, 1.0, count)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    out = np.zeros((t, n, n))
    for k in range(t):
        for j in range(count):
            d2 = (yy - cy[j] - v[0] * k) ** 2 + (xx - cx[j] - v[1] * k) ** 2
            out[k] += a[j] * np.exp(-d2 / (2 * s[j] ** 2))
    return np.clip(out, 0.0, 1.0)


def smooth_random(v, seed, t=T, n=N, big=128, scale=6.0) -> np.ndarray:
    """(t, n, n) Gaussian-filtered white noise on a 128x128 torus, shifted exactly (Fourier phase)
    by v*k at frame k and cropped to n x n, then scaled to [0, 1] (one scale for all frames)."""
    rng = np.random.default_rng(seed)
    ky, kx = np.fft.fftfreq(big)[:, None], np.fft.fftfreq(big)[None, :]
    spec = np.fft.fft2(rng.standard_normal((big, big))) * np.exp(-2 * (np.pi * scale) ** 2 * (ky ** 2 + kx ** 2))
    out = np.stack([np.real(np.fft.ifft2(spec * np.exp(-2j * np.pi * (ky * v[0] + kx * v[1]) * k)))[:n, :n]
                    for k in range(t)])
    return (out - out.min()) / (out.max() - out.min())


def clip_batch(make, v, seeds=(0, 1)) -> torch.Tensor:
    return torch.from_numpy(np.stack([make(v, s) for s in seeds])[:, :, None].astype(np.float32))


def interior_errors(pred: torch.Tensor, frames: torch.Tensor, v) -> tuple[float, float, float]:
    """(extrapolation MAE, persistence MAE, field range) over the interior: a border of the largest
    displacement over the forecast (where the truth holds structure advected in from outside) is left out."""
    border = int(np.ceil(max(abs(v[0]), abs(v[1])) * (T - T_IN)))
    inner = (Ellipsis, slice(border, N - border), slice(border, N - border))
    truth = frames[:, T_IN:]
    mae = (pred - truth)[inner].abs().mean().item()
    mae_persist = (persistence(frames, T_IN) - truth)[inner].abs().mean().item()
    return mae, mae_persist, (frames.max() - frames.min()).item()


# -------------------------------------------------------------------------------- persistence
def test_persistence_is_the_last_input_frame():
    frames = torch.rand(3, 9, 3, 8, 10)
    out = persistence(frames, 4)
    assert out.shape == (3, 5, 3, 8, 10)
    for k in range(5):
        assert torch.equal(out[:, k], frames[:, 3])
    assert out.data_ptr() != frames.data_ptr()
    u8 = (frames * 255).to(torch.uint8)  # dtype kept: an exact copy, not a float conversion
    assert torch.equal(persistence(u8, 2), u8[:, 1:2].expand(3, 7, 3, 8, 10))


def test_persistence_module_and_bad_arguments():
    frames = torch.rand(2, 5, 1, 6, 6)
    model = create_baseline("persistence", 3)
    assert isinstance(model, torch.nn.Module) and model.device == torch.device("cpu")
    assert list(model.parameters()) == []
    assert torch.equal(model(frames), frames[:, 2:3].repeat(1, 2, 1, 1, 1))
    model.t_in = 4
    assert torch.equal(model.rollout(frames), frames[:, 3:4])
    with pytest.raises(ValueError, match="choose one of persistence, extrapolation"):
        BaselineForecaster("climatology", 3)
    with pytest.raises(ValueError, match="t_in"):
        persistence(frames, 5)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        persistence(frames[0], 2)
    with pytest.raises(ValueError, match="both"):
        BaselineForecaster("persistence", 2, to_physical=unit_to_rain)
    assert BASELINES[:2] == ("persistence", "extrapolation")
    assert {"sprog", "sprog_log", "anvil", "steps_mean", "extrapolation_log"} <= set(BASELINES)


# ------------------------------------------------------------------------------ extrapolation
@pytest.mark.parametrize("make", [blobs, smooth_random], ids=["blobs", "smooth_random"])
@pytest.mark.parametrize("v", [(1, 2), (1.5, -0.5)], ids=["v=(1,2)", "v=(1.5,-0.5)"])
@pytest.mark.parametrize("physical", [False, True], ids=["model_units", "mm_per_h"])
def test_extrapolation_follows_a_constant_translation(make, v, physical):
    needs_pysteps()
    frames = clip_batch(make, v)
    units = dict(to_physical=unit_to_rain, from_physical=rain_to_unit) if physical else {}
    pred = extrapolate(frames, T_IN, **units)
    assert pred.shape == (2, T - T_IN, 1, N, N) and pred.dtype == torch.float32
    assert 0.0 <= pred.min().item() and pred.max().item() <= 1.0
    mae, mae_persist, span = interior_errors(pred, frames, v)
    assert mae < TOL_RANGE * span, (mae, span)
    assert mae < TOL_PERSIST * mae_persist, (mae, mae_persist)


def test_extrapolation_moves_every_channel_along_the_mean_motion():
    needs_pysteps()
    v = (1, 2)
    frames = torch.from_numpy(np.stack([blobs(v, 0), smooth_random(v, 3)], axis=1)[None].astype(np.float32))
    pred = create_baseline("extrapolation", T_IN)(frames)
    assert pred.shape == (1, T - T_IN, 2, N, N)
    for ch in range(2):
        mae, mae_persist, span = interior_errors(pred[:, :, ch:ch + 1], frames[:, :, ch:ch + 1], v)
        assert mae < TOL_RANGE * span and mae < TOL_PERSIST * mae_persist, (ch, mae, mae_persist)


@pytest.mark.parametrize("physical", [False, True], ids=["model_units", "mm_per_h"])
def test_extrapolation_of_no_rain_and_of_a_still_field(physical):
    needs_pysteps()
    units = dict(to_physical=unit_to_rain, from_physical=rain_to_unit) if physical else {}
    zeros = torch.zeros(2, 8, 1, 32, 32)
    out = extrapolate(zeros, 4, **units)
    assert out.shape == (2, 4, 1, 32, 32) and torch.equal(out, torch.zeros_like(out))
    still = clip_batch(blobs, (0, 0), seeds=(0,))  # no motion: extrapolation is persistence
    assert torch.allclose(extrapolate(still, T_IN, **units), persistence(still, T_IN), atol=1e-5)
    one = torch.rand(1, 3, 1, 16, 16)  # t_in = 1: no motion can be estimated -> persistence
    assert torch.allclose(extrapolate(one, 1), persistence(one, 1))
    nan = zeros.clone()
    nan[:, :, :, :4] = float("nan")  # non-finite input is taken as 0 (no rain)
    assert torch.equal(extrapolate(nan, 4, **units), torch.zeros(2, 4, 1, 32, 32))


def test_rain_advected_in_from_outside_is_zero_not_nan():
    needs_pysteps()
    v = (0, 2)  # uniform motion to the right: the left columns come from outside the frame
    frames = torch.from_numpy(smooth_random(v, 1)[None, :, None].astype(np.float32) * 0.5 + 0.5)
    pred = extrapolate(frames, T_IN, to_physical=unit_to_rain, from_physical=rain_to_unit)
    assert torch.isfinite(pred).all()
    last = pred[0, -1, 0]  # displaced by ~12 columns after 6 steps
    assert last[:, :10].abs().max().item() < 1e-6  # filled with 0 mm/h, not the last frame's values
    assert last[:, 14:].min().item() > 0.4


# ------------------------------------------------------------------------ missing dependency
def test_missing_pysteps_gives_one_line_reason(monkeypatch):
    for name in [m for m in sys.modules if m == "pysteps" or m.startswith("pysteps.")] + ["pysteps", "cv2"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    reason = extrapolation_available()
    assert reason is not None and "\n" not in reason and "transmem[nowcast]" in reason
    with pytest.raises(BaselineUnavailable) as err:
        BaselineForecaster("extrapolation", 4)
    assert str(err.value) == reason
    with pytest.raises(BaselineUnavailable):
        extrapolate(torch.zeros(1, 5, 1, 8, 8), 4)
    assert torch.equal(create_baseline("persistence", 2).rollout(torch.ones(1, 3, 1, 4, 4)),
                       torch.ones(1, 1, 1, 4, 4))  # persistence needs nothing


def test_unavailable_reason_is_what_the_constructor_raises(monkeypatch):
    message = "extrapolation needs pysteps: pip install 'transmem[nowcast]'"
    monkeypatch.setattr(bl.forecaster, "missing_dependency", lambda spec: message)
    with pytest.raises(BaselineUnavailable, match=r"^extrapolation needs pysteps: pip install 'transmem\[nowcast\]'$"):
        create_baseline("extrapolation", 3)


# ------------------------------------------------------------------------ through evaluate()
@pytest.mark.slow  # the evaluation loop over every baseline
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_through_evaluate(name):
    from transmem.training import evaluate
    clips = clip_batch(blobs, (1, 2), seeds=(0, 1, 2))  # (3, T, 1, N, N)
    dataset = [{"frames": c} for c in clips]
    try:
        model = create_baseline(name, T_IN)
    except BaselineUnavailable as e:
        pytest.skip(str(e))
    metrics = evaluate(model, dataset, batch_size=2)
    pred = model.rollout(clips)
    sq = (pred.double() - clips[:, T_IN:].double()) ** 2
    assert metrics["count"] == 3
    assert metrics["mse"] == pytest.approx(sq.sum().item() / (3 * (T - T_IN)), rel=1e-6)
    assert metrics["mse_pixel"] == pytest.approx(sq.mean().item(), rel=1e-6)


def test_inflow_last_keeps_the_last_frame_where_nothing_is_known():
    needs_pysteps()
    v = (0, 2)
    frames = torch.from_numpy(smooth_random(v, 1)[None, :, None].astype(np.float32) * 0.5 + 0.5)
    pred = extrapolate(frames, T_IN, inflow="last")
    last_in = frames[0, T_IN - 1, 0]
    out = pred[0, -1, 0]
    assert torch.isfinite(pred).all()
    assert torch.allclose(out[:, :8], last_in[:, :8])  # the inflow band is the last frame itself
    with pytest.raises(ValueError, match="inflow"):
        extrapolate(frames, T_IN, inflow="mirror")

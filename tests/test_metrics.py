"""Tests of transmem.metrics against hand-worked and numpy values on tiny tensors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from transmem.metrics import FrameMetrics, frame_metrics, ssim_per_image


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def _pair(b=3, t=4, c=1, h=16, w=16, seed=0, noise=0.2):
    target = _rand((b, t, c, h, w), seed)
    g = torch.Generator().manual_seed(seed + 1000)
    pred = (target + noise * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target


def _close(a, b, tol=1e-6):
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- MSE / MAE / PSNR
def test_mse_mae_hand_values():
    # 2 sequences, 2 lead times, one 1x2 frame each: errors chosen by hand.
    target = torch.zeros(2, 2, 1, 1, 2)
    pred = torch.tensor([[[[[0.5, 0.5]]], [[[1.0, 0.0]]]],
                         [[[[0.0, 0.0]]], [[[0.5, 0.0]]]]])
    r = frame_metrics(pred, target)
    # frame sums of squares: seq0: [0.5, 1.0], seq1: [0.0, 0.25] -> averaged over 2 sequences
    assert _close(r["mse_per_frame"], [0.25, 0.625])
    assert math.isclose(r["mse"], (0.25 + 0.625) / 2)
    # per pixel: divide by the 2 pixels of a frame
    assert _close(r["mse_pixel_per_frame"], [0.125, 0.3125])
    # abs sums: seq0: [1.0, 1.0], seq1: [0.0, 0.5]
    assert _close(r["mae_per_frame"], [0.5, 0.75])
    assert _close(r["mae_pixel_per_frame"], [0.25, 0.375])
    assert r["count"] == 2


def test_sum_vs_pixel_relation_and_numpy():
    pred, target = _pair(b=4, t=3, c=3, h=8, w=6, seed=1)
    r = frame_metrics(pred, target)
    chw = 3 * 8 * 6
    assert _close(r["mse"], r["mse_pixel"] * chw)
    assert _close(r["mse_per_frame"], np.array(r["mse_pixel_per_frame"]) * chw)
    assert _close(r["mae"], r["mae_pixel"] * chw)
    p, t = pred.double().numpy(), target.double().numpy()
    assert _close(r["mse_per_frame"], ((p - t) ** 2).sum(axis=(2, 3, 4)).mean(0))
    assert _close(r["mae_per_frame"], np.abs(p - t).sum(axis=(2, 3, 4)).mean(0))
    psnr = -10 * np.log10(((p - t) ** 2).mean(axis=(2, 3, 4)))
    assert _close(r["psnr_per_frame"], psnr.mean(0), tol=1e-5)


def test_psnr_known_mse():
    target = torch.full((2, 3, 1, 4, 4), 0.25)
    pred = target + 0.1  # per-pixel MSE 0.01 -> 20 dB
    r = frame_metrics(pred, target)
    assert all(abs(v - 20.0) < 1e-4 for v in r["psnr_per_frame"])
    same = frame_metrics(target, target)  # MSE clamped at 1e-10 -> 100 dB, finite
    assert abs(same["psnr"] - 100.0) < 1e-6


# --------------------------------------------------------------------------- SSIM
@pytest.mark.parametrize("c", [1, 3])
def test_ssim_identical_is_one_and_different_below(c):
    _, target = _pair(b=2, t=2, c=c, h=16, w=16, seed=2)
    r = frame_metrics(target, target)
    assert all(abs(v - 1.0) < 1e-5 for v in r["ssim_per_frame"])
    pred, _ = _pair(b=2, t=2, c=c, h=16, w=16, seed=2)
    r2 = frame_metrics(pred, target)
    assert all(v < 0.99 for v in r2["ssim_per_frame"])


@pytest.mark.parametrize("c,h,w", [(1, 16, 16), (3, 16, 16), (1, 32, 24), (3, 7, 9)])
def test_ssim_matches_torchmetrics(c, h, w):
    pred, target = _pair(b=3, t=2, c=c, h=h, w=w, seed=3)
    r = frame_metrics(pred, target)
    ref = [
        tm_ssim(pred[:, k], target[:, k], data_range=1.0, reduction="none").double().mean().item()
        for k in range(2)
    ]
    assert _close(r["ssim_per_frame"], ref, tol=1e-5)


def test_ssim_tiny_frames_work():
    pred, target = _pair(b=2, t=2, c=1, h=3, w=2, seed=4)
    s, n = ssim_per_image(pred[:, 0], target[:, 0])
    assert torch.isfinite(s).all() and (n == 3 * 2).all()
    s1, n1 = ssim_per_image(target[:, 0], target[:, 0])
    assert torch.allclose(s1 / n1, torch.ones(2), atol=1e-5)


# --------------------------------------------------------------------------- mask
def test_mask_ignores_invalid_values():
    pred, target = _pair(b=2, t=3, c=1, h=12, w=12, seed=5)
    mask = _rand((2, 3, 1, 12, 12), 6) > 0.3
    thr = [0.3, 0.7]
    r1 = frame_metrics(pred, target, mask, thresholds=thr)
    junk_p = torch.where(mask, pred, _rand(pred.shape, 7))
    junk_t = torch.where(mask, target, _rand(target.shape, 8))
    r2 = frame_metrics(junk_p, junk_t, mask, thresholds=thr)
    for key in ("mse_per_frame", "mae_per_frame", "mse_pixel_per_frame", "psnr_per_frame", "ssim_per_frame"):
        assert _close(r1[key], r2[key], tol=1e-5), key
    assert r1["contingency"] == r2["contingency"]
    # the masked sums equal numpy over the valid pixels only
    p, t, m = pred.double().numpy(), target.double().numpy(), mask.numpy()
    sq = np.where(m, (p - t) ** 2, 0.0)
    assert _close(r1["mse_per_frame"], sq.sum(axis=(2, 3, 4)).mean(0))
    assert _close(r1["mse_pixel_per_frame"], sq.sum(axis=(0, 2, 3, 4)) / m.sum(axis=(0, 2, 3, 4)))


def test_mask_all_valid_equals_no_mask_and_broadcasts_over_channels():
    pred, target = _pair(b=2, t=2, c=3, h=10, w=10, seed=9)
    full = torch.ones(2, 2, 1, 10, 10, dtype=torch.bool)
    a, b = frame_metrics(pred, target), frame_metrics(pred, target, full)
    for key in ("mse", "mae_pixel", "ssim", "psnr"):
        assert math.isclose(a[key], b[key], rel_tol=1e-6), key


def test_fully_masked_frame_is_left_out_of_psnr_ssim():
    pred, target = _pair(b=2, t=2, c=1, h=8, w=8, seed=10)
    mask = torch.ones(2, 2, 1, 8, 8, dtype=torch.bool)
    mask[0, 1] = False  # sequence 0, lead time 2: nothing valid
    r = frame_metrics(pred, target, mask)
    only1 = frame_metrics(pred[1:, 1:], target[1:, 1:])
    assert math.isclose(r["psnr_per_frame"][1], only1["psnr"], rel_tol=1e-6)
    assert math.isclose(r["ssim_per_frame"][1], only1["ssim"], rel_tol=1e-6)
    empty = FrameMetrics(2)
    empty.update(pred, target, torch.zeros_like(mask))
    out = empty.compute()
    assert out["ssim"] is None and out["psnr"] is None and out["mse_pixel"] is None
    assert out["mse"] == 0.0
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- streaming / DDP
def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True) or \
                _close_nested(a[k], b[k]), k
        else:
            assert _close(a[k], b[k], tol=1e-9), k


def _close_nested(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close_nested(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close_nested(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_streaming_equals_one_batch():
    pred, target = _pair(b=6, t=3, c=1, h=8, w=8, seed=11)
    mask = _rand((6, 3, 1, 8, 8), 12) > 0.2
    one = FrameMetrics(3, thresholds=[0.5])
    one.update(pred, target, mask)
    streamed = FrameMetrics(3, thresholds=[0.5])
    for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
        streamed.update(pred[s], target[s], mask[s])
    _assert_same(one.compute(), streamed.compute())


def test_merge_state_equals_single():
    pred, target = _pair(b=6, t=3, c=1, h=8, w=8, seed=13)
    single = FrameMetrics(3, thresholds=[0.2, 0.6])
    single.update(pred, target)
    rank0, rank1 = FrameMetrics(3, thresholds=[0.2, 0.6]), FrameMetrics(3, thresholds=[0.2, 0.6])
    rank0.update(pred[:3], target[:3])
    rank1.update(pred[3:], target[3:])
    rank0.merge_state(rank1)
    _assert_same(single.compute(), rank0.compute())
    for name, reduce in single._reductions.items():  # every state is a DDP sum
        assert reduce is not None and reduce.__name__ in ("dim_zero_sum",), name


def test_reset_and_shape_errors():
    m = FrameMetrics(2)
    pred, target = _pair(b=1, t=2, h=4, w=4, seed=14)
    m.update(pred, target)
    m.reset()
    m.update(pred, target)
    assert m.compute()["count"] == 1
    with pytest.raises(ValueError):
        m.update(pred[:, :1], target[:, :1])
    with pytest.raises(ValueError):
        m.update(pred, target, torch.ones(1, 2, 2, 4, 4, dtype=torch.bool))


# --------------------------------------------------------------------------- categorical scores
def test_csi_pod_far_hss_hand_case():
    # one sequence, 2 lead times, 1x4 frames, threshold 0.5
    target = torch.tensor([[[[[1.0, 1.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]]])
    pred = torch.tensor([[[[[1.0, 0.0, 1.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]]])
    r = frame_metrics(pred, target, thresholds=[0.5])
    c = r["contingency"]["0.5"]
    assert c == {"hits": [1, 0], "misses": [1, 0], "false_alarms": [1, 0], "correct_negatives": [1, 4]}
    # lead time 1: h=m=f=cn=1
    assert r["csi"]["0.5"]["per_frame"][0] == pytest.approx(1 / 3)
    assert r["pod"]["0.5"]["per_frame"][0] == pytest.approx(0.5)
    assert r["far"]["0.5"]["per_frame"][0] == pytest.approx(0.5)
    assert r["hss"]["0.5"]["per_frame"][0] == pytest.approx(0.0)
    # lead time 2: no event anywhere -> CSI/POD/FAR are 0/0 -> None; HSS 0/0 too
    for s in ("csi", "pod", "far", "hss"):
        assert r[s]["0.5"]["per_frame"][1] is None
    # mean from summed counts h=1, m=1, f=1, cn=5 (not an average of ratios)
    assert r["csi"]["0.5"]["mean"] == pytest.approx(1 / 3)
    hss = 2 * (1 * 5 - 1 * 1) / ((1 + 1) * (1 + 5) + (1 + 1) * (1 + 5))
    assert r["hss"]["0.5"]["mean"] == pytest.approx(hss)
    json.dumps(r, allow_nan=False)


def test_thresholds_in_physical_units_and_masked():
    # to_physical maps [0,1] to 0..100 "mm/h"; threshold 50 == 0.5 in data units
    target = torch.tensor([[[[[0.9, 0.1, 0.9]]]]])
    pred = torch.tensor([[[[[0.8, 0.6, 0.2]]]]])
    mask = torch.tensor([[[[[True, True, False]]]]])
    r = frame_metrics(pred, target, mask, thresholds=[50.0], to_physical=lambda x: 100.0 * x)
    assert r["contingency"]["50.0"] == {"hits": [1], "misses": [0], "false_alarms": [1], "correct_negatives": [0]}
    assert r["far"]["50.0"]["mean"] == pytest.approx(0.5)
    assert r["pod"]["50.0"]["mean"] == pytest.approx(1.0)


def test_output_is_json_safe_plain_python():
    pred, target = _pair(b=2, t=3, c=1, h=8, w=8, seed=15)
    r = frame_metrics(pred, target, thresholds=[0.5, 2.0])  # 2.0: never an event -> None scores
    s = json.dumps(r, allow_nan=False)
    back = json.loads(s)
    assert back["csi"]["2.0"]["mean"] is None
    assert len(back["mse_per_frame"]) == 3 and isinstance(back["mse"], float)
    for k in ("mse", "mse_pixel", "mae", "mae_pixel", "ssim", "psnr"):
        assert isinstance(r[k], float) and len(r[k + "_per_frame"]) == 3

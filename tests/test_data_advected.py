"""advected_rain: the synthetic radar-like pretext dataset (shapes, units, determinism, splits,
that the motion is real, the rain coverage and intensities, option checking)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transmem.data import DataConfig, DataError, build_datasets, list_datasets, physical_units
from transmem.data.advected import AdvectedOptions, domain_size, generate_clips, generate_rain
from transmem.data.clips import ClipDataset, Prepared
from transmem.data.radar import rain_to_unit, unit_to_rain


def cfg(**kw) -> DataConfig:
    base = dict(name="advected_rain", size=32, frames=6, train_clips=6, val_clips=3, test_clips=2, seed=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def motion_clips():
    """Clips moving at 1–3 px/step (rain rates, mm/h) and their parameters."""
    return generate_rain(16, "train", 64, 8, seed=3, options={"min_speed": 1.0, "max_speed": 3.0}, progress=False)


# --- format ------------------------------------------------------------------------------------

def test_registered_with_rain_units():
    assert "advected_rain" in list_datasets()
    units = physical_units(cfg())
    assert units.name == "mm/h"
    assert physical_units(cfg(extra={"r_max": 50})).to_physical(np.float32(1.0)) == pytest.approx(50.0, rel=1e-4)


def test_items_match_the_radar_readers_format():
    ds = build_datasets(cfg())
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "val": 3, "test": 2}
    item = ds["train"][0]
    # the radar readers' item: a ClipDataset over float16 frames with a mask
    prep = Prepared(np.zeros((6, 1, 32, 32), np.float16), np.ones((6, 1, 32, 32), bool), ["e"], ["e"], [0], [6])
    radar_item = ClipDataset(prep, [(0, 0)], 6, ["e"])[0]
    assert set(item) == set(radar_item) == {"frames", "mask"}
    for k in item:
        assert item[k].dtype == radar_item[k].dtype and item[k].shape == radar_item[k].shape
    assert item["frames"].dtype == torch.float32 and item["mask"].dtype == torch.bool
    assert bool(item["mask"].all())
    x = torch.stack([ds["train"][i]["frames"] for i in range(len(ds["train"]))])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.max()) > 0.0 and float((x == 0).float().mean()) > 0.05  # rain and dry areas
    assert torch.equal(x, x.half().float())  # stored as float16, like the radar readers' frames


def test_three_channels_repeat_the_field_and_others_are_refused():
    one, three = build_datasets(cfg())["val"][1], build_datasets(cfg(channels=3))["val"][1]
    assert three["frames"].shape == (6, 3, 32, 32) and three["mask"].shape == (6, 1, 32, 32)
    assert all(torch.equal(three["frames"][:, c], one["frames"][:, 0]) for c in range(3))
    with pytest.raises(DataError, match="channels"):
        build_datasets(cfg(channels=2))


def test_units_are_the_radar_log_scale():
    rain, info = generate_rain(3, "val", 32, 5, seed=2, progress=False)
    units, _ = generate_clips(3, "val", 32, 5, seed=2, progress=False)
    assert units.dtype == np.float16 and rain.dtype == np.float32
    assert np.allclose(units.astype(np.float32), rain_to_unit(rain, 100.0), atol=1e-3)
    assert np.allclose(unit_to_rain(units.astype(np.float32)), rain, rtol=0.01, atol=0.01)
    assert rain.min() >= 0.0 and rain.max() < 150.0  # soft cap
    for k, shape in {"velocity": (3, 2), "rotation": (3,), "shear": (3, 2), "coverage": (3,)}.items():
        assert info[k].shape == shape
    # r_max and rain_scale
    u50, _ = generate_clips(3, "val", 32, 5, seed=2, options={"r_max": 50}, progress=False)
    assert np.allclose(u50.astype(np.float32), rain_to_unit(rain, 50.0), atol=1e-3)
    half, _ = generate_rain(3, "val", 32, 5, seed=2, options={"rain_scale": 0.5}, progress=False)
    assert np.allclose(half, 0.5 * rain, rtol=1e-5, atol=1e-6)


# --- determinism and splits ---------------------------------------------------------------------

def test_same_config_same_clips_other_seed_other_clips():
    a, b = build_datasets(cfg()), build_datasets(cfg())
    for s in ("train", "val", "test"):
        assert np.array_equal(a[s].clips, b[s].clips)
    c = build_datasets(cfg(seed=2))
    assert not np.array_equal(a["train"].clips, c["train"].clips)


def test_splits_differ():
    ds = build_datasets(cfg(train_clips=3, val_clips=3, test_clips=3))
    clips = {s: ds[s].clips for s in ds}
    for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not np.array_equal(clips[s], clips[t])
        assert not any(np.array_equal(x, y) for x in clips[s] for y in clips[t])


def test_a_clip_is_a_function_of_its_index_alone():
    bulk, info = generate_clips(20, "test", 32, 6, seed=5, progress=False)
    for i in (0, 7, 16, 19):
        one, one_info = generate_clips(1, "test", 32, 6, seed=5, start=i, progress=False)
        assert np.array_equal(one[0], bulk[i])
        assert np.array_equal(one_info["velocity"][0], info["velocity"][i])
    part, _ = generate_clips(5, "test", 32, 6, seed=5, start=12, progress=False)
    assert np.array_equal(part, bulk[12:17])


# --- motion -------------------------------------------------------------------------------------

def _carry(frame: np.ndarray, v) -> np.ndarray:
    """``frame`` moved by ``v = (vx, vy)`` px (bilinear): out(p) = frame(p − v)."""
    S = frame.shape[-1]
    g = torch.arange(S, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([(xx - v[0]) * 2 / (S - 1) - 1, (yy - v[1]) * 2 / (S - 1) - 1], -1)[None].float()
    return F.grid_sample(torch.from_numpy(frame)[None, None].float(), grid, align_corners=True)[0, 0].numpy()


def test_frames_move_with_the_clip_velocity(motion_clips):
    rain, info = motion_clips
    L = np.log1p(rain)
    m = 5  # interior: away from what flows in at the edges
    inner = (slice(m, -m), slice(m, -m))
    for i in range(len(L)):
        v = info["velocity"][i]
        assert 1.0 - 1e-9 <= math.hypot(*v) <= 3.0 + 1e-9
        err_moved = err_still = 0.0
        for t in range(L.shape[1] - 1):
            nxt = L[i, t + 1][inner]
            err_moved += np.mean((_carry(L[i, t], v)[inner] - nxt) ** 2)
            err_still += np.mean((L[i, t][inner] - nxt) ** 2)
        assert err_moved < 0.3 * err_still, (i, v, err_moved, err_still)


def test_cross_correlation_finds_the_displacement(motion_clips):
    rain, info = motion_clips
    L = np.log1p(rain)
    k, r = 4, 14  # frames apart, largest shift searched
    S = L.shape[-1]
    a_in = (slice(r, S - r), slice(r, S - r))
    tested = 0
    for i in range(len(L)):
        a, b = L[i, 0], L[i, k]
        if (b[a_in] > 0).mean() < 0.1:  # too little rain in the window compared to tell a shift
            continue
        best, best_err = None, np.inf
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                # b(p) ≈ a(p − d): compare b on the interior with a shifted back by d
                err = np.mean((b[a_in] - a[r - dy:S - r - dy, r - dx:S - r - dx]) ** 2)
                if err < best_err:
                    best, best_err = (dx, dy), err
        expected = k * info["velocity"][i]
        assert abs(best[0] - expected[0]) <= 1.5 and abs(best[1] - expected[1]) <= 1.5, (i, best, expected)
        tested += 1
    assert tested >= 8


def test_growth_changes_intensity_but_not_the_first_frame():
    base, _ = generate_rain(4, "train", 32, 10, seed=7, progress=False)
    still, _ = generate_rain(4, "train", 32, 10, seed=7, options={"growth": 0.0}, progress=False)
    strong, _ = generate_rain(4, "train", 32, 10, seed=7, options={"growth": 0.2}, progress=False)
    assert np.array_equal(base[:, 0], still[:, 0]) and np.array_equal(base[:, 0], strong[:, 0])
    d_base = np.abs(np.log1p(base[:, -1]) - np.log1p(still[:, -1])).mean()
    d_strong = np.abs(np.log1p(strong[:, -1]) - np.log1p(still[:, -1])).mean()
    assert 0.0 < d_base < d_strong


def test_no_empty_border_flows_in():
    # fast clips over many frames: by the last frame the upwind edge shows rain that was outside
    # the frame at the start; it rains there as much as anywhere (no empty border came in)
    rain, info = generate_rain(12, "train", 32, 16, seed=11, options={"min_speed": 2.5, "max_speed": 3.0},
                               progress=False)
    upwind, overall = [], []
    for i in range(len(rain)):
        vx, vy = info["velocity"][i]
        last = rain[i, -1]
        if abs(vx) >= abs(vy):
            strip = last[:, :4] if vx > 0 else last[:, -4:]
        else:
            strip = last[:4, :] if vy > 0 else last[-4:, :]
        upwind.append((strip > 0).mean())
        overall.append((last > 0).mean())
    assert np.mean(overall) > 0.1
    assert np.mean(upwind) > 0.5 * np.mean(overall)


# --- coverage and intensity ---------------------------------------------------------------------

@pytest.mark.parametrize("coverage", [(0.2, 0.3), (0.4, 0.5)])
def test_coverage_is_within_the_configured_range_on_average(coverage):
    rain, info = generate_rain(40, "train", 32, 4, seed=13, options={"coverage": list(coverage)}, progress=False)
    assert ((info["coverage"] >= coverage[0]) & (info["coverage"] <= coverage[1])).all()
    wet = (rain > 0).mean()
    assert coverage[0] - 0.05 <= wet <= coverage[1] + 0.05, wet


def test_default_intensities_are_radar_like():
    rain, _ = generate_rain(40, "train", 64, 6, seed=17, progress=False)
    wet = rain >= 0.1
    assert 0.15 <= wet.mean() <= 0.45
    assert 0.1 <= rain.mean() <= 1.0                         # mm/h
    assert 0.04 <= (rain > 1).mean() <= 0.25
    assert 0.002 <= (rain > 5).mean() <= 0.05
    assert rain.max() > 10.0
    med = np.median(rain[wet])
    assert 0.3 <= med <= 2.0


# --- options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, match", [
    ({"coverage": 1.5}, "coverage"),
    ({"coverage": [0.5, 0.2]}, "coverage"),
    ({"coverage": "lots"}, "coverage"),
    ({"max_speed": -1}, "max_speed"),
    ({"min_speed": 2, "max_speed": 1}, "min_speed"),
    ({"growth": "fast"}, "growth"),
    ({"r_max": 0}, "r_max"),
    ({"rotation": 1.0}, "rotation"),
])
def test_bad_options_are_refused(extra, match):
    with pytest.raises(DataError, match=match):
        build_datasets(cfg(extra=extra))


def test_unknown_options_warn_and_too_much_motion_is_refused():
    with pytest.warns(UserWarning, match="max_sped"):
        AdvectedOptions.from_extra({"max_sped": 2})
    with pytest.raises(DataError, match="domain"):
        domain_size(64, 60, AdvectedOptions(max_speed=10, rotation=0.1, shear=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert domain_size(64, 20, AdvectedOptions.from_extra({})) >= 64 + 19 * 3


def test_scalar_coverage_and_zero_clips():
    ds = build_datasets(cfg(val_clips=0, extra={"coverage": 0.3}))
    assert len(ds["val"]) == 0
    assert np.allclose(ds["train"].info["coverage"], 0.3)

"""Radar readers (FMI PGM.gz, MeteoSwiss GIF), the unit transforms, and the HDF5 reader."""
from __future__ import annotations

import gzip
import math
import os
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from transmem.data import DataConfig, DataError, build_datasets
from transmem.data import radar
from transmem.data.radar import (dbz_to_rainrate, fmi_level_to_dbz, fmi_level_to_rainrate, mch_index_to_rainrate,
                                 parse_fmi_time, parse_mch_time, rain_to_unit, rainrate_to_dbz, read_mch_gif,
                                 read_pgm, read_radar_files, unit_to_rain)

h5py = pytest.importorskip("h5py")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fmi_dir(shared_data) -> Path:
    d = shared_data / "radar" / "fmi" / "pgm"
    if not d.is_dir():
        pytest.skip(f"FMI radar data absent ({d})")
    return d


@pytest.fixture(scope="module")
def mch_dir(shared_data) -> Path:
    d = shared_data / "radar" / "mch"
    if not d.is_dir():
        pytest.skip(f"MeteoSwiss radar data absent ({d})")
    return d


def _files(d: Path, pattern: str) -> list[Path]:
    return sorted(d.glob(pattern))


def _link_event(src_files: list[Path], dest: Path, shuffle_names: bool = False) -> list[Path]:
    """Symlink files into ``dest``; with shuffle_names, prefix each name with a random number so
    that name order (and directory order) differ from time order."""
    dest.mkdir(parents=True)
    prefixes = list(range(len(src_files)))
    random.Random(3).shuffle(prefixes)
    out = []
    for k, f in zip(prefixes, src_files):
        name = f"{k:02d}_{f.name}" if shuffle_names else f.name
        (dest / name).symlink_to(f)
        out.append(dest / name)
    return out


def _pgm_gz(path: Path, a: np.ndarray) -> Path:
    h, w = a.shape
    path.write_bytes(gzip.compress(b"P5\n# test\n%d %d\n255\n" % (w, h) + a.astype(np.uint8).tobytes()))
    return path


# ------------------------------------------------------------------ unit transforms (by hand)
def test_fmi_levels_to_dbz_and_rain_by_hand():
    assert fmi_level_to_dbz(64) == 0.0
    assert fmi_level_to_dbz(128) == 32.0
    assert fmi_level_to_dbz(0) == -32.0
    # v = 128 -> 32 dBZ -> Z = 10^3.2 = 1584.89 -> R = (Z / 223)^(1 / 1.53) = 3.60299 mm/h, worked
    # out by hand once and written down (the library's value is checked against it, not against
    # the same formula computed here); 0 dBZ -> Z = 1 -> R = 223^(-1 / 1.53) = 0.029185 mm/h
    assert float(dbz_to_rainrate(32.0)) == pytest.approx(3.60299, abs=1e-4)
    r = fmi_level_to_rainrate(np.array([0, 64, 128, 255], dtype=np.uint8))
    assert r[0] == 0.0  # the lowest level (-32 dBZ) is no rain
    assert r[1] == pytest.approx(0.029185, abs=1e-5)
    assert r[2] == pytest.approx(3.60299, abs=1e-4)
    assert math.isnan(r[3])  # 255 = no data
    # other Z-R coefficients
    assert float(dbz_to_rainrate(20.0, a=200.0, b=1.6)) == pytest.approx((100.0 / 200.0) ** (1 / 1.6), rel=1e-5)


def test_mch_index_to_rain_by_hand():
    i = np.array([0, 1, 72, 100, 250, 251, 254, 255], dtype=np.uint8)
    r = mch_index_to_rainrate(i)
    assert r[0] == 0 and r[1] == 0 and r[5] == 0 and r[6] == 0
    assert math.isnan(r[7])
    # the palette gives 5-minute totals (mm); the rate is 12 times that (pysteps: "[mm/5min]")
    assert r[2] == pytest.approx(12 * (10 ** ((72 - 71.5) / 20) / 316) ** (1 / 1.5), rel=1e-5)
    assert r[2] == pytest.approx(12 * 0.022398, rel=1e-4)
    assert r[3] == pytest.approx(12 * 0.192106, rel=1e-4)
    assert r[4] == pytest.approx(12 * (10 ** ((250 - 71.5) / 20) / 316) ** (1 / 1.5), rel=1e-5)
    assert np.all(np.diff(mch_index_to_rainrate(np.arange(2, 251))) > 0)


def test_round_trips_and_log_scaling():
    dbz = np.linspace(-10, 60, 71, dtype=np.float32)
    np.testing.assert_allclose(rainrate_to_dbz(dbz_to_rainrate(dbz)), dbz, atol=1e-4)
    r = np.array([0.0, 0.1, 1.0, 9.0, 50.0, 100.0], dtype=np.float32)
    x = rain_to_unit(r)
    assert x[0] == 0.0 and x[-1] == pytest.approx(1.0)
    assert x[3] == pytest.approx(math.log10(10) / math.log10(101), rel=1e-6)  # R = 9 mm/h
    np.testing.assert_allclose(unit_to_rain(x), r, rtol=1e-5, atol=1e-6)
    assert rain_to_unit(500.0) == pytest.approx(1.0)  # clipped above R_max
    assert rain_to_unit(-1.0) == 0.0
    assert rain_to_unit(9.0, r_max=9.0) == pytest.approx(1.0)
    np.testing.assert_allclose(unit_to_rain(rain_to_unit(r, 50.0), 50.0), np.minimum(r, 50.0), rtol=1e-5, atol=1e-6)
    assert math.isinf(float(rainrate_to_dbz(0.0)))


def test_time_parsing():
    assert parse_fmi_time("201609281445_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz") == datetime(2016, 9, 28, 14, 45)
    assert parse_fmi_time("07_201609281445_fmi.pgm.gz") == datetime(2016, 9, 28, 14, 45)
    assert parse_fmi_time("fmi.pgm.gz") is None
    assert parse_fmi_time("201613281445.pgm.gz") is None  # month 13
    # yy=15, jjj=135 (15 May), 15:45
    assert parse_mch_time("AQC151351545F_00005.801.gif") == datetime(2015, 5, 15, 15, 45)
    # 2016 is a leap year: day 193 = 11 July; the event crosses midnight
    assert parse_mch_time("AQC161932355V_00005.801.gif") == datetime(2016, 7, 11, 23, 55)
    assert parse_mch_time("AQC161940000V_00005.801.gif") == datetime(2016, 7, 12, 0, 0)
    assert parse_mch_time("AQC153671545F_00005.801.gif") is None  # day 367
    assert parse_mch_time("foo.gif") is None


# ------------------------------------------------------------------ real FMI / MeteoSwiss files
def test_fmi_native_frames_and_mask(fmi_dir):
    files = _files(fmi_dir / "20160928", "*.pgm.gz")[:3]
    assert len(files) == 3
    raw = read_pgm(files[0])
    assert raw.shape == (1226, 760) and raw.dtype == np.uint8
    vals, mask = read_radar_files(files, "fmi", size=None)
    assert vals.shape == (3, 1, 1226, 760) and vals.dtype == np.float16
    assert mask.shape == (3, 1, 1226, 760) and mask.dtype == bool
    np.testing.assert_array_equal(mask[0, 0], raw != 255)
    assert 0.05 < (~mask[0]).mean() < 0.6  # outside the radar coverage
    assert vals.min() >= 0 and vals.max() <= 1
    assert np.all(vals[0, 0][~mask[0, 0]] == 0)
    expect = rain_to_unit(fmi_level_to_rainrate(raw))
    np.testing.assert_allclose(vals[0, 0][mask[0, 0]].astype(np.float32), expect[mask[0, 0]], atol=1e-3)
    # a pixel at level 128, if any, maps to log10(1 + 3.603) / log10(101)
    ys, xs = np.nonzero(raw == 128)
    if len(ys):
        assert float(vals[0, 0, ys[0], xs[0]]) == pytest.approx(math.log10(1 + 3.60299) / math.log10(101), abs=1e-3)


def test_mch_native_frames_and_mask(mch_dir):
    files = _files(mch_dir / "20150515", "*.gif")[:2]
    idx = read_mch_gif(files[0])
    assert idx.shape == (640, 710) and idx.dtype == np.uint8
    vals, mask = read_radar_files(files, "mch", size=None)
    assert vals.shape == (2, 1, 640, 710)
    np.testing.assert_array_equal(mask[0, 0], idx != 255)
    expect = rain_to_unit(mch_index_to_rainrate(idx))
    np.testing.assert_allclose(vals[0, 0][mask[0, 0]].astype(np.float32), expect[mask[0, 0]], atol=1e-3)
    assert np.all(vals[0, 0][idx < 2] == 0)


def test_area_average_downsampling_with_mask():
    # 4x4 field -> 2x2: every output pixel is the mean over its valid 2x2 block
    r = np.array([[1, 3, 0, 0], [5, 7, 0, np.nan], [np.nan, np.nan, 2, 2], [np.nan, 4, 2, 2]], dtype=np.float32)
    from transmem.data.clips import fit_masked
    v, m = fit_masked(np.nan_to_num(r)[None, None], np.isfinite(r)[None, None], 2)
    np.testing.assert_allclose(v[0, 0], [[4.0, 0.0], [0.0, 2.0]])
    np.testing.assert_array_equal(m[0, 0], [[True, True], [False, True]])  # 1 of 4 valid -> invalid


def test_fmi_sorted_by_time_not_names(fmi_dir, tmp_path):
    src = _files(fmi_dir / "20160928", "*.pgm.gz")[:6]
    _link_event(src, tmp_path / "ev", shuffle_names=True)
    names = sorted(os.listdir(tmp_path / "ev"))
    assert [n.split("_", 1)[1] for n in names] != [f.name for f in src]  # name order is not time order
    cfg = DataConfig(name="radar_fmi", path=str(tmp_path), frames=6, size=16, split=(1, 0, 0))
    ds = build_datasets(cfg)
    assert len(ds["train"]) == 1
    got = ds["train"][0]["frames"].numpy()
    want, _ = read_radar_files(src, "fmi", size=16)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_mch_sorted_across_midnight(mch_dir, tmp_path):
    src = _files(mch_dir / "20160711", "*.gif")
    times = [parse_mch_time(f.name) for f in src]
    assert times == sorted(times)
    i = times.index(datetime(2016, 7, 12, 0, 0))
    pick = src[i - 3:i + 1]  # 23:45 .. 00:00 (the last file of the event)
    _link_event(pick, tmp_path / "night", shuffle_names=True)
    ds = build_datasets(DataConfig(name="radar_mch", path=str(tmp_path / "night"), frames=4, size=8, split=(1, 0, 0)))
    want, wmask = read_radar_files(pick, "mch", size=8)
    item = ds["train"][0]
    np.testing.assert_array_equal(item["frames"].numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(item["mask"].numpy(), wmask)


def test_gap_splits_sequence(mch_dir, tmp_path):
    src = _files(mch_dir / "20150515", "*.gif")[:8]
    _link_event(src[:3] + src[4:], tmp_path / "gap")  # 15:55 missing
    ds = build_datasets(DataConfig(name="radar_mch", path=str(tmp_path), frames=3, size=8, split=(1, 0, 0)))
    clips = ds["train"].clips
    assert sorted({n for n, _ in clips}) == ["gap#0", "gap#1"]
    assert clips == [("gap#0", 0), ("gap#1", 0), ("gap#1", 1)]  # no clip crosses the gap
    # an explicit gap limit larger than the hole keeps one sequence
    ds = build_datasets(DataConfig(name="radar_mch", path=str(tmp_path), frames=3, size=8, split=(1, 0, 0),
                                   extra={"max_gap_minutes": 15}))
    assert {n for n, _ in ds["train"].clips} == {"gap"}


def test_mch_event_split_disjoint(mch_dir):
    cfg = DataConfig(name="radar_mch", path=str(mch_dir), frames=4, stride=4, size=8, extra={"max_frames": 8})
    ds = build_datasets(cfg)
    ev = {k: set(v.events) for k, v in ds.items()}
    assert ev == {"train": {"20150515"}, "val": {"20160711"}, "test": {"20170131"}}  # chronological
    seqs = {k: {n for n, _ in v.clips} for k, v in ds.items()}
    assert not (seqs["train"] & seqs["val"]) and not (seqs["train"] & seqs["test"]) and not (seqs["val"] & seqs["test"])
    for k in ds:
        assert len(ds[k]) == 2
        item = ds[k][1]
        assert item["frames"].shape == (4, 1, 8, 8) and item["mask"].shape == (4, 1, 8, 8)
        assert str(item["frames"].dtype) == "torch.float32" and str(item["mask"].dtype) == "torch.bool"
        assert 0 <= float(item["frames"].min()) and float(item["frames"].max()) <= 1


def test_fmi_two_events_need_explicit_splits(fmi_dir):
    base = dict(name="radar_fmi", path=str(fmi_dir), frames=3, size=8, extra={"max_frames": 3})
    with pytest.raises(DataError, match=r"only 2 events .*extra\.splits") as ei:
        build_datasets(DataConfig(**base))
    assert "\n" not in str(ei.value)
    ds = build_datasets(DataConfig(**dict(base, extra={"max_frames": 3, "splits": {"train": ["20160928"],
                                                                                      "test": ["20170509"]}})))
    assert ds["train"].events == ["20160928"] and ds["test"].events == ["20170509"] and len(ds["val"]) == 0
    ds = build_datasets(DataConfig(**dict(base, split=(1, 0, 1))))
    assert set(ds["train"].events) | set(ds["test"].events) == {"20160928", "20170509"}
    with pytest.raises(DataError, match="both"):
        build_datasets(DataConfig(**dict(base, extra={"max_frames": 3, "splits": {"train": ["20160928"],
                                                                                   "val": ["20160928"]}})))
    with pytest.raises(DataError, match="not one of"):
        build_datasets(DataConfig(**dict(base, extra={"max_frames": 3, "splits": {"train": ["nope"]}})))


def test_radar_cache_hit_does_not_decode(mch_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = DataConfig(name="radar_mch", path=str(mch_dir), frames=3, size=8, cache_dir=str(cache),
                     extra={"max_frames": 4})
    first = build_datasets(cfg)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (entry / "frames.npy").exists() and (entry / "mask.npy").exists() and (entry / "index.json").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left

    def boom(path):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(radar, "read_mch_gif", boom)
    second = build_datasets(cfg)
    assert isinstance(second["train"].prep.data, np.memmap)
    for k in ("train", "val", "test"):
        assert len(first[k]) == len(second[k])
        a, b = first[k][0], second[k][0]
        np.testing.assert_array_equal(a["frames"].numpy(), b["frames"].numpy())
        np.testing.assert_array_equal(a["mask"].numpy(), b["mask"].numpy())
    # a config that changes the prepared frames needs a new decode
    with pytest.raises(AssertionError, match="decoded although cached"):
        build_datasets(DataConfig(**dict(cfg.to_dict(), size=16)))


def test_all_nodata_and_broken_radar(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    for k in range(3):
        _pgm_gz(ev / f"20200101{k:02d}00_fmi.pgm.gz", np.full((6, 5), 255))
    with pytest.raises(DataError, match="all no-data"):
        build_datasets(DataConfig(name="radar_fmi", path=str(tmp_path), frames=2, size=4, split=(1, 0, 0)))
    _pgm_gz(ev / "2020010100" "00_fmi.pgm.gz", np.full((6, 5), 80))
    bad = ev / "202001010100_fmi.pgm.gz"
    bad.write_bytes(gzip.compress(b"P5\n5 6\n255\n" + bytes(10)))
    with pytest.raises(DataError, match="truncated PGM") as ei:
        build_datasets(DataConfig(name="radar_fmi", path=str(tmp_path), frames=2, size=4, split=(1, 0, 0)))
    assert str(ei.value).startswith(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        build_datasets(DataConfig(name="radar_mch", path=str(tmp_path / "empty"), frames=2))
    with pytest.raises(DataError, match="no valid time"):
        (tmp_path / "empty" / "radar.gif").write_bytes(b"GIF89a")
        build_datasets(DataConfig(name="radar_mch", path=str(tmp_path / "empty"), frames=2))


def test_mixed_sizes_and_too_few_frames(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    _pgm_gz(ev / "202001010000_fmi.pgm.gz", np.full((6, 5), 80))
    _pgm_gz(ev / "202001010005_fmi.pgm.gz", np.full((6, 5), 90))
    with pytest.raises(DataError, match="too few frames"):
        build_datasets(DataConfig(name="radar_fmi", path=str(tmp_path), frames=3, size=4, split=(1, 0, 0)))
    _pgm_gz(ev / "202001010010_fmi.pgm.gz", np.full((7, 5), 90))
    with pytest.raises(DataError, match="mixed frame sizes"):
        build_datasets(DataConfig(name="radar_fmi", path=str(tmp_path), frames=3, size=4, split=(1, 0, 0)))


# ------------------------------------------------------------------ HDF5 / NetCDF4
def test_hdf5_scale_offset_nodata(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 5000, size=(6, 8, 8)).astype(np.int16)
    raw[:, 0, 0] = -9999
    raw[2, 3, 4] = 900  # 9 mm/h
    f = tmp_path / "event1.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("precip", data=raw)
        h.create_dataset("lat", data=np.zeros(8))
    cfg = DataConfig(name="hdf5", path=str(f), frames=6, size=8, split=(1, 0, 0),
                     extra={"dataset": "/precip", "scale": 0.01, "offset": 0, "nodata": -9999})
    item = build_datasets(cfg)["train"][0]
    x, m = item["frames"].numpy(), item["mask"].numpy()
    assert x.shape == (6, 1, 8, 8)
    assert not m[:, 0, 0, 0].any() and m[:, 0, 1:, :].all()
    assert x[2, 0, 3, 4] == pytest.approx(math.log10(10) / math.log10(101), abs=1e-3)
    np.testing.assert_allclose(x[:, 0][m[:, 0]], rain_to_unit(raw * 0.01)[m[:, 0]], atol=1e-3)


def test_hdf5_cf_attributes_dbz_and_single_frames(tmp_path):
    # NetCDF4-style: scale_factor / add_offset / _FillValue attributes, values in dBZ, time on axis 2
    raw = np.full((4, 4, 3), 128, dtype=np.uint8)
    raw[0, 0, :] = 255
    f = tmp_path / "dbz.nc"
    with h5py.File(f, "w") as h:
        d = h.create_dataset("DBZH", data=raw)
        d.attrs["scale_factor"] = 0.5
        d.attrs["add_offset"] = -32.0
        d.attrs["_FillValue"] = np.uint8(255)
    ds = build_datasets(DataConfig(name="hdf5", path=str(f), frames=3, size=None, resize="none", split=(1, 0, 0),
                                   extra={"units": "dBZ", "time_axis": 2}))
    item = ds["train"][0]
    assert item["frames"].shape == (3, 1, 4, 4)
    assert not item["mask"][:, 0, 0, 0].any()
    assert float(item["frames"][1, 0, 2, 2]) == pytest.approx(math.log10(1 + 3.60299) / math.log10(101), abs=1e-3)
    # a folder of 2-D files is one event, ordered by the time in the names
    ev = tmp_path / "single" / "ev"
    ev.mkdir(parents=True)
    for k, t in enumerate([2, 0, 1]):
        with h5py.File(ev / f"x{k}_t{t}.h5", "w") as h:
            h.create_dataset("r", data=np.full((4, 4), float(t), dtype=np.float32))
    ds = build_datasets(DataConfig(name="hdf5", path=str(tmp_path / "single"), frames=3, size=4, split=(1, 0, 0),
                                   extra={"time_regex": r"_t(\d+)"}))
    x = ds["train"][0]["frames"].numpy()
    np.testing.assert_allclose(x[:, 0, 0, 0], rain_to_unit(np.array([0.0, 1.0, 2.0])), atol=1e-3)


def test_hdf5_errors(tmp_path):
    f = tmp_path / "two.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("a", data=np.zeros((3, 4, 4)))
        h.create_dataset("b", data=np.zeros((3, 4, 4)))
    with pytest.raises(DataError, match="set extra.dataset"):
        build_datasets(DataConfig(name="hdf5", path=str(f), frames=2, size=4, split=(1, 0, 0)))
    with pytest.raises(DataError, match="no dataset '/c'"):
        build_datasets(DataConfig(name="hdf5", path=str(f), frames=2, size=4, split=(1, 0, 0), extra={"dataset": "/c"}))
    g = tmp_path / "nan.h5"
    with h5py.File(g, "w") as h:
        h.create_dataset("r", data=np.full((3, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="all no-data"):
        build_datasets(DataConfig(name="hdf5", path=str(g), frames=2, size=4, split=(1, 0, 0)))
    n3 = tmp_path / "classic.nc"
    n3.write_bytes(b"CDF\x01" + bytes(100))
    with pytest.raises(DataError, match="NetCDF3"):
        build_datasets(DataConfig(name="hdf5", path=str(n3), frames=2, size=4, split=(1, 0, 0)))

"""The silent misreads of issue 19 made impossible: radar files are read by what they declare
(ODIM ``what`` groups, KNMI calibration), an undeclared fill value is refused, and image stacks are
sequences. Every file is built here."""
import math

import numpy as np
import pytest
from PIL import Image

from transmem.data import DataConfig, DataError, build_datasets
from transmem.data.conventions import MP_A, MP_B, undeclared_fill
from transmem.data.inputs import read_input_frames
from transmem.data.radar import dbz_to_rainrate, rain_to_unit

h5py = pytest.importorskip("h5py", reason="HDF5 files need h5py (pip install 'transmem[radar]')")


def _x(rate):
    return float(rain_to_unit(np.float32(rate)))


def _knmi(path, raw, formula="GEO=0.010000*PV+0.000000", param=b"PRECIP_[MM]"):
    with h5py.File(path, "w") as f:
        img = f.create_group("image1")
        img.attrs["image_geo_parameter"] = param
        img.create_dataset("image_data", data=raw)
        cal = img.create_group("calibration")
        cal.attrs["calibration_formulas"] = formula.encode()
        cal.attrs["calibration_missing_data"] = np.array([65535], dtype=np.int64)
        cal.attrs["calibration_out_of_image"] = np.array([65535], dtype=np.int64)
        f.create_group("visualisation1").create_dataset("color_palette", data=np.zeros((256, 3), np.uint8))


def test_knmi_calibration_is_read_not_guessed(tmp_path):
    raw = np.full((8, 8), 65535, dtype=np.uint16)   # 75 % out of image / no data, as in the real file
    raw[:4, :4] = 0
    raw[1, 1] = 50                                   # 0.5 mm in 5 minutes = 6 mm/h
    _knmi(tmp_path / "RAD_NL25_RAC_5min_202001011200.h5", raw)
    x, m = read_input_frames(tmp_path / "RAD_NL25_RAC_5min_202001011200.h5", return_mask=True)
    assert m[0, 0].sum() == 16 and m[0, 0, :4, :4].all()
    assert x[0, 0, 1, 1] == pytest.approx(_x(6.0), abs=2e-3)
    assert x[0, 0, 0, 0] == 0 and x[0, 0][m[0, 0]].max() < _x(7)
    # the reflectivity product: GEO = 0.5 PV - 32 dBZ, rain rate by Marshall-Palmer
    raw = np.full((4, 4), 128, dtype=np.uint16)
    _knmi(tmp_path / "dbz.h5", raw, "GEO=0.500000*PV+-32.000000", b"REFLECTIVITY_[DBZ]")
    x = read_input_frames(tmp_path / "dbz.h5")
    assert x[0, 0, 0, 0] == pytest.approx(_x(dbz_to_rainrate(32.0, MP_A, MP_B)), abs=2e-3)


def _odim(path, raw, quantity=b"DBZH", gain=0.5, offset=-32.0, nodata=255.0, undetect=0.0, level="data"):
    with h5py.File(path, "w") as f:
        f.attrs["Conventions"] = b"ODIM_H5/V2_2"
        w = f.create_group("what")
        w.attrs["object"] = b"COMP"
        ds = f.create_group("dataset1")
        d = ds.create_group("data1")
        d.create_dataset("data", data=raw)
        what = (d if level == "data" else ds).create_group("what")
        for k, v in dict(quantity=quantity, gain=gain, offset=offset, nodata=nodata, undetect=undetect,
                         startdate=b"20200101", starttime=b"120000", enddate=b"20200101",
                         endtime=b"130000").items():
            what.attrs[k] = v
        q = f.create_group("dataset2").create_group("data1")
        q.create_dataset("data", data=np.ones_like(raw))
        q.create_group("what").attrs["quantity"] = b"QIND"


def test_odim_gain_offset_nodata_undetect_quantity(tmp_path):
    raw = np.zeros((6, 6), dtype=np.uint8)          # undetect: measured, no rain
    raw[:, :2] = 255                                 # no data
    raw[3, 3] = 120                                  # 0.5 * 120 - 32 = 28 dBZ
    _odim(tmp_path / "odim.h5", raw)
    x, m = read_input_frames(tmp_path / "odim.h5", return_mask=True)
    assert not m[0, 0, :, :2].any() and m[0, 0, :, 2:].all()
    r28 = (10 ** 2.8 / 200.0) ** (1 / 1.6)           # Marshall-Palmer, as pysteps
    assert x[0, 0, 3, 3] == pytest.approx(_x(r28), abs=2e-3) and r28 == pytest.approx(2.05, abs=0.01)
    assert x[0, 0, 0, 2] == 0
    # the same at the dataset level, as a rain rate, and an hourly accumulation
    raw2 = np.where(raw == 120, 40, raw).astype(np.uint8)
    _odim(tmp_path / "rate.h5", raw2, b"RATE", 0.1, 0.0, level="dataset")
    x = read_input_frames(tmp_path / "rate.h5")
    assert x[0, 0, 3, 3] == pytest.approx(_x(4.0), abs=2e-3)
    _odim(tmp_path / "acrr.h5", raw2, b"ACRR", 0.1, 0.0)
    assert read_input_frames(tmp_path / "acrr.h5")[0, 0, 3, 3] == pytest.approx(_x(4.0), abs=2e-3)  # 4 mm in 1 h
    with pytest.raises(DataError, match="no ODIM dataset with quantity TH"):
        read_input_frames(tmp_path / "rate.h5", quantity="TH")


def test_undeclared_fill_is_refused_with_the_option_to_set(tmp_path):
    raw = np.full((3, 8, 8), 65535, dtype=np.uint16)
    raw[:, :4, :4] = 7
    f = tmp_path / "composite.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("precip", data=raw)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="hdf5", path=str(f), frames=2, size=4, split=(1, 0, 0)))
    msg = str(e.value)
    assert "\n" not in msg and "75% of the pixels" in msg and "65535" in msg and "extra.nodata" in msg
    ds = build_datasets(DataConfig(name="hdf5", path=str(f), frames=2, size=8, split=(1, 0, 0),
                                   extra={"nodata": 65535, "scale": 0.1}))
    item = ds["train"][0]
    assert item["mask"][0, 0].sum() == 16
    assert float(item["frames"][0, 0, 0, 0]) == pytest.approx(_x(0.7), abs=2e-3)
    # a value the user says is real is kept
    ok = build_datasets(DataConfig(name="hdf5", path=str(f), frames=2, size=8, split=(1, 0, 0),
                                   extra={"nodata": [], "r_max": 100000}))
    assert bool(ok["train"][0]["mask"].all())
    # a field in other units is not read as rain
    with h5py.File(tmp_path / "t.h5", "w") as h:
        h.create_dataset("t2m", data=np.full((3, 4, 4), 280.0, np.float32)).attrs["units"] = "K"
    with pytest.raises(DataError, match=r"/t2m is in 'K', not a rain rate.*name: xarray"):
        read_input_frames(tmp_path / "t.h5")
    # the detector: dtype extremes and usual fill constants, not ordinary values
    assert undeclared_fill(np.array([-9999.0] * 10 + [1.0] * 90), np.float32)[:2] == (-9999.0, 0.1)
    assert undeclared_fill(np.array([0.0] * 90 + [2.0] * 10), np.float32) is None
    assert undeclared_fill(np.array([127] * 10 + [1] * 90, dtype=np.int8), np.int8)[0] == 127


def test_tiff_stack_and_animated_png_are_sequences(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8)
    frames = [Image.fromarray(a) for a in stack]
    frames[0].save(tmp_path / "cells.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    for name in ("cells.tif", "anim.png"):
        x = read_input_frames(tmp_path / name)
        assert x.shape == (12, 1, 16, 16)
        np.testing.assert_allclose(x[:, 0], stack / 255.0, atol=1e-6)
    # a folder of stacks: several sequences, one event each, split between train and test
    root = tmp_path / "stacks"
    root.mkdir()
    for k in range(3):
        frames[0].save(root / f"s{k}.tif", save_all=True, append_images=frames[1:1 + 5 + k])
    ds = build_datasets(DataConfig(name="frames", path=str(root), frames=4, size=16, stride=1,
                                   split=(2, 0, 1)))
    seqs = {n for n, _ in ds["train"].clips} | {n for n, _ in ds["test"].clips}
    assert seqs == {"stacks/s0.tif", "stacks/s1.tif", "stacks/s2.tif"}
    assert len(ds["train"]) + len(ds["test"]) == (6 - 3) + (7 - 3) + (8 - 3)
    assert not set(ds["train"].events) & set(ds["test"].events)
    with pytest.raises(DataError, match="image stack"):
        read_input_frames(root)


def test_tifffile_16bit_stack(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="16-bit TIFF stacks through tifffile (transmem[io])")
    a = (np.arange(5 * 8 * 8, dtype=np.uint16).reshape(5, 8, 8) * 100)
    tifffile.imwrite(tmp_path / "s.tif", a)
    x = read_input_frames(tmp_path / "s.tif")
    assert x.shape == (5, 1, 8, 8)
    # the data's precision is kept (float16, not 8 bits), scaled by the largest value it holds
    np.testing.assert_allclose(x[:, 0], a / a.max(), rtol=1e-3, atol=1e-4)
    assert len(np.unique(x)) == 5 * 8 * 8
    # 12-bit data in 16-bit pages: scaled by what it holds, or by a declared white level
    b = (np.arange(5 * 8 * 8, dtype=np.uint16).reshape(5, 8, 8) * 12)  # up to 3828
    tifffile.imwrite(tmp_path / "b.tif", b)
    np.testing.assert_allclose(read_input_frames(tmp_path / "b.tif")[:, 0], b / 3828, rtol=1e-3, atol=1e-4)
    x = read_input_frames(tmp_path / "b.tif", white=4095)
    np.testing.assert_allclose(x[:, 0], b / 4095, rtol=1e-3, atol=1e-4)
    # read_stack alone (no white) still names the key for dark 16-bit data
    from transmem.data.stacks import read_stack
    with pytest.warns(UserWarning, match="set extra.white: 3828"):
        read_stack(tmp_path / "b.tif")


def test_image_in_npy_is_refused(tmp_path):
    np.save(tmp_path / "rgb.npy", np.zeros((48, 64, 3), dtype=np.uint8))
    np.save(tmp_path / "gray.npy", np.zeros((48, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"one RGB image \(H, W, 3\), not frames"):
        read_input_frames(tmp_path / "rgb.npy")
    with pytest.raises(DataError, match="is one image, not frames"):
        read_input_frames(tmp_path / "gray.npy")
    np.save(tmp_path / "clip.npy", np.zeros((6, 48, 64, 3), dtype=np.uint8))
    assert read_input_frames(tmp_path / "clip.npy").shape == (6, 1, 48, 64)
    assert math.isfinite(float(read_input_frames(tmp_path / "clip.npy").sum()))


def test_predict_reads_an_hdf5_input_with_the_models_file_conventions(tmp_path):
    """An HDF5 model's reader declares how predict reads its input: the card's scale applies, the
    training's ``max_frames`` does not; an input in another format is read by its extension."""
    from transmem.predict import read_forecast_input
    raw = np.random.default_rng(0).uniform(0, 4, (5, 8, 8)).astype(np.float32)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("precip", data=raw)
    data = {"name": "hdf5", "resize": "none", "extra": {"dataset": "/precip", "scale": 5.0, "units": "mm/h",
                                                        "max_frames": 2}}
    frames, mask, grid = read_forecast_input(tmp_path / "r.h5", data, 1, 64)
    assert frames.shape == (5, 1, 8, 8) and frames.dtype == np.float32 and mask.all() and grid is None
    np.testing.assert_allclose(frames[:, 0], rain_to_unit(raw * 5.0), atol=2e-3)
    plain, _, _ = read_forecast_input(tmp_path / "r.h5", {"name": "npy", "resize": "none", "extra": data["extra"]}, 1, 64)
    np.testing.assert_allclose(plain[:, 0], rain_to_unit(raw), atol=2e-3)  # not an HDF5 model: the file's own values
    np.save(tmp_path / "r.npy", (raw / 4).astype(np.float32))
    frames, _, _ = read_forecast_input(tmp_path / "r.npy", data, 1, 64, last=3)
    np.testing.assert_allclose(frames[:, 0], raw[-3:] / 4, atol=1e-6)


def test_predict_asks_the_models_reader_first_and_falls_back_to_the_extension(tmp_path):
    from transmem.data import registry
    from transmem.predict import read_forecast_input
    seen = []

    def read_tens(path, cfg, last):  # a format of its own: ".tens", one value a line
        seen.append((cfg.size, cfg.resize, last))
        if not str(path).endswith(".tens"):
            return None
        v = np.loadtxt(path, dtype=np.float32)[-last:] / 10
        return v.reshape(-1, 1, 1, 1) * np.ones((1, 1, 4, 4), np.float32), np.ones((len(v), 1, 4, 4), bool), None

    registry.register_dataset("test_tens", read_input=read_tens)(lambda cfg: {})
    try:
        (tmp_path / "a.tens").write_text("1\n2\n3\n4\n")
        frames, mask, grid = read_forecast_input(tmp_path / "a.tens", {"name": "test_tens"}, 1, 4, last=2)
        assert seen == [(4, "resize", 2)] and grid is None
        np.testing.assert_allclose(frames[:, 0, 0, 0], [0.3, 0.4])
        np.save(tmp_path / "a.npy", np.full((3, 6, 6), 255, np.uint8))
        frames, _, _ = read_forecast_input(tmp_path / "a.npy", {"name": "test_tens"}, 1, 4)
        assert frames.shape == (3, 1, 4, 4) and frames.min() == 1  # not its format: by the extension
        with pytest.raises(DataError, match="unsupported input format '.tens'"):
            read_forecast_input(tmp_path / "a.tens", {"name": "npy"}, 1, 4)  # a reader that declares nothing
    finally:
        registry._DATASETS.pop("test_tens", None)
        registry._READ_INPUT.pop("test_tens", None)


def test_odim_grid_spacing_is_read_from_the_where_group(tmp_path):
    """STEPS' perturbations are physical: an ODIM composite's pixel size comes from its ``where``
    group (xscale, yscale in m), scaled by the crop and resize; a file without it declares none."""
    from transmem.data.registry import pixel_km
    (tmp_path / "odim").mkdir()
    _odim(tmp_path / "odim" / "a.h5", np.zeros((30, 40), np.uint8))
    with h5py.File(tmp_path / "odim" / "a.h5", "a") as f:
        where = f.require_group("where")
        where.attrs.update({"xscale": 2000.0, "yscale": 2000.0, "xsize": 40, "ysize": 30})
    cfg = dict(name="hdf5", path=str(tmp_path / "odim"))
    assert pixel_km(DataConfig(**cfg, size=10)) == pytest.approx(30 * 2.0 / 10)  # the central 30x30, to 10x10
    assert pixel_km(DataConfig(**cfg, size=None)) == pytest.approx(2.0)
    assert pixel_km(DataConfig(**cfg, size=10, extra={"crop": [0, 0, 20, 20]})) == pytest.approx(4.0)
    assert pixel_km(DataConfig(**cfg, size=10, extra={"aspect": "stretch"})) is None  # 6 km down, 8 km across
    _odim(tmp_path / "plain.h5", np.zeros((30, 40), np.uint8))  # no where group
    assert pixel_km(DataConfig(name="hdf5", path=str(tmp_path / "plain.h5"), size=10)) is None

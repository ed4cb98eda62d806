"""The shared radar files read right: OPERA (ODIM HDF5) and MRMS (GRIB2) against pysteps'
importers, FMI and MeteoSwiss against pysteps' too, and OPERA / MRMS through pretrain -> predict."""
import json
import os

import numpy as np
import pytest
import yaml

from transmem.cli import main
from transmem.data import DataConfig, build_datasets
from transmem.data.inputs import read_input_frames
from transmem.data.radar import rain_to_unit

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, real radar files): not in make test-fast

R_BIG = 1000.0  # mm/h: no clipping in the comparisons (OPERA holds a few artefacts over 1000)
MRMS_BOX = {"latitude": [250, 750], "longitude": [3750, 4750]}  # 34 % no coverage, 14 % rain > 0.5 mm/h


def _importers():
    pytest.importorskip("pyproj", reason="pysteps' radar importers need pyproj (transmem[test])")
    try:
        from pysteps.io import importers
    except Exception as e:  # pysteps absent (transmem[nowcast]) or broken
        pytest.skip(f"pysteps' importers unavailable: {e}")
    return importers


def _same(ours_x, ours_mask, ref_rate, atol=2e-3):
    """Mask equal to pysteps' NaNs, values equal in the log scale (float16 storage)."""
    assert np.array_equal(ours_mask, np.isfinite(ref_rate))
    ref = rain_to_unit(np.where(np.isfinite(ref_rate), ref_rate, 0), R_BIG)
    np.testing.assert_allclose(ours_x[ours_mask], ref[ours_mask], atol=atol)


@pytest.fixture(scope="module")
def radar(shared_data):
    return shared_data / "radar"


def test_opera_odim_matches_pysteps(radar):
    pytest.importorskip("h5py", reason="HDF5 needs transmem[radar]")
    importers = _importers()
    f = sorted((radar / "opera" / "20180824").glob("*.hdf"))[5]
    x, m = read_input_frames(f, return_mask=True, r_max=R_BIG)
    ref, _, meta = importers.import_opera_hdf5(str(f))
    assert meta["unit"] == "mm/h" and x.shape == (1, 1, 2200, 1900)
    assert 0.4 < m.mean() < 0.6  # the field outside the radars' reach is no data, not rain
    _same(x[0, 0], m[0, 0], ref)
    assert (ref[m[0, 0]] == 0).mean() > 0.5  # ODIM undetect is read as 0 mm/h


class _EccodesGrib:
    """The few pygrib calls pysteps' ``import_mrms_grib`` makes, over the ecCodes bindings that
    cfgrib uses. pygrib bundles a second ecCodes, which crashes a process that loads both; with
    this stand-in pysteps' own code (grid corners, -3 -> NaN, orientation, units) reads the file."""

    def __init__(self, path):
        import eccodes
        self._ec = eccodes
        with open(path, "rb") as fh:
            self._h = eccodes.codes_grib_new_from_file(fh)

    def rewind(self):
        pass

    def read(self, n):
        return [self]

    def __getitem__(self, key):
        return self._ec.codes_get(self._h, key)

    @property
    def values(self):
        v = self._ec.codes_get_values(self._h)
        return v.reshape(self["Nj"], self["Ni"])

    @property
    def projparams(self):  # pygrib's for an oblate regular lat/lon grid; pysteps swaps a, b for the
        return {"proj": "cyl", "a": 6378160.0, "b": 6356775.0}  # shapeOfTheEarth code (2: IAU76)


@pytest.mark.slow
def test_mrms_grib_matches_pysteps(radar, monkeypatch):
    pytest.importorskip("cfgrib", reason="GRIB needs transmem[grib]")
    importers = _importers()
    from types import SimpleNamespace
    from transmem.data.gridded import read_grid
    f = sorted((radar / "mrms" / "20190610").glob("*.grib2"))[0]
    monkeypatch.setattr(importers, "pygrib", SimpleNamespace(open=_EccodesGrib), raising=False)
    monkeypatch.setattr(importers, "PYGRIB_IMPORTED", True)
    full, _, meta = importers.import_mrms_grib(str(f), window_size=1)
    assert meta["unit"] == "mm/h" and full.shape == (3500, 7000)
    ref = full[250:750, 3750:4750]
    x, m, grid = read_grid(f, {"name": "radar_mrms", "resize": "none", "extra": {"isel": MRMS_BOX}}, None,
                           r_max=R_BIG)
    assert grid.units == "mm/h" and grid.y_name == "latitude" and len(grid.times) == 1
    assert str(grid.times[0]) == "2019-06-10T00:00:00"
    assert 0.2 < (~m).mean() < 0.5  # -3 (no coverage) is masked
    _same(x[0, 0], m[0, 0], ref)
    np.testing.assert_allclose(grid.y[[0, -1]], [54.995 - 0.01 * 250, 54.995 - 0.01 * 749], atol=1e-4)


def test_mrms_without_its_nodata_is_refused(radar):
    pytest.importorskip("cfgrib", reason="GRIB needs transmem[grib]")
    f = sorted((radar / "mrms" / "20190610").glob("*.grib2"))[0]
    from transmem.data import DataError
    with pytest.raises(DataError, match=r"hold -3 \(a negative value in a rain field\).*extra.nodata"):
        build_datasets(DataConfig(name="xarray", path=str(f), frames=1, size=16, split=(1, 0, 0),
                                  extra={"quantity": "rain", "isel": MRMS_BOX}))


def test_fmi_and_meteoswiss_match_pysteps(radar):
    importers = _importers()
    fmi = sorted((radar / "fmi" / "pgm" / "20160928").glob("*.pgm.gz"))[10]
    x, m = read_input_frames(fmi, return_mask=True, r_max=R_BIG)
    dbz, _, meta = importers.import_fmi_pgm(str(fmi), gzipped=True)
    assert meta["unit"] == "dBZ"
    rate = (10 ** (dbz / 10) / meta["zr_a"]) ** (1 / meta["zr_b"])
    rate[dbz == -32.0] = 0.0  # level 0 (-32 dBZ, "no echo") is taken as no rain, by design
    _same(x[0, 0], m[0, 0], rate)
    mch = sorted((radar / "mch" / "20160711").glob("*.gif"))[10]
    x, m = read_input_frames(mch, return_mask=True, r_max=R_BIG)
    mm, _, meta = importers.import_mch_gif(str(mch), "AQC", "mm", 5.0)
    assert meta["unit"] == "mm" and meta["accutime"] == 5.0
    _same(x[0, 0], m[0, 0], mm * 12.0)  # 5-minute totals -> mm/h


def _tiny(tmp_path, data):
    cfg = tmp_path / f"{data['name']}.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": data,
        "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
        "train": {"steps": 2, "batch_size": 2, "t_in": 3, "progress": False},
        "eval": {"split": "train", "thresholds": [0.5]},
    }))
    return cfg


def test_opera_pretrain_and_predict(radar, tmp_path):
    pytest.importorskip("h5py", reason="HDF5 needs transmem[radar]")
    opera = radar / "opera" / "20180824"
    cfg = _tiny(tmp_path, {"name": "hdf5", "path": str(opera), "size": 16, "frames": 5, "stride": 4,
                           "split": [1, 0, 0]})
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["contingency"]["0.5"]["hits"] is not None
    pred = tmp_path / "in"
    pred.mkdir()
    for f in sorted(opera.glob("*.hdf"))[-4:]:
        os.symlink(f, pred / f.name)
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(pred),
                 "--out", str(tmp_path / "p"), "--format", "both"]) == 0
    mmh = np.load(tmp_path / "p" / "prediction_mmh.npy")
    assert mmh.shape == (2, 1, 16, 16) and mmh.min() >= 0 and mmh.max() <= 100
    xr = pytest.importorskip("xarray", reason="netCDF output needs transmem[io]")
    with xr.open_dataset(tmp_path / "p" / "forecast.nc") as nc:
        assert nc["forecast"].attrs["units"] == "mm/h"
        obs = nc["observed"].values
        assert np.isnan(obs).any() and np.nanmin(obs) >= 0  # no data stays missing, never rain


@pytest.mark.slow
def test_mrms_pretrain_and_predict(radar, tmp_path):
    pytest.importorskip("cfgrib", reason="GRIB needs transmem[grib]")
    files = sorted((radar / "mrms" / "20190610").glob("*.grib2"))
    cfg = _tiny(tmp_path, {"name": "radar_mrms", "path": str(radar / "mrms"), "size": 16, "frames": 5,
                           "stride": 1, "split": [1, 0, 0], "extra": {"isel": MRMS_BOX, "max_frames": 6}})
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    pred = tmp_path / "in"
    pred.mkdir()
    for f in files[-3:]:
        os.symlink(f, pred / f.name)
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(pred),
                 "--out", str(tmp_path / "p")]) == 0
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(tmp_path / "p" / "forecast.nc") as nc:
        assert nc["forecast"].attrs["units"] == "mm/h"
        assert str(nc["time"].values[0])[:19] == "2019-06-10T01:12:00"  # 2 minutes after the last frame
        np.testing.assert_allclose(nc["lead_time"].values, [2.0, 4.0])
        assert nc["latitude"].size == 16 and 47 < float(nc["latitude"].min()) < float(nc["latitude"].max()) < 53
        assert np.isnan(nc["observed"].values).any()


def test_pysteps_reader_agrees_with_ours_on_fmi_and_opera(radar):
    _importers()
    small = dict(frames=4, size=32, split=(1, 0, 0))
    fmi = radar / "fmi" / "pgm" / "20160928"
    ours = build_datasets(DataConfig(name="radar_fmi", path=str(fmi), **small, extra={"max_frames": 4}))["train"][0]
    theirs = build_datasets(DataConfig(name="pysteps", path=str(fmi), **small, extra={
        "importer": "fmi_pgm", "importer_kwargs": {"gzipped": True}, "max_frames": 4,
        "time_regex": r"^(\d{12})_", "time_format": "%Y%m%d%H%M"}))["train"][0]
    assert np.array_equal(ours["mask"].numpy(), theirs["mask"].numpy())
    np.testing.assert_allclose(ours["frames"].numpy(), theirs["frames"].numpy(), atol=1e-3)
    pytest.importorskip("h5py", reason="HDF5 needs transmem[radar]")
    opera = radar / "opera" / "20180824"
    ours = build_datasets(DataConfig(name="hdf5", path=str(opera), **small, extra={"max_frames": 4}))["train"][0]
    theirs = build_datasets(DataConfig(name="pysteps", path=str(opera), **small, extra={
        "importer": "opera_hdf5", "max_frames": 4, "time_regex": r"_(\d{14})\.hdf$",
        "time_format": "%Y%m%d%H%M%S"}))["train"][0]
    assert np.array_equal(ours["mask"].numpy(), theirs["mask"].numpy())
    np.testing.assert_allclose(ours["frames"].numpy(), theirs["frames"].numpy(), atol=1e-3)

"""Weather grids end to end: a CF netCDF temperature series made here trains a tiny model through
the `xarray` reader (normalisation fitted on the train split, stored on the card), and `predict`
writes CF-netCDF in kelvin at the input's coordinates and times, with the forecast pictures."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from transmem.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

xr = pytest.importorskip("xarray", reason="the xarray reader needs transmem[io]")
pytest.importorskip("h5netcdf", reason="netCDF4 files through h5netcdf (transmem[io])")
pd = pytest.importorskip("pandas", reason="xarray's time index")


def _t2m(path, n=48, start="2021-03-01", engine="h5netcdf", seed=0):
    rng = np.random.default_rng(seed)
    t = pd.date_range(start, periods=n, freq="3h")
    lat = np.linspace(50.0, 42.5, 16)
    lon = np.linspace(5.0, 12.5, 16)
    base = 275 + 8 * np.sin(np.arange(n) / 4.0)[:, None, None] + np.linspace(-3, 3, 16)[None, :, None]
    vals = (base + rng.normal(0, 0.3, (n, 16, 16))).astype(np.float32)
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), vals, {"units": "K", "standard_name": "air_temperature"})},
                    coords={"time": t, "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
                            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"})})
    ds.to_netcdf(path, engine=engine)
    return vals, t, lat, lon


def test_reader_sorts_time_splits_gaps_crops_and_concatenates(tmp_path):
    from transmem.data import DataConfig, build_datasets, physical_units
    folder = tmp_path / "series"
    folder.mkdir()
    a, ta, lat, lon = _t2m(folder / "b_later.nc", n=12, start="2021-03-10", engine="scipy")   # netCDF3
    b, tb, _, _ = _t2m(folder / "a_first.nc", n=12, start="2021-03-01", seed=1)                # netCDF4
    cfg = DataConfig(name="xarray", path=str(folder), frames=4, size=8, resize="none", split=(1, 0, 0),
                     extra={"isel": {"lat": [2, 10]}, "sel": {"lon": [12.5, 8.0]}, "blocks": 1})
    ds = build_datasets(cfg)
    # two gap-free sequences (the 9-day gap splits them), each one event, in time order
    assert ds["train"].events == ["20210301T0000/b000", "20210310T0000/b000"]
    norm = cfg.extra["normalization"]
    assert norm["units"] == "K" and norm["kind"] == "minmax" and cfg.extra["quantity"] == "field"
    cols = (lon >= 8.0) & (lon <= 12.5)
    both = np.concatenate([b, a])[:, 2:10][:, :, cols]
    span = both.max() - both.min()
    assert norm["lo"] == pytest.approx(both.min() - 0.1 * span, rel=1e-6)
    assert norm["hi"] == pytest.approx(both.max() + 0.1 * span, rel=1e-6)
    first = ds["train"][0]["frames"].numpy()[:, 0]
    units = physical_units(cfg)
    np.testing.assert_allclose(units.to_physical(first), b[:4, 2:10][:, :, cols], atol=0.02)
    assert units.name == "K"


def test_normalisation_is_fitted_on_train_only(tmp_path):
    from transmem.data import DataConfig, build_datasets
    vals, *_ = _t2m(tmp_path / "t.nc", n=40)
    vals[30:] += 50.0  # a warm end of the series: test split only
    xr.open_dataset(tmp_path / "t.nc", engine="h5netcdf").load().assign(
        t2m=lambda d: d.t2m.copy(data=vals)).to_netcdf(tmp_path / "t2.nc", engine="h5netcdf")
    cfg = DataConfig(name="xarray", path=str(tmp_path / "t2.nc"), frames=4, size=16, split=(0.75, 0, 0.25),
                     extra={"normalize": "meanstd", "blocks": 4})
    ds = build_datasets(cfg)
    n = cfg.extra["normalization"]
    assert n["kind"] == "meanstd" and n["fitted_on"] == "train"
    assert n["mean"] == pytest.approx(float(vals[:30].mean()), abs=1e-3)
    assert n["std"] == pytest.approx(float(vals[:30].std()), abs=1e-3)
    assert ds["test"].events == ["20210301T0000/b003"]


def test_temperature_pretrain_predict_netcdf_round_trip(tmp_path, capsys):
    vals, times, lat, lon = _t2m(tmp_path / "t2m.nc")
    cfg = tmp_path / "t2m.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"name": "xarray", "path": str(tmp_path / "t2m.nc"), "size": 16, "frames": 6,
                 "split": [0.6, 0.2, 0.2], "extra": {"variable": "t2m", "blocks": 5}},
        "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
        "train": {"steps": 2, "batch_size": 2, "t_in": 4, "progress": False},
        "eval": {"split": "test", "thresholds": [275.0]},
    }))
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    norm = card["data"]["extra"]["normalization"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["extra"]["normalization"] == norm and norm["units"] == "K"
    # evaluate the model on its config (no normalisation in it): the card's is used, not refitted
    assert main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--config", str(cfg),
                 "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["mse"] == pytest.approx(json.loads((tmp_path / "run" / "metrics.json").read_text())["mse"], rel=1e-5)
    # predict from the last 10 frames of the series, as a new file
    last = tmp_path / "recent.nc"
    xr.open_dataset(tmp_path / "t2m.nc", engine="h5netcdf").isel(time=slice(-10, None)).to_netcdf(last)
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(last),
                 "--out", str(tmp_path / "pred"), "--baselines"]) == 0
    out = tmp_path / "pred"
    assert {"forecast.nc", "forecast.png", "forecast.gif"} <= {p.name for p in out.iterdir()}
    assert not (out / "prediction.npy").exists()  # netcdf is the default for an input with coordinates
    with xr.open_dataset(out / "forecast.nc") as f:
        assert f["forecast"].attrs["units"] == "K" and f["observed"].attrs["units"] == "K"
        np.testing.assert_allclose(f["lat"].values, lat)
        np.testing.assert_allclose(f["lon"].values, lon)
        assert f["lat"].attrs["units"] == "degrees_north"
        step = np.timedelta64(3, "h")
        expect = np.array([times[-1].to_datetime64() + k * step for k in (1, 2)], dtype="datetime64[ns]")
        np.testing.assert_array_equal(f["time"].values, expect)
        np.testing.assert_allclose(f["lead_time"].values, [180.0, 360.0])
        np.testing.assert_array_equal(f["time_observed"].values, times[-4:].values)
        np.testing.assert_allclose(f["observed"].values, vals[-4:], atol=1e-3)
        # persistence, in kelvin: the last observed frame at every lead
        pers = f["forecast_persistence"].values
        np.testing.assert_allclose(pers, np.repeat(vals[-1:], 2, 0), atol=1e-3)
        fc = f["forecast"].values
        assert fc.shape == (2, 16, 16) and norm["lo"] - 1e-3 <= fc.min() and fc.max() <= norm["hi"] + 1e-3
    assert Image.open(out / "forecast.png").size[0] >= 600
    gif = Image.open(out / "forecast.gif")
    assert gif.n_frames == 4 + 2 and gif.size[0] >= 300
    # --format npy gives the arrays instead
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(last),
                 "--out", str(tmp_path / "npy"), "--format", "npy"]) == 0
    k = np.load(tmp_path / "npy" / "prediction_K.npy")
    assert k.shape == (2, 1, 16, 16) and not (tmp_path / "npy" / "forecast.nc").exists()
    # an input with a gap in time: the forecast starts from the run after the gap
    full = xr.open_dataset(tmp_path / "t2m.nc", engine="h5netcdf").load()
    xr.concat([full.isel(time=slice(-20, -12)), full.isel(time=slice(-5, None))], "time").to_netcdf(tmp_path / "gap.nc")
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(tmp_path / "gap.nc"),
                 "--out", str(tmp_path / "gap")]) == 0
    assert "1 gap(s) in time; forecasting from the 5 frames" in capsys.readouterr().out
    with xr.open_dataset(tmp_path / "gap" / "forecast.nc") as f:
        np.testing.assert_array_equal(f["time_observed"].values, times[-4:].values)

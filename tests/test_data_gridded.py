"""The `xarray` reader's options and refusals, zarr stores, and a model's fitted normalisation
carried to new data (`data.adopt_fitted`)."""
import numpy as np
import pytest

from transmem.data import DataConfig, DataError, adopt_fitted, build_datasets, physical_units

xr = pytest.importorskip("xarray", reason="the xarray reader needs transmem[io]")
pd = pytest.importorskip("pandas", reason="xarray's time index")


def _wind(n=24, levels=(850.0, 500.0), seed=0):
    rng = np.random.default_rng(seed)
    t = pd.date_range("2022-01-01", periods=n, freq="1h")
    u = rng.normal(0, 5, (n, len(levels), 10, 12)).astype(np.float32)
    u[:, 1:] += 30.0  # the upper level blows harder
    return xr.Dataset({"u": (("time", "level", "y", "x"), u, {"units": "m s-1"}),
                       "v": (("time", "level", "y", "x"), -u, {"units": "m s-1"})},
                      coords={"time": t, "level": list(levels), "y": np.arange(10.0), "x": np.arange(12.0)}), u


def test_options_select_level_and_refusals(tmp_path):
    pytest.importorskip("h5netcdf", reason="netCDF4 through h5netcdf (transmem[io])")
    ds, u = _wind()
    ds.to_netcdf(tmp_path / "w.nc", engine="h5netcdf")
    base = dict(name="xarray", path=str(tmp_path / "w.nc"), frames=4, size=8, resize="none", split=(1, 0, 0))
    with pytest.raises(DataError, match=r"set extra.variable: 2 gridded variables \(u .*, v .*\)"):
        build_datasets(DataConfig(**base))
    with pytest.raises(DataError, match=r"expected time and two spatial dimensions .*extra.select"):
        build_datasets(DataConfig(**base, extra={"variable": "u"}))
    with pytest.raises(DataError, match="no variable 'w'"):
        build_datasets(DataConfig(**base, extra={"variable": "w"}))
    cfg = DataConfig(**base, extra={"variable": "u", "select": {"level": 510}, "isel": {"y": [1, 9], "x": [2, 10]},
                                    "blocks": 1})
    item = build_datasets(cfg)["train"][0]
    back = physical_units(cfg).to_physical(item["frames"].numpy()[:, 0])
    np.testing.assert_allclose(back, u[:4, 1, 1:9, 2:10], atol=0.05)  # the nearest level: 500 hPa
    assert item["mask"].all()
    # an undeclared fill value in a field is refused as in a radar file
    bad = u[:, 0].copy()
    bad[:, :5] = -9999.0
    xr.Dataset({"u": (("time", "y", "x"), bad)}, coords={"time": ds.time}).to_netcdf(tmp_path / "f.nc", engine="h5netcdf")
    with pytest.raises(DataError, match=r"50% of the pixels of u hold -9999 .*extra.nodata"):
        build_datasets(DataConfig(**dict(base, path=str(tmp_path / "f.nc"))))
    cfg = DataConfig(**dict(base, path=str(tmp_path / "f.nc")), extra={"nodata": -9999, "blocks": 1})
    item = build_datasets(cfg)["train"][0]
    assert not item["mask"][:, 0, :5].any() and item["mask"][:, 0, 5:].all()


def test_zarr_store_and_adopted_normalisation(tmp_path):
    pytest.importorskip("zarr", reason="zarr stores need transmem[zarr]")
    ds, u = _wind(levels=(850.0,))
    ds.isel(level=0).to_zarr(tmp_path / "w.zarr", mode="w", consolidated=False)
    cfg = DataConfig(name="xarray", path=str(tmp_path / "w.zarr"), frames=4, size=10, split=(1, 0, 0),
                     extra={"variable": "u", "normalize": "meanstd", "blocks": 2})
    ds_ = build_datasets(cfg)
    norm = cfg.extra["normalization"]
    square = u[:, 0, :, 1:11]  # resize: the central 10 x 10 square of the 10 x 12 grid
    assert norm["mean"] == pytest.approx(float(square.mean()), abs=1e-3) and norm["units"] == "m s-1"
    assert len(ds_["train"]) == 2 * (12 - 4 + 1)
    # new data (stronger wind) evaluated by the model keeps the model's normalisation
    ds2, u2 = _wind(levels=(850.0,), seed=1)
    ds2["u"] = ds2["u"] * 2
    ds2.isel(level=0).to_zarr(tmp_path / "w2.zarr", mode="w", consolidated=False)
    new = DataConfig(name="xarray", path=str(tmp_path / "w2.zarr"), frames=4, size=10, split=(1, 0, 0),
                     extra={"variable": "u", "blocks": 1})
    assert adopt_fitted(new, cfg.to_dict()) == ["normalization"]
    assert adopt_fitted(DataConfig(name="radar_fmi"), cfg.to_dict()) == []
    x = build_datasets(new)["train"][0]["frames"].numpy()[:, 0]
    assert new.extra["normalization"] == norm
    expect = np.clip(0.5 + (2 * u2[:4, 0, :, 1:11] - norm["mean"]) / (8 * norm["std"]), 0, 1)
    np.testing.assert_allclose(x, expect, atol=2e-3)

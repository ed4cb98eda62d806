"""Whole fields of any size from a model trained on crops: padding to the patch size, seamless
tiles, and `transmem predict --native` on a full-size MeteoSwiss composite."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from transmem.fullfield import FullFieldForecaster, pad_to_multiple, ramp, tile_starts
from transmem.models import create_model
from transmem.training import ForecastModule, SamplingSchedule

MCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "radar" / "mch" / "20170131"


def advection_module(seed=0):
    torch.manual_seed(seed)
    m = create_model("advection", num_layers=1, hidden=4, filter_size=3, patch_size=4, motion_prior="lucas_kanade",
                     prior_radius=2, prior_levels=2)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape))
    return ForecastModule(m, SamplingSchedule(kind="none", t_in=3, frames=6)).eval()


def test_padding_to_the_patch_size_is_cropped_back():
    x = torch.rand(1, 6, 1, 30, 41)
    padded, h, w = pad_to_multiple(x, 4)
    assert padded.shape[-2:] == (32, 44) and (h, w) == (30, 41)
    assert torch.equal(padded[..., :30, :41], x) and torch.equal(padded[..., 31, :41], x[..., 29, :])
    module = advection_module()
    y = module.rollout(x)  # 41 is not a multiple of the patch: padded inside, cropped back
    assert y.shape == (1, 3, 1, 30, 41) and torch.isfinite(y).all()


def test_a_model_that_reads_teachers_at_inference_pads_to_every_patch_size():
    """A bank_read TMU on patch 2 reading a patch-4 teacher: whole frames of 30x41 are padded to
    32x44 (4 divides both), so the teacher can roll out beside it, and cropped back."""
    from transmem.transfer.builder import build_tmu
    torch.manual_seed(0)
    teacher = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    tmu, bank = build_tmu("convlstm", {"num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 2},
                          [teacher], ["t4"], {"mode": "bank_read"})
    module = ForecastModule(tmu, SamplingSchedule(kind="none", t_in=3, frames=6), bank=bank).eval()
    assert module.patch_size == 4
    x = torch.rand(1, 6, 1, 30, 41)
    with torch.no_grad():
        y = module.rollout(x)
        padded = pad_to_multiple(x, 4)[0]
        ref = tmu(padded, t_in=3, bank=bank.rollout(padded, 3))[:, 2:, ..., :30, :41]
    assert y.shape == (1, 3, 1, 30, 41) and torch.allclose(y, ref)


def test_tiles_cover_the_field_and_blend_without_seams():
    assert tile_starts(100, 40, 8, 4) == [0, 32, 60] and tile_starts(30, 40, 8, 4) == [0]
    w = ramp(40, 32, 100, 8, "cpu", torch.float32)
    assert w[0] < 0.1 and w[8:32].eq(1).all() and w[-1] < 0.1
    identity = FullFieldForecaster(type("Id", (), {"t_in": 3, "device": torch.device("cpu"),
                                                   "rollout": lambda self, f: f[:, 3:] * 2})(), 4, tile=32, overlap=8)
    x = torch.rand(1, 6, 1, 70, 90)
    assert torch.allclose(identity.rollout(x), x[:, 3:] * 2, atol=1e-6)  # a pointwise model: tiles are exact
    module = advection_module()
    whole = module.rollout(x)
    tiled = FullFieldForecaster(module, 4, tile=48, overlap=16).rollout(x)
    assert tiled.shape == whole.shape
    # a recurrent model sees less context in a tile, so tiles differ slightly, but without a seam:
    # the largest jump between neighbouring columns is no larger than in the untiled forecast
    jump = lambda y: (y[..., 1:] - y[..., :-1]).abs().amax().item()  # noqa: E731
    assert jump(tiled) <= jump(whole) * 1.5 + 1e-3
    assert (tiled - whole).abs().mean() < 0.05


@pytest.mark.slow  # predict on a whole radar composite
@pytest.mark.skipif(not MCH.is_dir(), reason="../shared/data/radar/mch is absent")
def test_predict_native_writes_the_forecast_on_the_composites_own_grid(tmp_path):
    from transmem.cli import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: advected_rain, size: 32, frames: 6, train_clips: 8, val_clips: 2, test_clips: 2}\n"
                   "model: {name: advection, num_layers: 1, hidden: 4, filter_size: 3, patch_size: 4,"
                   " motion_prior: lucas_kanade, prior_radius: 2, prior_levels: 2}\n"
                   "train: {steps: 2, batch_size: 2, t_in: 3, progress: false}\n")
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "fc"
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(MCH), "--out", str(out),
                 "--native", "--leads", "12", "--tile", "256", "--format", "npy"]) == 0
    pred = np.load(out / "prediction.npy")
    assert pred.shape == (12, 1, 640, 710)  # the composite's own 1 km grid, 12 leads
    assert np.isfinite(pred).all() and pred.max() > 0
    assert (out / "forecast.png").is_file()


@pytest.mark.skipif(not MCH.is_dir(), reason="../shared/data/radar/mch is absent")
def test_predict_native_netcdf_carries_the_composites_coordinates(tmp_path):
    """CF-netCDF on the MeteoSwiss CCS4 grid: 1 km cell centres in metres (Swiss coordinates,
    north up), the projection as a grid mapping, and valid times after the last input file's."""
    pytest.importorskip("pysteps")
    pytest.importorskip("pyproj")
    xr = pytest.importorskip("xarray")
    from transmem.cli import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: advected_rain, size: 32, frames: 6, train_clips: 8, val_clips: 2, test_clips: 2}\n"
                   "model: {name: advection, num_layers: 1, hidden: 4, filter_size: 3, patch_size: 4}\n"
                   "train: {steps: 1, batch_size: 2, t_in: 3, progress: false}\n")
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "fc"
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(MCH), "--out", str(out),
                 "--native", "--leads", "3"]) == 0
    with xr.open_dataset(out / "forecast.nc") as ds:
        fc = ds["forecast"]
        assert fc.shape == (3, 640, 710)
        x, y = ds["x"].values, ds["y"].values
        assert np.allclose(np.diff(x), 1000) and np.allclose(np.diff(y), -1000)  # 1 km, north up
        assert x[0] == 255500 and y[0] == 479500  # the CCS4 grid's first cell centre
        assert ds["x"].attrs["standard_name"] == "projection_x_coordinate"
        crs = ds[fc.attrs["grid_mapping"]] if "grid_mapping" in fc.attrs else ds["crs"]
        assert "somerc" in crs.attrs["proj4"] and crs.attrs["crs_wkt"]
        from transmem.data.radar import parse_mch_time
        last = max(parse_mch_time(p.name) for p in MCH.iterdir() if p.suffix == ".gif")
        first_lead = np.datetime64(last + datetime.timedelta(minutes=5), "ns")
        assert ds["time"].values[0] == first_lead and np.allclose(ds["lead_time"].values, [5, 10, 15])

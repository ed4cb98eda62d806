"""The reference-nowcast registry: every registered name swept through the same interface checks
(as pysteps' interface tests sweep ``get_method``), the fair inflow per kind of data, and a
baseline added from a file outside transmem reaching the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from transmem.baselines import (BaselineUnavailable, create_baseline, default_baselines, get_method, list_baselines,
                                register_baseline)
from transmem.data import DataConfig
from transmem.data.radar import rain_to_unit, rain_units

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

T, T_IN, N = 10, 6, 64
RAIN = rain_units(DataConfig(name="radar_mch"))


def rain_clips(v=(1.0, 1.5), seeds=(0, 1)) -> torch.Tensor:
    """(B, T, 1, N, N) log-scaled rain: Gaussian cells up to ~30 mm/h translating at v px/frame."""
    yy, xx = np.mgrid[0:N, 0:N].astype(np.float64)
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        cy, cx, s, a = rng.uniform(10, 54, 6), rng.uniform(10, 54, 6), rng.uniform(3, 8, 6), rng.uniform(2, 30, 6)
        rate = np.stack([sum(a[j] * np.exp(-((yy - cy[j] - v[0] * k) ** 2 + (xx - cx[j] - v[1] * k) ** 2) / (2 * s[j] ** 2))
                             for j in range(6)) for k in range(T)])
        out.append(rain_to_unit(np.where(rate > 0.05, rate, 0.0)))
    return torch.from_numpy(np.stack(out)[:, :, None].astype(np.float32))


def make(name, units=RAIN, **kw):
    try:
        return create_baseline(name, T_IN, units, **kw)
    except BaselineUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list_baselines())
def test_every_registered_baseline_keeps_the_interface(name):
    clips = rain_clips()
    model = make(name)
    pred = model.rollout(clips)
    assert pred.shape == (2, T - T_IN, 1, N, N) and pred.dtype == torch.float32
    assert torch.isfinite(pred).all() and pred.min() >= 0 and pred.max() <= 1
    future = clips.clone()
    future[:, T_IN:] = torch.rand_like(future[:, T_IN:])  # the frames to forecast are never read
    assert torch.equal(model.rollout(future), pred)
    assert torch.equal(make(name).rollout(clips), pred)  # a function of the clip (ensembles are seeded)
    if name != "persistence":  # moving rain: every nowcast beats persistence at the first lead
        err = ((pred[:, 0] - clips[:, T_IN]) ** 2).mean()
        assert err < ((clips[:, T_IN - 1] - clips[:, T_IN]) ** 2).mean()


@pytest.mark.parametrize("name", ["sprog", "sprog_log", "anvil", "steps_mean"])
def test_a_cascade_nowcast_of_a_single_wet_pixel_is_persistence(name):
    """pysteps' wet-area percentile mask fails on a field with one wet pixel (an IndexError on
    small tiles): the cascade nowcasts keep the last frame there, as they do without rain."""
    clips = torch.zeros(1, T, 1, 32, 32)
    for k in range(T):
        clips[0, k, 0, 10 + k, 12] = float(rain_to_unit(3.0))  # one pixel of 3 mm/h, moving
    pred = make(name).rollout(clips)
    assert torch.equal(pred, clips[:, T_IN - 1:T_IN].expand_as(pred))


def test_a_cascade_nowcast_whose_ar2_fit_is_nonstationary_falls_back_to_ar1():
    """Sparse rain (a 32x32 OPERA tile in a mixture's training; STEPS there): pysteps' AR(2) fit of
    the cascade's correlations fails as nonstationary; the nowcast runs with AR(1) instead."""
    make("sprog")  # skips without pysteps
    from transmem.baselines.registry import cascade_call, pysteps_call, quiet_pysteps
    db = np.full((3, 32, 32), -15.0)
    db[0, 21, 17], db[1, 16, 17], db[1, 21, 17], db[2, 21, 17] = -8.33, -8.55, -8.0, -8.57
    velocity = np.zeros((2, 32, 32))
    steps = quiet_pysteps().nowcasts.get_method("steps")
    opts = dict(precip_thr=-10.0, n_cascade_levels=4, n_ens_members=2, seed=0, mask_method="incremental",
                kmperpixel=1.0, timestep=5.0, vel_pert_method=None)
    with pytest.raises(RuntimeError, match="nonstationary"):  # the input does trip pysteps
        pysteps_call(steps, db, velocity, 3, ar_order=2, **opts)
    out = cascade_call(steps, db, velocity, 3, ar_order=2, **opts)
    assert np.shape(out) == (2, 3, 32, 32) and np.isfinite(out).all()
    assert np.array_equal(out, pysteps_call(steps, db[-2:], velocity, 3, ar_order=1, **opts))


def _degenerate_fields() -> dict:
    """Crops of a composite that give a cascade nothing to fit (each made pysteps raise before)."""
    wet = float(rain_to_unit(5.0))
    fields = {k: torch.zeros(1, T, 1, 32, 32) for k in ("uniform", "two_pixels", "edge", "last_only")}
    fields["uniform"][:] = wet                     # S-PROG: non-finite correlations; STEPS: an empty reduction
    fields["two_pixels"][..., 10, 10:12] = wet     # a singular correlation matrix
    fields["edge"][..., :16] = wet                 # a straight rain edge: singular too
    fields["last_only"][:, T_IN - 1, :, 5:9, 5:9] = wet  # rain in the last input frame only
    return fields


@pytest.mark.parametrize("name", ["sprog", "sprog_log", "anvil", "steps_mean"])
def test_a_cascade_nowcast_of_a_degenerate_field_advects_the_last_frame(name):
    """Where pysteps finds nothing to fit (registry.DEGENERATE), the nowcast is the last frame
    advected along the motion field instead of an error that ends a mixture's training."""
    for kind, clips in _degenerate_fields().items():
        pred = make(name).rollout(clips)
        assert pred.shape == (1, T - T_IN, 1, 32, 32) and torch.isfinite(pred).all(), kind
        assert pred.min() >= 0 and pred.max() <= 1, kind
    uniform = _degenerate_fields()["uniform"]  # no motion in a uniform field: the last frame, kept
    assert torch.allclose(make(name).rollout(uniform), uniform[:, T_IN - 1:T_IN].expand(1, T - T_IN, 1, 32, 32),
                          atol=1e-6)


@pytest.mark.parametrize("name", list_baselines())
def test_every_registered_baseline_runs_on_a_field_that_is_not_rain(name):
    clips = 0.5 + 0.5 * rain_clips()  # e.g. a temperature: no zero, no rain threshold
    pred = make(name, None).rollout(clips)
    assert torch.isfinite(pred).all() and pred.shape == (2, T - T_IN, 1, N, N)


def test_default_lists_follow_the_kind_of_data():
    assert default_baselines(None)[:2] == ["persistence", "extrapolation"]
    assert not any(get_method(n).rain_only for n in default_baselines(None))
    rain = default_baselines(RAIN)
    assert {"sprog", "sprog_log", "anvil", "steps_mean"} <= set(rain)
    assert "linda" not in rain and "linda" in list_baselines()  # slow: by name only
    with pytest.raises(ValueError, match="choose one of persistence"):
        get_method("nope")


def test_inflow_is_zero_for_rain_and_the_last_frame_otherwise():
    assert make("extrapolation").inflow == "zero"
    assert make("extrapolation", None).inflow == "last"
    assert make("extrapolation", None, inflow="zero").inflow == "zero"
    # a warm field moving in from the left: zero inflow would paint the bottom of the range
    yy, xx = np.mgrid[0:N, 0:N]
    frames = np.stack([0.6 + 0.3 * np.sin((xx - 2 * k) / 9.0) * np.cos(yy / 13.0) for k in range(T)])
    clips = torch.from_numpy(frames[None, :, None].astype(np.float32))
    persistence = ((clips[:, T_IN - 1] - clips[:, T_IN]) ** 2).mean()
    fair = ((make("extrapolation", None).rollout(clips)[:, 0] - clips[:, T_IN]) ** 2).mean()
    zero = ((make("extrapolation", None, inflow="zero").rollout(clips)[:, 0] - clips[:, T_IN]) ** 2).mean()
    assert fair <= persistence < zero


def test_steps_mean_options_and_seed_reach_pysteps():
    clips = rain_clips(seeds=(3,))
    two = make("steps_mean", n_ens_members=2).rollout(clips)
    assert not torch.equal(two, make("steps_mean").rollout(clips))  # 2 members, not the default 10
    assert not torch.equal(two, make("steps_mean", n_ens_members=2, seed=5).rollout(clips))
    assert torch.equal(two, make("steps_mean", n_ens_members=2).rollout(clips))


def test_too_few_input_frames_are_refused():
    with pytest.raises(ValueError, match="anvil needs 4 input frames; t_in is 3"):
        create_baseline("anvil", 3, RAIN)


def test_a_registered_function_is_scored_like_any_baseline():
    from transmem.baselines import registry

    @register_baseline("test_mean_of_inputs", default=False)
    def mean_of_inputs(past, n_leads, ctx):
        """The mean of the input frames."""
        return np.repeat(past.mean(axis=0, keepdims=True), n_leads, axis=0)
    try:
        clips = rain_clips()
        pred = create_baseline("test_mean_of_inputs", T_IN).rollout(clips)
        assert torch.allclose(pred, clips[:, :T_IN].mean(1, keepdim=True).expand_as(pred), atol=1e-6)
        assert "test_mean_of_inputs" in list_baselines()
        assert "test_mean_of_inputs" not in default_baselines(RAIN)  # default=False: by name only
    finally:
        registry._BASELINES.pop("test_mean_of_inputs", None)  # other tests see the built-in table


def test_a_plugin_baseline_reaches_evaluate_through_an_entry_point(tmp_path):
    """A package outside transmem adds a baseline by an entry point; `evaluate --baseline` runs it."""
    plugin = tmp_path / "plugin"
    (plugin / "shift_nowcast.py").parent.mkdir()
    (plugin / "shift_nowcast.py").write_text(textwrap.dedent('''
        import numpy as np
        from transmem.baselines import register_baseline

        @register_baseline("half_persistence")
        def half(past, n_leads, ctx):
            """Half the last frame."""
            return np.repeat(0.5 * past[-1:], n_leads, axis=0)
    '''))
    (plugin / "tiny_backbone.py").write_text(textwrap.dedent('''
        from transmem.models import register_model
        from transmem.models.convlstm import ConvLSTM

        @register_model("plugin_convlstm")
        class PluginConvLSTM(ConvLSTM):
            """A backbone from another package."""
    '''))
    (plugin / "ones_reader.py").write_text(textwrap.dedent('''
        from pathlib import Path

        import numpy as np
        import torch
        from transmem.data.registry import register_dataset

        def read_ramp(path, cfg, last):
            """A .ramp file (a format transmem does not know): one brightness a line, a frame each."""
            if Path(path).suffix != ".ramp":
                return None  # read by its extension
            levels = np.array(Path(path).read_text().split(), dtype=np.float32)[-last:]
            frames = levels.reshape(-1, 1, 1, 1) * np.ones((1, cfg.channels, cfg.size, cfg.size), np.float32)
            return frames, np.ones((len(levels), 1, cfg.size, cfg.size), bool), None

        @register_dataset("plugin_ramp", read_input=read_ramp)
        def build(cfg):
            """Clips of a ramp that brightens frame by frame."""
            t = torch.linspace(0, 1, cfg.frames).view(1, -1, 1, 1, 1)
            clips = (t * torch.ones(4, 1, 1, cfg.size, cfg.size)).unbind(0)
            return {k: [{"frames": c} for c in clips] for k in ("train", "val", "test")}
    '''))
    info = plugin / "shift_nowcast-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shift-nowcast\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[transmem.baselines]\nhalf = shift_nowcast\n"
                                           "[transmem.models]\ntiny = tiny_backbone\n"
                                           "[transmem.readers]\nramp = ones_reader\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: flying_digits, size: 16, frames: 6, num_digits: 1, train_clips: 4, val_clips: 2,"
                   " test_clips: 3}\ntrain: {t_in: 3, batch_size: 2, progress: false}\neval: {batch_size: 3}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), *sys.path])}
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "transmem.cli", "evaluate", "--baseline", "half_persistence",
                        "--config", str(cfg), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "half_persistence" and metrics["mse"] > 0
    listing = subprocess.run([sys.executable, "-c", "from transmem.baselines import BASELINES; print(BASELINES)"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert "half_persistence" in listing.stdout
    assert Path(out / "report.md").is_file()
    models = subprocess.run([sys.executable, "-m", "transmem.cli", "models"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert models.returncode == 0 and "plugin_convlstm" in models.stdout
    # the plugin's reader serves evaluate, scored with the plugin's backbone trained on it
    cfg2 = tmp_path / "ramp.yaml"
    cfg2.write_text("data: {name: plugin_ramp, size: 8, frames: 6}\nmodel: {name: plugin_convlstm, num_layers: 1,"
                    " hidden: 4, filter_size: 3, patch_size: 2}\ntrain: {steps: 2, batch_size: 2, t_in: 3,"
                    " progress: false}\neval: {batch_size: 2}\n")
    r = subprocess.run([sys.executable, "-m", "transmem.cli", "pretrain", "--config", str(cfg2), "--out",
                        str(tmp_path / "ramp_run")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((tmp_path / "ramp_run" / "model" / "card.json").read_text())
    assert card["model"] == "plugin_convlstm" and card["data"]["name"] == "plugin_ramp"
    # and predict: the reader declared how it reads an input of its format, found by the registry
    (tmp_path / "in.ramp").write_text("0.9\n0.1\n0.2\n0.3\n0.4\n")
    r = subprocess.run([sys.executable, "-m", "transmem.cli", "predict", "--model", str(tmp_path / "ramp_run" / "model"),
                        "--input", str(tmp_path / "in.ramp"), "--out", str(tmp_path / "fc")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pred = np.load(tmp_path / "fc" / "prediction.npy")
    assert pred.shape == (3, 1, 8, 8) and np.isfinite(pred).all()  # T_out frames at the card's size
    assert (tmp_path / "fc" / "forecast.png").is_file()


def test_a_dataset_can_declare_its_inflow():
    """Generated digits bounce on a black canvas: nothing enters, so the zero inflow is the fair one
    there (measured on the demo's test clips: MSE 54.46 with zero inflow, 55.13 with the last frame)."""
    from transmem import api
    from transmem.config import load_experiment
    from transmem.data import inflow_hint
    digits = load_experiment(base={"data": {"name": "flying_digits", "size": 16, "frames": 6}, "train": {"t_in": 3}})
    assert inflow_hint(digits.data) == "zero" and api.load_baseline("extrapolation", digits).inflow == "zero"
    video = load_experiment(base={"data": {"name": "npy", "path": "x.npy", "size": 16, "frames": 6}, "train": {"t_in": 3}})
    assert inflow_hint(video.data) is None and api.load_baseline("extrapolation", video).inflow == "last"


def test_rain_read_from_a_window_of_its_field_keeps_the_last_frame_at_the_edge():
    """A crop of a composite (or a selection of a gridded file) has its edge inside the scene,
    where rain comes in: zero inflow there made every optical-flow nowcast about 2x worse than
    persistence on tiles of wide rain (MRMS, 32x32 tiles). The whole field keeps zero inflow."""
    from transmem.baselines import baseline_for_data
    from transmem.data import DataConfig, inflow_hint
    assert inflow_hint(DataConfig(name="radar_mch", path="x")) is None
    assert baseline_for_data("extrapolation", 3, DataConfig(name="radar_mch", path="x")).inflow == "zero"
    for name, extra in (("radar_mch", {"crop": [0, 0, 64, 64]}), ("radar_fmi", {"crop": [10, 10, 32, 32]}),
                        ("hdf5", {"crop": [0, 0, 8, 8]}), ("radar_mrms", {"isel": {"latitude": [0, 8]}}),
                        ("xarray", {"sel": {"x": [0, 1]}, "quantity": "rain"})):
        cfg = DataConfig(name=name, path="x", extra=extra)
        assert inflow_hint(cfg) == "last", name
        assert baseline_for_data("sprog", 4, cfg).inflow == "last", name


def test_steps_gets_the_grid_spacing_the_reader_knows():
    """STEPS' perturbations are physical: a 1 km composite area-averaged to 64x64 has ~10 km pixels
    (MeteoSwiss: the 640-pixel side / 64), and the baseline must be told so."""
    from transmem.baselines import baseline_for_data
    from transmem.data import DataConfig, pixel_km
    coarse = DataConfig(name="radar_mch", path="x", size=64)
    assert pixel_km(coarse) == pytest.approx(10.0)
    assert pixel_km(DataConfig(name="radar_mch", path="x", resize="none")) == 1.0
    assert pixel_km(DataConfig(name="radar_fmi", path="x", size=76)) == pytest.approx(10.0)
    assert pixel_km(DataConfig(name="flying_digits")) is None
    try:
        assert baseline_for_data("steps_mean", 4, coarse).kmperpixel == pytest.approx(10.0)
        assert baseline_for_data("steps_mean", 4, {"name": "flying_digits"}).kmperpixel == 1.0
    except BaselineUnavailable as e:
        pytest.skip(str(e))

"""The blend of a model with a baseline: exact weighted mean, per-lead weights, CLI."""
import json

import numpy as np
import pytest
import torch
import yaml

from transmem.baselines import create_baseline
from transmem.blend import BlendForecaster, parse_blend
from transmem.cli import main


class Const(torch.nn.Module):
    """A forecaster that predicts a constant value for every lead."""

    def __init__(self, value, t_in=2):
        super().__init__()
        self.value, self.t_in = value, t_in

    @property
    def device(self):
        return torch.device("cpu")

    def rollout(self, frames):
        b, t, c, h, w = frames.shape
        return torch.full((b, t - self.t_in, c, h, w), float(self.value))


def test_blend_is_the_weighted_mean():
    frames = torch.rand(2, 5, 1, 4, 4)
    out = BlendForecaster(Const(1.0), Const(0.0), 0.25).rollout(frames)
    assert out.shape == (2, 3, 1, 4, 4) and torch.allclose(out, torch.full_like(out, 0.25))
    per_lead = BlendForecaster(Const(1.0), Const(0.0), [0.0, 0.5, 1.0]).rollout(frames)
    assert per_lead[:, :, 0, 0, 0].tolist() == [[0.0, 0.5, 1.0]] * 2
    with pytest.raises(ValueError, match="lead times"):
        BlendForecaster(Const(1.0), Const(0.0), [0.1, 0.2]).rollout(frames)


def test_blend_with_itself_is_the_forecaster_and_t_in_reaches_both():
    frames = torch.rand(2, 6, 1, 8, 8)
    p = create_baseline("persistence", 3)
    blend = BlendForecaster(p, create_baseline("persistence", 3), 0.7)
    assert torch.allclose(blend.rollout(frames), p.rollout(frames), atol=1e-6)
    blend.t_in = 2
    assert blend.a.t_in == blend.b.t_in == 2 and blend.rollout(frames).shape[1] == 4


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), []])
def test_bad_weights_are_refused(weight):
    with pytest.raises(ValueError, match="weight"):
        BlendForecaster(Const(1.0), Const(0.0), weight)


def test_parse_blend():
    assert parse_blend("extrapolation") == ("extrapolation", 0.5)
    assert parse_blend("persistence:0.3") == ("persistence", 0.3)
    for bad in ("persistence:x", "persistence:2"):
        with pytest.raises(ValueError, match="--blend"):
            parse_blend(bad)


TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 16, "val_clips": 4,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 2},
    "train": {"steps": 3, "batch_size": 4, "t_in": 3, "progress": False, "ckpt_every": 3},
    "eval": {"batch_size": 8},
}


@pytest.mark.slow  # evaluate and predict end to end
def test_evaluate_blend_scores_the_weighted_mean(tmp_path, capsys):
    from transmem import api
    from transmem.config import load_experiment
    from transmem.data import build_datasets
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--zoo-name", "m", "--zoo-root", str(tmp_path / "zoo")]) == 0
    out = tmp_path / "blend"
    assert main(["evaluate", "--model", str(tmp_path / "zoo" / "m"), "--blend", "persistence:0.25",
                 "--config", str(cfg), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # the same blend by hand, from the model's own rollout and the last input frame
    exp = load_experiment(cfg)
    model, _ = api.load_for_inference(tmp_path / "zoo" / "m")
    model.t_in = 3
    test = build_datasets(exp.data)["test"]
    frames = torch.stack([test[i]["frames"] for i in range(len(test))])
    with torch.no_grad():
        mixed = (0.25 * model.rollout(frames) + 0.75 * frames[:, 2:3]).clamp(0, 1)  # evaluate clamps
    err = ((mixed - frames[:, 3:]) ** 2).sum((2, 3, 4)).mean()
    assert m["mse"] == pytest.approx(float(err), rel=1e-4)
    assert "0.25" in m["model"] and "persistence" in m["model"]
    capsys.readouterr()
    # a bad --blend is one line before anything is written
    assert main(["evaluate", "--model", str(tmp_path / "zoo" / "m"), "--blend", "persistence:7",
                 "--config", str(cfg), "--out", str(tmp_path / "bad")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "--blend" in err_lines[0] and not (tmp_path / "bad").exists()
    assert np.isfinite(m["ssim"])

    # predict --blend: weight 0 is the baseline alone, weight 1 the model alone, 0.5 their mean
    clip = tmp_path / "clip.npy"
    np.save(clip, frames[0, :3, 0].numpy())  # (T, H, W) in [0, 1]
    preds = {}
    for spec in (None, "persistence:0", "persistence:1", "persistence"):
        out = tmp_path / f"pred-{spec}"
        args = ["predict", "--model", str(tmp_path / "zoo" / "m"), "--input", str(clip), "--out", str(out)]
        assert main(args + (["--blend", spec] if spec else [])) == 0
        preds[spec] = np.load(out / "prediction.npy").squeeze()
    last = frames[0, 2, 0].numpy()
    assert np.allclose(preds["persistence:0"], np.broadcast_to(last, preds[None].shape), atol=1e-6)
    assert np.allclose(preds["persistence:1"], preds[None], atol=1e-6)
    inside = preds[None] > 0  # predict clamps to [0, 1] after blending: compare where the model was not clamped
    assert inside.mean() > 0.3
    assert np.allclose(preds["persistence"][inside], (0.5 * preds[None] + 0.5 * last)[inside], atol=1e-5)
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "zoo" / "m"), "--input", str(clip),
                 "--out", str(tmp_path / "bad-predict"), "--blend", "nowcast"]) == 2
    assert "--blend" in capsys.readouterr().err and not (tmp_path / "bad-predict").exists()


def test_probability_matching_keeps_the_order_and_takes_the_last_frames_values():
    from transmem.blend import ProbabilityMatched, match_distribution
    g = torch.Generator().manual_seed(0)
    field = torch.rand(16, 16, generator=g)
    ref = torch.rand(16, 16, generator=g) ** 3
    out = match_distribution(field, ref)
    assert torch.equal(out.flatten().sort().values, ref.flatten().sort().values)  # the reference's values
    assert torch.equal(out.flatten().argsort(), field.flatten().argsort())        # the field's order
    dry = field.clone()
    dry[:4] = 0
    assert (match_distribution(dry, ref)[:4] == 0).all()                          # no rain stays no rain
    frames = torch.rand(2, 5, 1, 8, 8, generator=g)
    smooth = create_baseline("persistence", 3)
    pm = ProbabilityMatched(BlendForecaster(smooth, create_baseline("persistence", 2), 0.5))
    pm.t_in = 3
    pred = pm.rollout(frames)
    assert pred.shape == (2, 2, 1, 8, 8)
    for b in range(2):
        assert torch.equal(pred[b, 1, 0].flatten().sort().values, frames[b, 2, 0].flatten().sort().values)

"""`transmem predict` on files and folders, for backbones and TMU targets; radar end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from transmem import zoo
from transmem.cli import main
from transmem.models import create_model

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast


def entry(tmp_path, name="m", model=None, data=None):
    torch.manual_seed(0)
    model = model or create_model("convlstm", num_layers=2, hidden=4, filter_size=3, patch_size=4)
    card = {"t_in": 4, "t_out": 3, "frame_size": [16, 16], "channels": 1,
            "data": data or {"name": "flying_digits"}}
    return zoo.save_entry(model, tmp_path / name, card)


def test_predict_from_npy_writes_pngs_npy_gif(tmp_path):
    e = entry(tmp_path)
    frames = np.random.default_rng(0).random((9, 32, 32)).astype(np.float32)
    np.save(tmp_path / "in.npy", frames)
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "in.npy"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    pngs = sorted(out.glob("frame_*.png"))
    assert [p.name for p in pngs] == ["frame_01.png", "frame_02.png", "frame_03.png"]
    assert Image.open(pngs[0]).size == (16, 16)
    pred = np.load(out / "prediction.npy")
    assert pred.shape == (3, 1, 16, 16) and pred.min() >= 0 and pred.max() <= 1
    gif = Image.open(out / "prediction.gif")
    assert gif.n_frames == 4  # max(T_in, T_out)
    # the forecast is the model's rollout of the last T_in frames (resized to 16x16)
    from transmem.api import load_for_inference
    from transmem.data.inputs import read_input_frames
    module, _ = load_for_inference(e)
    x = torch.from_numpy(read_input_frames(tmp_path / "in.npy", size=16)[-4:])[None]
    with torch.inference_mode():
        ref = module.rollout(torch.cat([x, torch.zeros(1, 3, 1, 16, 16)], 1))[0].clamp(0, 1).numpy()
    assert np.allclose(pred, ref, atol=1e-6)
    # with --baselines, the baselines' forecasts of the same input beside it
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "in.npy"), "--out", str(tmp_path / "b"),
                 "--baselines"]) == 0
    pers = np.load(tmp_path / "b" / "baseline_persistence.npy")
    assert pers.shape == (3, 1, 16, 16) and np.array_equal(pers, np.repeat(x[0, -1:].numpy(), 3, 0))
    assert np.allclose(np.load(tmp_path / "b" / "prediction.npy"), pred)
    from transmem.baselines import extrapolation_available
    assert (tmp_path / "b" / "baseline_extrapolation.npy").is_file() == (extrapolation_available() is None)


def test_predict_with_a_tmu_target_runs_without_teachers(tmp_path):
    tmu = create_model("tmu", backbone="predrnn",
                       backbone_config=dict(num_layers=2, hidden=4, filter_size=3, patch_size=4),
                       source_names=["a"], source_channels=[4], tmu_layers="all")
    e = entry(tmp_path, "tmu", tmu)
    np.save(tmp_path / "in.npy", np.random.default_rng(1).random((6, 16, 16)).astype(np.float32))
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "in.npy"), "--out", str(tmp_path / "o")]) == 0
    assert np.load(tmp_path / "o" / "prediction.npy").shape == (3, 1, 16, 16)


def test_predict_refuses_bad_input_and_leaves_nothing(tmp_path, capsys):
    e = entry(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros((2, 16, 16), np.float32))
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "short.npy"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "short.npy" in err and "T_in=4" in err and err.count("\n") == 0
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    (tmp_path / "junk.txt").write_text("hello")
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "junk.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "junk.txt" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    np.save(tmp_path / "ok.npy", np.zeros((6, 16, 16), np.float32))
    assert main(["predict", "--model", str(e), "--input", str(tmp_path / "ok.npy"), "--out", str(tmp_path / "full")]) == 2
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]


def test_predict_on_real_video(tmp_path, shared_data):
    video = shared_data / "video" / "realshort.mp4"
    if not video.exists():
        pytest.skip(f"{video} absent")
    e = entry(tmp_path)
    assert main(["predict", "--model", str(e), "--input", str(video), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("frame_*.png"))) == 3


def test_radar_train_on_meteoswiss_evaluate_on_fmi_with_csi(tmp_path, shared_data):
    mch, fmi = shared_data / "radar" / "mch", shared_data / "radar" / "fmi" / "pgm"
    if not (mch.is_dir() and fmi.is_dir()):
        pytest.skip("radar data absent")
    small = ["--data.size", "16", "--data.frames", "8", "--train.t_in", "4", "--train.progress", "false",
             "--model.hidden", "4", "--model.filter_size", "3"]
    assert main(["pretrain", "--config", "configs/radar_mch.yaml", "--out", str(tmp_path / "mch"),
                 "--data.path", str(mch), "--train.steps", "4"] + small) == 0
    card = json.loads((tmp_path / "mch" / "model" / "card.json").read_text())
    assert card["data"]["name"] == "radar_mch"
    assert main(["evaluate", "--model", str(tmp_path / "mch" / "model"), "--config", "configs/radar_fmi_eval.yaml",
                 "--out", str(tmp_path / "fmi"), "--data.path", str(fmi)] + small) == 0
    m = json.loads((tmp_path / "fmi" / "metrics.json").read_text())
    for score in ("csi", "pod", "far", "hss"):
        assert set(m[score]) == {"0.5", "1.0", "5.0"}
        assert len(m[score]["0.5"]["per_frame"]) == 4
    c = m["contingency"]["0.5"]
    assert sum(c["hits"]) + sum(c["misses"]) > 0  # real rain above 0.5 mm/h in the FMI events
    csi = m["csi"]["0.5"]["mean"]
    assert csi is None or 0.0 <= csi <= 1.0
    # predict on the FMI folder writes rain rates too
    assert main(["predict", "--model", str(tmp_path / "mch" / "model"), "--input", str(fmi / "20160928"),
                 "--out", str(tmp_path / "pred")]) == 0
    mmh = np.load(tmp_path / "pred" / "prediction_mmh.npy")
    assert mmh.shape == (4, 1, 16, 16) and mmh.min() >= 0

"""End to end through the command line: pretrain -> finetune / transfer -> evaluate -> zoo list,
and the one-line errors for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from transmem.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, real radar files): not in make test-fast

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 8,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 2, "hidden": 4, "filter_size": 3, "patch_size": 2},
    "train": {"steps": 6, "batch_size": 4, "t_in": 3, "progress": False, "ckpt_every": 3},
    "eval": {"batch_size": 8},
}


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def run(*args):
    return main([str(a) for a in args])


def test_pipeline_pretrain_finetune_transfer_evaluate(tmp_path, cfg, capsys):
    zoo = tmp_path / "zoo"
    assert run("pretrain", "--config", cfg, "--out", tmp_path / "p1", "--zoo-name", "d1", "--zoo-root", zoo) == 0
    assert run("pretrain", "--config", cfg, "--out", tmp_path / "p2", "--data.num_digits", "2",
               "--model.name", "predrnn", "--zoo-name", "d2", "--zoo-root", zoo) == 0
    card = json.loads((zoo / "d2" / "card.json").read_text())
    assert card["model"] == "predrnn" and card["data"]["num_digits"] == 2 and card["t_out"] == 3
    assert card["train"]["steps"] == 6 and "mse" in card["metrics"]
    saved = yaml.safe_load((tmp_path / "p2" / "config.yaml").read_text())
    assert saved["data"]["num_digits"] == 2 and saved["model"]["name"] == "predrnn"

    assert run("finetune", "--config", cfg, "--out", tmp_path / "ft", "--from", zoo / "d1",
               "--data.num_digits", "3") == 0
    assert json.loads((tmp_path / "ft" / "model" / "card.json").read_text())["kind"] == "finetune"

    assert run("transfer", "--config", cfg, "--out", tmp_path / "tr", "--teachers", zoo / "d1", zoo / "d2",
               "--distill-weight", "0.5", "--data.num_digits", "3", "--transfer.tmu_layers", "all") == 0
    tcard = json.loads((tmp_path / "tr" / "model" / "card.json").read_text())
    assert [t["name"] for t in tcard["teachers"]] == ["d1", "d2"]
    assert tcard["transfer"]["distill_weight"] == 0.5 and tcard["model"] == "tmu"
    m = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    assert len(m["mse_per_frame"]) == 3 and m["count"] == 8

    # evaluate a distill-mode TMU target with its teachers gone
    import shutil
    shutil.rmtree(zoo / "d1")
    assert run("evaluate", "--model", tmp_path / "tr" / "model", "--config", cfg, "--out", tmp_path / "ev",
               "--data.num_digits", "3") == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["mse"] == pytest.approx(m["mse"], rel=1e-5)
    for key in ("mse", "mse_pixel", "mae", "ssim", "psnr", "mse_per_frame", "ssim_per_frame"):
        assert key in ev

    capsys.readouterr()
    assert run("zoo", "list", "--root", zoo) == 0
    out = capsys.readouterr().out
    assert "d2" in out and "predrnn" in out and "6" in out and "d1" not in out


def test_bank_read_and_finetune_init(tmp_path, cfg):
    zoo = tmp_path / "zoo"
    run("pretrain", "--config", cfg, "--out", tmp_path / "p1", "--zoo-name", "d1", "--zoo-root", zoo)
    assert run("transfer", "--config", cfg, "--out", tmp_path / "br", "--teachers", zoo / "d1",
               "--mode", "bank_read", "--init-from", zoo / "d1", "--transfer.teacher_inputs", "own") == 0
    card = json.loads((tmp_path / "br" / "model" / "card.json").read_text())
    assert card["config"]["mode"] == "bank_read" and card["transfer"]["init_from"].endswith("d1")
    assert run("evaluate", "--model", tmp_path / "br" / "model", "--config", cfg, "--out", tmp_path / "ev") == 0


def test_unknown_key_and_existing_run_folder(tmp_path, cfg, capsys):
    assert run("pretrain", "--config", cfg, "--out", tmp_path / "r", "--train.stepz", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stepz" in err
    (tmp_path / "r").mkdir(exist_ok=True)
    (tmp_path / "r" / "precious.txt").write_text("keep")
    assert run("pretrain", "--config", cfg, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--resume" in err and err.count("\n") == 0
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("key, value", [("transfer.distill_decay", "step"), ("transfer.distill_span", "late"),
                                        ("transfer.mode", "read"), ("train.schedule", "cosine")])
def test_a_value_outside_a_settings_choices_is_refused_before_the_run_folder(tmp_path, cfg, capsys, key, value):
    out = tmp_path / "r"
    assert run("transfer", "--config", cfg, "--out", out, "--teachers", tmp_path / "none",
               f"--{key}", value) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and value in err and "expected one of" in err
    assert not out.exists()


def test_bad_data_file_gives_one_line_error_and_nonzero_exit(tmp_path, cfg):
    bad = tmp_path / "clips.npy"
    np.save(bad, np.zeros((4, 16, 16), dtype=np.float64) + 7)  # wrong ndim and range
    proc = subprocess.run([sys.executable, "-m", "transmem.cli", "pretrain", "--config", str(cfg),
                           "--out", str(tmp_path / "r"), "--data.name", "npy", "--data.path", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "clips.npy" in lines[0] and lines[0].startswith("transmem: error:")


def test_short_training_lowers_the_loss(tmp_path, cfg):
    from transmem import api
    from transmem.config import load_experiment
    exp = load_experiment(cfg, {"train.steps": "1", "train.lr": "0.01", "data.train_clips": "64"})
    before = api.run_train(exp, tmp_path / "a")["mse"]
    exp = load_experiment(cfg, {"train.steps": "60", "train.lr": "0.01", "data.train_clips": "64"})
    after = api.run_train(exp, tmp_path / "b")["mse"]
    assert after < 0.8 * before, (before, after)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, cfg):
    from safetensors.torch import load_file
    from transmem import api
    from transmem.config import load_experiment

    def weights(name, seed):
        exp = load_experiment(cfg, {"train.steps": "2", "train.seed": str(seed)})
        api.run_train(exp, tmp_path / name)
        return load_file(str(tmp_path / name / "model" / "weights.safetensors"))

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_evaluate_a_baseline_needs_no_model(tmp_path, cfg, capsys):
    from transmem.baselines import extrapolation_available
    assert run("evaluate", "--baseline", "persistence", "--config", cfg, "--out", tmp_path / "p") == 0
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert m["model"] == "persistence" and m["mse"] > 0 and len(m["mse_per_frame"]) == 3
    assert (tmp_path / "p" / "report.md").is_file()
    # the same clips, forecast by hand: the metric is the last input frame's error
    from transmem.config import load_experiment
    from transmem.data import build_datasets
    exp = load_experiment(cfg)
    test = build_datasets(exp.data)["test"]
    frames = np.stack([test[i]["frames"].numpy() for i in range(len(test))])
    err = ((frames[:, 3:] - frames[:, 2:3]) ** 2).sum((2, 3, 4)).mean()
    assert m["mse"] == pytest.approx(float(err), rel=1e-5)
    capsys.readouterr()
    assert run("evaluate", "--baseline", "persistence", "--config", cfg, "--out", tmp_path / "p") == 2
    assert "exists" in capsys.readouterr().err
    if extrapolation_available() is None:
        assert run("evaluate", "--baseline", "extrapolation", "--config", cfg, "--out", tmp_path / "e") == 0
        e = json.loads((tmp_path / "e" / "metrics.json").read_text())
        assert e["model"] == "extrapolation" and np.isfinite(e["mse"])


def test_api_runs_leave_the_given_experiment_unchanged(tmp_path, cfg):
    import copy
    from transmem import api
    from transmem.config import load_experiment
    exp = load_experiment(cfg)
    before = copy.deepcopy(exp.to_dict())
    api.run_train(exp, tmp_path / "pre", zoo_name="a", zoo_root=tmp_path / "zoo")
    api.run_train(exp, tmp_path / "ft", init_from=tmp_path / "zoo" / "a")  # used to overwrite exp.model
    api.run_transfer(exp, tmp_path / "tr", teachers=[tmp_path / "zoo" / "a"])  # and exp.transfer.teachers
    assert exp.to_dict() == before


def test_entry_names_are_looked_up_under_zoo_root(tmp_path, cfg, monkeypatch):
    """`--from NAME`, `--teachers NAME` and `--init-from NAME` find NAME under --zoo-root (not only
    under ./zoo); the TMU's card records the teacher's folder, so it loads from anywhere."""
    zoo = tmp_path / "elsewhere" / "zoo"
    monkeypatch.chdir(tmp_path)  # no ./zoo here
    monkeypatch.delenv("TRANSMEM_ZOO", raising=False)
    assert run("pretrain", "--config", cfg, "--out", "p", "--zoo-name", "d1", "--zoo-root", zoo) == 0
    assert run("finetune", "--config", cfg, "--out", "ft", "--from", "d1", "--zoo-root", zoo) == 0
    assert json.loads((tmp_path / "ft" / "model" / "card.json").read_text())["kind"] == "finetune"
    assert run("transfer", "--config", cfg, "--out", "tr", "--teachers", "d1", "--init-from", "d1",
               "--zoo-root", zoo, "--mode", "bank_read", "--transfer.teacher_inputs", "own",
               "--transfer.cache_bank", "none") == 0
    tcard = json.loads((tmp_path / "tr" / "model" / "card.json").read_text())
    assert tcard["teachers"][0]["entry"] == str(zoo / "d1")
    monkeypatch.chdir(tmp_path / "elsewhere")  # a bank_read model needs its teachers to load
    assert run("evaluate", "--model", tmp_path / "tr" / "model", "--config", cfg, "--out", tmp_path / "ev") == 0
    # without --zoo-root the name is looked for under ./zoo: a one-line error, no folder made
    monkeypatch.chdir(tmp_path)
    assert run("finetune", "--config", cfg, "--out", "ft2", "--from", "d1") == 2
    assert not (tmp_path / "ft2").exists()

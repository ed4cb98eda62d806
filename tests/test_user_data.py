"""A user's own data, read right (issue 27): native frame sizes, patch sizes checked against the
size the data really has, 16-bit images, ODIM files without gain/offset, ``extra`` keys, scores in
the data's units, and the smaller rough edges a new user met."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from transmem import zoo
from transmem.cli import main
from transmem.models import create_model

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY_MODEL = {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 2}
TRAIN = {"steps": 2, "batch_size": 2, "t_in": 3, "progress": False, "threads": 1}


def _frames_folder(root: Path, h: int = 30, w: int = 40, seqs: int = 4, n: int = 10) -> Path:
    """``seqs`` folders of ``n`` gray PNG frames of ``h`` x ``w``: a bright bar moving right."""
    for s in range(seqs):
        d = root / f"seq{s}"
        d.mkdir(parents=True)
        for t in range(n):
            a = np.full((h, w), 10, np.uint8)
            x = (3 * t + 2 * s) % (w - 8)
            a[h // 4:h // 2, x:x + 8] = 200
            Image.fromarray(a).save(d / f"f{t:02d}.png")
    return root


def _config(path: Path, data: dict, model: dict | None = None, **sections) -> Path:
    cfg = {"data": {"frames": 6, "split": [0.5, 0.25, 0.25], **data}, "train": dict(TRAIN),
           "eval": {"batch_size": 2, "examples": 0}}
    if model is not None:
        cfg["model"] = model
    cfg.update(sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transmem: error: ") and "Traceback" not in err[0], err
    assert needle in err[0], err[0]
    return err[0]


# --------------------------------------------------------------------------------------------
# 2. resize: none records the true frame size, and predict keeps it
# --------------------------------------------------------------------------------------------
def test_native_size_run_records_its_true_size_and_predict_keeps_it(tmp_path, capsys):
    data = _frames_folder(tmp_path / "fr")
    cfg = _config(tmp_path / "c.yaml", {"name": "frames", "path": str(data), "resize": "none"}, TINY_MODEL)
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    assert card["frame_size"] == [30, 40]
    capsys.readouterr()
    assert main(["zoo", "list", "--root", str(tmp_path / "run")]) == 0
    assert "30x40" in capsys.readouterr().out
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--input", str(data / "seq0"),
                 "--out", str(tmp_path / "p")]) == 0
    pred = np.load(tmp_path / "p" / "prediction.npy")
    assert pred.shape == (3, 1, 30, 40)  # not centre-cropped and rescaled to 64x64


# --------------------------------------------------------------------------------------------
# 3. a patch size that does not divide the real frames: one line, exit 2, nothing created
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Frames of 30x40 (read at native size) and two zoo entries made on 32x32 frames: patch size
    4 (does not divide 30) and 2 (divides 30 and 40)."""
    w = tmp_path_factory.mktemp("native")
    data = _frames_folder(w / "fr")
    _config(w / "native.yaml", {"name": "frames", "path": str(data), "resize": "none"})
    torch.manual_seed(0)
    for name, patch in (("p4", 4), ("p2", 2)):
        m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=patch)
        zoo.save_entry(m, w / "zoo" / name, {"t_in": 3, "t_out": 3, "frame_size": [32, 32], "channels": 1,
                                             "data": {"name": "frames", "size": 32}})
    return w


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "finetune-auto"])
def test_non_dividing_patch_size_is_one_line_and_nothing_created(native, tmp_path, capsys, cmd):
    """Training on whole frames the patch size does not divide is refused (with no train.crop)."""
    cfg, out = str(native / "native.yaml"), tmp_path / "out"
    argv = {"pretrain": ["pretrain", "--config", cfg, "--model.patch_size", "4", "--model.hidden", "4",
                         "--model.num_layers", "1"],
            "finetune": ["finetune", "--from", str(native / "zoo" / "p4"), "--config", cfg],
            "finetune-auto": ["finetune", "--from", "auto", "--zoo-root", str(tmp_path / "z"), "--config", cfg,
                              "--probe-steps", "0"]}[cmd]
    if cmd == "finetune-auto":  # only the p4 entry in this zoo: auto must not pick it, and say why
        import shutil
        shutil.copytree(native / "zoo" / "p4", tmp_path / "z" / "p4")
    before = _files(native)
    capsys.readouterr()
    rc = main(argv + ["--out", str(out)])
    assert rc == 2
    line = _one_line_error(capsys, "30x40" if cmd != "finetune-auto" else "p4")
    assert "patch size 4" in line
    assert not out.exists()
    assert _files(native) == before


def test_evaluate_pads_whole_frames_the_patch_size_does_not_divide(native, tmp_path):
    """30x40 frames through a patch-4 entry: padded to 32x40, the forecast cropped back; the
    scores are those of the padded forecast's 30x40 part (the rollout checked by hand)."""
    from transmem.api import load_for_inference
    from transmem.config import load_experiment
    from transmem.data import build_datasets
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(native / "zoo" / "p4"), "--config", str(native / "native.yaml"),
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    module, _ = load_for_inference(native / "zoo" / "p4")
    clips = build_datasets(load_experiment(str(native / "native.yaml")).data)["test"]
    frames = torch.stack([clips[i]["frames"] for i in range(len(clips))]).float()
    assert frames.shape[-2:] == (30, 40)
    with torch.no_grad():
        padded = torch.cat([frames, frames[..., -1:, :].expand(-1, -1, -1, 2, -1)], -2)  # edge rows
        pred = module.model(padded, t_in=3)[:, 2:, ..., :30, :]
    assert torch.allclose(module.rollout(frames), pred, atol=1e-6)
    mse = ((pred.clamp(0, 1) - frames[:, 3:]) ** 2).mean().item()
    assert m["mse_pixel"] == pytest.approx(mse, rel=1e-4)


def test_training_on_crops_evaluates_whole_frames_the_patch_size_does_not_divide(native, tmp_path):
    """With train.crop (a multiple of 4), a patch-4 model trains on native 30x40 frames: it reads
    crops in training, and validation and test pad the whole frames."""
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(native / "native.yaml"), "--model.patch_size", "4",
                 "--model.hidden", "4", "--model.num_layers", "1", "--train.crop", "16", "--train.val_every", "1",
                 "--out", str(out)]) == 0
    card = json.loads((out / "model" / "card.json").read_text())
    assert card["frame_size"] == [30, 40]
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["mse_pixel"])


def test_zoo_rank_lists_a_non_dividing_entry_with_the_reason(native, capsys):
    assert main(["zoo", "rank", "--zoo-root", str(native / "zoo"), "--config", str(native / "native.yaml"),
                 "--probe-steps", "0"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["p4"])
    assert "unusable" in row and "patch size 4 does not divide the target's 30x40 frames" in row
    assert any(line.split()[:2] == ["1", "p2"] for line in out.splitlines())


def test_zoo_rank_with_a_training_crop_checks_the_crop_not_the_frames(native, capsys):
    """With train.crop the target trains on crops, so an entry serves when its patch size divides
    the crop (16: p4 is ranked) and not when it does not (6: p4 is listed with that reason)."""
    def rank(crop):
        capsys.readouterr()
        assert main(["zoo", "rank", "--zoo-root", str(native / "zoo"), "--config", str(native / "native.yaml"),
                     "--probe-steps", "0", "--train.crop", crop, "--model.patch_size", "2"]) == 0
        out = capsys.readouterr().out
        return next(line for line in out.splitlines() if line.split()[1:2] == ["p4"])
    assert "unusable" not in rank("16")
    row = rank("6")
    assert "unusable" in row and "patch size 4 does not divide the target's 6x6 training crops" in row


# --------------------------------------------------------------------------------------------
# 4. 16-bit images keep their precision; forecast.png shows the data's own range
# --------------------------------------------------------------------------------------------
def _dim_16bit(n=12, h=16, w=16, seed=0) -> np.ndarray:
    """A microscopy-like 16-bit stack: 12-bit values in a narrow band (1000..1400 of 65535)."""
    rng = np.random.default_rng(seed)
    return (1000 + rng.integers(0, 400, (n, h, w))).astype(np.uint16)


def test_16bit_stack_keeps_more_than_200_levels_and_the_white_level_travels(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="16-bit TIFF stacks through tifffile (transmem[io])")
    from transmem.data import DataConfig, build_datasets
    root = tmp_path / "stacks"
    root.mkdir()
    for k in range(3):
        tifffile.imwrite(root / f"cells{k}.tif", _dim_16bit(seed=k))
    cfg = DataConfig(name="frames", path=str(root), frames=6, size=16, split=(1, 1, 1))
    ds = build_datasets(cfg)
    values = np.concatenate([ds[s][i]["frames"].numpy().ravel() for s in ds for i in range(len(ds[s]))])
    assert len(np.unique(values)) > 200  # not 8 bits (was: about 2 grey levels of 256 on this band)
    assert cfg.extra["white"] == max(int(_dim_16bit(seed=k).max()) for k in range(3))  # fitted, recorded
    assert values.max() == pytest.approx(1.0, abs=1e-3) and values.min() > 0.6  # the data's own range
    # a folder of single 16-bit PNG frames too
    pngs = tmp_path / "pngs" / "seq"
    pngs.mkdir(parents=True)
    for t, a in enumerate(_dim_16bit(n=8)):
        Image.fromarray(a).save(pngs / f"f{t}.png")
    cfg = DataConfig(name="frames", path=str(tmp_path / "pngs"), frames=4, size=16, split=(1, 0, 0))
    x = np.concatenate([d["frames"].numpy().ravel() for d in build_datasets(cfg)["train"]])
    assert len(np.unique(x)) > 200 and "white" in cfg.extra


def test_forecast_png_shows_a_dim_input_on_its_own_range(tmp_path):
    from transmem.predict import save_forecast_figure
    rng = np.random.default_rng(0)
    obs = (0.02 + 0.02 * rng.random((3, 16, 16))).astype(np.float32)  # a dim field in [0.02, 0.04]
    save_forecast_figure(tmp_path / "f.png", tmp_path / "f.gif", obs, np.ones_like(obs, bool), obs[:2],
                         ["a", "b", "c"], ["+1", "+2"], None, False)
    img = np.asarray(Image.open(tmp_path / "f.png").convert("L"))
    # on a fixed 0..1 scale every panel would be near black; on the data's range it spans grey levels
    panels = img[:, : img.shape[1] * 4 // 5]  # the colour bar left out
    assert ((panels > 60) & (panels < 190)).sum() > 5000


# --------------------------------------------------------------------------------------------
# 6. every reader declares its extra keys; one long sequence splits by time for every reader
# --------------------------------------------------------------------------------------------
def test_a_misspelled_extra_key_is_refused_naming_the_valid_ones(tmp_path, capsys):
    from transmem.data import DataConfig, DataError, build_datasets, list_datasets
    from transmem.data.registry import extra_keys
    data = _frames_folder(tmp_path / "fr")
    cfg = _config(tmp_path / "c.yaml", {"name": "frames", "path": str(data), "size": 16,
                                         "extra": {"blokcs": 3}}, TINY_MODEL)
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    line = _one_line_error(capsys, "data.extra.blokcs")
    assert "did you mean blocks?" in line and "time_regex" in line
    assert not (tmp_path / "run").exists()
    from transmem.data import registry
    builtin = [n for n in list_datasets() if registry._DATASETS[n].__module__.startswith("transmem.data.")]
    assert len(builtin) >= 12
    for name in builtin:  # every built-in reader declares its keys, and refuses others
        assert extra_keys(name) is not None, name
        with pytest.raises(DataError, match="not a key of"):
            build_datasets(DataConfig(name=name, path=str(data), extra={"no_such_key": 1}))


def test_one_long_sequence_splits_into_time_blocks_for_any_reader(tmp_path):
    from transmem.data import DataConfig, build_datasets
    video = np.zeros((60, 8, 8), np.uint8)
    video[:, 0, 0] = np.arange(60)  # the frame's index, to find where each clip comes from
    d = tmp_path / "long" / "one"
    d.mkdir(parents=True)
    for t, a in enumerate(video):
        Image.fromarray(a).save(d / f"f{t:03d}.png")
    np.save(tmp_path / "long.npy", video[:, None])  # (T, N=1, H, W)
    for cfg in (DataConfig(name="frames", path=str(tmp_path / "long"), frames=5, size=8, resize="none",
                           split=(6, 2, 2), extra={"blocks": 10}),
                DataConfig(name="npy", path=str(tmp_path / "long.npy"), frames=5, size=8, resize="none",
                           split=(6, 2, 2), extra={"blocks": 10})):
        ds = build_datasets(cfg)
        first = {s: sorted(int(round(float(ds[s][i]["frames"][0, 0, 0, 0]) * 255)) for i in range(len(ds[s])))
                 for s in ("train", "val", "test")}
        assert all(first[s] for s in first), (cfg.name, first)
        # in time order, no clip across two splits: train before val before test
        assert max(first["train"]) + 5 <= min(first["val"]) and max(first["val"]) + 5 <= min(first["test"]), first
    # without blocks, the one sequence cannot be split: said, naming the key
    from transmem.data import DataError
    with pytest.raises(DataError, match="extra.blocks"):
        build_datasets(DataConfig(name="npy", path=str(tmp_path / "long.npy"), frames=5, size=8, resize="none",
                                  split=(6, 2, 2)))


def test_split_shares_are_normalised_everywhere(tmp_path):
    from transmem.config import load_experiment
    exp = load_experiment(overrides={"data.split": "[21, 3, 7]"})
    assert list(exp.data.split) == [21, 3, 7]
    from transmem.data import DataConfig, build_datasets
    np.save(tmp_path / "a.npy", np.zeros((6, 31, 8, 8), np.uint8))
    ds = build_datasets(DataConfig(name="npy", path=str(tmp_path / "a.npy"), frames=6, size=8, split=(21, 3, 7)))
    assert [len(ds[s]) for s in ("train", "val", "test")] == [21, 3, 7]


# --------------------------------------------------------------------------------------------
# 5. ODIM HDF5 rain rates without gain / offset / nodata (float32 mm/h, NaN = no data)
# --------------------------------------------------------------------------------------------
def test_odim_rates_without_gain_offset_nodata_read(tmp_path):
    h5py = pytest.importorskip("h5py", reason="HDF5 through h5py (transmem[radar])")
    from transmem.data import DataConfig, build_datasets, physical_units
    rng = np.random.default_rng(0)
    fields = []
    for k in range(6):
        a = rng.gamma(0.5, 2.0, (16, 16)).astype(np.float32)
        a[:, :4] = np.nan  # outside the radar network
        fields.append(a)
        with h5py.File(tmp_path / f"qpe_2023010112{5 * k:02d}.h5", "w") as f:
            f.attrs["Conventions"] = np.bytes_("ODIM_H5/V2_2")
            f.create_group("what").attrs["object"] = np.bytes_("COMP")
            d = f.create_group("dataset1/data1")
            d.create_group("what").attrs["quantity"] = np.bytes_("RATE")  # no gain, offset, nodata
            d.create_dataset("data", data=a)
    cfg = DataConfig(name="hdf5", path=str(tmp_path), frames=6, size=16, split=(1, 0, 0))
    item = build_datasets(cfg)["train"][0]
    valid = item["mask"].numpy()[:, 0]
    assert valid.mean() == pytest.approx(12 / 16)  # the NaN columns, nothing else
    got = np.asarray(physical_units(cfg).to_physical(item["frames"].numpy()[:, 0]), dtype=np.float64)
    want = np.stack(fields).astype(np.float64)
    np.testing.assert_allclose(got[valid], want[valid], rtol=0.02, atol=0.02)  # gain 1, offset 0


# --------------------------------------------------------------------------------------------
# scores in the data's units
# --------------------------------------------------------------------------------------------
def test_metrics_hold_rmse_and_mae_in_physical_units():
    from transmem.metrics import frame_metrics
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((2, 3, 1, 8, 8))).float()
    pred = (target + 0.1 * torch.from_numpy(rng.standard_normal((2, 3, 1, 8, 8))).float()).clamp(0, 1)
    mask = torch.ones(2, 3, 1, 8, 8, dtype=torch.bool)
    mask[..., :2] = False
    m = frame_metrics(pred, target, mask, to_physical=lambda x: 250.0 + 50.0 * x)  # kelvin, say
    d = (pred - target)[mask.expand_as(pred)].double() * 50.0
    assert m["rmse_physical"] == pytest.approx(float(d.pow(2).mean().sqrt()), rel=1e-6)
    assert m["mae_physical"] == pytest.approx(float(d.abs().mean()), rel=1e-6)
    assert len(m["rmse_physical_per_frame"]) == 3
    assert "rmse_physical" not in frame_metrics(pred, target)  # no units, no physical scores


def test_evaluate_writes_rmse_in_the_datas_units(tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile", reason="16-bit TIFF stacks through tifffile (transmem[io])")
    root = tmp_path / "stacks"
    root.mkdir()
    for k in range(3):
        tifffile.imwrite(root / f"cells{k}.tif", _dim_16bit(seed=k))
    cfg = _config(tmp_path / "c.yaml", {"name": "frames", "path": str(root), "size": 16, "split": [1, 1, 1]})
    assert main(["evaluate", "--baseline", "persistence", "--config", str(cfg), "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["units"] == "counts" and m["rmse_physical"] > 1.0  # raw 16-bit counts, not [0, 1] values
    white = max(int(_dim_16bit(seed=k).max()) for k in range(3))
    assert m["mae_physical"] == pytest.approx(m["mae_pixel"] * white, rel=1e-3)
    assert "RMSE (counts)" in (tmp_path / "ev" / "report.md").read_text()
    assert "rmse_physical=" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# start-up: --help, --version and config errors without torch
# --------------------------------------------------------------------------------------------
def _run_cli(*args, stdin=None, shell_tail: str | None = None):
    import os
    import subprocess
    import sys
    import time
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    t0 = time.perf_counter()
    if shell_tail is not None:  # the command piped into another (e.g. "| head -3")
        import shlex
        cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "transmem.cli", *args)) + " " + shell_tail
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env,
                           timeout=120)
    else:
        r = subprocess.run([sys.executable, "-m", "transmem.cli", *args], capture_output=True, text=True,
                           env=env, timeout=120)
    return r, time.perf_counter() - t0


def test_help_version_and_config_errors_answer_without_torch():
    import subprocess
    import sys
    code = ("import sys, transmem.cli as c\n"
            "c.build_parser()\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert r.stdout.strip() == "[]", r.stdout + r.stderr  # the parser loads neither
    r, wall = _run_cli("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and wall < 2.0, (wall, r.stderr)
    import transmem
    r, _ = _run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"transmem {transmem.__version__}"
    r, wall = _run_cli("pretrain", "--out", "never-made", "--train.steps", "0")
    assert r.returncode == 2 and "train.steps=0" in r.stderr and wall < 2.0, (wall, r.stderr)
    assert not Path("never-made").exists()


def test_choices_mirror_their_owners():
    from transmem import choices, zoo
    assert zoo.PROBE_STEPS == choices.PROBE_STEPS


# --------------------------------------------------------------------------------------------
# 7. smaller rough edges
# --------------------------------------------------------------------------------------------
def test_zoo_show_into_a_closed_pipe_is_not_an_error(tmp_path):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    zoo.save_entry(m, tmp_path / "e", {"t_in": 3, "t_out": 3, "frame_size": [8, 8], "channels": 1,
                                       "notes": ["x" * 100] * 2000})  # a card longer than a pipe's buffer
    r, _ = _run_cli("zoo", "show", str(tmp_path / "e"), shell_tail="| head -2")
    assert r.returncode == 0 and "Broken pipe" not in r.stderr and not r.stderr.strip(), r.stderr
    assert len(r.stdout.splitlines()) == 2


def test_evaluate_into_earlier_results_names_overwrite(tmp_path, capsys):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.json").write_text("{}")
    from transmem import api
    with pytest.raises(api.RunFolderError, match="--overwrite"):
        api.check_eval_out(tmp_path / "ev")


TINY_DIGITS = ["--data.size", "16", "--data.frames", "6", "--data.train_clips", "8", "--data.val_clips", "4",
               "--data.test_clips", "4", "--train.batch_size", "4", "--train.t_in", "3", "--train.progress", "false",
               "--model.hidden", "4", "--model.num_layers", "1", "--model.patch_size", "4", "--model.filter_size", "3",
               "--eval.examples", "0", "--train.threads", "1"]


def test_val_every_is_honoured_across_epochs(tmp_path):
    import csv
    # 8 clips in batches of 4: 2 steps an epoch; validation every 3 steps, not every 2
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--train.steps", "7", "--train.val_every", "3",
                 *TINY_DIGITS]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r" / "logs" / "metrics.csv")))
    assert [int(r["step"]) + 1 for r in rows if r.get("val/mse")] == [3, 6]


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["pretrain", "--out", str(out), "--train.steps", "2", *TINY_DIGITS]) == 0
    import shutil
    for name in ("checkpoints", "metrics.json", "model"):  # as if killed before its first checkpoint
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--train.steps", "2", "--resume", *TINY_DIGITS]) == 0
    said = capsys.readouterr().out
    assert "found no checkpoint" in said and "starts again from step 0" in said
    assert (out / "metrics.json").is_file()


def test_a_fifo_named_like_the_newest_radar_frame_is_refused(tmp_path):
    import gzip
    import os
    from transmem.data import DataError
    from transmem.data.inputs import read_input_frames
    folder = tmp_path / "radar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for m in (0, 5, 10):
        a = rng.integers(60, 120, (16, 16)).astype(np.uint8)
        (folder / f"2016092814{m:02d}_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz").write_bytes(
            gzip.compress(b"P5\n16 16\n255\n" + a.tobytes()))
    assert read_input_frames(folder).shape[0] == 3
    os.mkfifo(folder / "201609281415_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz")  # the newest "frame"
    with pytest.raises(DataError, match="201609281415.*not a regular file"):
        read_input_frames(folder)


def test_readme_python_snippet_runs_as_written(tmp_path):
    import re
    import subprocess
    import sys
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "no Python snippet in the README"
    import os
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# lead times in minutes when file names carry times
# --------------------------------------------------------------------------------------------
def test_radar_folder_forecast_is_labelled_in_minutes(tmp_path):
    import gzip
    from transmem.predict import input_times, lead_labels
    from types import SimpleNamespace
    folder = tmp_path / "radar"
    folder.mkdir()
    for m in (0, 5, 10, 15):
        (folder / f"2016092814{m:02d}_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz").write_bytes(
            gzip.compress(b"P5\n4 4\n255\n" + bytes(16)))
    times = input_times(folder, {"name": "radar_fmi"}, 4)
    assert [str(t) for t in times][-1] == "2016-09-28T14:15:00"
    obs, leads = lead_labels(SimpleNamespace(times=times), 3, 2)
    assert leads == ["+5 min", "+10 min"] and obs[-1] == "2016-09-28 14:15"
    assert input_times(folder, {"name": "radar_fmi"}, 5) is None  # not one time per frame: steps


# --------------------------------------------------------------------------------------------
# the input's projection (CF grid mapping) in forecast.nc
# --------------------------------------------------------------------------------------------
def test_forecast_netcdf_carries_the_inputs_grid_mapping(tmp_path):
    xr = pytest.importorskip("xarray", reason="gridded data through xarray (transmem[io])")
    from transmem.data.gridded import read_grid, write_forecast_netcdf
    t = np.arange("2024-01-01T00", "2024-01-01T06", dtype="datetime64[h]")
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"t2m": (("time", "y", "x"), (270 + 5 * rng.random((6, 8, 8))).astype(np.float32),
                 {"units": "K", "grid_mapping": "lambert"}),
         "lambert": ((), np.int32(0), {"grid_mapping_name": "lambert_conformal_conic",
                                       "standard_parallel": [30.0, 60.0], "longitude_of_central_meridian": 10.0,
                                       "latitude_of_projection_origin": 50.0})},
        coords={"time": t, "y": ("y", np.arange(8) * 2500.0, {"standard_name": "projection_y_coordinate"}),
                "x": ("x", np.arange(8) * 2500.0, {"standard_name": "projection_x_coordinate"})})
    ds.to_netcdf(tmp_path / "in.nc", engine="scipy")
    data = {"name": "xarray", "resize": "none", "extra": {
        "variable": "t2m", "quantity": "field",
        "normalization": {"kind": "minmax", "variable": "t2m", "units": "K", "lo": 260.0, "hi": 290.0}}}
    frames, mask, grid = read_grid(tmp_path / "in.nc", data, None, 1)
    assert grid.crs["name"] == "lambert"
    obs = 260 + 30 * frames[:, 0]
    write_forecast_netcdf(tmp_path / "f.nc", obs[-3:], obs[-2:], grid, "K", obs_mask=mask[-3:, 0])
    with xr.open_dataset(tmp_path / "f.nc", decode_coords=False) as out:
        assert out["forecast"].attrs["grid_mapping"] == "lambert"
        assert out["lambert"].attrs["grid_mapping_name"] == "lambert_conformal_conic"
        assert list(out["lambert"].attrs["standard_parallel"]) == [30.0, 60.0]
        assert out["x"].attrs["standard_name"] == "projection_x_coordinate"


# --------------------------------------------------------------------------------------------
# transmem compare RUN... --baselines: one table on the same clips
# --------------------------------------------------------------------------------------------
def test_compare_scores_runs_and_baselines_on_the_same_clips(tmp_path, capsys):
    for name, hidden in (("a", "4"), ("b", "6")):
        assert main(["pretrain", "--out", str(tmp_path / name), "--train.steps", "2", *TINY_DIGITS[:-4],
                     "--train.threads", "1", "--eval.examples", "1"]
                    + (["--model.hidden", hidden] if name == "b" else [])) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--baselines",
                 "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    m = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert {"a", "b", "persistence"} <= set(m)
    assert len({v["count"] for v in m.values()}) == 1  # the same clips for every method
    run_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["a"]["mse"] == pytest.approx(run_a["mse"], rel=1e-5)  # the run's own test score
    assert table.splitlines()[0].split()[:2] == ["method", "MSE/frame"] and "persistence" in table
    assert "persistence" in (tmp_path / "cmp" / "report.md").read_text()
    assert main(["compare", str(tmp_path / "a"), "--out", str(tmp_path / "cmp")]) == 2  # earlier results
    assert "--overwrite" in capsys.readouterr().err


def test_transfer_with_a_teacher_whose_patch_does_not_divide_the_frames(native, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["transfer", "--config", str(native / "native.yaml"), "--teachers", str(native / "zoo" / "p4"),
               "--model.patch_size", "2", "--model.hidden", "4", "--model.num_layers", "1", "--out", str(out)])
    assert rc == 2
    line = _one_line_error(capsys, "teacher")
    assert "patch size 4 does not divide the data's 30x40 frames" in line
    assert not out.exists()


def test_predict_reads_its_input_with_the_models_white_level(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="16-bit TIFF stacks through tifffile (transmem[io])")
    from transmem.predict import read_forecast_input
    a = _dim_16bit(n=6, h=12, w=20)
    tifffile.imwrite(tmp_path / "s.tif", a)
    data = {"name": "frames", "resize": "none", "size": 64, "extra": {"white": 2000}}
    frames, _, _ = read_forecast_input(tmp_path / "s.tif", data, 1, 64)
    assert frames.shape == (6, 1, 12, 20)  # native size, as the model's data was read
    np.testing.assert_allclose(frames[:, 0], a / 2000.0, rtol=1e-3, atol=1e-4)  # the model's white, not 65535


def test_slow_data_reading_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    import transmem.data.clips as clips
    from transmem.data import DataConfig, build_datasets
    data = _frames_folder(tmp_path / "fr")
    build_datasets(DataConfig(name="frames", path=str(data), size=16, frames=4, split=(1, 0, 0)))
    assert "reading" not in capsys.readouterr().err  # quick: silent
    monkeypatch.setattr(clips, "_PROGRESS_AFTER_S", 0.0)  # as if each sequence took long
    build_datasets(DataConfig(name="frames", path=str(data), size=16, frames=4, split=(1, 0, 0)))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("reading frames data")]
    assert lines and lines[-1].startswith("reading frames data sequence 4/4")

"""Reliability: kill-safe training with exact resume, atomic checkpoints and zoo entries, safe
loading, NaN/Inf guard rails, unwritable or full run folders. See docs/reliability.md.

Kills are real: a subprocess runs the CLI through a small wrapper that sends itself SIGKILL at a
chosen training step (or in the middle of writing a checkpoint). The references are uninterrupted
runs of the same command; both start from the same initial weights (``torch.manual_seed(0)``
before the CLI runs)."""
from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from transmem import api, zoo
from transmem.cli import main
from transmem.config import load_experiment
from transmem.data import build_datasets
from transmem.models import create_model
from transmem.training import ForecastModule, SamplingSchedule, evaluate, fit
from transmem.training import checkpoints, samplers
from transmem.progress import LineProgress, progress_lines, train_progress

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 8,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
    # 32 clips / batch 4 = 8 steps per epoch: 20 steps cross two epoch boundaries
    "train": {"steps": 20, "batch_size": 4, "t_in": 3, "ckpt_every": 3, "progress": False, "threads": 1,
              "val_every": 5, "reverse_time_prob": 0.5},
    "eval": {"batch_size": 8},
}

WRAPPER = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.manual_seed(0)  # the same initial weights as the in-process reference runs
    from transmem.training import module as M

    KILL = int(os.environ.get("TM_KILL_AT_STEP", "-1"))
    NAN = int(os.environ.get("TM_NAN_AT_STEP", "-1"))
    KILL_SAVE = int(os.environ.get("TM_KILL_IN_SAVE_AT_STEP", "-1"))

    _step = M.ForecastModule.training_step
    def training_step(self, batch, i):
        if self.global_step == KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(self, batch, i)
    M.ForecastModule.training_step = training_step

    _loss = M.ForecastModule.compute_loss
    def compute_loss(self, batch):
        loss, pred, distill = _loss(self, batch)
        if self.global_step == NAN:
            loss = loss * float("nan")
        return loss, pred, distill
    M.ForecastModule.compute_loss = compute_loss

    _save = torch.save
    def save(obj, f, *a, **k):
        name = str(getattr(f, "name", ""))
        if isinstance(obj, dict) and obj.get("global_step") == KILL_SAVE and ".last.ckpt." in name:
            f.write(b"partial checkpoint " * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing last.ckpt
        return _save(obj, f, *a, **k)
    torch.save = save

    from transmem.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _cfg(tmp_path, **train):
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    p = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _cli_subprocess(tmp_path, args, **env):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    e = dict(os.environ, **{k: str(v) for k, v in env.items()})
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        e.pop(k, None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=300)


def _cli(*args) -> int:
    torch.manual_seed(0)
    return main([str(a) for a in args])


def _weights(run) -> dict:
    return load_file(str(run / "model" / "weights.safetensors"))


def _ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted pretrain run (in-process) that the killed-and-resumed runs must equal."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp)
    assert _cli("pretrain", "--config", cfg, "--out", tmp / "run") == 0
    return tmp / "run"


# --------------------------------------------------------------------------------------------
# kill -9 and --resume


@pytest.mark.parametrize("kill_at", [7, 1], ids=["mid-epoch", "before-first-checkpoint"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference, kill_at):
    cfg = _cfg(tmp_path)
    out = tmp_path / "run"
    r = _cli_subprocess(tmp_path, ["pretrain", "--config", cfg, "--out", out], TM_KILL_AT_STEP=kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    if kill_at == 7:  # checkpoints every 3 steps: the last one is step 6 (epoch 0, batch 6)
        ck = _ckpt(out / "checkpoints" / "last.ckpt")
        assert ck["global_step"] == 6
        assert ck["transmem"]["data"] == {"global_step": 6, "epoch": 0, "batch": 6, "batches_per_epoch": 8,
                                          "global_batch": 4, "processes": 1, "clips": 32, "seed": 0,
                                          "shuffle": True}
        assert set(ck["transmem"]["rng"]) >= {"torch", "numpy", "python"}
    else:  # killed before the first checkpoint: --resume starts over from step 0
        assert not (out / "checkpoints" / "last.ckpt").exists()
    # a plain rerun is refused (the folder holds a run); --resume continues it
    assert _cli("pretrain", "--config", cfg, "--out", out) == 2
    assert _cli("pretrain", "--config", cfg, "--out", out, "--resume") == 0
    _assert_same_weights(_weights(reference), _weights(out))
    assert _ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 20
    ref_m, m = (json.loads((p / "metrics.json").read_text()) for p in (reference, out))
    assert {k: v for k, v in ref_m.items() if k != "train_wall_s"} == {k: v for k, v in m.items() if k != "train_wall_s"}
    if kill_at == 7:  # the log rows before the resumed step are kept beside the new log
        assert (out / "logs" / "metrics.until-step6.csv").is_file()


def test_resume_of_a_finished_run_trains_nothing(tmp_path, reference):
    ck = _ckpt(reference / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 20  # the final state is checkpointed, not only every ckpt_every
    import shutil
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    (out / "metrics.json").unlink()
    calls = []
    orig = ForecastModule.training_step
    try:
        ForecastModule.training_step = lambda self, b, i: calls.append(i) or orig(self, b, i)
        assert _cli("pretrain", "--config", _cfg(tmp_path), "--out", out, "--resume") == 0
    finally:
        ForecastModule.training_step = orig
    assert calls == []
    _assert_same_weights(_weights(reference), _weights(out))


def test_last_checkpoint_holds_the_final_validation(tmp_path):
    """Lightning writes a checkpoint step's last.ckpt before that step's validation; the final one
    is written again after it, so that a resume with more steps knows the best score so far and
    never lets a worse model replace best.ckpt."""
    import csv
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, steps=18, val_every=3, select_best=True)  # the last step checkpoints and validates
    assert _cli("pretrain", "--config", cfg, "--out", out) == 0
    ck = _ckpt(out / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 18
    (best_state,) = [v for k, v in ck["callbacks"].items() if "val/mse" in k]
    rows = [r for r in csv.DictReader((out / "logs" / "metrics.csv").open()) if r.get("val/mse")]
    vals = [float(r["val/mse"]) for r in rows]
    assert len(vals) == 6  # steps 3, 6, ..., 18
    assert float(best_state["current_score"]) == pytest.approx(vals[-1], rel=1e-5)
    assert float(best_state["best_model_score"]) == pytest.approx(min(vals), rel=1e-5)


def test_a_moved_run_resumes_in_its_new_folder_and_keeps_its_best_score(tmp_path):
    """A run folder moved or copied, then resumed with more steps: the best model stays the one
    with the lowest validation MSE over the whole run (the score before the move is remembered),
    in best.ckpt of the new folder; no best-v1.ckpt, and the old folder is not touched."""
    import csv
    import shutil
    first = tmp_path / "first"
    assert _cli("pretrain", "--config", _cfg(tmp_path, steps=18, val_every=3, select_best=True), "--out", first) == 0
    kept = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    out = tmp_path / "moved"
    shutil.copytree(first, out)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    assert _cli("pretrain", "--config", _cfg(tmp_path, steps=30, val_every=3, select_best=True), "--out", out,
                "--resume") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if "-v" in p.name) == []
    rows = [r for f in ("metrics.until-step18.csv", "metrics.csv")
            for r in csv.DictReader((out / "logs" / f).open()) if r.get("val/mse")]
    assert len(rows) == 10  # steps 3, 6, ..., 30
    best = _ckpt(out / "checkpoints" / "best.ckpt")
    (state,) = [v for k, v in best["callbacks"].items() if "val/mse" in k]
    assert float(state["best_model_score"]) == pytest.approx(min(float(r["val/mse"]) for r in rows), rel=1e-5)
    assert state["best_model_path"] == os.path.realpath(out / "checkpoints" / "best.ckpt")
    _assert_same_weights({k[len("model."):]: v for k, v in best["state_dict"].items()}, _weights(out))
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == kept


def _stopped_run(cfg, out, at_step):
    """An in-process run that dies with an exception at ``at_step`` (checkpoints every 3 steps)."""
    orig = ForecastModule.compute_loss

    def compute_loss(self, batch):
        if self.global_step == at_step:
            raise RuntimeError("stopped")
        return orig(self, batch)

    ForecastModule.compute_loss = compute_loss
    try:
        with pytest.raises(RuntimeError, match="stopped"):
            _cli("pretrain", "--config", cfg, "--out", out)
    finally:
        ForecastModule.compute_loss = orig


def test_resume_prefers_a_newer_slurm_hpc_checkpoint(tmp_path, reference):
    """On SLURM, Lightning answers the pre-emption signal by writing ``hpc_ckpt_N.ckpt`` into the
    run folder; --resume continues from whichever of it and last.ckpt is further along."""
    cfg = _cfg(tmp_path)
    out, other = tmp_path / "run", tmp_path / "other"
    _stopped_run(cfg, out, 7)     # last.ckpt at step 6
    _stopped_run(cfg, other, 10)  # last.ckpt at step 9
    (other / "checkpoints" / "last.ckpt").rename(out / "hpc_ckpt_1.ckpt")
    steps = []
    orig = ForecastModule.training_step
    try:
        ForecastModule.training_step = lambda self, b, i: steps.append(self.global_step) or orig(self, b, i)
        assert _cli("pretrain", "--config", cfg, "--out", out, "--resume") == 0
    finally:
        ForecastModule.training_step = orig
    assert steps == list(range(9, 20))
    _assert_same_weights(_weights(reference), _weights(out))


def test_sigkill_transfer_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = _cfg(tmp_path, steps=12, ckpt_every=4, val_every=0, reverse_time_prob=0.0)
    assert _cli("pretrain", "--config", cfg, "--out", tmp_path / "teacher", "--train.steps", 4) == 0
    args = ["transfer", "--config", cfg, "--teachers", tmp_path / "teacher" / "model"]
    assert _cli(*args, "--out", tmp_path / "ref") == 0
    out = tmp_path / "run"
    r = _cli_subprocess(tmp_path, [*args, "--out", out], TM_KILL_AT_STEP=6)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert _cli(*args, "--out", out, "--resume") == 0
    _assert_same_weights(_weights(tmp_path / "ref"), _weights(out))
    assert _ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    cfg = _cfg(tmp_path)
    out = tmp_path / "run"
    r = _cli_subprocess(tmp_path, ["pretrain", "--config", cfg, "--out", out], TM_KILL_IN_SAVE_AT_STEP=9)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckdir = out / "checkpoints"
    leftovers = list(ckdir.glob(".last.ckpt.*.tmp"))
    assert leftovers and leftovers[0].read_bytes().startswith(b"partial checkpoint")
    assert _ckpt(ckdir / "last.ckpt")["global_step"] == 6  # the previous one, intact
    assert _cli("pretrain", "--config", cfg, "--out", out, "--resume") == 0
    assert not list(ckdir.glob(".*.tmp"))  # the torn temporary file was cleaned up
    _assert_same_weights(_weights(reference), _weights(out))


def _sampled(n, batch, seed, step, world=1, rank=0, monkeypatch=None):
    """What StepSampler yields for the iteration that starts at global step ``step``."""
    class Trainer:
        global_step = step

    if monkeypatch is not None:
        monkeypatch.setattr(samplers, "dist_info", lambda: (world, rank))
    s = samplers.StepSampler(n, batch, seed=seed)
    s.step_source = Trainer()
    return list(s)


def test_sampler_continues_mid_epoch_and_splits_global_batches(monkeypatch):
    # 10 clips, batch 2: 5 steps per epoch; each epoch a permutation that depends on (seed, epoch)
    epoch0, epoch1 = _sampled(10, 2, 3, 0), _sampled(10, 2, 3, 5)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    stream = epoch0 + epoch1  # what an uninterrupted run reads over steps 0..9
    for step in range(10):  # resuming at any step continues the same stream to the epoch's end
        assert _sampled(10, 2, 3, step) == stream[2 * step:10 if step < 5 else 20]
    # 2 processes with batch 1 read, together, what 1 process with batch 2 reads, at every step
    for step in range(10):
        r0 = _sampled(10, 1, 3, step, 2, 0, monkeypatch)
        r1 = _sampled(10, 1, 3, step, 2, 1, monkeypatch)
        assert sorted([r0[0], r1[0]]) == sorted(stream[2 * step:2 * step + 2])
    # an incomplete global batch at the end of an epoch is dropped on every process alike
    monkeypatch.setattr(samplers, "dist_info", lambda: (1, 0))
    assert len(samplers.StepSampler(11, 2)) == 10 and len(_sampled(11, 2, 0, 0)) == 10


# --------------------------------------------------------------------------------------------
# atomic writes


def test_failed_checkpoint_write_keeps_previous_last_ckpt(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, steps=8, val_every=0)
    out = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == 6 and ".last.ckpt." in str(getattr(f, "name", "")):
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    assert _cli("pretrain", "--config", cfg, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transmem: error: ") and "No space left on device" in err[0]
    assert "previous checkpoint is kept" in err[0]
    assert _ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_write_json_failure_keeps_previous_file(tmp_path):
    p = tmp_path / "metrics.json"
    api.write_json(p, {"mse": 1.0})
    with pytest.raises(ValueError):
        api.write_json(p, {"mse": float("nan")})  # NaN is refused mid-serialisation
    assert json.loads(p.read_text()) == {"mse": 1.0}
    assert [f.name for f in tmp_path.iterdir()] == ["metrics.json"]


def test_interrupted_zoo_overwrite_keeps_previous_entry(tmp_path, monkeypatch):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    entry = zoo.save_entry(m, tmp_path / "zoo" / "a", {"t_in": 3})
    before = (entry / "weights.safetensors").read_bytes()

    def torn(state, path, *a, **k):
        pathlib.Path(path).write_bytes(b"torn")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(zoo, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        zoo.save_entry(create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2),
                       entry, overwrite=True)
    assert (entry / "weights.safetensors").read_bytes() == before
    zoo.load_entry(entry)  # sha256 still matches
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == ["a"]  # no temporary folder left


# --------------------------------------------------------------------------------------------
# safe loading


def test_tampered_zoo_weights_refused_with_one_line(tmp_path, capsys):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    entry = zoo.save_entry(m, tmp_path / "e", {"t_in": 3, "t_out": 3})
    w = entry / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match=r"sha256 .* does not match the card .* refusing to load"):
        zoo.load_entry(entry)
    assert _cli("evaluate", "--model", entry, "--config", _cfg(tmp_path), "--out", tmp_path / "ev") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0]


class _Payload:
    """Unpickling this runs ``Path.write_text(marker, ...)``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, reference, capsys, monkeypatch):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "metrics.json").unlink()
    marker = tmp_path / "marker"
    last = out / "checkpoints" / "last.ckpt"
    ck = _ckpt(last)
    ck["global_step"] = 10
    ck["payload"] = _Payload(marker)
    torch.save(ck, last)
    cfg = _cfg(tmp_path)
    # 1. the CLI refuses it with one line, before anything is built
    assert _cli("pretrain", "--config", cfg, "--out", out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to load" in err[0] and "last.ckpt" in err[0]
    assert not marker.exists()
    # 2. Lightning's own load (trainer.fit(ckpt_path, weights_only=True)) refuses it as well
    monkeypatch.setattr(checkpoints, "load_checkpoint_safely", lambda *a, **k: {"global_step": 10})
    assert _cli("pretrain", "--config", cfg, "--out", out, "--resume") == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(last, weights_only=False)
    assert marker.read_text() == "code ran"


def test_checkpoints_hold_only_weights_only_types(reference):
    for f in (reference / "checkpoints").glob("*.ckpt"):
        ck = torch.load(f, map_location="cpu", weights_only=True)  # raises on anything else
        assert {"state_dict", "optimizer_states", "loops", "callbacks", "transmem"} <= set(ck)


# --------------------------------------------------------------------------------------------
# guard rails


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, steps=12, val_every=0)
    out = tmp_path / "run"
    r = _cli_subprocess(tmp_path, ["pretrain", "--config", cfg, "--out", out], TM_NAN_AT_STEP=7)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("transmem: error: loss became nan at step 7: stopping")
    ck = _ckpt(out / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not (out / "metrics.json").exists() and not (out / "model").exists()


def test_nonfinite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    exp = load_experiment(_cfg(tmp_path, steps=12, val_every=0, reverse_time_prob=0.0))
    datasets = build_datasets(exp.data)

    class Corrupting(ForecastModule):
        def optimizer_step(self, *a, **k):
            super().optimizer_step(*a, **k)
            if self.global_step == 5:  # the update that makes step 6 (a checkpoint step) blows up
                with torch.no_grad():
                    next(self.model.parameters()).fill_(float("inf"))

    model = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    module = Corrupting(model, SamplingSchedule(t_in=3, frames=6, stop_step=6), seed=0)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"became NaN/Inf by step 6: .* last good checkpoint is kept"):
        fit(module, datasets["train"], None, exp.train, out)
    ckdir = out / "checkpoints"
    assert _ckpt(ckdir / "last.ckpt")["global_step"] == 3
    assert not (ckdir / "step6.ckpt").exists() and not list(ckdir.glob(".*.tmp"))


def test_unwritable_run_folder_fails_early(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # works even as root, where permission bits do not stop writes
    with pytest.raises(api.RunFolderError, match="cannot write to the run folder"):
        api.prepare_run_dir(out)
    assert _cli("pretrain", "--config", _cfg(tmp_path), "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transmem: error: ") and "cannot write" in err[0]


def test_full_disk_fails_early(tmp_path, monkeypatch, capsys):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(api.shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 50 * 2**20, 50 * 2**20))
    out = tmp_path / "run"
    with pytest.raises(api.RunFolderError, match=r"only 50 MiB free .* below the 200 MiB"):
        api.prepare_run_dir(out)
    assert not out.exists()  # failed before creating anything
    assert _cli("pretrain", "--config", _cfg(tmp_path), "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRANSMEM_MIN_FREE_MB" in err[0]
    monkeypatch.setenv("TRANSMEM_MIN_FREE_MB", "10")
    assert api.prepare_run_dir(out) == out
    monkeypatch.setenv("TRANSMEM_MIN_FREE_MB", "lots")
    with pytest.raises(api.RunFolderError, match="TRANSMEM_MIN_FREE_MB"):
        api.prepare_run_dir(tmp_path / "other")


def test_resume_without_an_earlier_run_is_refused(tmp_path):
    with pytest.raises(api.RunFolderError, match="no earlier run here"):
        api.prepare_run_dir(tmp_path / "nothing", resume=True)


# --------------------------------------------------------------------------------------------
# progress output that is not a terminal (`transmem demo > log`)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress_fit(tmp_path, progress: bool, steps: int = 100):
    cfg = _cfg(tmp_path, steps=steps, val_every=10, ckpt_every=50, progress=progress, reverse_time_prob=0.0)
    d = yaml.safe_load(cfg.read_text())
    d["data"]["train_clips"] = 40  # 10 steps per epoch, a validation every 10 steps
    cfg.write_text(yaml.safe_dump(d))
    exp = load_experiment(cfg)
    datasets = build_datasets(exp.data)
    torch.manual_seed(0)
    model = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=6, stop_step=steps), seed=0)
    fit(module, datasets["train"], datasets["val"], exp.train, tmp_path / f"run-{progress}")
    return module


def test_progress_to_a_file_is_a_few_plain_lines_and_changes_no_result(tmp_path, monkeypatch):
    """100 steps with progress on and standard output redirected: about one line per 10 % of the
    steps (no bar refreshes), with the step counts, the loss and the latest validation MSE; the
    trained weights are those of the same fit without progress output."""
    out = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stdout", out)
    with_lines = _progress_fit(tmp_path, progress=True)
    monkeypatch.undo()
    text = out.getvalue()
    lines = text.splitlines()
    assert 1 <= len(lines) <= 15 and "\r" not in text, text[-2000:]
    assert [int(re.match(r"train step (\d+)/100 ", ln).group(1)) for ln in lines] == list(range(10, 101, 10))
    assert all(re.fullmatch(r"train step \d+/100 loss \S+ .*\d+\.\d s", ln) for ln in lines), lines
    # a step's line comes after that step's validation: every line shows a validation MSE
    assert all(" val/mse " in ln for ln in lines), lines
    without = _progress_fit(tmp_path, progress=False)
    _assert_same_weights(with_lines.state_dict(), without.state_dict())


def test_progress_bars_stay_on_a_terminal():
    assert train_progress(False, io.StringIO()) == (False, [])
    assert train_progress(False, _Terminal()) == (False, [])
    assert train_progress(True, _Terminal()) == (True, [])  # Lightning's own bar
    bar, callbacks = train_progress(True, io.StringIO())
    assert bar and len(callbacks) == 1 and isinstance(callbacks[0], LineProgress)


def test_evaluate_progress_to_a_file_is_a_few_plain_lines(tmp_path, monkeypatch):
    s = io.StringIO()
    assert list(progress_lines(range(100), 100, "evaluate", stream=s)) == list(range(100))
    lines = s.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == [f"{k}/100" for k in range(10, 101, 10)]
    assert all(re.fullmatch(r"evaluate batch \d+/100 \d+\.\d s", ln) for ln in lines), lines
    s = io.StringIO()
    assert list(progress_lines(iter(range(7)), None, "evaluate", stream=s)) == list(range(7))
    assert s.getvalue().splitlines()[-1].startswith("evaluate batch 7 ")  # unknown total: a final line
    # evaluate(progress=True) with standard error redirected: lines, not tqdm refreshes
    exp = load_experiment(_cfg(tmp_path))
    test = build_datasets(exp.data)["test"]
    model = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=6), seed=0)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    quiet = evaluate(module, test, batch_size=1)
    shown = evaluate(module, test, batch_size=1, progress=True)
    monkeypatch.undo()
    assert shown == quiet
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and [ln.split()[2] for ln in lines] == [f"{k}/8" for k in range(1, 9)]


def test_data_generation_progress_to_a_file_is_a_few_plain_lines():
    from transmem.progress import BlockProgress
    s = io.StringIO()
    bar = BlockProgress(1000, "flying digits (train)", force=True, stream=s)
    for k in range(1, 101):  # 100 blocks of 10 clips
        bar.update(10 * k, 100)
    bar.close()
    lines = s.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and "\r" not in s.getvalue()
    assert lines[-1].startswith("flying digits (train) clip 1000/1000 ")
    quiet = io.StringIO()
    bar = BlockProgress(1000, "x", force=False, stream=quiet)
    for k in range(1, 101):
        bar.update(10 * k, 100)
    assert quiet.getvalue() == ""

"""Fault injection with real processes (issue 29; see docs/reliability.md): two runs into one
``--out``, SIGKILL, SIGTERM and SIGINT at chosen moments (start-up, mid-training, while evaluate
and predict write), a full disk (a small tmpfs where it can be mounted, else injected errors),
byte flips and truncation in checkpoints, and inputs far longer than the model needs.

The processes that a scenario needs are started together by one fixture (their imports overlap,
which keeps the file to a couple of minutes on 2 cores); each test then checks one scenario.
Every case asserts exit statuses, the lines on standard error and the files left, so each fails
when the guarantee it checks breaks."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from transmem import api, zoo
from transmem.cli import main
from transmem.models import create_model
from transmem.training import checkpoints

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

SRC = Path(__file__).resolve().parents[1] / "src"

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 8,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
    "train": {"steps": 8, "batch_size": 4, "t_in": 3, "ckpt_every": 3, "progress": False, "threads": 1,
              "val_every": 0},
    "eval": {"batch_size": 8, "examples": 1},
}

WRAPPER = textwrap.dedent('''
    import os, signal, sys, time
    # as in a terminal: a shell running the tests in the background makes children ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import transmem.cli as C
    import transmem.predict as P
    import transmem.run_report as R  # the CLI imports method_report from here when evaluate runs
    from transmem.training import module as M

    E = os.environ
    SIG = getattr(signal, E.get("TM_SIGNAL", "SIGTERM"))
    STEP = int(E.get("TM_SIGNAL_AT_STEP", "-1"))
    KILL = int(E.get("TM_KILL_AT_STEP", "-1"))
    GATE_STEP = int(E.get("TM_GATE_AT_STEP", "-1"))
    GATE, MARK, IN = E.get("TM_GATE"), E.get("TM_MARK"), E.get("TM_IN")
    SLEEP = float(E.get("TM_SLEEP_PER_STEP", "0"))

    def gate():  # say where we are, then wait for the test
        open(MARK, "w").close()
        while not os.path.exists(GATE):
            time.sleep(0.05)

    _step = M.ForecastModule.training_step
    def training_step(self, batch, i):
        s = self.global_step
        if s == KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if s == STEP:
            os.kill(os.getpid(), SIG)
        if s == GATE_STEP and GATE:
            gate()
        if SLEEP:
            time.sleep(SLEEP)
        return _step(self, batch, i)
    M.ForecastModule.training_step = training_step

    def hook(fn):
        def wrapped(*a, **k):
            if GATE:
                gate()
            else:
                os.kill(os.getpid(), SIG)  # while the outputs are being written
            return fn(*a, **k)
        return wrapped
    if IN == "report":
        R.method_report = hook(R.method_report)
    if IN == "forecast":
        P.save_gif = hook(P.save_gif)
    sys.exit(C.main(sys.argv[1:]))
''')


def _env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child's Python then raises on SIGINT


class Proc:
    """A CLI process started now and waited for when a test asks."""

    def __init__(self, cmd, cwd, **env):
        self.p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=_env(**env), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        self.t0 = time.monotonic()
        self._done = None

    def result(self, timeout=400):
        if self._done is None:
            out, err = self.p.communicate(timeout=timeout)
            self._done = (self.p.returncode, out, err)
        return self._done


def _in_imports(proc: Proc, timeout: float = 60.0) -> None:
    """Wait until ``proc`` is importing torch (its shared library is mapped): the CLI's first
    statement, which installs the start-up handlers, has run, and the imports have not ended."""
    maps = Path(f"/proc/{proc.p.pid}/maps")
    t = time.monotonic()
    while time.monotonic() - t < timeout and proc.p.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            break
        time.sleep(0.005)
    time.sleep(0.5)  # no /proc: half a second in, the imports are still running


def _lines(err: str) -> list[str]:
    return [ln for ln in err.strip().splitlines() if ln.strip()]


def _one_line(err: str, *words) -> str:
    lines = _lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _wait_for(path: Path, proc: Proc, timeout=300):
    t = time.monotonic()
    while not path.exists():
        if proc.p.poll() is not None:
            rc, out, err = proc.result()
            raise AssertionError(f"process ended ({rc}) before {path} appeared: {err[-3000:]}")
        assert time.monotonic() - t < timeout, f"{path} did not appear"
        time.sleep(0.05)


def _ckpt_step(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]


def _weights(run) -> dict:
    return load_file(str(Path(run) / "model" / "weights.safetensors"))


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


# --------------------------------------------------------------------------------------------
# the world: a config, a zoo entry, earlier evaluate results, and every process started at once


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("faults")
    (w / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    torch.manual_seed(0)
    entry = zoo.save_entry(create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4),
                           w / "zoo" / "tiny", {"t_in": 3, "t_out": 3, "frame_size": [16, 16], "channels": 1,
                                                "data": TINY["data"]})
    frames = (np.random.default_rng(0).random((8, 16, 16)) * 255).astype(np.uint8)
    np.save(w / "frames.npy", frames)
    earlier = w / "ev-earlier"  # results of an earlier evaluate, and a file of the user's
    earlier.mkdir()
    for name, text in (("metrics.json", '{"mse": 1.0}'), ("report.md", "# earlier\n"), ("notes.txt", "mine\n")):
        (earlier / name).write_text(text)
    return w


@pytest.fixture(scope="module")
def procs(world):
    """Every scenario's process, started together."""
    w, cfg, py, wrapper = world, world / "cfg.yaml", sys.executable, world / "wrapper.py"
    wrapper.write_text(WRAPPER)
    train = ["pretrain", "--config", cfg]
    ev = ["evaluate", "--model", w / "zoo" / "tiny", "--config", cfg]
    pr = ["predict", "--model", w / "zoo" / "tiny", "--input", w / "frames.npy"]
    p = {}
    # start-up: the signal arrives while the imports run (0.5 s in; they take seconds)
    p["startup-SIGTERM"] = Proc([py, "-m", "transmem.cli", *train, "--out", w / "startup-term"], w)
    p["startup-SIGINT"] = Proc([py, "-c", "import sys; from transmem.cli import main; sys.exit(main())",
                                *train, "--out", w / "startup-int"], w)
    for name, sig in (("startup-SIGTERM", signal.SIGTERM), ("startup-SIGINT", signal.SIGINT)):
        _in_imports(p[name])
        p[name].p.send_signal(sig)
    for sig in ("SIGTERM", "SIGINT"):
        p[f"train-{sig}"] = Proc([py, wrapper, *train, "--out", w / f"train-{sig}"], w, TM_SIGNAL=sig,
                                 TM_SIGNAL_AT_STEP=4)
    p["kill"] = Proc([py, wrapper, *train, "--out", w / "killed"], w, TM_KILL_AT_STEP=4)
    p["report-SIGTERM"] = Proc([py, wrapper, *ev, "--out", w / "ev-earlier", "--overwrite"], w, TM_IN="report")
    p["report-SIGINT"] = Proc([py, wrapper, *ev, "--out", w / "ev-int"], w, TM_IN="report", TM_SIGNAL="SIGINT")
    p["forecast-SIGTERM"] = Proc([py, wrapper, *pr, "--out", w / "pred-term"], w, TM_IN="forecast")
    # two identical runs started at the same moment into one --out
    for k in (1, 2):
        p[f"twin{k}"] = Proc([py, wrapper, *train, "--out", w / "twins"], w, TM_SLEEP_PER_STEP=0.05)
    # runs held at a gate while a second command tries the same --out
    for name, cmd, env in (("hold-train", [*train, "--out", w / "held"], {"TM_GATE_AT_STEP": 4}),
                           ("hold-eval", [*ev, "--out", w / "held-ev"], {"TM_IN": "report"}),
                           ("hold-predict", [*pr, "--out", w / "held-pred"], {"TM_IN": "forecast"})):
        p[name] = Proc([py, wrapper, *cmd], w, TM_GATE=w / f"{name}.go", TM_MARK=w / f"{name}.here", **env)
    yield p
    for proc in p.values():
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait()


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run (in this process) that interrupted-and-resumed runs must equal."""
    out = world / "reference"
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out)]) == 0
    return out


# --------------------------------------------------------------------------------------------
# 1. ownership of run and output folders


def test_twin_runs_into_one_out_one_trains_the_other_is_refused_and_nothing_is_lost(procs, world):
    r1, r2 = procs["twin1"].result(), procs["twin2"].result()
    assert sorted([r1[0], r2[0]]) == [0, 2], (r1[2][-2000:], r2[2][-2000:])
    loser = r1 if r1[0] == 2 else r2
    line = _one_line(loser[2], "twins")
    assert "in use by another transmem process" in line or "exists and is not empty" in line, line
    out = world / "twins"  # the winner's run is complete: the loser removed nothing
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 8
    zoo.load_entry(out / "model")
    assert _ckpt_step(out / "checkpoints" / "last.ckpt") == 8
    assert not (out / ".transmem.lock").exists() and not _tmp_files(out)


def test_second_run_into_a_training_folder_is_refused_before_anything_and_removes_nothing(procs, world, capsys):
    a = procs["hold-train"]
    out = world / "held"
    _wait_for(world / "hold-train.here", a)  # A is at step 4, holding the folder
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--resume"]):
        assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), *extra]) == 2
        _one_line(capsys.readouterr().err, str(out), "in use by another transmem process")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    (world / "hold-train.go").touch()
    rc, _, err = a.result()
    assert rc == 0, err[-3000:]
    assert (out / "metrics.json").is_file() and _ckpt_step(out / "checkpoints" / "last.ckpt") == 8
    assert not (out / ".transmem.lock").exists()


@pytest.mark.parametrize("cmd", ["eval", "predict"])
def test_second_evaluate_or_predict_into_a_busy_out_is_refused(procs, world, capsys, cmd):
    name = f"hold-{cmd}"
    out = world / ("held-ev" if cmd == "eval" else "held-pred")
    _wait_for(world / f"{name}.here", procs[name])  # A is writing its outputs (in a temporary folder)
    args = (["evaluate", "--model", str(world / "zoo" / "tiny"), "--config", str(world / "cfg.yaml")]
            if cmd == "eval" else ["predict", "--model", str(world / "zoo" / "tiny"), "--input",
                                   str(world / "frames.npy")])
    assert main([*args, "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, str(out), "in use by another transmem process")
    assert not out.exists()  # B wrote nothing; A's outputs are not in place yet
    (world / f"{name}.go").touch()
    rc, _, err = procs[name].result()
    assert rc == 0, err[-3000:]
    assert (out / ("report.md" if cmd == "eval" else "prediction.npy")).is_file()
    assert not list(world.glob(f".{out.name}.*")), "temporary folder or lock file left beside --out"


# --------------------------------------------------------------------------------------------
# 2. signals


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_start_up_ends_with_one_line(procs, world, sig):
    rc, _, err = procs[f"startup-{sig}"].result()
    assert rc == 128 + getattr(signal, sig), (rc, err[-3000:])
    _one_line(err, "transmem: interrupted", sig)
    assert not (world / ("startup-term" if sig == "SIGTERM" else "startup-int")).exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_training_saves_the_step_then_resume_equals_uninterrupted_run(procs, world, reference, sig):
    rc, _, err = procs[f"train-{sig}"].result()
    out = world / f"train-{sig}"
    assert rc == 128 + getattr(signal, sig), (rc, err[-3000:])
    _one_line(err, "transmem: interrupted", sig)
    # the step that was running when the signal came was finished and checkpointed (5 is not a
    # multiple of ckpt_every=3: this checkpoint exists only because of the signal)
    assert _ckpt_step(out / "checkpoints" / "last.ckpt") == 5
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    assert not _tmp_files(out) and not (out / ".transmem.lock").exists()
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), "--resume"]) == 0
    _same_weights(_weights(out), _weights(reference))


def test_signal_while_evaluate_writes_keeps_the_earlier_results(procs, world):
    rc, _, err = procs["report-SIGTERM"].result()
    assert rc == 143, err[-3000:]
    _one_line(err, "transmem: interrupted (SIGTERM)")
    earlier = world / "ev-earlier"  # --overwrite was given: the earlier results stay until the new ones are complete
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.json", "notes.txt", "report.md"]
    assert (earlier / "metrics.json").read_text() == '{"mse": 1.0}'
    assert not list(world.glob(".ev-earlier.*"))


def test_ctrl_c_while_evaluate_writes_leaves_no_output(procs, world):
    rc, _, err = procs["report-SIGINT"].result()
    assert rc == 130, err[-3000:]
    _one_line(err, "transmem: interrupted (SIGINT)")
    assert not (world / "ev-int").exists() and not list(world.glob(".ev-int.*"))
    # the same command then runs without --overwrite
    assert main(["evaluate", "--model", str(world / "zoo" / "tiny"), "--config", str(world / "cfg.yaml"),
                 "--out", str(world / "ev-int")]) == 0
    assert {"metrics.json", "report.md", "report.html", "figures"} <= {p.name for p in (world / "ev-int").iterdir()}


def test_evaluate_overwrite_keeps_the_users_other_files(world):
    out = world / "ev-keep"
    shutil.copytree(world / "ev-earlier", out)
    assert main(["evaluate", "--model", str(world / "zoo" / "tiny"), "--config", str(world / "cfg.yaml"),
                 "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "metrics.json").read_text())["mse"] != 1.0


def test_signal_while_predict_writes_leaves_no_forecast(procs, world):
    rc, _, err = procs["forecast-SIGTERM"].result()
    assert rc == 143, err[-3000:]
    _one_line(err, "transmem: interrupted (SIGTERM)")
    assert not (world / "pred-term").exists() and not list(world.glob(".pred-term.*"))


def test_sigkill_leaves_a_stale_lock_that_does_not_block_resume(procs, world, reference, capsys):
    rc, _, err = procs["kill"].result()
    assert rc == -signal.SIGKILL, err[-2000:]
    out = world / "killed"
    assert _ckpt_step(out / "checkpoints" / "last.ckpt") == 3
    keep = world / "killed-copy"  # for the checkpoint-damage tests below
    shutil.copytree(out, keep)
    # not --resume: refused (the folder holds a run), nothing removed
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, "--resume")
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), "--resume"]) == 0
    _same_weights(_weights(out), _weights(reference))


# --------------------------------------------------------------------------------------------
# 3. damaged checkpoints


def _killed_run(world, tmp_path) -> Path:
    src = world / "killed-copy"
    if not src.exists():
        pytest.skip("needs test_sigkill_leaves_a_stale_lock_that_does_not_block_resume first")
    out = tmp_path / "run"
    shutil.copytree(src, out)
    return out


def _flip(path: Path, member: str) -> None:
    """Flip one byte in the middle of the zip member whose name ends with ``member``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _largest_tensor_record(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename


def test_bit_flip_in_last_ckpt_falls_back_to_the_previous_good_checkpoint(world, tmp_path, reference, capsys):
    out = _killed_run(world, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    _flip(last, _largest_tensor_record(last))
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), "--resume"]) == 0
    warn = [ln for ln in _lines(capsys.readouterr().err) if ln.startswith("transmem:")]
    assert len(warn) == 1 and "last.ckpt" in warn[0] and "damaged" in warn[0] and "step3.ckpt" in warn[0], warn
    _same_weights(_weights(out), _weights(reference))


@pytest.mark.parametrize("damage", ["weights", "pickle", "empty", "truncated"])
def test_damaged_checkpoint_without_a_good_one_is_refused_in_one_line(world, tmp_path, capsys, damage):
    out = _killed_run(world, tmp_path)
    for f in (out / "checkpoints").glob("step*.ckpt"):
        f.unlink()
    last = out / "checkpoints" / "last.ckpt"
    if damage == "weights":
        _flip(last, _largest_tensor_record(last))
    elif damage == "pickle":
        _flip(last, "data.pkl")
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = sorted(p.name for p in out.rglob("*") if p.name != ".transmem.lock")  # (the killed run's)
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err, "transmem: error:", str(last))
    assert "empty file" in line if damage == "empty" else "damaged" in line
    for bad in ("weights_only", "could run code", "mmap can only", "allowlist", "safe_globals"):
        assert bad not in line, line
    assert sorted(p.name for p in out.rglob("*") if p.name != ".transmem.lock") == before


def test_every_checkpoint_carries_the_sha256_of_its_content(reference):
    for f in (reference / "checkpoints").glob("*.ckpt"):
        ck = torch.load(f, map_location="cpu", weights_only=True)
        assert ck[checkpoints.CHECKSUM_KEY] == checkpoints.content_sha256(ck)
        ck["global_step"] += 1  # any change to the content changes it
        assert ck[checkpoints.CHECKSUM_KEY] != checkpoints.content_sha256(ck)


# --------------------------------------------------------------------------------------------
# 4. full disks: a real small file system where one can be mounted, injected errors otherwise


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:100]}); the injected-error tests cover this")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@contextlib.contextmanager
def _full(disk: Path):
    """``fill()`` fills ``disk`` to the last byte; the filler goes away after the block."""
    filler = disk / "filler"

    def fill():
        with open(filler, "ab", buffering=0) as f:
            for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    continue
    try:
        yield fill
    finally:
        filler.unlink(missing_ok=True)


def _no_space_line(err: str, path) -> str:
    line = _one_line(err, "transmem: error:", str(path), "No space left on device", "free on its file system")
    return line


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(small_disk, world, monkeypatch, capsys):
    from transmem.training import module as M
    out = small_disk / "ckpt-run"
    monkeypatch.setenv("TRANSMEM_MIN_FREE_MB", "0")
    real = M.ForecastModule.training_step
    with _full(small_disk) as fill:
        def step(self, batch, i):
            if self.global_step == 4:
                fill()
            return real(self, batch, i)
        monkeypatch.setattr(M.ForecastModule, "training_step", step)
        assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out)]) == 2
        line = _no_space_line(capsys.readouterr().err, out / "checkpoints")
        assert "previous checkpoint is kept" in line
        assert _ckpt_step(out / "checkpoints" / "last.ckpt") == 3
        assert not _tmp_files(out)
    monkeypatch.setattr(M.ForecastModule, "training_step", real)
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out), "--resume"]) == 0
    shutil.rmtree(out)


@pytest.mark.parametrize("what", ["metrics", "zoo"])
def test_disk_full_while_writing_results_or_the_zoo_entry_keeps_the_previous_state(small_disk, world, tmp_path,
                                                                                   monkeypatch, capsys, what):
    monkeypatch.setenv("TRANSMEM_MIN_FREE_MB", "0")
    out = (small_disk if what == "metrics" else tmp_path) / "res-run"
    zroot = small_disk / "zoo"
    real = api.evaluate_forecaster
    with _full(small_disk) as fill:
        def evaluate(*a, **k):
            m = real(*a, **k)
            fill()  # after training, before metrics.json / the zoo entry
            return m
        monkeypatch.setattr(api, "evaluate_forecaster", evaluate)
        args = ["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out)]
        if what == "zoo":
            args += ["--zoo-name", "full", "--zoo-root", str(zroot)]
        assert main(args) == 2
        err = capsys.readouterr().err
        _no_space_line(err, out / "metrics.json" if what == "metrics" else zroot / "full")
        assert not (zroot / "full").exists() and not _tmp_files(small_disk) and not _tmp_files(out)
        assert _ckpt_step(out / "checkpoints" / "last.ckpt") == 8  # the final state was saved first
    monkeypatch.setattr(api, "evaluate_forecaster", real)
    assert main([*args, "--resume"]) == 0  # space again: the results are written, nothing retrained
    assert (out / "metrics.json").is_file()
    shutil.rmtree(out)
    shutil.rmtree(zroot, ignore_errors=True)


@pytest.mark.parametrize("cmd", ["evaluate", "predict"])
def test_disk_full_while_writing_the_report_or_forecast_leaves_nothing(small_disk, world, monkeypatch, capsys, cmd):
    import transmem.predict as P
    import transmem.run_report as R
    out = small_disk / f"{cmd}-out"
    with _full(small_disk) as fill:
        if cmd == "evaluate":
            real = R.method_report
            monkeypatch.setattr(R, "method_report", lambda *a, **k: (fill(), real(*a, **k))[1])
            args = ["evaluate", "--model", str(world / "zoo" / "tiny"), "--config", str(world / "cfg.yaml")]
        else:
            real = P.save_gif
            monkeypatch.setattr(P, "save_gif", lambda *a, **k: (fill(), real(*a, **k))[1])
            args = ["predict", "--model", str(world / "zoo" / "tiny"), "--input", str(world / "frames.npy")]
        assert main([*args, "--out", str(out)]) == 2
        _no_space_line(capsys.readouterr().err, out)
        assert not out.exists() and not _tmp_files(small_disk) and not list(small_disk.glob(".*.lock"))


def test_injected_write_errors_end_in_one_line_with_the_free_space(world, tmp_path, monkeypatch, capsys):
    """Without a mountable file system: torch's RuntimeError after an ENOSPC while writing a
    checkpoint, and safetensors' SafetensorError (not an OSError) while saving a zoo entry."""
    import errno
    from safetensors import SafetensorError
    real_save = torch.save

    def torch_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == 6:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", torch_save)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err, str(out / "checkpoints"), ".ckpt: cannot write the checkpoint",
                     "No space left on device", "free on its file system")
    assert "previous checkpoint is kept" in line and _ckpt_step(out / "checkpoints" / "last.ckpt") == 3
    assert not _tmp_files(out)
    monkeypatch.setattr(torch, "save", real_save)

    def save_file(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(zoo, "save_file", save_file)
    with pytest.raises(OSError, match=r"weights.safetensors: cannot write \(No space left on device; .* free on"):
        zoo.save_entry(create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4),
                       tmp_path / "zoo" / "e")
    assert not (tmp_path / "zoo" / "e").exists() and not _tmp_files(tmp_path / "zoo")


# --------------------------------------------------------------------------------------------
# 5. inputs longer than memory needs


def _peak_reading(path: Path) -> tuple[int, np.ndarray]:
    from transmem.predict import read_forecast_input
    tracemalloc.start()
    frames, _, _ = read_forecast_input(path, {}, 1, 16, last=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, frames


def test_predict_reads_only_the_frames_it_needs_from_a_long_npy(world, tmp_path):
    rng = np.random.default_rng(1)
    long = (rng.random((20000, 64, 64)) * 255).astype(np.uint8)  # 78 MiB on disk, 313 MiB as float32
    np.save(tmp_path / "long.npy", long)
    np.save(tmp_path / "short.npy", long[-8:])
    del long
    peak_long, a = _peak_reading(tmp_path / "long.npy")
    peak_short, b = _peak_reading(tmp_path / "short.npy")
    assert np.array_equal(a, b) and a.shape == (3, 1, 16, 16)
    assert peak_long < 2 * peak_short + (1 << 20), (peak_long, peak_short)  # not ~80-400 MiB
    # and the forecast from the long file is the forecast from its last frames
    for name in ("long", "short"):
        assert main(["predict", "--model", str(world / "zoo" / "tiny"), "--input", str(tmp_path / f"{name}.npy"),
                     "--out", str(tmp_path / f"p-{name}")]) == 0
    assert np.array_equal(np.load(tmp_path / "p-long" / "prediction.npy"),
                          np.load(tmp_path / "p-short" / "prediction.npy"))


def test_a_video_input_keeps_only_its_last_frames_while_decoding(tmp_path):
    from PIL import Image
    from transmem.data.inputs import read_input_frames
    rng = np.random.default_rng(2)
    frames = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(40)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    whole = read_input_frames(tmp_path / "v.gif", size=16)
    last = read_input_frames(tmp_path / "v.gif", size=16, last=3)
    assert whole.shape[0] == 40 and np.array_equal(last, whole[-3:])


def test_a_gridded_input_decodes_only_the_last_frames(tmp_path, monkeypatch, capsys):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    from transmem.data import gridded
    from transmem.predict import read_forecast_input
    times = np.arange(np.datetime64("2024-01-01T00:00"), np.datetime64("2024-01-01T00:00") + np.timedelta64(5 * 300, "m"),
                      np.timedelta64(5, "m"))
    times = np.concatenate([times[:200], times[210:]])  # a 55-minute gap, then 90 frames
    rain = (np.random.default_rng(3).random((len(times), 16, 16)) * 5).astype(np.float32)
    xr.Dataset({"rain": (("time", "y", "x"), rain, {"units": "mm/h"})}, coords={"time": times}).to_netcdf(
        tmp_path / "long.nc", engine="h5netcdf")
    decoded = []
    real = gridded._Decoder._load
    monkeypatch.setattr(gridded._Decoder, "_load", lambda self, f, idx: (decoded.extend(idx), real(self, f, idx))[1])
    frames, mask, grid = read_forecast_input(tmp_path / "long.nc", {"name": "xarray", "extra": {"variable": "rain"}},
                                             1, 16, last=4)
    assert sorted(decoded) == list(range(len(times) - 4, len(times)))  # 4 of 290 frames read
    assert frames.shape == (4, 1, 16, 16) and list(grid.times) == list(times[-4:])
    assert "1 gap(s) in time; forecasting from the 90 frames" in capsys.readouterr().out

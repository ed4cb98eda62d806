"""Every bad input, config, zoo card and output path is refused cleanly, and nothing of the user's
changes (issue 20, docs/reliability.md).

One table, ``CASES``: each case builds its malformed input in a fresh folder and gives the command
line. Every case asserts the exit status, exactly one line on standard error that names the file
or the key, no traceback, no new file anywhere under the case's folder and the shared fixtures
(no run folder, no temporary file), and the sha256 of every file that was there before unchanged.
The commands run in-process (``transmem.cli.main``); only the signal and alias-bomb timing tests
start a subprocess. Readers that could block (a FIFO) run under a 5-second alarm.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from transmem import api, files, zoo
from transmem.cli import main
from transmem.config import load_experiment
from transmem.models import create_model

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 8, "val_clips": 4,
             "test_clips": 4, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
    "train": {"steps": 2, "batch_size": 4, "t_in": 3, "ckpt_every": 1, "progress": False, "threads": 1},
    "eval": {"batch_size": 4, "examples": 1},
}
NOMODEL = {k: v for k, v in TINY.items() if k != "model"}


def _entry(path: Path, hidden=4, patch=4, card_extra=None, seed=0) -> Path:
    torch.manual_seed(seed)
    m = create_model("convlstm", num_layers=1, hidden=hidden, filter_size=3, patch_size=patch)
    card = {"t_in": 3, "t_out": 3, "frame_size": [16, 16], "channels": 1, "data": dict(TINY["data"]),
            **(card_extra or {})}
    return zoo.save_entry(m, path, card)


def _fmi(folder: Path, minutes: list[int]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for m in minutes:
        a = rng.integers(60, 120, (16, 16)).astype(np.uint8)
        name = f"2016092814{m:02d}_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz" if m < 60 else \
            f"2016092815{m - 60:02d}_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz"
        (folder / name).write_bytes(gzip.compress(b"P5\n16 16\n255\n" + a.tobytes()))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared, read-only for the cases: configs, zoo entries (a backbone, one with patch 8, a
    bank_read TMU with its teacher), an input folder of frames, a finished and an unfinished run."""
    w = tmp_path_factory.mktemp("world")
    (w / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    (w / "nomodel.yaml").write_text(yaml.safe_dump(NOMODEL))
    good = _entry(w / "zoo" / "good")
    _entry(w / "zoo" / "other", seed=1)
    _entry(w / "zoo" / "p8", patch=8)
    exp = load_experiment(w / "cfg.yaml", {"transfer.mode": "bank_read", "transfer.teacher_inputs": "own"})
    model, _, teachers_card = api.build_transfer(exp, [str(good)])
    zoo.save_entry(model, w / "zoo" / "tmu", {"t_in": 3, "t_out": 3, "frame_size": [16, 16], "channels": 1,
                                               "teachers": teachers_card, "data": dict(TINY["data"])})
    (w / "frames").mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(w / "frames" / f"f{i}.png")
    torch.manual_seed(0)
    assert main(["pretrain", "--config", str(w / "cfg.yaml"), "--out", str(w / "done")]) == 0
    import shutil
    shutil.copytree(w / "done", w / "stopped")
    for name in ("metrics.json", "model"):  # as if killed after training, before the results
        p = w / "stopped" / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return w


def _snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` (links not followed) -> sha256 of a regular file, else its kind."""
    out = {}
    for root in roots:
        for d, dirs, fs in os.walk(root):
            for n in dirs + fs:
                p = Path(d) / n
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[str(p)] = stat.filemode(st.st_mode)[0]
    return out


class _Alarm:
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted after ``s`` seconds."""

    def __init__(self, s: int = 5):
        self.s = s

    def __enter__(self):
        def boom(*_):
            raise TimeoutError(f"still running after {self.s} s (blocked?)")
        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.s)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# --------------------------------------------------------------------------------------------
# the cases: name -> (setup(t, w) -> argv, the text stderr must hold)
# ``t``: the case's own folder, ``w``: the shared world. Setups may also return (argv, patches)
# with patches a list of (object, attribute, value) for monkeypatch.


def _pre(t, w, *extra, cfg="cfg.yaml"):
    return ["pretrain", "--config", w / cfg, "--out", t / "run", *extra]


def _eval(t, w, *extra, out=None):
    return ["evaluate", "--baseline", "persistence", "--config", w / "cfg.yaml", "--out", out or t / "ev", *extra]


def _pred(t, w, out=None, model=None, inp=None):
    return ["predict", "--model", model or w / "zoo" / "good", "--input", inp or w / "frames", "--out", out or t / "p"]


def _yaml(t, text: str | bytes, name="c.yaml"):
    p = t / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _copy_entry(t, w, name="good") -> Path:
    import shutil
    shutil.copytree(w / "zoo" / name, t / name)
    return t / name


def _edit_card(entry: Path, **changes) -> Path:
    card = json.loads((entry / "card.json").read_text())
    card.update(changes)
    (entry / "card.json").write_text(json.dumps(card))
    return entry


def _card_text(t, w, text: bytes) -> Path:
    e = _copy_entry(t, w)
    (e / "card.json").write_bytes(text)
    return e


def _weights(t, w, state_fn) -> Path:
    """A copy of the good entry whose weights are ``state_fn(state)``, with the card's sha256
    updated to match (so only the new checks can refuse it)."""
    e = _copy_entry(t, w)
    from safetensors.torch import load_file
    state = state_fn(load_file(str(e / "weights.safetensors")))
    save_file(state, str(e / "weights.safetensors"))
    return _edit_card(e, sha256=zoo.sha256_file(e / "weights.safetensors"))


def _nan(state):
    k = next(iter(state))
    state[k] = state[k].clone()
    state[k].view(-1)[0] = float("nan")
    return state


def _wider(state):
    torch.manual_seed(0)
    big = create_model("convlstm", num_layers=1, hidden=8, filter_size=3, patch_size=4)
    return {k: v.contiguous() for k, v in big.state_dict().items()}


def _readonly(target: Path):
    """Patches making ``target``'s file system read-only (statvfs reports ST_RDONLY)."""
    real = os.statvfs

    def fake(p):
        st = real(p)
        if str(target) in os.path.abspath(p) or os.path.abspath(p) in str(target):
            vals = list(st)
            vals[8] |= os.ST_RDONLY
            return os.statvfs_result(vals)
        return st
    return [(os, "statvfs", fake)]


def _dangling(t):
    (t / "link").symlink_to(t / "missing")
    return t / "link"


def _file(t):
    (t / "a-file").write_text("mine")
    return t / "a-file"


def _earlier(t, *names) -> Path:
    """An evaluate --out folder holding an earlier report (no metrics.json)."""
    for n in names:
        (t / "ev" / n).parent.mkdir(parents=True, exist_ok=True)
        (t / "ev" / n).write_text("mine")
    return t / "ev"


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _tmu_teacher_replaced(t, w):
    """The bank_read entry with its teacher path now holding another entry's weights."""
    import shutil
    shutil.copytree(w / "zoo", t / "zoo")
    card = json.loads((t / "zoo" / "tmu" / "card.json").read_text())
    card["teachers"][0]["entry"] = str(t / "zoo" / "good")
    (t / "zoo" / "tmu" / "card.json").write_text(json.dumps(card))  # the card's own sha256 is of the weights
    shutil.rmtree(t / "zoo" / "good")
    shutil.copytree(t / "zoo" / "other", t / "zoo" / "good")
    return t / "zoo" / "tmu"


def _tmu_teacher_repointed(t, w):
    import shutil
    shutil.copytree(w / "zoo", t / "zoo")
    card = json.loads((t / "zoo" / "tmu" / "card.json").read_text())
    card["teachers"][0]["entry"] = str(t / "zoo" / "other")
    (t / "zoo" / "tmu" / "card.json").write_text(json.dumps(card))
    return t / "zoo" / "tmu"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)) + "data: {extra: {x: *i}}\n"

CASES = {
    # ---- config values that parse but are out of range or of the wrong kind
    "steps-zero": (lambda t, w: _pre(t, w, "--train.steps", "0"), "train.steps"),
    "steps-negative": (lambda t, w: _pre(t, w, "--train.steps", "-5"), "train.steps"),
    "steps-true": (lambda t, w: _pre(t, w, "--train.steps", "true"), "train.steps"),
    "steps-fraction": (lambda t, w: _pre(t, w, "--train.steps", "1.5"), "train.steps"),
    "steps-word": (lambda t, w: _pre(t, w, "--train.steps", "many"), "train.steps"),
    "batch-zero": (lambda t, w: _pre(t, w, "--train.batch_size", "0"), "train.batch_size"),
    "batch-absurd": (lambda t, w: _pre(t, w, "--train.batch_size", "100000000"), "train.batch_size"),
    "batch-too-big-for-memory": (lambda t, w: _pre(t, w, "--train.batch_size", "900000"), "train.batch_size"),
    "lr-nan": (lambda t, w: _pre(t, w, "--train.lr", "nan"), "train.lr"),
    "lr-inf": (lambda t, w: _pre(t, w, "--train.lr", ".inf"), "train.lr"),
    "lr-negative": (lambda t, w: _pre(t, w, "--train.lr", "-0.1"), "train.lr"),
    "lr-huge": (lambda t, w: _pre(t, w, "--train.lr", "1e9"), "train.lr"),
    "lr-bool": (lambda t, w: _pre(t, w, "--train.lr", "false"), "train.lr"),
    "patch-zero": (lambda t, w: _pre(t, w, "--model.patch_size", "0"), "model.patch_size"),
    "patch-not-dividing": (lambda t, w: _pre(t, w, "--model.patch_size", "3"), "model.patch_size"),
    "t_in-zero": (lambda t, w: _pre(t, w, "--train.t_in", "0"), "train.t_in"),
    "t_in-all-frames": (lambda t, w: _pre(t, w, "--train.t_in", "6"), "train.t_in"),
    "threads-negative": (lambda t, w: _pre(t, w, "--train.threads", "-1"), "train.threads"),
    "hidden-negative": (lambda t, w: _pre(t, w, "--model.hidden", "-4"), "model.hidden"),
    "hidden-huge": (lambda t, w: _pre(t, w, "--model.hidden", "100000"), "model.hidden"),
    "filter-even": (lambda t, w: _pre(t, w, "--model.filter_size", "4"), "model.filter_size"),
    "layers-zero": (lambda t, w: _pre(t, w, "--model.num_layers", "0"), "model.num_layers"),
    "norm-unknown": (lambda t, w: _pre(t, w, "--model.norm", "batch"), "model.norm"),
    "precision-unknown": (lambda t, w: _pre(t, w, "--train.precision", "fp7"), "train.precision"),
    "accelerator-unknown": (lambda t, w: _pre(t, w, "--train.accelerator", "abacus"), "train.accelerator"),
    "frame-size-huge": (lambda t, w: _pre(t, w, "--data.size", "1000000"), "data.size"),
    "clips-huge": (lambda t, w: _pre(t, w, "--data.train_clips", "100000000"), "data.train_clips"),
    "clips-too-many-for-memory": (lambda t, w: _pre(t, w, "--data.train_clips", "5000000", "--data.size", "1024"),
                                  "data.size"),
    "list-override-malformed": (lambda t, w: _pre(t, w, "--train.augment", "[flip"), "train.augment"),
    "list-item-unknown": (lambda t, w: _pre(t, w, "--train.augment", "flip,shear"), "train.augment"),
    "thresholds-not-numbers": (lambda t, w: _pre(t, w, "--eval.thresholds", "[1, x]"), "eval.thresholds"),
    "switch-not-bool": (lambda t, w: _pre(t, w, "--train.select_best", "3"), "train.select_best"),
    "probability-above-one": (lambda t, w: _pre(t, w, "--train.reverse_time_prob", "2"), "train.reverse_time_prob"),
    "channels-two": (lambda t, w: _pre(t, w, "--data.channels", "2"), "data.channels"),
    "split-two-fractions": (lambda t, w: _pre(t, w, "--data.split", "[0.5, 0.5]"), "data.split"),
    "distill-weight-nan": (lambda t, w: _pre(t, w, "--transfer.distill_weight", "nan"), "transfer.distill_weight"),
    "devices-zero": (lambda t, w: _pre(t, w, "--train.devices", "0"), "train.devices"),
    "tmu-layers-negative": (lambda t, w: _pre(t, w, "--transfer.tmu_layers", "[-1]"), "transfer.tmu_layers"),
    "ckpt-every-zero": (lambda t, w: _pre(t, w, "--train.ckpt_every", "0"), "train.ckpt_every"),
    "eval-batch-zero": (lambda t, w: _pre(t, w, "--eval.batch_size", "0"), "eval.batch_size"),
    "eval-split-unknown": (lambda t, w: _pre(t, w, "--eval.split", "holdout"), "eval.split"),
    "frames-one": (lambda t, w: _pre(t, w, "--data.frames", "1"), "data.frames"),
    "crop-not-dividing": (lambda t, w: _pre(t, w, "--train.crop", "7"), "train.crop"),
    "seed-negative": (lambda t, w: _pre(t, w, "--train.seed", "-1"), "train.seed"),
    "extra-not-mapping": (lambda t, w: _pre(t, w, "--data.extra", "[1]"), "data.extra"),
    "override-without-section": (lambda t, w: _pre(t, w, "--steps", "3"), "--steps"),
    "distill-weight-flag-nan": (lambda t, w: ["transfer", "--config", w / "cfg.yaml", "--teachers", w / "zoo" / "good",
                                              "--distill-weight", "nan", "--out", t / "r"], "transfer.distill_weight"),
    "strategy-unknown": (lambda t, w: _pre(t, w, "--train.strategy", "foo"), "train.strategy"),
    "accelerator-absent": (lambda t, w: _pre(t, w, "--train.accelerator", "mps"), "train.accelerator"),
    "model-unknown": (lambda t, w: _pre(t, w, "--model.name", "nope"), "nope"),
    "model-unknown-key": (lambda t, w: _pre(t, w, "--model.foo", "1"), "foo"),
    "zoo-name-with-slash": (lambda t, w: _pre(t, w, "--zoo-name", "../x", "--zoo-root", w / "zoo"), "--zoo-name"),
    # ---- the config file itself
    "config-not-utf8": (lambda t, w: _pre(t, w, cfg=_yaml(t, b"train:\n  steps: \xff\xfe\n")), "c.yaml"),
    "config-latin1": (lambda t, w: _pre(t, w, cfg=_yaml(t, "data:\n  name: caf\xe9\n".encode("latin-1"))), "c.yaml"),
    "config-is-a-folder": (lambda t, w: _pre(t, w, cfg=t), "is a folder"),
    "config-is-a-fifo": (lambda t, w: _pre(t, w, cfg=_fifo(t / "f.yaml")), "f.yaml"),
    "config-missing": (lambda t, w: _pre(t, w, cfg=t / "nope.yaml"), "nope.yaml"),
    "config-duplicate-key": (lambda t, w: _pre(t, w, cfg=_yaml(t, "train:\n  steps: 2\n  steps: 3\n")), "steps"),
    "config-duplicate-section": (lambda t, w: _pre(t, w, cfg=_yaml(t, "train: {steps: 2}\ntrain: {lr: 0.1}\n")),
                                 "duplicate key 'train'"),
    "config-alias-bomb": (lambda t, w: _pre(t, w, cfg=_yaml(t, BOMB)), "c.yaml"),
    "config-huge-document": (lambda t, w: _pre(t, w, cfg=_yaml(t, "# " + "x" * (2 << 20) + "\n")), "c.yaml"),
    "config-a-list": (lambda t, w: _pre(t, w, cfg=_yaml(t, "- train\n- data\n")), "c.yaml"),
    "config-section-a-list": (lambda t, w: _pre(t, w, cfg=_yaml(t, "train: [1, 2]\n")), "train"),
    "config-python-tag": (lambda t, w: _pre(t, w, cfg=_yaml(t, "train: !!python/object/apply:os.system ['touch PWNED']\n")),
                          "c.yaml"),
    "config-unknown-section": (lambda t, w: _pre(t, w, cfg=_yaml(t, "trian: {steps: 2}\n")), "trian"),
    "config-bad-yaml": (lambda t, w: _pre(t, w, cfg=_yaml(t, "train: {steps: 2\n")), "c.yaml"),
    # ---- output paths, for evaluate, pretrain and predict
    "evaluate-out-is-a-file": (lambda t, w: _eval(t, w, out=_file(t)), "a-file"),
    "pretrain-out-is-a-file": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", _file(t)], "a-file"),
    "predict-out-is-a-file": (lambda t, w: _pred(t, w, out=_file(t)), "a-file"),
    "evaluate-out-dangling-link": (lambda t, w: _eval(t, w, out=_dangling(t)), "link"),
    "pretrain-out-dangling-link": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", _dangling(t)], "link"),
    "predict-out-dangling-link": (lambda t, w: _pred(t, w, out=_dangling(t)), "link"),
    "evaluate-out-under-a-file": (lambda t, w: _eval(t, w, out=_file(t) / "ev"), "a-file"),
    "pretrain-out-under-a-file": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", _file(t) / "r"],
                                  "a-file"),
    "predict-out-under-a-file": (lambda t, w: _pred(t, w, out=_file(t) / "p"), "a-file"),
    "evaluate-out-read-only-fs": (lambda t, w: (_eval(t, w, out=t / "ro" / "ev"), _readonly(t / "ro")), "read-only"),
    "pretrain-out-read-only-fs": (lambda t, w: (_pre(t, w)[:-1] + [t / "ro" / "r"], _readonly(t / "ro")), "read-only"),
    "predict-out-read-only-fs": (lambda t, w: (_pred(t, w, out=t / "ro" / "p"), _readonly(t / "ro")), "read-only"),
    "transfer-out-read-only-fs": (lambda t, w: (["transfer", "--config", w / "cfg.yaml", "--teachers", w / "zoo" / "good",
                                                 "--out", t / "ro" / "r"], _readonly(t / "ro")), "read-only"),
    "evaluate-out-in-proc": (lambda t, w: _eval(t, w, out="/proc/sys/transmem-ev"), "/proc/sys"),
    "predict-out-in-proc": (lambda t, w: _pred(t, w, out="/proc/sys/transmem-p"), "/proc/sys"),
    "pretrain-out-not-empty": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", w / "done"], "--resume"),
    "predict-out-not-empty": (lambda t, w: _pred(t, w, out=w / "frames"), "not empty"),
    "evaluate-into-earlier-report": (lambda t, w: _eval(t, w, out=_earlier(t, "report.md")), "report.md"),
    "evaluate-into-earlier-figures": (lambda t, w: _eval(t, w, out=_earlier(t, "figures/mse.png", "report.html")),
                                      "--overwrite"),
    "evaluate-into-a-run": (lambda t, w: _eval(t, w, out=w / "done"), "metrics.json"),
    # ---- zoo cards
    "card-null": (lambda t, w: _pred(t, w, model=_card_text(t, w, b"null")), "card.json"),
    "card-a-list": (lambda t, w: ["evaluate", "--model", _card_text(t, w, b"[1, 2]"), "--config", w / "cfg.yaml",
                                  "--out", t / "ev"], "card.json"),
    "card-not-utf8": (lambda t, w: ["zoo", "show", _card_text(t, w, b'{"model": "\xff"}')], "card.json"),
    "card-too-large": (lambda t, w: ["zoo", "show", _card_text(t, w, b" " * (2 << 20) + b"{}")], "card.json"),
    "card-terabyte-hidden": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), config={
        **json.loads((w / "zoo" / "good" / "card.json").read_text())["config"], "hidden": 10**9})), "config.hidden"),
    "card-terabyte-frames": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), frame_size=[10**6, 10**6])),
                             "frame_size"),
    "card-t_in-string": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), t_in="3")), "t_in"),
    "card-t_in-zero": (lambda t, w: ["evaluate", "--model", _edit_card(_copy_entry(t, w), t_in=0), "--config",
                                     w / "cfg.yaml", "--out", t / "ev"], "t_in"),
    "card-sha-not-hex": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), sha256="zz")), "sha256"),
    "card-config-not-object": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), config="convlstm")),
                               "config"),
    "card-is-a-folder": (lambda t, w: ["zoo", "show", (lambda e: ((e / "card.json").unlink(), (e / "card.json").mkdir(), e)[2])(
        _copy_entry(t, w))], "good"),
    "card-is-a-fifo": (lambda t, w: ["zoo", "show", (lambda e: ((e / "card.json").unlink(), _fifo(e / "card.json"), e)[2])(
        _copy_entry(t, w))], "good"),
    "weights-wrong-shapes-predict": (lambda t, w: _pred(t, w, model=_weights(t, w, _wider)), "weights.safetensors"),
    "weights-wrong-shapes-finetune": (lambda t, w: ["finetune", "--config", w / "cfg.yaml", "--from", _weights(t, w, _wider),
                                                    "--out", t / "r"], "weights.safetensors"),
    "weights-nan-predict": (lambda t, w: _pred(t, w, model=_weights(t, w, _nan)), "NaN"),
    "weights-nan-teacher": (lambda t, w: ["transfer", "--config", w / "cfg.yaml", "--teachers", _weights(t, w, _nan),
                                          "--out", t / "r"], "NaN"),
    "teacher-replaced-predict": (lambda t, w: _pred(t, w, model=_tmu_teacher_replaced(t, w)), "sha256"),
    "teacher-replaced-evaluate": (lambda t, w: ["evaluate", "--model", _tmu_teacher_replaced(t, w), "--config",
                                                w / "cfg.yaml", "--out", t / "ev"], "sha256"),
    "teacher-repointed-predict": (lambda t, w: _pred(t, w, model=_tmu_teacher_repointed(t, w)), "other"),
    "card-channels-not-the-models": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), channels=3)), "channels"),
    "card-frame-size-not-patch": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), frame_size=[18, 18])),
                                  "frame_size"),
    "card-r_max-a-word": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), data={
        "name": "radar_fmi", "extra": {"r_max": "abc"}})), "r_max"),
    "card-data-unknown-key": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), data={"bogus": 1})), "bogus"),
    "card-model-unknown": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w), model="nosuch")), "nosuch"),
    "card-bank-read-teachers-dropped": (lambda t, w: _pred(t, w, model=_edit_card(_copy_entry(t, w, "tmu"), teachers=[])),
                                        "teachers"),
    "finetune-from-a-transfer-model": (lambda t, w: ["finetune", "--config", w / "cfg.yaml", "--from", w / "zoo" / "tmu",
                                                     "--out", t / "r"], "tmu"),
    "teacher-is-a-transfer-model": (lambda t, w: ["transfer", "--config", w / "cfg.yaml", "--teachers", w / "zoo" / "tmu",
                                                  "--out", t / "r"], "tmu"),
    "zoo-list-root-is-a-file": (lambda t, w: ["zoo", "list", "--root", _file(t)], "a-file"),
    # ---- training frame size the model's patch size does not divide (evaluation pads: tests/test_user_data.py)
    "train-size-20-patch-8-finetune": (lambda t, w: ["finetune", "--config", w / "nomodel.yaml", "--from",
                                                     w / "zoo" / "p8", "--data.size", "20", "--out", t / "r"], "data.size"),
    "train-size-crop-12-patch-8-finetune": (lambda t, w: ["finetune", "--config", w / "nomodel.yaml", "--from",
                                                          w / "zoo" / "p8", "--train.crop", "12", "--out", t / "r"],
                                            "train.crop=12"),
    # ---- --resume
    "resume-other-model": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", w / "stopped", "--resume",
                                         "--model.hidden", "8"], "model.hidden"),
    "resume-model-left-to-defaults": (lambda t, w: ["pretrain", "--config", w / "nomodel.yaml", "--out", w / "stopped",
                                                    "--resume"], "model.hidden"),
    "resume-other-backbone": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", w / "stopped", "--resume",
                                            "--model.name", "predrnn"], "model.name"),
    "resume-other-frames": (lambda t, w: ["pretrain", "--config", w / "cfg.yaml", "--out", w / "stopped", "--resume",
                                          "--data.size", "32"], "data.size"),
    "resume-nothing-there": (lambda t, w: _pre(t, w, "--resume"), "no earlier run"),
    # ---- empty evaluation split, --zoo-name clash: before training
    "empty-test-split-pretrain": (lambda t, w: _pre(t, w, "--data.test_clips", "0"), "eval.split"),
    "empty-val-split-pretrain": (lambda t, w: _pre(t, w, "--eval.split", "val", "--data.val_clips", "0"), "eval.split"),
    "empty-train-split": (lambda t, w: _pre(t, w, "--data.train_clips", "0"), "train"),
    "empty-test-split-evaluate": (lambda t, w: _eval(t, w, "--data.test_clips", "0"), "eval.split"),
    "zoo-name-clash-pretrain": (lambda t, w: _pre(t, w, "--zoo-name", "good", "--zoo-root", w / "zoo"), "good"),
    "zoo-name-clash-transfer": (lambda t, w: ["transfer", "--config", w / "cfg.yaml", "--teachers", w / "zoo" / "good",
                                              "--out", t / "r", "--zoo-name", "other", "--zoo-root", w / "zoo"], "other"),
    # ---- special files and gaps in inputs
    "predict-radar-folder-with-fifo": (lambda t, w: _pred(t, w, inp=_fifo(
        t / "radar" / "201609281400_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz").parent), "radar"),
    "frames-dataset-with-fifo": (lambda t, w: _pre(t, w, "--data.name", "frames", "--data.path",
                                                   _fifo(t / "fr" / "a.png").parent), "fr"),
    "radar-dataset-with-fifo": (lambda t, w: _pre(t, w, "--data.name", "radar_fmi", "--data.path", _fifo(
        t / "rd" / "201609281400_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz").parent), "rd"),
    "predict-frames-folder-with-fifo": (lambda t, w: _pred(t, w, inp=_fifo(t / "ff" / "a.png").parent), "ff"),
    "predict-input-is-a-fifo": (lambda t, w: _pred(t, w, inp=_fifo(t / "in.npy")), "in.npy"),
    "predict-input-is-a-device": (lambda t, w: _pred(t, w, inp=(t / "zero.npy").symlink_to("/dev/zero") or t / "zero.npy"),
                                  "zero.npy"),
    "predict-frames-are-devices": (lambda t, w: _pred(t, w, inp=((t / "dv").mkdir(), (t / "dv" / "a.png").symlink_to(
        "/dev/zero"))[0] or t / "dv"), "dv"),
    "predict-radar-gap-too-late": (lambda t, w: _pred(t, w, inp=_fmi(t / "gap", [0, 5, 10, 15, 20, 50, 55])), "gap"),
    "predict-radar-gap-one-frame-after": (lambda t, w: _pred(t, w, inp=_fmi(t / "gap", [0, 5, 10, 15, 45])), "gap"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_line_and_changes_nothing(name, world, tmp_path, capsys, monkeypatch):
    setup, needle = CASES[name]
    got = setup(tmp_path, world)
    argv, patches = got if isinstance(got, tuple) else (got, [])
    before = _snapshot(tmp_path, world)
    for obj, attr, value in patches:
        monkeypatch.setattr(obj, attr, value)
    capsys.readouterr()
    with _Alarm(5):
        rc = main([str(a) for a in argv])
    monkeypatch.undo()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err, out[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("transmem: error: ") and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])
    assert _snapshot(tmp_path, world) == before  # no new file, no changed file, no temporary left
    assert not Path("PWNED").exists()


def test_the_table_covers_every_class_twice():
    assert len(CASES) >= 80
    classes = ["steps", "batch", "lr", "patch", "t_in", "config-", "-out-", "card-", "weights-", "teacher-",
               "train-size", "resume-", "empty-", "zoo-name", "fifo", "gap", "earlier", "read-only", "dangling"]
    for c in classes:
        assert sum(c in n for n in CASES) >= 2, c


# --------------------------------------------------------------------------------------------
# what is accepted: with the problem said (or handled) and nothing of the user's changed


def test_resume_of_a_finished_run_changes_no_file(world, capsys):
    before = _snapshot(world / "done")
    rc = main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(world / "done"), "--resume"])
    assert rc == 0
    assert _snapshot(world / "done") == before
    m = json.loads((world / "done" / "metrics.json").read_text())
    assert capsys.readouterr().out.strip() == f"test: mse={m['mse']:.4g} mse_pixel={m['mse_pixel']:.4g} " \
        f"mae={m['mae']:.4g} ssim={m['ssim']:.4g} psnr={m['psnr']:.4g}"


def test_failed_resume_then_right_resume_finishes(world, tmp_path):
    import shutil
    run = tmp_path / "stopped"
    shutil.copytree(world / "stopped", run)
    before = _snapshot(run)
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(run), "--resume",
                 "--model.hidden", "8"]) == 2
    assert _snapshot(run) == before  # config.yaml and the CSV log untouched
    assert main(["pretrain", "--config", str(world / "cfg.yaml"), "--out", str(run), "--resume"]) == 0
    assert (run / "metrics.json").is_file() and (run / "model" / "card.json").is_file()


def test_config_error_after_nothing_created_then_the_corrected_command_runs(world, tmp_path, capsys):
    out = tmp_path / "r"
    # the patch size of the --from entry (8) does not divide 20: found once the entry is read
    assert main(["finetune", "--config", str(world / "nomodel.yaml"), "--from", str(world / "zoo" / "p8"),
                 "--data.size", "20", "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["finetune", "--config", str(world / "nomodel.yaml"), "--from", str(world / "zoo" / "p8"),
                 "--out", str(out)]) == 0  # no "pass --resume"
    assert (out / "metrics.json").is_file()


def test_zoo_list_shows_bad_entries_with_their_problem(world, tmp_path, capsys):
    import shutil
    shutil.copytree(world / "zoo" / "good", tmp_path / "a-good")
    for name, text in (("b-null", b"null"), ("c-list", b"[]"), ("d-latin1", b'{"model": "caf\xe9"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_bytes(text)
    assert main(["zoo", "list", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[0] == "a-good" and "convlstm" in lines[1]
    assert lines[2].split()[:2] == ["b-null", "unusable:"] and "null" in lines[2]
    assert lines[3].split()[:2] == ["c-list", "unusable:"] and "list" in lines[3]
    assert lines[4].split()[:2] == ["d-latin1", "unusable:"] and "UTF-8" in lines[4]
    assert [p.name for p, _ in zoo.list_entries(tmp_path)] == ["a-good"]


def test_evaluate_overwrite_flag_replaces_earlier_report(world, tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "report.md").write_text("old")
    assert main(["evaluate", "--baseline", "persistence", "--config", str(world / "cfg.yaml"), "--out", str(ev)]) == 2
    assert (ev / "report.md").read_text() == "old"
    assert main(["evaluate", "--baseline", "persistence", "--config", str(world / "cfg.yaml"), "--out", str(ev),
                 "--overwrite"]) == 0
    assert (ev / "report.md").read_text() != "old" and (ev / "metrics.json").is_file()


def test_symlink_loop_in_a_frames_dataset_gives_no_duplicate_sequences(tmp_path):
    root = tmp_path / "frames"
    for seq in ("s1", "s2"):
        (root / seq).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((16, 16), 30 * i, np.uint8)).save(root / seq / f"{i}.png")
    (root / "s1" / "loop").symlink_to(root)       # a loop back to the top
    (root / "s2" / "again").symlink_to(root / "s1")  # a second way into s1
    seen = [os.path.relpath(d, root) for d, _, fs in files.walk(root) if fs]
    assert sorted(seen) == ["s1", "s2"]
    from transmem.data.frames import find_frame_folders
    assert sorted(os.path.relpath(f, root) for f in find_frame_folders(root)) == ["s1", "s2"]


def test_predict_splits_a_radar_folder_at_a_gap_and_says_so(world, tmp_path, capsys):
    inp = _fmi(tmp_path / "gap", [0, 5, 10, 45, 50, 55, 60])  # 35 minutes missing after 14:10
    assert main(["predict", "--model", str(world / "zoo" / "good"), "--input", str(inp),
                 "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "1 gap(s) in time" in out and "35 minutes" in out and "the 4 frames after it" in out
    from transmem.data.inputs import read_input_frames
    from transmem.predict import last_run_after_gaps
    frames = read_input_frames(inp, size=16)
    np.testing.assert_array_equal(last_run_after_gaps(inp, frames, 3), frames[3:])


def test_predict_cleans_the_temporary_folder_of_a_killed_run(world, tmp_path):
    out = tmp_path / "p"
    dead = tmp_path / ".p.999999999-abc.tmp"  # what a killed predict leaves: pid 999999999 is not running
    dead.mkdir()
    (dead / "prediction.npy").write_bytes(b"partial")
    alive = tmp_path / f".p.{os.getpid()}-abc.tmp"  # a writer still running keeps its folder
    alive.mkdir()
    assert main(["predict", "--model", str(world / "zoo" / "good"), "--input", str(world / "frames"),
                 "--out", str(out)]) == 0
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "p"])


def test_outputs_and_zoo_entries_honour_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        e = _entry(tmp_path / "zoo" / "e")
        assert main(["predict", "--model", str(e), "--input", str(world / "frames"), "--out", str(tmp_path / "p")]) == 0
    finally:
        os.umask(old)
    for p in (e, tmp_path / "p"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p
    for f in list(e.iterdir()) + list((tmp_path / "p").iterdir()):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --------------------------------------------------------------------------------------------
# subprocesses: signals, and the alias bomb's time

SIGNAL_WRAPPER = textwrap.dedent('''
    import os, signal, sys
    # as in a terminal: a shell running the tests in the background (nohup, &) makes children
    # ignore SIGINT, and transmem rightly leaves an ignored SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from transmem.training import module as M
    import transmem.api as A
    WHERE = os.environ["TM_SIGINT_AT"]
    if WHERE == "train":
        _step = M.ForecastModule.training_step
        def training_step(self, batch, i):
            if self.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return _step(self, batch, i)
        M.ForecastModule.training_step = training_step
    else:
        _build = A.build_datasets
        def build(cfg):
            os.kill(os.getpid(), signal.SIGINT)
            return _build(cfg)
        A.build_datasets = build
    from transmem.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _subprocess(tmp_path, script: str, args, timeout=120, **env):
    p = tmp_path / "wrapper.py"
    p.write_text(script)
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, str(p), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.mark.parametrize("where", ["train", "data"])
def test_ctrl_c_gives_one_line_and_status_130(world, tmp_path, where):
    out = tmp_path / "run"
    r = _subprocess(tmp_path, SIGNAL_WRAPPER, ["pretrain", "--config", world / "cfg.yaml", "--out", out,
                                               "--train.steps", "4"], TM_SIGINT_AT=where)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 130, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("transmem: interrupted"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    if where == "train":  # killed mid-training: the checkpoint of step 1 is there, --resume goes on
        assert (out / "checkpoints" / "last.ckpt").is_file()


def test_alias_bomb_ends_with_one_line_within_5_seconds(tmp_path):
    bomb = _yaml(tmp_path, BOMB, "bomb.yaml")
    script = textwrap.dedent('''
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway expansion dies, not the machine
        from transmem.cli import main
        t0 = time.monotonic()
        rc = main(sys.argv[1:])
        print(f"{time.monotonic() - t0:.3f}")
        sys.exit(rc)
    ''')
    r = _subprocess(tmp_path, script, ["pretrain", "--config", bomb, "--out", tmp_path / "r"], timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bomb.yaml" in lines[0] and "expands to more than" in lines[0]
    assert float(r.stdout.strip()) < 5.0
    assert not (tmp_path / "r").exists()

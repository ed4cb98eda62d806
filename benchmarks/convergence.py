"""Training to convergence, the rule the transfer benchmarks share.

A run validates every ``val_every`` steps and keeps its best checkpoint (``select_best``). Its
``best_step`` is the step of the lowest validation MSE; it has converged when its step cap is at
least 1.25 times that. Until then it is resumed from its last checkpoint with the cap doubled, at
most ``max_doublings`` times; a run still short of the rule is reported ``converged: false``.

    m, cap, history = train_to_convergence(lambda steps, resume: train(..., steps, resume),
                                           out, first_cap=160, max_doublings=6)

A worker stopped inside a stage (a scheduler's signal, the end of a session) leaves the stage it
was in beside the run (``stage_file``); the next worker goes on from the run's last checkpoint
(``resumable``) instead of training it again: at 3000 digit clips one run takes up to 25600 steps.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from transmem.training.checkpoints import CHECKSUM_KEY, atomic_torch_save, load_checkpoint_safely

MARGIN = 1.25  # the cap must reach 1.25 x the best step: room after the best for a later one


def converged(best: int | None, cap: int) -> bool:
    return best is not None and cap >= MARGIN * best


def record(history: list[dict], cap: int) -> dict:
    """The fields a run's result carries from :func:`train_to_convergence`'s history and final cap."""
    b = history[-1]["best_step"]
    return {"best_step": b, "step_cap": cap, "converged": converged(b, cap), "doublings": len(history) - 1,
            "history": history}


def binding(runs: list[dict]) -> dict:
    """The run nearest to breaking the rule (the highest best_step / step_cap): its best_step and
    step_cap speak for a cell of several runs, which keeps the rule exactly when all of them do."""
    return max(runs, key=lambda r: (r["best_step"] or 0) / r["step_cap"])


def best_step(run: Path) -> int | None:
    """The global step of the checkpoint ``select_best`` keeps (``checkpoints/best.ckpt``: the lowest
    validation MSE); else from ``logs/metrics.csv``, where Lightning writes a validation at
    ``global_step - 1``."""
    f = run / "checkpoints" / "best.ckpt"
    if f.is_file():
        return int(load_checkpoint_safely(f)["global_step"])
    f = run / "logs" / "metrics.csv"
    if not f.is_file():
        return None
    best = None
    with open(f, newline="") as fh:
        for row in csv.DictReader(fh):
            v = row.get("val/mse")
            if v not in (None, ""):
                step, v = int(float(row["step"])) + 1, float(v)
                if best is None or v < best[1]:
                    best = (step, v)
    return None if best is None else best[0]


def refresh_best_record(run: Path) -> None:
    """Before a resume: Lightning writes the step checkpoint (and so ``last.ckpt``) before that
    step's validation, so the record of the best validation score in ``last.ckpt`` can miss the
    last validation; a resumed run would then replace ``best.ckpt`` by a worse model. The record
    is taken from ``best.ckpt``, which holds it up to date."""
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    if not (last.is_file() and best.is_file()):
        return
    state, kept = load_checkpoint_safely(last), load_checkpoint_safely(best)
    keys = [k for k in kept.get("callbacks", {}) if "'monitor': 'val/mse'" in k]
    if not keys:
        return
    for k in keys:
        state["callbacks"][k] = kept["callbacks"][k]
    state.pop(CHECKSUM_KEY, None)
    atomic_torch_save(state, last)


def reopen(run: Path) -> None:
    """Make a finished run resumable from its last checkpoint: its final metrics and exported
    model go (they are written again when it finishes), its best-score record is refreshed."""
    (run / "metrics.json").unlink(missing_ok=True)
    shutil.rmtree(run / "model", ignore_errors=True)
    refresh_best_record(run)


#: an unconverged run's result, set aside by :func:`set_aside`: the run goes on from its last checkpoint
EXTENDED = "result.unconverged.json"


def set_aside(result: Path, max_doublings: int) -> bool:
    """After a preset's ``max_doublings`` was raised: move the result of a run that stopped short of
    the rule, with doublings now left, to ``EXTENDED`` beside it, so that the next worker goes on
    from its last checkpoint (:func:`extension`) instead of keeping or redoing it."""
    if not result.is_file():
        return False
    r = json.loads(result.read_text())
    if r.get("converged", True) or "doublings" not in r or r["doublings"] >= max_doublings:
        return False
    result.rename(result.with_name(EXTENDED))
    return True


def extension(job: Path, first_cap: int) -> tuple[dict | None, dict]:
    """The result set aside in ``job`` (or None) and the ``train_to_convergence`` arguments that go
    on from it: its history, its cap doubled, its doublings; else the first cap."""
    f = job / EXTENDED
    if not f.is_file():
        return None, {"first_cap": first_cap}
    r = json.loads(f.read_text())
    return r, {"first_cap": 2 * r["step_cap"], "history": r["history"], "doublings_done": r["doublings"]}


def extended_from(job: Path, earlier: dict | None) -> dict:
    """Once the run went on: what it was extended from (for its result), and the set-aside file goes."""
    if earlier is None:
        return {}
    (job / EXTENDED).unlink(missing_ok=True)
    return {"extended_from": {k: earlier.get(k) for k in ("step_cap", "commit")}}


def stage_file(run: Path) -> Path:
    """Beside the run folder (not in it: a fresh run needs an empty folder): the stage it is in."""
    return run.with_name(run.name + ".stage.json")


def resumable(run: Path) -> bool:
    """A run whose worker stopped inside a stage, with a checkpoint to go on from."""
    return stage_file(run).is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def _write_stage(run: Path, history: list, cap: int, stage: int) -> None:
    f = stage_file(run)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps({"history": history, "step_cap": cap, "stage": stage}))
    os.replace(tmp, f)


def train_to_convergence(train: Callable[[int, bool], dict], run: Path, first_cap: int, max_doublings: int,
                         history: list | None = None, doublings_done: int = -1) -> tuple[dict, int, list]:
    """``train(step_cap, resume) -> metrics`` trains ``run`` to the cap; returns (the last
    metrics, the final cap, the history of caps). ``doublings_done`` and ``history`` continue a
    run that stopped at an earlier, lower ``max_doublings`` (its cap is ``first_cap``). A run whose
    worker stopped inside a stage (:func:`resumable`) goes on from its last checkpoint at that
    stage's cap; that stage's entry in the history says ``resumed: true`` (its wall time is the
    part after the stop)."""
    history = list(history or [])
    cap, k0 = first_cap, doublings_done + 1
    resume, resumed = k0 > 0, False
    if k0 == 0 and resumable(run):
        s = json.loads(stage_file(run).read_text())
        history, cap, k0, resume, resumed = s["history"], s["step_cap"], s["stage"], True, True
    stage_file(run).unlink(missing_ok=True)
    if resume:
        reopen(run)
    for k in range(k0, max_doublings + 1):
        run.parent.mkdir(parents=True, exist_ok=True)
        _write_stage(run, history, cap, k)
        m = train(cap, resume)
        b = best_step(run)
        history.append({"step_cap": cap, "best_step": b, "mse": m["mse"], "train_wall_s": m.get("train_wall_s"),
                        **({"resumed": True} if resumed else {})})
        resumed = False
        if b is None or converged(b, cap) or k == max_doublings:
            break
        reopen(run)
        cap *= 2
        resume = True
    stage_file(run).unlink(missing_ok=True)
    return m, cap, history

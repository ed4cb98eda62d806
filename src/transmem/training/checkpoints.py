"""Checkpoints: atomic writes, safe loads, the state Lightning does not save, resume lookup.

Reliability (see ``docs/reliability.md``): checkpoints are written to a temporary file, fsynced
and renamed (:class:`AtomicCheckpointIO`); a checkpoint whose weights or optimizer state are not
finite is never written (:class:`TrainingState`); checkpoints are only ever loaded with
``weights_only=True``. The run-folder housekeeping of a (re)start lives here too: finding the
checkpoint to resume from, removing torn temporary files and keeping the log rows of the
interrupted run.
"""
from __future__ import annotations

import csv
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from ..files import atomic_write
from .samplers import StepSampler


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or is refused on load (one-line message)."""


# --------------------------------------------------------------------------------------------
# writing and loading


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`transmem.files.atomic_write` (fsynced): a reader (or a later
    resume) sees the old file or the new one, never a partial one, even if the process is killed
    or the disk fills up mid-write. Leftover temporary files (``.<name>.<pid>-<random>.tmp``) are
    removed by :func:`clean_stale_temps` when the next fit starts."""
    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    try:
        atomic_write(path, save, fsync=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); "
                              "the previous checkpoint is kept") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_torch_save` for local paths.

    Lightning's own ``_atomic_save`` writes through an fsspec transaction whose local temporary
    file lives in the system temp folder and is moved with ``shutil.move``: atomic only when that
    folder is on the same file system as the run folder (otherwise the move copies into the
    destination in place), and never fsynced. Remote URLs keep Lightning's path."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def load_checkpoint_safely(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with a one-line :class:`CheckpointError` when the file is
    refused (a pickled object that is not a tensor or a plain container) or unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln
                      or "GLOBAL" in ln), str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(f"{path}: refused to load: the checkpoint holds pickled objects other "
                              f"than tensors and plain containers, which could run code "
                              f"(weights_only=True; {first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: unreadable checkpoint ({msg})") from None


# --------------------------------------------------------------------------------------------
# what goes into a checkpoint besides weights, optimizer and loops


def _nonfinite(obj, where: str = "") -> str | None:
    """Path of the first floating tensor in ``obj`` holding a NaN or Inf, else None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            if not bool(torch.isfinite(obj).all()):
                return where or "tensor"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = _nonfinite(v, f"{where}.{k}" if where else str(k))
        if bad:
            return bad
    return None


def _np_state_to_plain(state) -> dict:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_plain(d):
    return (d["kind"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainingState(Callback):
    """Puts what the model, optimizer and loops do not cover into every checkpoint, as plain
    tensors and numbers (loadable with ``weights_only=True``): the RNG states (torch, CUDA, numpy,
    Python; rank 0's) and the data position (global step, epoch, batch, global batch, number of
    clips, seed). Refuses to write a checkpoint whose weights or optimizer state hold NaN/Inf, so
    that the previous good checkpoint stays the last one."""

    KEY = "transmem"

    def __init__(self, sampler: StepSampler | None = None):
        self.sampler = sampler

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.sampler is not None:
            self.sampler.step_source = trainer

    def data_position(self, step: int) -> dict:
        s = self.sampler
        if s is None:
            return {"global_step": int(step)}
        world, _, gb, per_epoch = s.layout()
        epoch, batch = divmod(int(step), per_epoch)
        return {"global_step": int(step), "epoch": epoch, "batch": batch, "batches_per_epoch": per_epoch,
                "global_batch": gb, "processes": world, "clips": s.n, "seed": s.seed, "shuffle": bool(s.shuffle)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = _nonfinite(checkpoint.get("state_dict", {}), "state_dict") or \
            _nonfinite(checkpoint.get("optimizer_states", []), "optimizer_states")
        if bad:
            raise FloatingPointError(
                f"{bad} became NaN/Inf by step {trainer.global_step}: stopping without writing that "
                "checkpoint; the last good checkpoint is kept (lower the learning rate or check the data)")
        rng = {"torch": torch.get_rng_state(), "numpy": _np_state_to_plain(np.random.get_state()),
               "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.KEY] = {"format": 1, "rng": rng, "data": self.data_position(trainer.global_step)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if not state:
            return
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_np_state_from_plain(rng["numpy"]))
        random.setstate(_as_tuple(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = state.get("data", {})
        if self.sampler is not None and "clips" in saved:
            now = self.data_position(saved["global_step"])
            diff = [k for k in ("clips", "global_batch", "seed", "shuffle") if saved.get(k) != now.get(k)]
            if diff:
                rank_zero_warn("resuming with a different data setup ("
                               + ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in diff)
                               + "): the run continues, but not with the batches an uninterrupted run would see")


# --------------------------------------------------------------------------------------------
# the run folder on a (re)start


def resume_point(out_dir: Path) -> tuple[str, int] | None:
    """The checkpoint to resume from and its global step: the most advanced of
    ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` files Lightning writes into the run
    folder when SLURM signals a job before preempting it. Each candidate is opened with
    ``weights_only=True`` here, so a checkpoint carrying pickled code is refused with one line
    before anything is built."""
    candidates = [out_dir / "checkpoints" / "last.ckpt", *sorted(out_dir.glob("hpc_ckpt_*.ckpt"))]
    best = None
    for c in candidates:
        if c.is_file():
            step = int(load_checkpoint_safely(c, mmap=True).get("global_step", 0))
            if best is None or step > best[1]:
                best = (str(c), step)
    return best


def clean_stale_temps(ckpt_dir: Path) -> None:
    """Remove the temporary files a killed :func:`atomic_torch_save` left in ``ckpt_dir``."""
    if ckpt_dir.is_dir():
        for f in ckpt_dir.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def keep_logs_before(log_dir: Path, step: int) -> None:
    """On resume, Lightning's CSV logger would delete ``logs/metrics.csv``: keep its rows before
    the resumed step as ``logs/metrics.until-step{step}.csv``."""
    old = log_dir / "metrics.csv"
    if not old.is_file():
        return
    with open(old, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if _row_step(r) < step]
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    atomic_write(log_dir / f"metrics.until-step{step}.csv", write)
    old.unlink()


def _row_step(row) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0

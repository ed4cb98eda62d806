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
import hashlib
import os
import pickle
import random
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from ..errors import Diverged, UserError
from ..files import WriteError, atomic_write, free_space_text
from .samplers import StepSampler


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or is refused on load (one-line message)."""


# --------------------------------------------------------------------------------------------
# writing and loading


#: the top-level key of a checkpoint that holds the sha256 of the rest of its content
CHECKSUM_KEY = "transmem_sha256"


def _feed(h, obj) -> None:
    """Feed ``obj`` (what a checkpoint holds: tensors, plain containers, numbers, strings) into
    the hash ``h`` in a form that survives ``torch.save``/``torch.load`` unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.layout == torch.strided and t.numel():
            t = t.cpu().contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
        return
    if isinstance(obj, Mapping):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        return
    if isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
        return
    if isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
        return
    if isinstance(obj, (bytes, bytearray)):
        h.update(b"B%d" % len(obj) + bytes(obj))
        return
    text = repr(obj).encode("utf-8", "backslashreplace")
    h.update(f"{type(obj).__name__}:{len(text)}:".encode() + text)


def content_sha256(checkpoint: Mapping) -> str:
    """sha256 of everything in ``checkpoint`` but its own checksum: tensors by dtype, shape and
    bytes; containers, numbers and strings by value."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def _torch_write_failure(e: BaseException) -> bool:
    """torch's zip writer reports a failed write (disk full) as a RuntimeError."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text
                                            or "unexpected pos" in text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`transmem.files.atomic_write` (fsynced): a reader (or a later
    resume) sees the old file or the new one, never a partial one, even if the process is killed
    or the disk fills up mid-write. A checkpoint dict gets the sha256 of its content
    (``CHECKSUM_KEY``), checked when it is loaded. A failed write ends in one line naming the
    file and the free space; the temporary file is removed, and leftovers of killed writers
    (``.<name>.<pid>-<random>.tmp``) by :func:`clean_stale_temps` when the next fit starts."""
    if isinstance(obj, dict):
        obj[CHECKSUM_KEY] = content_sha256(obj)
    existed = os.path.exists(path) or any(Path(path).parent.glob("*.ckpt"))

    def save(tmp):
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                cause = e.__context__ or e.__cause__
                if isinstance(cause, OSError):  # the OSError behind torch's RuntimeError (ENOSPC, EDQUOT, EIO)
                    raise cause from None
                if not _torch_write_failure(e):
                    raise
                raise OSError(5, "Input/output error (torch could not write the file)") from None
    try:
        atomic_write(path, save, fsync=True)
    except OSError as e:
        reason = e.strerror if isinstance(e, WriteError) else (e.strerror or str(e))
        if isinstance(e, WriteError):  # "PATH: cannot write (REASON; FREE); kept"
            m = re.search(r"cannot write \((.*)\); ", str(e))
            reason = m.group(1) if m else str(e)
        else:
            reason = f"{reason}; {free_space_text(path)}"
        kept = "the previous checkpoint is kept" if existed else "no checkpoint was written yet"
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason}); {kept}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_torch_save` for local paths.

    Lightning's own ``_atomic_save`` writes through an fsspec transaction whose local temporary
    file lives in the system temp folder and is moved with ``shutil.move``: atomic only when that
    folder is on the same file system as the run folder (otherwise the move copies into the
    destination in place), and never fsynced. Remote URLs keep Lightning's path.

    Given the run's ``ckpt_dir``, a checkpoint loaded to resume has its checkpoint callbacks'
    paths moved there (:func:`relocate_checkpoint_paths`): the run folder may have been moved or
    copied since it was written."""

    def __init__(self, ckpt_dir: str | os.PathLike | None = None):
        super().__init__()
        self.ckpt_dir = ckpt_dir

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if self.ckpt_dir is not None and "://" not in str(path):
            relocate_checkpoint_paths(checkpoint, self.ckpt_dir)
        return checkpoint


def relocate_checkpoint_paths(checkpoint: dict, ckpt_dir: str | os.PathLike) -> None:
    """Point the ``ModelCheckpoint`` states of ``checkpoint`` at ``ckpt_dir`` (same file names).

    They name the folder they wrote to. Resumed in another folder (a run moved to another disk,
    or copied to go on with), Lightning would forget the best score so far, so that the first
    validation after the resume, however bad, became the best model, saved as ``best-v1.ckpt``
    beside the real ``best.ckpt``."""
    new = os.path.realpath(ckpt_dir)  # ModelCheckpoint keeps its dirpath resolved
    for key, state in checkpoint.get("callbacks", {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        if not state.get("dirpath") or state["dirpath"] == new:
            continue
        state["dirpath"] = new
        for k in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(k):
                state[k] = os.path.join(new, os.path.basename(state[k]))
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {os.path.join(new, os.path.basename(p)): v
                                      for p, v in state["best_k_models"].items()}


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose bytes are not what was written (checksum, truncation, bad zip or
    pickle): another kept checkpoint may be used instead."""


_ADVICE = re.compile(r"weights_only|safe_globals|add_safe_globals|allowlist|trust|Please|Re-running", re.I)


def no_advice(text: str) -> str:
    """The first line of a torch error without its advice (to unpickle with ``weights_only=False``
    or to allowlist a global): a user must never follow it for a file that failed to load."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in lines:
        g = re.search(r"GLOBAL ([\w.]+)", ln)
        if g:
            return f"it names the global {g.group(1)}"
    for ln in lines:
        ln = re.split(r"(?<=[.:]) ", ln)[0] if _ADVICE.search(ln) else ln
        if not _ADVICE.search(ln):
            return ln[:160]
    return "not a readable checkpoint"


def load_checkpoint_safely(path: str | os.PathLike, map_location="cpu", mmap: bool = False,
                           verify: bool = True) -> dict:
    """``torch.load(weights_only=True)`` with a one-line :class:`CheckpointError` when the file is
    refused (a pickled object that is not a tensor or a plain container) and a
    :class:`DamagedCheckpoint` when it is empty, unreadable, or (``verify``) its content does not
    match the sha256 it was written with. No message relays torch's advice to unpickle."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if size == 0:
        raise DamagedCheckpoint(f"{path}: empty file (0 bytes), not a checkpoint: the write that made it did "
                                "not finish")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or re.search(r"GLOBAL [\w.]+ was not an allowed global", text):
            raise CheckpointError(f"{path}: refused to load: the checkpoint holds pickled objects other "
                                  f"than tensors and plain containers, which could run code "
                                  f"({no_advice(text)}); it was not loaded") from None
        raise DamagedCheckpoint(f"{path}: damaged checkpoint (its pickled content is corrupt: "
                                f"{no_advice(text)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, struct.error) as e:
        raise DamagedCheckpoint(f"{path}: damaged checkpoint, not readable ({no_advice(str(e))})") from None
    if not isinstance(ck, dict):
        raise DamagedCheckpoint(f"{path}: damaged checkpoint (holds a {type(ck).__name__}, not a checkpoint)")
    want = ck.get(CHECKSUM_KEY)
    if verify and want is not None:
        try:
            got = content_sha256(ck)
        except (RuntimeError, OSError, ValueError) as e:  # e.g. a truncated memory-mapped storage
            raise DamagedCheckpoint(f"{path}: damaged checkpoint, not readable ({no_advice(str(e))})") from None
        if got != want:
            raise DamagedCheckpoint(f"{path}: damaged checkpoint: its content does not match the sha256 it was "
                                    f"written with ({got[:12]}... against {str(want)[:12]}...)")
    return ck


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
            raise Diverged(
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


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def resume_point(out_dir: Path) -> tuple[str, int] | None:
    """The checkpoint to resume from and its global step: the most advanced of
    ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` files Lightning writes into the run
    folder when SLURM signals a job before preempting it. Each candidate is opened with
    ``weights_only=True`` and its content checked against its sha256 here, so a checkpoint
    carrying pickled code is refused with one line before anything is built. A damaged one is
    passed over for the previous good checkpoint kept in ``checkpoints/`` (``stepN.ckpt``,
    ``best.ckpt``), with a line saying which; with none left, the run is refused in one line."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    first = [ckpt_dir / "last.ckpt", *sorted(out_dir.glob("hpc_ckpt_*.ckpt"), key=_step_of)]
    kept = sorted(ckpt_dir.glob("step*.ckpt"), key=_step_of, reverse=True) + [ckpt_dir / "best.ckpt"]
    key = tuple((str(c), c.stat().st_size, c.stat().st_mtime_ns) for c in first + kept if c.is_file())
    if _RESUME_SEEN.get(str(out_dir), (None,))[0] == key:  # checked already (before anything was built)
        return _RESUME_SEEN[str(out_dir)][1]
    best, damaged = None, []
    for group in (first, kept):
        for c in group:
            if not c.is_file():
                continue
            try:
                step = int(load_checkpoint_safely(c, mmap=True).get("global_step", 0))
            except DamagedCheckpoint as e:
                damaged.append(e)
                continue
            if best is None or step > best[1]:
                best = (str(c), step)
        if best is not None:
            break
    if damaged:
        if best is None:
            more = f" (and {len(damaged) - 1} more damaged)" if len(damaged) > 1 else ""
            raise CheckpointError(f"{damaged[0]}{more}; no good checkpoint is kept to resume from: start the run "
                                  "again in a new --out")
        for e in damaged:
            print(f"transmem: warning: {e}; resuming from the previous good checkpoint {best[0]} (step {best[1]})",
                  file=sys.stderr)
    _RESUME_SEEN[str(out_dir)] = (key, best)
    return best


_RESUME_SEEN: dict = {}


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

"""Training and evaluation drivers around Lightning. The options a user touches (precision,
compile, resume, DDP) are the few visible lines in :func:`fit`.

Reliability (see ``docs/reliability.md``): the order of the training clips is a pure function of
(seed, global step) (:class:`StepSampler`), like the sampling masks, so a resumed run sees exactly
the batches an uninterrupted one would, on any number of processes with the same global batch;
checkpoints are written to a temporary file, fsynced and renamed (:class:`AtomicCheckpointIO`);
a checkpoint whose weights or optimizer state are not finite is never written; checkpoints are
only ever loaded with ``weights_only=True``.
"""
from __future__ import annotations

import csv
import logging
import os
import pickle
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import TrainConfig
from .module import ForecastModule


class Indexed(Dataset):
    """Adds the clip index to each item (the bank cache is keyed by it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["index"] = i
        return item


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*predict_dataloader.*")
    warnings.filterwarnings("ignore", ".*val_check_interval.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teachers
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    # resuming: StepSampler continues mid-epoch exactly although the loader is not `_Stateful`;
    # the run folder is expected to hold the previous checkpoints and logs
    warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
    warnings.filterwarnings("ignore", ".*exists and is not empty.*")


def run_loggers(out_dir: Path) -> list:
    """CSV logs always (``logs/metrics.csv``); TensorBoard too when it is installed."""
    loggers = [CSVLogger(str(out_dir), name="logs", version="")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


def make_loader(ds, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last=False):
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(Indexed(ds), batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------------------------
# processes


def dist_info() -> tuple[int, int]:
    """``(world size, global rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def is_launch_rank_zero() -> bool:
    """Whether this process is the first one of a distributed launch, judged from the launcher's
    environment before any process group exists: ``RANK`` (torchrun), ``SLURM_PROCID`` (a SLURM
    job step with several tasks), ``NODE_RANK``/``LOCAL_RANK`` (Lightning's own launcher). A plain
    single-process run is rank zero."""
    env = os.environ
    if env.get("RANK", "").strip():
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID", "").strip() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0") or 0) == 0 and int(env.get("LOCAL_RANK", "0") or 0) == 0


def planned_world_size(cfg: TrainConfig) -> int:
    """Number of training processes the Trainer will start for ``cfg`` (best effort)."""
    dev = cfg.devices
    if isinstance(dev, (list, tuple)):
        n = len(dev)
    elif isinstance(dev, int) or (isinstance(dev, str) and dev.strip().isdigit()):
        n = int(dev)
    else:  # "auto" / -1: every GPU when one is used, else one process
        gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1
    return max(n, 1) * max(int(cfg.num_nodes or 1), 1)


# --------------------------------------------------------------------------------------------
# data order


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + 0x2545F491) % (2 ** 63)


class StepSampler(Sampler[int]):
    """Training-clip order as a pure function of (seed, global step), split across processes.

    The clips of epoch ``e`` are ``randperm(n)`` drawn from a generator seeded by (seed, e) (or
    ``0..n-1`` without shuffle). A *global* batch of ``world * batch_size`` consecutive clips of
    that order is consumed per optimizer step; process ``r`` takes every ``world``-th clip of it,
    starting at ``r``. Each iteration starts at the position of the current global step (read from
    ``step_source.global_step``, the Trainer), so a run resumed from a checkpoint -- even in the
    middle of an epoch -- continues with exactly the batches an uninterrupted run would see, and
    the union of what the processes see at a step does not depend on the number of processes.
    Incomplete global batches at the end of an epoch are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), shuffle
        self.step_source = None  # the Trainer (anything with .global_step); None: step 0

    def layout(self) -> tuple[int, int, int, int]:
        """``(world, rank, global batch, global batches per epoch)``."""
        world, rank = dist_info()
        gb = world * self.batch_size
        per_epoch = self.n // gb
        if per_epoch == 0:
            raise ValueError(f"{self.n} training clips are fewer than one global batch "
                             f"({world} process(es) x batch_size {self.batch_size})")
        return world, rank, gb, per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        g.manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` of global step ``step``."""
        return divmod(int(step), self.layout()[3])

    def __iter__(self):
        world, rank, gb, per_epoch = self.layout()
        step = int(getattr(self.step_source, "global_step", 0) or 0)
        epoch, first = divmod(step, per_epoch)
        order = self.order(epoch)
        for k in range(first, per_epoch):
            yield from order[k * gb + rank:(k + 1) * gb:world].tolist()

    def __len__(self) -> int:
        return self.layout()[3] * self.batch_size


class ShardSampler(Sampler[int]):
    """Evaluation order: ``0..n-1``, process ``r`` of ``world`` taking ``r, r+world, ...`` (no
    padding, so every clip is counted exactly once; metrics must be sums reduced over processes)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __iter__(self):
        world, rank = dist_info()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        world, rank = dist_info()
        return len(range(rank, self.n, world))


# --------------------------------------------------------------------------------------------
# checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or is refused on load (one-line message)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``: a
    reader (or a later resume) sees the old file or the new one, never a partial one, even if the
    process is killed or the disk fills up mid-write. Leftover temporary files are named
    ``.<name>.<pid>.tmp`` and removed by :func:`fit` on the next start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); "
                              "the previous checkpoint is kept") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _clean_stale_temps(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        for f in ckpt_dir.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def _keep_logs_before(log_dir: Path, step: int) -> None:
    """On resume, Lightning's CSV logger would delete ``logs/metrics.csv``: keep its rows before
    the resumed step as ``logs/metrics.until-step{step}.csv``."""
    old = log_dir / "metrics.csv"
    if not old.is_file():
        return
    with open(old, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if _row_step(r) < step]
    dst = log_dir / f"metrics.until-step{step}.csv"
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, dst)
    old.unlink()


def _row_step(row) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def _resume_point(out_dir: Path) -> tuple[str, int] | None:
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


def fit(module: ForecastModule, train_ds, val_ds, cfg: TrainConfig, out_dir: str | Path,
        resume: bool = False) -> L.Trainer:
    """Train ``module`` for ``cfg.steps`` optimizer steps; checkpoints in ``out_dir/checkpoints``.
    With ``resume`` the run continues from ``checkpoints/last.ckpt`` to the same final step (from
    step 0 when the run was stopped before its first checkpoint).

    ``cfg.batch_size`` is per process: with DDP the global batch is ``batch_size`` times the
    number of processes. After a multi-process fit only global rank 0 returns (the other ranks
    end with ``SystemExit(0)``) and the process group is closed, so the caller evaluates and
    writes results once."""
    quiet_lightning()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if resume:
        found = _resume_point(out_dir)
        if found is not None:
            ckpt_path, step0 = found
            if is_launch_rank_zero():
                _keep_logs_before(out_dir / "logs", step0)
    if is_launch_rank_zero():
        _clean_stale_temps(ckpt_dir)
    every = max(cfg.ckpt_every, 1)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_last=True,
                                 every_n_train_steps=every, save_top_k=1, monitor=None, auto_insert_metric_name=False)]
    best = None
    if cfg.select_best and cfg.val_every and val_ds is not None:
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/mse", mode="min",
                               save_top_k=1, auto_insert_metric_name=False)
        callbacks.append(best)
    model = module
    if cfg.compile:
        module.model = torch.compile(module.model)
    n_train = len(train_ds)
    world = planned_world_size(cfg)
    batches_per_epoch = max(n_train // (cfg.batch_size * world), 1)
    val_interval = None
    if cfg.val_every and val_ds is not None:
        val_interval = min(cfg.val_every, batches_per_epoch)
    sampler = StepSampler(n_train, cfg.batch_size, cfg.seed, shuffle=True)
    callbacks.append(TrainingState(sampler))
    trainer = L.Trainer(
        max_steps=cfg.steps,
        max_epochs=-1,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=run_loggers(out_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # StepSampler / ShardSampler split the data themselves
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        log_every_n_steps=min(25, max(cfg.steps // 4, 1)),
        val_check_interval=val_interval,
        check_val_every_n_epoch=None if val_interval else 1,
        limit_val_batches=cfg.val_batches or 1.0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    sampler.step_source = trainer
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    train_loader = DataLoader(Indexed(train_ds), batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=g, num_workers=cfg.num_workers,
                              persistent_workers=cfg.num_workers > 0)
    val_loader = None
    if val_ds is not None and val_interval:
        val_loader = DataLoader(Indexed(val_ds), batch_size=cfg.batch_size, sampler=ShardSampler(len(val_ds)))
    # weights_only: a checkpoint that carries pickled code is refused, never run
    try:
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path,
                    weights_only=True)
    except pickle.UnpicklingError as e:  # a rank that read another file than the one checked above
        raise CheckpointError(f"{ckpt_path}: refused to load ({str(e).splitlines()[0]})") from None
    if trainer.global_step % every != 0 or not last.is_file():
        trainer.save_checkpoint(last)  # the final state, so that a resume after training is a no-op
    if best is not None and best.best_model_path and os.path.exists(best.best_model_path) \
            and trainer.is_global_zero:
        state = load_checkpoint_safely(best.best_model_path)["state_dict"]
        module.load_state_dict(state)
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("transmem.fit.end")
        if not trainer.is_global_zero:
            raise SystemExit(0)
        torch.distributed.destroy_process_group()
    return trainer


@torch.inference_mode()
def predict_batches(module: ForecastModule, dataset, batch_size: int = 32, limit: int | None = None):
    """Yield (frames, valid, forecast) over ``dataset`` in inference mode."""
    module.eval()
    loader = make_loader(dataset, batch_size, False)
    seen = 0
    for batch in loader:
        frames = batch["frames"].to(module.device)
        valid = batch.get("mask")
        yield frames, valid, module.rollout(frames)
        seen += frames.shape[0]
        if limit is not None and seen >= limit:
            break


def evaluate(module: ForecastModule, dataset, batch_size: int = 32, thresholds=None, to_physical=None,
             progress: bool = False) -> dict:
    """Streaming per-frame metrics of the forecasts on ``dataset`` (see :mod:`transmem.metrics`)."""
    from ..metrics import FrameMetrics
    t_in = module.t_in
    first = dataset[0]["frames"]
    metric = FrameMetrics(first.shape[0] - t_in, thresholds=thresholds or None, to_physical=to_physical)
    it = predict_batches(module, dataset, batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=(len(dataset) + batch_size - 1) // batch_size, desc="evaluate", leave=False)
    for frames, valid, pred in it:
        metric.update(pred.float().clamp(0, 1), frames[:, t_in:].float(),
                      None if valid is None else valid[:, t_in:].to(frames.device))
    return metric.compute()

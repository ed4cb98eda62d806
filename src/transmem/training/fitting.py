"""The training driver around Lightning. The options a user touches (precision, compile, resume,
DDP, progress output) are the few visible lines in :func:`fit`; the data order lives in
:mod:`.samplers`, checkpoint writing, loading and resume lookup in :mod:`.checkpoints`, the
progress output in :mod:`transmem.progress` (see ``docs/reliability.md``).
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.callbacks import Callback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from .. import signals
from ..config import ConfigError, TrainConfig
from ..files import WriteError
from .checkpoints import (AtomicCheckpointIO, CheckpointError, TrainingState, no_advice, clean_stale_temps,
                          keep_logs_before, load_checkpoint_safely, resume_point)
from .module import ForecastModule
from ..progress import train_progress
from .samplers import Indexed, ShardSampler, StepSampler, is_launch_rank_zero, planned_world_size


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
    # a run folder moved or copied, then resumed (also a fallback to stepN.ckpt): nothing is lost
    warnings.filterwarnings("ignore", ".*dirpath has changed from.*")


class StopOnSignal(Callback):
    """SIGTERM / SIGINT during training (see :mod:`transmem.signals`): the step that is running
    ends, ``last.ckpt`` is written when steps since the last checkpoint would otherwise be lost,
    and :class:`~transmem.signals.Interrupted` ends the fit (the CLI: one line, status 143 / 130).
    Lightning by itself turns SIGTERM into a ``SystemExit`` without a code: status 0."""

    def __init__(self, last: Path, periodic: ModelCheckpoint):
        self.last = last
        self.periodic = periodic

    @staticmethod
    def _signal(trainer) -> int | None:
        if getattr(trainer, "received_sigterm", False):
            signals.note(signal.SIGTERM)
        return signals.pending()

    def on_train_start(self, trainer, pl_module) -> None:
        signals.raise_if_pending()  # nothing trained since the resume point: nothing to save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sig = self._signal(trainer)
        if sig is None:
            return
        if trainer.world_size > 1:  # several processes: Lightning stops them together on SIGTERM
            if sig == signal.SIGTERM:  # (SIGTERMException, turned into Interrupted by fit), no save
                return
            raise signals.Interrupted(sig)
        saved = getattr(self.periodic, "_last_global_step_saved", None)
        if trainer.global_step > 0 and saved != trainer.global_step:
            trainer.save_checkpoint(self.last)
        raise signals.Interrupted(sig)


def _write_failure(e: OSError, out_dir: Path) -> BaseException:
    """The one-line error for an OSError out of ``trainer.fit``: the checkpoint error it followed
    (Lightning finalises the loggers after a failure, which can fail again on a full disk), else
    the failed write with its path and the free space."""
    c = e
    while c is not None:
        if isinstance(c, (CheckpointError, WriteError)):
            return c
        c = c.__context__
    if e.errno in _WRITE_ERRNOS or (e.filename and str(e.filename).startswith(str(out_dir))):
        return WriteError.of(e.filename or out_dir, e, "the last checkpoint is kept; continue with --resume")
    return e


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


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


def fit(module: ForecastModule, train_ds, val_ds, cfg: TrainConfig, out_dir: str | Path,
        resume: bool = False) -> L.Trainer:
    """Train ``module`` for ``cfg.steps`` optimizer steps; checkpoints in ``out_dir/checkpoints``.
    With ``resume`` the run continues from ``checkpoints/last.ckpt`` to the same final step (from
    step 0 when the run was stopped before its first checkpoint).

    ``cfg.batch_size`` is per process: with DDP the global batch is ``batch_size`` times the
    number of processes. After a multi-process fit only global rank 0 returns (the other ranks
    end with ``SystemExit(0)``) and the process group is closed, so the caller evaluates and
    writes results once.

    ``cfg.progress``: Lightning's progress bar when standard output is a terminal, else a plain
    line per ~10 % of the steps (:class:`~.progress.LineProgress`)."""
    quiet_lightning()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if resume:
        found = resume_point(out_dir)
        if found is not None:
            ckpt_path, step0 = found
            if is_launch_rank_zero():
                keep_logs_before(out_dir / "logs", step0)
        elif is_launch_rank_zero():  # as docs/reliability.md promises, and said
            print(f"{out_dir}: --resume found no checkpoint (the run stopped before its first one, "
                  f"every train.ckpt_every={cfg.ckpt_every} steps): training starts again from step 0", flush=True)
    if is_launch_rank_zero():
        clean_stale_temps(ckpt_dir)
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
        val_interval = cfg.val_every  # across epochs (check_val_every_n_epoch=None): never shortened
    sampler = StepSampler(n_train, cfg.batch_size, cfg.seed, shuffle=True)
    callbacks.append(TrainingState(sampler))
    callbacks.append(StopOnSignal(last, callbacks[0]))
    progress_bar, progress_callbacks = train_progress(cfg.progress)
    callbacks.extend(progress_callbacks)
    try:
        trainer = _trainer(cfg, out_dir, callbacks, progress_bar, val_interval)
    except MisconfigurationException as e:  # Lightning's word for a bad accelerator/devices/strategy
        raise ConfigError(f"train: {' '.join(str(e).split())}", where="train") from None
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
        with signals.deferred():  # a signal ends the running step first (StopOnSignal)
            trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path,
                        weights_only=True)
            # the final state, so that a resume after training is a no-op: written again even on a
            # checkpoint step, since Lightning wrote that one before the step's validation, and a
            # resume with a higher cap from it would forget that validation (a worse model could then
            # replace best.ckpt)
            trainer.save_checkpoint(last)
    except MisconfigurationException as e:
        raise ConfigError(f"train: {' '.join(str(e).split())}", where="train") from None
    except pickle.UnpicklingError as e:  # a rank that read another file than the one checked above
        raise CheckpointError(f"{ckpt_path}: refused to load ({no_advice(str(e))})") from None
    except SIGTERMException:  # Lightning's own SIGTERM stop (a SystemExit without a code)
        raise signals.Interrupted(signal.SIGTERM) from None
    except OSError as e:  # a log write (CSV, TensorBoard) on a full disk, or one while stopping
        raise _write_failure(e, out_dir) from None
    signals.raise_if_pending()
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


def _trainer(cfg: TrainConfig, out_dir: Path, callbacks, progress_bar: bool, val_interval) -> L.Trainer:
    """The Lightning trainer of :func:`fit` (its settings in one place)."""
    return L.Trainer(
        max_steps=cfg.steps,
        max_epochs=-1,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=run_loggers(out_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(Path(out_dir) / "checkpoints")],  # a moved run resumes in its new folder
        use_distributed_sampler=False,  # StepSampler / ShardSampler split the data themselves
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=min(25, max(cfg.steps // 4, 1)),
        val_check_interval=val_interval,
        check_val_every_n_epoch=None if val_interval else 1,
        limit_val_batches=cfg.val_batches or 1.0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )

"""Training and evaluation drivers around Lightning. The options a user touches (precision,
compile, resume, DDP) are the few visible lines in :func:`fit`."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

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


def make_loader(ds, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last=False):
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(Indexed(ds), batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0)


def fit(module: ForecastModule, train_ds, val_ds, cfg: TrainConfig, out_dir: str | Path,
        resume: bool = False) -> L.Trainer:
    """Train ``module`` for ``cfg.steps`` optimizer steps; checkpoints in ``out_dir/checkpoints``.
    With ``resume`` the run continues from ``checkpoints/last.ckpt`` to the same final step."""
    quiet_lightning()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = out_dir / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_last=True,
                                 every_n_train_steps=max(cfg.ckpt_every, 1), save_top_k=1, monitor=None, auto_insert_metric_name=False)]
    best = None
    if cfg.select_best and cfg.val_every and val_ds is not None:
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/mse", mode="min",
                               save_top_k=1, auto_insert_metric_name=False)
        callbacks.append(best)
    model = module
    if cfg.compile:
        module.model = torch.compile(module.model)
    n_train = len(train_ds)
    batches_per_epoch = max(n_train // cfg.batch_size, 1)
    val_interval = None
    if cfg.val_every and val_ds is not None:
        val_interval = min(cfg.val_every, batches_per_epoch)
    trainer = L.Trainer(
        max_steps=cfg.steps,
        max_epochs=-1,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=CSVLogger(str(out_dir), name="logs", version=""),
        callbacks=callbacks,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        log_every_n_steps=min(25, max(cfg.steps // 4, 1)),
        val_check_interval=val_interval,
        check_val_every_n_epoch=None if val_interval else 1,
        limit_val_batches=cfg.val_batches or 1.0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    train_loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.num_workers, drop_last=True)
    val_loader = make_loader(val_ds, cfg.batch_size, False) if (val_ds is not None and val_interval) else None
    ckpt_path = None
    if resume:
        last = ckpt_dir / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"{last}: --resume asked but there is no checkpoint to resume from")
        ckpt_path = str(last)
    # weights_only: a checkpoint that carries pickled code is refused, never run
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path,
                weights_only=True)
    if best is not None and best.best_model_path and os.path.exists(best.best_model_path):
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
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

"""One LightningModule for every way of training a forecaster: pretraining a zoo model, training
from scratch, finetuning, and TMU transfer (a backbone or a TMU model, optionally a memory bank).

The loss is ``L_pred + distill_weight * L_distill``: the frame MSE over the predicted frames (plus
an optional L1 term) and, for a TMU with a bank, the distillation term, which is part of the graph.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from ..choices import DISTILL_DECAYS, DISTILL_SPANS, check
from ..errors import Diverged
from ..fullfield import pad_to_multiple
from .samplers import dist_info
from .augment import augment_clips
from .schedules import SamplingSchedule, reverse_time


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return F.mse_loss(pred, target)
    w = valid.to(pred.dtype).expand_as(pred)
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def masked_l1(pred, target, valid):
    if valid is None:
        return F.l1_loss(pred, target)
    w = valid.to(pred.dtype).expand_as(pred)
    return ((pred - target).abs() * w).sum() / w.sum().clamp_min(1.0)


def forecast_loss(model, frames, mask, valid=None, bank=None, distill_weight: float = 0.0,
                  l1_weight: float = 0.0, distill_until: int | None = None):
    """``L = L_pred + distill_weight * L_distill`` for one batch: the loss of training and of the
    benchmarks. ``L_pred`` is the frame MSE over frames 1..T-1 (plus ``l1_weight`` times the L1),
    counted where ``valid``; ``L_distill`` comes from a transfer model (``model_kind ==
    "transfer"``, such as the TMU) and its ``bank`` and stays in the graph. Returns ``(loss,
    L_pred, L_distill or None)``."""
    target = frames[:, 1:]
    tvalid = None if valid is None else valid[:, 1:]
    distill = None
    if model.model_kind == "transfer":
        preds, aux = model(frames, mask, bank=bank, return_aux=True, distill_until=distill_until)
        distill = aux["distill_loss"]
    else:
        preds = model(frames, mask)
    pred_loss = masked_mse(preds, target, tvalid)
    if l1_weight:
        pred_loss = pred_loss + l1_weight * masked_l1(preds, target, tvalid)
    loss = pred_loss
    if distill is not None and distill_weight > 0:
        loss = loss + distill_weight * distill
    return loss, pred_loss, distill


class WeightedMean(Metric):
    """sum(value * weight) / sum(weight) with sum states (float64), so that it reduces exactly
    across processes. (torchmetrics' ``MeanMetric(nan_strategy="disable")`` drops the weights in
    torchmetrics 1.9; a NaN value here propagates.)"""

    full_state_update = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight) -> None:
        w = torch.as_tensor(weight, dtype=torch.float64, device=self.total.device)
        self.total += value.detach().to(torch.float64).sum() * w
        self.weight += w

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).to(torch.float32)


class ForecastModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, schedule: SamplingSchedule, lr: float = 1e-3,
                 bank=None, distill_weight: float = 0.0, bank_cache=None,
                 reverse_prob: float = 0.0, l1_weight: float = 0.0, seed: int = 0,
                 augment=(), crop: int = 0,
                 distill_decay: str = "none", total_steps: int = 0, distill_span: str = "all"):
        super().__init__()
        self.model = model
        self.bank = bank
        self.bank_cache = bank_cache
        self.schedule = schedule
        self.lr = lr
        self.distill_weight = distill_weight
        check("distill_decay", distill_decay, DISTILL_DECAYS)
        if distill_decay != "none" and total_steps <= 0:
            raise ValueError("a decaying distillation weight needs the number of training steps")
        self.distill_decay = distill_decay
        check("distill_span", distill_span, DISTILL_SPANS)
        # "input": only the steps that read input frames (t < T_in), where a ground_truth teacher
        # knows nothing the target could not know; later teacher states have seen true frames
        # that the target (once scheduled sampling ends) only predicts
        self.distill_until = schedule.t_in if distill_span == "input" else None
        self.total_steps = total_steps
        self.reverse_prob = reverse_prob
        self.augment, self.crop = tuple(augment), int(crop)
        self.l1_weight = l1_weight
        self.t_in = schedule.t_in
        self.is_tmu = model.model_kind == "transfer"
        self.seed = seed
        # validation MSE as a (sum, weight) metric: exact when the val set is split over processes
        self.val_mse = WeightedMean()
        if bank_cache is not None and (reverse_prob > 0 or self.augment or self.crop):
            raise ValueError("a cached bank cannot be combined with augmentation (the teachers must "
                             "see the augmented clip)")
        if bank_cache is not None and bank is not None and bank.teacher_inputs != "ground_truth":
            raise ValueError("only a ground_truth-mode bank can be cached (an 'own' bank depends on the sampling mask)")

    # the teachers are frozen and not part of what this module trains or checkpoints
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("bank.")}

    def load_state_dict(self, state_dict, strict: bool = True, **kw):
        own = {k: v for k, v in state_dict.items() if not k.startswith("bank.")}
        return super().load_state_dict(own, strict=False if self.bank is not None else strict, **kw)

    def _generator(self) -> torch.Generator:
        # masks and augmentation are a pure function of (seed, step): resume reproduces them
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.global_step)
        return g

    def _draws(self, frames, valid):
        """Time reversal and sampling mask for this step. The random numbers are drawn for the
        global batch (all processes) and each process takes the rows of its own clips (every
        world-th, as :class:`~transmem.training.samplers.StepSampler` deals them), so a step is the
        same on 1 or N processes with the same global batch; on one process this is exactly
        ``reverse_time`` followed by ``schedule.mask``."""
        g = self._generator()
        world, rank = dist_info()
        if world == 1:
            frames, valid = reverse_time(frames, self.reverse_prob, g, valid)
            mask = self.schedule.mask(self.global_step, frames.shape[0], frames.device, g)
        else:
            b = frames.shape[0]
            if self.reverse_prob > 0:
                flip = torch.rand(world * b, generator=g)[rank::world] < self.reverse_prob
                flip = flip.to(frames.device).view(-1, *([1] * (frames.dim() - 1)))
                frames = torch.where(flip, frames.flip(1), frames)
                if valid is not None:
                    valid = torch.where(flip, valid.flip(1), valid)
            mask = self.schedule.mask(self.global_step, world * b, None, g)[rank::world].to(frames.device)
        if self.augment or self.crop:  # drawn after the mask: the mask does not depend on them
            frames, valid = augment_clips(frames, valid, self.augment, self.crop, g, world, rank)
        return frames, valid, mask

    def current_distill_weight(self) -> float:
        """lambda at this step. A decay lets the teachers shape the memory early and leaves the
        last part of the budget to the target's own loss."""
        if self.distill_decay == "none":
            return self.distill_weight
        frac = min(self.global_step / self.total_steps, 1.0)
        if self.distill_decay == "linear":
            return self.distill_weight * (1.0 - frac)
        return self.distill_weight * 0.5 * (1.0 + math.cos(math.pi * frac))

    def get_bank(self, batch, frames, mask):
        if self.bank is None:
            return None
        if self.bank_cache is not None and "index" in batch:
            cached = self.bank_cache.get(batch["index"].cpu())
            if cached is not None:
                return [{l: s.to(frames.device) for l, s in src.items()} for src in cached]
            bank = self.bank(frames, mask, self.t_in)
            self.bank_cache.put(batch["index"].cpu(), bank)
            return bank
        return self.bank(frames, mask, self.t_in)

    def compute_loss(self, batch):
        frames, valid = batch["frames"], batch.get("mask")
        frames, valid, mask = self._draws(frames, valid)
        bank = self.get_bank(batch, frames, mask) if self.is_tmu else None
        return forecast_loss(self.model, frames, mask, valid, bank, self.current_distill_weight(),
                             self.l1_weight, self.distill_until)

    def training_step(self, batch, batch_idx):
        loss, pred_loss, distill = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise Diverged(
                f"loss became {loss.item()} at step {self.global_step}: stopping; the last good "
                "checkpoint is kept (lower the learning rate or check the data)")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", pred_loss)
        if distill is not None:
            self.log("train/distill", distill, prog_bar=True)
            self.log("train/lambda", self.current_distill_weight())
        return loss

    @property
    def patch_size(self) -> int:
        """What whole frames are padded to: the model's patch size, or the least common multiple
        with its teachers' when it reads them at inference (every one must divide the frames)."""
        sizes = [int(self.model.patch_size)]
        if self.bank is not None and self.is_tmu and self.model.needs_teachers_at_inference:
            sizes += [int(t.patch_size) for t in self.bank.teachers]
        return math.lcm(*sizes)

    def rollout(self, frames: torch.Tensor) -> torch.Tensor:
        """Forecast frames T_in..T-1 from the first T_in frames (teachers, if read, roll out too).
        Frames of any size: padded to a multiple of the patch size, the forecast cropped back
        (:func:`transmem.fullfield.pad_to_multiple`)."""
        frames, h, w = pad_to_multiple(frames, self.patch_size)
        if self.is_tmu and self.model.needs_teachers_at_inference:
            bank = self.bank.rollout(frames, self.t_in)
            return self.model(frames, t_in=self.t_in, bank=bank)[:, self.t_in - 1:, ..., :h, :w]
        return self.model(frames, t_in=self.t_in)[:, self.t_in - 1:, ..., :h, :w]

    def validation_step(self, batch, batch_idx):
        frames, valid = batch["frames"], batch.get("mask")
        preds = self.rollout(frames)
        target = frames[:, self.t_in:]
        tvalid = None if valid is None else valid[:, self.t_in:]
        mse = masked_mse(preds, target, tvalid)
        weight = target.numel() if tvalid is None else tvalid.to(preds.dtype).expand_as(preds).sum()
        self.val_mse.update(mse.detach(), weight)
        self.log("val/mse", self.val_mse, prog_bar=True, batch_size=frames.shape[0])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr)


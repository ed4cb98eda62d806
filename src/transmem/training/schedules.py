"""Sampling schedules of the PredRNN family, vectorised in torch.

A sampling mask has shape (B, T-1): entry t-1 is 1 where the model reads the ground-truth frame t
and 0 where it reads its own prediction of frame t. ``probabilities(step)`` gives the exact
probability of 1 for each entry at a training step; ``mask`` draws from it.

* ``linear`` (scheduled sampling, PredRNN): inputs 1..T_in-1 are ground truth; for the forecast
  inputs the probability decays linearly from 1 at step 0 to 0 at ``stop_step``.
* ``reverse`` (reverse scheduled sampling, PredRNN-V2): input steps start at probability 0.5 and
  rise to 1, forecast steps start at 0.5 and fall to 0, both linearly between ``start_step`` and
  ``stop_step`` (or, for the input part, exponentially with ``exp_alpha``).
* ``none``: always ground truth at the input steps and own predictions after (a plain rollout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import SCHEDULE_KINDS, check


@dataclass
class SamplingSchedule:
    kind: str = "linear"       # "linear" | "reverse" | "none"
    t_in: int = 10
    frames: int = 20           # T = T_in + T_out
    stop_step: int = 1000      # end of the decay
    start_step: int = 0        # reverse only: start of the change
    exp_alpha: float | None = None  # reverse only: exponential rise of the input part

    def __post_init__(self):
        check("schedule", self.kind, SCHEDULE_KINDS)
        if not 1 <= self.t_in < self.frames:
            raise ValueError(f"t_in={self.t_in} must be in [1, frames={self.frames})")

    def _progress(self, step: int) -> float:
        span = max(self.stop_step - self.start_step, 1)
        return min(max((step - self.start_step) / span, 0.0), 1.0)

    def probabilities(self, step: int) -> torch.Tensor:
        """P(ground truth) for each of the T-1 mask entries at training step ``step``."""
        T1 = self.frames - 1
        n_in = self.t_in - 1  # entries that feed input frames 1..T_in-1
        p = torch.zeros(T1, dtype=torch.float64)
        if self.kind == "none":
            p[:n_in] = 1.0
            return p
        if self.kind == "linear":
            p[:n_in] = 1.0
            p[n_in:] = max(0.0, 1.0 - step / max(self.stop_step, 1))
            return p
        prog = self._progress(step)
        if self.exp_alpha is not None and step >= self.start_step:
            p_in = 1.0 - 0.5 * math.exp(-(step - self.start_step) / self.exp_alpha)
            p_in = 1.0 if step >= self.stop_step else p_in
        else:
            p_in = 0.5 + 0.5 * prog
        p[:n_in] = p_in
        p[n_in:] = 0.5 - 0.5 * prog
        return p

    def mask(self, step: int, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.probabilities(step).to(torch.float32)
        u = torch.rand(batch, p.numel(), generator=generator)
        return (u < p).to(torch.float32).to(device)


def reverse_time(frames: torch.Tensor, prob: float, generator: torch.Generator | None = None,
                 valid: torch.Tensor | None = None):
    """Time-reversed clips as augmentation: each sequence is flipped in time with ``prob``."""
    if prob <= 0:
        return frames, valid
    flip = torch.rand(frames.shape[0], generator=generator) < prob
    flip = flip.to(frames.device).view(-1, *([1] * (frames.dim() - 1)))
    frames = torch.where(flip, frames.flip(1), frames)
    if valid is not None:
        valid = torch.where(flip, valid.flip(1), valid)
    return frames, valid

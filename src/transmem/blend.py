"""A weighted mean of two forecasters: ``w * a + (1 - w) * b``, lead time by lead time.

Why: operational nowcasting blends extrapolation with model output because the two make
different errors. On our radar benchmark the advection model loses to extrapolation alone by 6 %
in MSE, but the equal mean of the two beats extrapolation by 7 % (benchmarks/results/real_data.md).
The weight is fixed beforehand (not fitted on the data it is scored on).

Any object with the interface :func:`transmem.training.evaluate` uses (``eval()``, ``device``,
settable ``t_in``, ``rollout(frames) -> (B, T - t_in, C, H, W)``) can be blended: a loaded
zoo model, a baseline, or another blend.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BlendForecaster", "ProbabilityMatched", "Wrapped", "match_distribution", "parse_blend"]


class BlendForecaster(torch.nn.Module):
    """``weight * a.rollout(frames) + (1 - weight) * b.rollout(frames)``.

    ``weight``: one number in [0, 1], or one per lead time (a sequence as long as the forecast).
    """

    def __init__(self, a, b, weight: float | Sequence[float] = 0.5):
        super().__init__()
        w = torch.as_tensor(weight, dtype=torch.float32).flatten()
        if w.numel() == 0 or not torch.isfinite(w).all() or (w < 0).any() or (w > 1).any():
            raise ValueError(f"blend weight must be in [0, 1] (one number or one per lead time), got {weight!r}")
        self.a, self.b = a, b
        self.register_buffer("weight", w, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def t_in(self) -> int:
        return self.a.t_in

    @t_in.setter
    def t_in(self, value: int) -> None:
        self.a.t_in = value
        self.b.t_in = value

    @torch.no_grad()
    def rollout(self, frames: Tensor) -> Tensor:
        pa = self.a.rollout(frames)
        pb = self.b.rollout(frames).to(pa.device, pa.dtype)
        w = self.weight.to(pa.device, pa.dtype)
        if w.numel() > 1:
            if w.numel() != pa.shape[1]:
                raise ValueError(f"blend has {w.numel()} weights but the forecast has {pa.shape[1]} lead times")
            w = w.view(1, -1, 1, 1, 1)
        return w * pa + (1 - w) * pb

    forward = rollout

    def extra_repr(self) -> str:
        return f"weight={self.weight.tolist()}"


def match_distribution(field: Tensor, reference: Tensor) -> Tensor:
    """``field`` with its values replaced rank for rank by ``reference``'s (same shape): the
    result has exactly the reference's distribution and ``field``'s spatial order (pysteps'
    empirical-CDF probability matching). Where ``field`` is at or below 0 (no rain) it stays 0:
    a smooth forecast then loses its drizzle fringe instead of gaining rain at random places."""
    flat, ref = field.flatten(), reference.flatten().to(field.dtype)
    out = torch.empty_like(flat)
    out[flat.argsort(stable=True)] = ref.sort().values
    return torch.where(flat > 0, out, torch.zeros_like(out)).view_as(field)


class Wrapped(torch.nn.Module):
    """A forecaster around one ``inner`` forecaster: its ``device`` and settable ``t_in`` are the
    inner one's (the interface :func:`transmem.training.evaluate` needs), so a wrapper only says
    what its ``rollout`` adds."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def t_in(self) -> int:
        return self.inner.t_in

    @t_in.setter
    def t_in(self, value: int) -> None:
        self.inner.t_in = value


class ProbabilityMatched(Wrapped):
    """``inner``'s forecast with every lead's values matched to the distribution of the last
    input frame (:func:`match_distribution`), clip by clip and channel by channel.

    Why: a mean of forecasts, or an MSE-trained one, is smooth, so it under-forecasts intense
    cells and over-forecasts drizzle; S-PROG and STEPS restore the observed intensity distribution
    the same way. The area and intensities of rain are then persistence's, their places the
    forecaster's."""

    @torch.no_grad()
    def rollout(self, frames: Tensor) -> Tensor:
        pred = self.inner.rollout(frames)
        last = torch.nan_to_num(frames[:, self.t_in - 1]).to(pred.device, pred.dtype)
        out = torch.empty_like(pred)
        for b in range(pred.shape[0]):
            for k in range(pred.shape[1]):
                for c in range(pred.shape[2]):
                    out[b, k, c] = match_distribution(pred[b, k, c], last[b, c])
        return out

    forward = rollout


def parse_blend(spec: str) -> tuple[str, float]:
    """``"extrapolation"`` or ``"extrapolation:0.3"`` -> (baseline name, weight of the *model*);
    the default weight is 0.5."""
    name, _, w = spec.partition(":")
    try:
        weight = 0.5 if w == "" else float(w)
    except ValueError:
        raise ValueError(f"--blend {spec!r}: the weight after ':' must be a number in [0, 1]") from None
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--blend {spec!r}: the weight after ':' must be in [0, 1]")
    return name, weight

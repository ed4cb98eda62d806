"""Streaming, per-lead-time metrics for frame-sequence prediction.

:class:`FrameMetrics` is a :class:`torchmetrics.Metric`: ``update`` takes batches of predicted and
true future frames ``(B, T_out, C, H, W)`` with values in [0, 1], ``compute`` returns a dict of plain
Python numbers and lists (JSON-safe, no NaN: undefined values are ``None``).

Conventions
-----------
* ``mse`` / ``mae`` (and ``*_per_frame``): the PredRNN / OpenSTL convention -- the error is
  **summed over the C*H*W values of one frame**, then averaged over sequences. With a mask the sum
  runs over the valid values only.
* ``mse_pixel`` / ``mae_pixel``: per-value mean. Pooled: total error divided by the total number of
  valid values (over sequences, channels and pixels). Without a mask
  ``mse_pixel == mse / (C*H*W)``.
* ``psnr``: per frame and per sequence from that frame's per-value MSE (clamped at 1e-10), data
  range 1, then averaged over sequences.
* ``ssim``: Gaussian window (sigma 1.5, 11 taps, reflect padding -- the same SSIM as
  ``torchmetrics.functional.structural_similarity_index_measure`` with ``data_range=1.0``), one value
  per frame and sequence (mean of the SSIM map over pixels and channels), averaged over sequences.
  Frames smaller than 6 pixels along a side use a window truncated to fit (``2*(side-1)+1`` taps,
  renormalised) because reflect padding needs ``pad < side``.
* Mask (``True`` = valid): invalid values are ignored by every metric -- changing them (in the
  prediction or in the target) changes nothing. For SSIM this goes beyond "fill the prediction with
  the target at invalid pixels": the local means, variances and covariance are computed by
  normalised convolution over the valid pixels of each window only, and the SSIM map is averaged
  over valid pixels only (so invalid regions neither leak into nearby windows nor count as
  trivially perfect). Without a mask this is exactly the plain SSIM. Frames of a sequence without
  any valid value are left out of the PSNR and SSIM averages (and of nothing else).
* Overall scalars (``mse``, ``ssim``, ...): pooled over all (sequence, lead time) pairs that have a
  value; without a mask this is the mean of the per-frame values.
* ``rmse_physical`` / ``mae_physical`` (and ``*_per_frame``), only with ``to_physical`` (the
  data's units: mm/h, K, ...): the root-mean-square and mean absolute error **per value** in those
  units, pooled over the valid values (``sqrt`` of the pooled mean square). The caller names the
  unit (``metrics["units"]``).
* Categorical scores, for each threshold ``th`` (physical units after ``to_physical``): an event is
  ``value >= th``. Hits, misses, false alarms and correct negatives are counted per lead time over
  all valid values; ``csi``, ``pod``, ``far`` and ``hss`` are computed from the summed counts
  (``per_frame`` from each lead time's counts, ``mean`` from the counts summed over lead times --
  not an average of ratios). A score whose denominator is zero (e.g. POD with no observed event) is
  ``None``.

All states are sums registered with ``dist_reduce_fx="sum"``, so ``compute`` is correct under DDP
and after :meth:`torchmetrics.Metric.merge_state`. Accumulators are float64; ``update`` does no
host round trip. (float64 states cannot live on Apple MPS.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["FrameMetrics", "frame_metrics", "ssim_per_image"]

_SSIM_SIGMA = 1.5
_SSIM_TAPS = 11  # int(3.5 * 1.5 + 0.5) * 2 + 1, as in torchmetrics
_K1, _K2 = 0.01, 0.03
_PSNR_MIN_MSE = 1e-10
_ACC = torch.float64


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, pad: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, n) matrix of a 1-D Gaussian blur (taps -pad..pad, sigma 1.5, normalised) with reflect
    padding folded in: ``A @ x`` == conv1d(reflect_pad(x, pad), g). Requires pad <= n - 1."""
    x = torch.arange(-pad, pad + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    g = g / g.sum()
    rows = torch.arange(n).unsqueeze(1).expand(n, 2 * pad + 1)
    cols = rows + torch.arange(-pad, pad + 1).unsqueeze(0)
    cols = torch.where(cols < 0, -cols, cols)
    cols = torch.where(cols >= n, 2 * (n - 1) - cols, cols)
    a = torch.zeros(n, n, dtype=torch.float64)
    a.index_put_((rows.reshape(-1), cols.reshape(-1)), g.repeat(n), accumulate=True)
    return a.to(dtype=dtype, device=device)


def ssim_per_image(
    pred: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    data_range: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """SSIM of each image of ``(N, C, H, W)`` batches.

    Returns ``(ssim_sum, n_valid)``, both of shape ``(N,)``: the SSIM map summed over the valid
    (channel, pixel) positions and the number of those positions. ``valid`` is a bool tensor
    broadcastable to ``(N, C, H, W)`` (None = all valid). ``ssim_sum / n_valid`` is the image's
    SSIM; without a mask it equals torchmetrics' ``structural_similarity_index_measure`` with
    ``reduction="none"`` and the same ``data_range`` (for images of side >= 6). With a mask, the
    local statistics are Gaussian-weighted means over the valid pixels of each window (normalised
    convolution) and the map is summed over valid positions only.
    """
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"expected two (N, C, H, W) tensors of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    dtype = pred.dtype if pred.dtype in (torch.float32, torch.float64) else torch.float32
    pred = pred.to(dtype)
    target = target.to(dtype)
    n, c, h, w = pred.shape
    pad_h = min((_SSIM_TAPS - 1) // 2, h - 1)
    pad_w = min((_SSIM_TAPS - 1) // 2, w - 1)
    a_h = _blur_matrix(h, pad_h, dtype, pred.device)
    a_wt = _blur_matrix(w, pad_w, dtype, pred.device).t()

    def blur(x: Tensor) -> Tensor:
        # Separable Gaussian with reflect padding as two matrix products: the same numbers as a
        # padded depthwise conv, but 5-20x faster on CPU (1-channel convs are poorly optimised).
        k = x.shape[0]
        x = x.reshape(k * n * c, h, w)
        return torch.matmul(torch.matmul(a_h, x), a_wt).reshape(k, n, c, h, w)

    if valid is None:
        mu_p, mu_t, e_pp, e_tt, e_pt = blur(
            torch.stack((pred, target, pred * pred, target * target, pred * target))
        ).unbind(0)
    else:
        # Normalised convolution: every local statistic is a weighted mean over the valid pixels of
        # the window only, so invalid values of pred *and* target have no influence at all.
        valid = valid.expand(n, c, h, w)
        v = valid.to(dtype)
        zero = torch.zeros((), dtype=dtype, device=pred.device)
        pv = torch.where(valid, pred, zero)
        tv = torch.where(valid, target, zero)
        sums = blur(torch.stack((pv, tv, pv * pv, tv * tv, pv * tv, v)))
        wsum = sums[5].clamp_min(1e-12)
        mu_p, mu_t, e_pp, e_tt, e_pt = (sums[:5] / wsum).unbind(0)

    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    mu_pp, mu_tt, mu_pt = mu_p * mu_p, mu_t * mu_t, mu_p * mu_t
    var_p = (e_pp - mu_pp).clamp_min(0.0)
    var_t = (e_tt - mu_tt).clamp_min(0.0)
    cov = e_pt - mu_pt
    ssim_map = ((2 * mu_pt + c1) * (2 * cov + c2)) / ((mu_pp + mu_tt + c1) * (var_p + var_t + c2))

    if valid is None:
        s = ssim_map.reshape(n, -1).sum(-1)
        cnt = torch.full((n,), float(c * h * w), dtype=s.dtype, device=s.device)
    else:
        s = torch.where(valid, ssim_map, torch.zeros_like(ssim_map)).reshape(n, -1).sum(-1)
        cnt = valid.reshape(n, -1).sum(-1).to(s.dtype)
    return s, cnt


def _ratio(num: Tensor, den: Tensor) -> list[float | None]:
    """Elementwise num/den as a list of floats, None where den == 0."""
    out: list[float | None] = []
    for a, b in zip(num.tolist(), den.tolist()):
        out.append(None if b == 0 else float(a) / float(b))
    return out


def _scalar_ratio(num: Tensor, den: Tensor) -> float | None:
    b = float(den)
    return None if b == 0 else float(num) / b


def _finite(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return x


class FrameMetrics(Metric):
    """Per-lead-time MSE, MAE, SSIM, PSNR and (optionally) CSI/POD/FAR/HSS. See the module docstring.

    Args:
        t_out: number of predicted frames per sequence (the length of every ``*_per_frame`` list).
        thresholds: event thresholds for the categorical scores, in the units of ``to_physical``.
        to_physical: maps a tensor of [0, 1] values to physical units (e.g. mm/h) before the
            thresholds are applied; identity by default. Only the categorical scores use it.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        t_out: int,
        thresholds: Sequence[float] | None = None,
        to_physical: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(t_out) < 1:
            raise ValueError(f"t_out must be >= 1, got {t_out}")
        self.t_out = int(t_out)
        self.thresholds = list(thresholds) if thresholds else []
        self.to_physical = to_physical
        t = self.t_out

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=_ACC)

        self.add_state("count", default=zeros(()), dist_reduce_fx="sum")
        # per lead time, summed over sequences
        self.add_state("sq_sum", default=zeros(t), dist_reduce_fx="sum")
        self.add_state("abs_sum", default=zeros(t), dist_reduce_fx="sum")
        self.add_state("n_values", default=zeros(t), dist_reduce_fx="sum")
        self.add_state("psnr_sum", default=zeros(t), dist_reduce_fx="sum")
        self.add_state("ssim_sum", default=zeros(t), dist_reduce_fx="sum")
        self.add_state("n_frames", default=zeros(t), dist_reduce_fx="sum")  # (seq, t) with a valid value
        if to_physical is not None:  # errors in the data's own units
            self.add_state("phys_sq_sum", default=zeros(t), dist_reduce_fx="sum")
            self.add_state("phys_abs_sum", default=zeros(t), dist_reduce_fx="sum")
        if self.thresholds:
            k = len(self.thresholds)
            # contingency counts, shape (K thresholds, T); float64 holds integers exactly to 2**53
            for name in ("hits", "misses", "false_alarms", "correct_negatives"):
                self.add_state(name, default=zeros(k, t), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ update
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        if pred.ndim != 5 or pred.shape != target.shape:
            raise ValueError(f"pred and target must be (B, T_out, C, H, W) of one shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        b, t, c, h, w = pred.shape
        if t != self.t_out:
            raise ValueError(f"expected T_out={self.t_out} frames, got {t}")
        pred = pred.detach()
        target = target.detach()
        if not pred.is_floating_point():
            pred = pred.float()
        target = target.to(pred.dtype)
        valid: Tensor | None = None
        mask_bt: Tensor | None = None  # (B*T, 1 or C, H, W), not expanded
        if mask is not None:
            if mask.ndim != 5 or mask.shape[2] not in (1, c) or mask.shape[:2] != (b, t) \
                    or mask.shape[3:] != (h, w):
                raise ValueError(f"mask must be (B, T_out, 1 or C, H, W) = ({b}, {t}, 1|{c}, {h}, {w}), "
                                 f"got {tuple(mask.shape)}")
            m = mask.detach().to(device=pred.device, dtype=torch.bool)
            mask_bt = m.reshape(b * t, m.shape[2], h, w)
            valid = m.expand(b, t, c, h, w)

        diff = pred - target
        sq = diff * diff
        ab = diff.abs()
        if valid is not None:
            zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
            sq = torch.where(valid, sq, zero)
            ab = torch.where(valid, ab, zero)
            n_val = m.reshape(b, t, -1).sum(-1).to(_ACC) * (c // m.shape[2])  # (B, T) valid values
        else:
            n_val = torch.full((b, t), float(c * h * w), dtype=_ACC, device=pred.device)
        sq_bt = sq.reshape(b, t, -1).sum(-1, dtype=_ACC)  # (B, T)
        ab_bt = ab.reshape(b, t, -1).sum(-1, dtype=_ACC)
        has = n_val > 0

        mse_px = sq_bt / n_val.clamp_min(1.0)
        psnr = -10.0 * torch.log10(mse_px.clamp_min(_PSNR_MIN_MSE))
        psnr = torch.where(has, psnr, torch.zeros_like(psnr))

        s_sum, s_cnt = ssim_per_image(
            pred.reshape(b * t, c, h, w),
            target.reshape(b * t, c, h, w),
            mask_bt,
        )
        ssim_bt = (s_sum.to(_ACC) / s_cnt.to(_ACC).clamp_min(1.0)).reshape(b, t)
        ssim_bt = torch.where(has, ssim_bt, torch.zeros_like(ssim_bt))

        self.count += b
        self.sq_sum += sq_bt.sum(0)
        self.abs_sum += ab_bt.sum(0)
        self.n_values += n_val.sum(0)
        self.psnr_sum += psnr.sum(0)
        self.ssim_sum += ssim_bt.sum(0)
        self.n_frames += has.to(_ACC).sum(0)

        phys_p = phys_t = None
        if self.to_physical is not None:
            phys_p = torch.as_tensor(self.to_physical(pred), device=pred.device)
            phys_t = torch.as_tensor(self.to_physical(target), device=pred.device)
            pdiff = phys_p.to(_ACC) - phys_t.to(_ACC)
            psq, pab = pdiff * pdiff, pdiff.abs()
            if valid is not None:
                psq = torch.where(valid, psq, torch.zeros((), dtype=_ACC, device=pred.device))
                pab = torch.where(valid, pab, torch.zeros((), dtype=_ACC, device=pred.device))
            # a non-finite physical value (a model's value past the top of a log scale) counts as
            # a NaN error, not silently as 0
            self.phys_sq_sum += psq.reshape(b, t, -1).sum(-1).sum(0)
            self.phys_abs_sum += pab.reshape(b, t, -1).sum(-1).sum(0)
        if self.thresholds:
            if phys_p is None:
                phys_p, phys_t = pred, target
            dims = (0, 2, 3, 4)  # everything but the lead time
            rows: list[list[Tensor]] = [[], [], [], []]
            for thr in self.thresholds:  # K is small: a loop keeps memory at one (B, T, C, H, W) mask
                ev_t = phys_t >= thr
                ev_p = phys_p >= thr
                nev_p = ~ev_p
                if valid is not None:
                    ev_p = ev_p & valid
                    nev_p = nev_p & valid
                rows[0].append((ev_p & ev_t).sum(dims))
                rows[1].append((nev_p & ev_t).sum(dims))
                rows[2].append((ev_p & ~ev_t).sum(dims))
                rows[3].append((nev_p & ~ev_t).sum(dims))
            self.hits += torch.stack(rows[0]).to(_ACC)
            self.misses += torch.stack(rows[1]).to(_ACC)
            self.false_alarms += torch.stack(rows[2]).to(_ACC)
            self.correct_negatives += torch.stack(rows[3]).to(_ACC)

    # ----------------------------------------------------------------- compute
    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        count = self.count
        n_seq = float(count)
        per_seq = count.expand_as(self.sq_sum)
        out: dict[str, Any] = {"count": int(round(n_seq))}

        def both(name: str, num: Tensor, den: Tensor) -> None:
            out[name + "_per_frame"] = [_finite(v) for v in _ratio(num, den)]
            out[name] = _finite(_scalar_ratio(num.sum(), den.sum()))

        both("mse", self.sq_sum, per_seq)
        both("mae", self.abs_sum, per_seq)
        both("mse_pixel", self.sq_sum, self.n_values)
        both("mae_pixel", self.abs_sum, self.n_values)
        both("ssim", self.ssim_sum, self.n_frames)
        both("psnr", self.psnr_sum, self.n_frames)
        if self.to_physical is not None:
            out["rmse_physical_per_frame"] = [_finite(math.sqrt(v) if v is not None and v >= 0 else None)
                                              for v in (_finite(x) for x in _ratio(self.phys_sq_sum, self.n_values))]
            ms = _finite(_scalar_ratio(self.phys_sq_sum.sum(), self.n_values.sum()))
            out["rmse_physical"] = None if ms is None else _finite(math.sqrt(ms))
            both("mae_physical", self.phys_abs_sum, self.n_values)

        if self.thresholds:
            hits, misses = self.hits, self.misses
            fa, cn = self.false_alarms, self.correct_negatives
            scores: dict[str, dict[str, Any]] = {"csi": {}, "pod": {}, "far": {}, "hss": {}}
            contingency: dict[str, dict[str, list[int]]] = {}
            for i, thr in enumerate(self.thresholds):
                h, m, f, n = hits[i], misses[i], fa[i], cn[i]
                key = str(thr)
                per_t = _categorical(h, m, f, n)
                total = _categorical(h.sum().view(1), m.sum().view(1), f.sum().view(1), n.sum().view(1))
                for s in scores:
                    scores[s][key] = {"per_frame": per_t[s], "mean": total[s][0]}
                contingency[key] = {
                    "hits": [int(x) for x in h.tolist()],
                    "misses": [int(x) for x in m.tolist()],
                    "false_alarms": [int(x) for x in f.tolist()],
                    "correct_negatives": [int(x) for x in n.tolist()],
                }
            out.update(scores)
            out["contingency"] = contingency
        return out


def _categorical(h: Tensor, m: Tensor, f: Tensor, n: Tensor) -> dict[str, list[float | None]]:
    """CSI, POD, FAR and HSS from contingency counts (1-D tensors); None where 0/0."""
    hss_num = 2.0 * (h * n - m * f)
    hss_den = (h + m) * (m + n) + (h + f) * (f + n)
    return {
        "csi": [_finite(v) for v in _ratio(h, h + m + f)],
        "pod": [_finite(v) for v in _ratio(h, h + m)],
        "far": [_finite(v) for v in _ratio(f, h + f)],
        "hss": [_finite(v) for v in _ratio(hss_num, hss_den)],
    }


def frame_metrics(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    thresholds: Sequence[float] | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """One-shot :class:`FrameMetrics` on a single batch ``(B, T_out, C, H, W)``."""
    m = FrameMetrics(pred.shape[1], thresholds=thresholds, to_physical=to_physical).to(pred.device)
    m.update(pred, target, mask)
    return m.compute()

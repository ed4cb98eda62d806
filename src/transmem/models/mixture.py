"""The mixture of finetuned zoo models: frozen member forecasters combined by learned weights.

Each member is a backbone (a zoo entry, finetuned on the target) or a registered reference
nowcast (:mod:`transmem.baselines`, each in the scale its name declares through the data's units:
``sprog`` in dBR, ``sprog_log`` on the log-scaled values; entries made before that ran every
baseline on the [0, 1] values, ``baseline_scale: values``, and still do). At lead time ``l`` the
forecast is

    y_l = sum_n w_{l,n} * f_n,l          w_{l,.} = softmax(a_l + G(f_1,l .. f_N,l))

with ``a`` one learned logit per lead and member (zero at the start: the plain average) and, for
``gating="pixel"`` only, ``G`` a zero-initialised convolution over the members' forecasts that
lets the weights vary over the field. ``gating="stack"`` is the native radar recipe's combination
(benchmarks/nowcast.py, ``recipe:stack``): :class:`StackGate`, a small CNN that also reads the last
observed frame and the lead, gives the per-pixel logits and a bounded correction

    y_l = clip( sum_n softmax(a_l + o_l)_n f_n,l + 0.1 tanh(e_l), 0, 1 ),   [o_l, e_l] = S(f_.,l, x_last, l / L)

and ``areas`` (calibrated rain areas, :func:`banded`) may then keep its values inside the areas
that chosen members draw at calibrated levels (``transfer --mode mixture --areas``). Only ``a``
(and ``G`` or ``S``) train; the members are frozen and held inside the model, so one zoo entry is
the whole forecaster and loads like any other
(issue 26; the benchmark's ``mix:finetuned`` fit the same weights by a grid on validation clips).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..baselines import baseline_for_data
from ..choices import MIXTURE_GATINGS
from ..fullfield import pad_to_multiple
from .registry import create_model, register_model


@dataclass
class MixtureConfig:
    members: list = field(default_factory=list)        # [{"model": name, "config": {...}}]: frozen backbones
    member_names: list = field(default_factory=list)   # one per member (the zoo entries' names)
    baselines: list = field(default_factory=list)      # registered reference nowcasts that are members too
    baseline_data: dict = field(default_factory=dict)  # the data they forecast (units, inflow, grid spacing)
    baseline_scale: str = "values"                     # "own": each baseline's declared scale; "values": all on [0, 1]
    t_in: int = 10                                     # input frames of a training clip (lead 1 follows)
    leads: int = 10                                    # lead times with their own weights (later: the last's)
    gating: str = "lead"                               # "lead" | "pixel" (plus a per-pixel convolution) | "stack"
    gate_kernel: int = 3
    gate_width: int = 16                               # "stack": channels of the gate network
    areas: list = field(default_factory=list)          # calibrated rain areas (see banded), in threshold order
    channels: int = 1                                  # channels of the frames (the members read them)
    patch_size: int = 1                                # lcm of the members' patch sizes: frames are padded to it


@register_model("mixture", kind="mixture")
class MixtureModel(nn.Module):
    """Frozen members, learned per-lead (and optionally per-pixel) softmax weights. ``forward``
    has a backbone's signature, so training, checkpoints, evaluation and ``predict`` treat it as
    any model; it predicts frames 1..T-1, the input frames as the members' plain mean (no
    weights: only the forecast leads train them)."""

    config_class = MixtureConfig

    @classmethod
    def describe(cls, config: dict) -> str:
        """The zoo table's model column: the members and the baselines."""
        return f"{cls.model_name}({', '.join(list(config.get('member_names') or []) + list(config.get('baselines') or []))})"

    def __init__(self, config: MixtureConfig):
        super().__init__()
        if config.gating not in MIXTURE_GATINGS:
            raise ValueError(f"mixture gating must be one of {', '.join(MIXTURE_GATINGS)}, got {config.gating!r}")
        if not config.members:
            raise ValueError("a mixture needs at least one zoo member")
        if len(config.member_names) != len(config.members):
            raise ValueError("a mixture needs one name per member")
        if len(config.members) + len(config.baselines) < 2:
            raise ValueError("a mixture needs at least two members (zoo entries and baselines together)")
        if config.leads < 1 or config.t_in < 1:
            raise ValueError(f"mixture t_in and leads must be >= 1, got {config.t_in}, {config.leads}")
        if config.baseline_scale not in ("own", "values"):
            raise ValueError(f"mixture baseline_scale must be 'own' or 'values', got {config.baseline_scale!r}")
        if config.gate_kernel < 1 or config.gate_kernel % 2 == 0:
            raise ValueError(f"mixture gate_kernel must be odd, got {config.gate_kernel}")
        self.config = config
        self.members = nn.ModuleList(create_model(m["model"], m["config"]) for m in config.members)
        for m in self.members:
            if m.model_kind != "backbone":
                raise ValueError(f"mixture members are backbones, got a '{m.model_name}' model")
            m.requires_grad_(False)
        # parameter-free and CPU-bound (pysteps): kept out of the module tree and the state dict
        own = config.baseline_scale == "own"
        self.baselines = [baseline_for_data(name, config.t_in, config.baseline_data or None, physical=own)
                          for name in config.baselines]
        n = len(config.members) + len(config.baselines)
        self.logits = nn.Parameter(torch.zeros(config.leads, n))
        self.gate = None
        if config.gating == "pixel":
            k = config.gate_kernel
            self.gate = nn.Conv2d(n * config.channels, n, k, padding=k // 2)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        elif config.gating == "stack":
            self.gate = StackGate(n, config.channels, config.gate_width)
        check_areas(config.areas, self.names)
        self.remember_baselines(0)

    @property
    def names(self) -> list[str]:
        return list(self.config.member_names) + list(self.config.baselines)

    @property
    def patch_size(self) -> int:
        """The least common multiple of the members' patch sizes (frames are padded to it)."""
        return int(self.config.patch_size)

    @property
    def in_channels(self) -> int:
        return int(self.config.channels)

    @property
    def needs_teachers_at_inference(self) -> bool:
        """The members are inside the model: nothing else is needed to forecast."""
        return False

    def train(self, mode: bool = True):
        """The frozen members stay in eval mode whatever the mixture is set to."""
        super().train(mode)
        self.members.eval()
        return self

    def lead_weights(self, n_leads: int) -> torch.Tensor:
        """``(n_leads, members)``: the softmax weights per lead (leads past ``config.leads`` take
        the last lead's), without the per-pixel part."""
        idx = torch.arange(n_leads, device=self.logits.device).clamp(max=self.config.leads - 1)
        return torch.softmax(self.logits[idx], -1)

    def weights_per_lead(self) -> dict[str, list[float]]:
        """member name -> its weight at each lead (for the card and the report)."""
        w = self.lead_weights(self.config.leads).detach().cpu()
        return {name: [round(float(x), 4) for x in w[:, i]] for i, name in enumerate(self.names)}

    def member_forecasts(self, frames: torch.Tensor, sampling_mask=None, t_in: int | None = None):
        """``(head (B, t_in-1, C, H, W), forecasts (B, T-t_in, N, C, H, W))``: the members' mean
        prediction of the input frames, and every member's forecast of the leads (no gradient)."""
        t_in = self.config.t_in if t_in is None else int(t_in)
        if not 1 <= t_in < frames.shape[1]:
            raise ValueError(f"need 1 <= t_in < T, got t_in={t_in} with T={frames.shape[1]}")
        with torch.no_grad():
            # frames of any size: padded to the patch size every member's divides, cropped back
            padded, h, w = pad_to_multiple(frames, self.patch_size)
            preds = torch.stack([m(padded, sampling_mask, t_in=t_in) for m in self.members], 2)[..., :h, :w]
            head = preds[:, :t_in - 1].mean(2)
            fc = preds[:, t_in - 1:]
            if self.baselines:
                fc = torch.cat([fc, self.baseline_forecasts(frames, t_in).to(fc.device, fc.dtype)], 2)
        return head, fc

    def baseline_forecasts(self, frames: torch.Tensor, t_in: int) -> torch.Tensor:
        """``(B, T-t_in, NB, C, H, W)``: every baseline's forecast (they read only the ``t_in``
        input frames). While ``memo_bytes`` > 0 (the weights' fit: it revisits the same clips,
        and pysteps is most of its time) a clip's forecasts are kept by its input frames' bytes,
        up to that many bytes, and served again exactly as computed."""
        def run(x):
            out = []
            for b in self.baselines:
                b.t_in = t_in
                out.append(b.rollout(x))
            return torch.stack(out, 2)
        if not self.memo_bytes:
            return run(frames)
        inputs = frames[:, :t_in].detach().to("cpu", torch.float32).contiguous()
        keys = [(t_in, tuple(frames.shape[1:]), hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest())
                for x in inputs]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        fresh = dict(zip(todo, run(frames[todo]).cpu())) if todo else {}
        for i in todo:
            if self._memo_used + fresh[i].nbytes <= self.memo_bytes:
                self._memo[keys[i]] = fresh[i]
                self._memo_used += fresh[i].nbytes
        return torch.stack([fresh[i] if i in fresh else self._memo[k] for i, k in enumerate(keys)]).to(frames.device)

    def remember_baselines(self, max_bytes: int) -> None:
        """Keep baseline forecasts by clip (:meth:`baseline_forecasts`) up to ``max_bytes``; 0: keep
        none and forget those kept."""
        self.memo_bytes, self._memo, self._memo_used = int(max_bytes), {}, 0

    def combine(self, fc: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, C, H, W)``: the members' forecasts ``fc`` ``(B, L, N, C, H, W)`` weighted
        (``last`` (B, C, H, W), the last observed frame, is read by the ``stack`` gate), then kept
        inside the calibrated rain areas, if any."""
        b, n_leads, n, c, h, w = fc.shape
        idx = torch.arange(n_leads, device=fc.device).clamp(max=self.config.leads - 1)
        logits = self.logits[idx].to(fc.dtype)  # (L, N)
        if self.config.gating == "stack":
            if last is None:
                raise ValueError("the stack gate reads the last observed frame: combine(fc, last)")
            lead = ((idx + 1) / self.config.leads).to(fc.dtype)
            y = self.gate(fc.reshape(b * n_leads, n, c, h, w),
                          last[:, None].expand(b, n_leads, c, h, w).reshape(b * n_leads, c, h, w),
                          lead.repeat(b), logits.repeat(b, 1)).view(b, n_leads, c, h, w)
        else:
            logits = logits[None, :, :, None, None, None]  # (1, L, N, 1, 1, 1)
            if self.gate is not None:
                logits = logits + self.gate(fc.reshape(b * n_leads, n * c, h, w)).view(b, n_leads, n, 1, h, w)
            y = (torch.softmax(logits, 2) * fc).sum(2)
        if self.config.areas:
            reach = torch.stack([area_source(fc, self.names, a["source"]) >= a["level_value"]
                                 for a in self.config.areas], 2)  # (B, L, K, C, H, W)
            y = banded(y.flatten(0, 1), reach.flatten(0, 1), [a["value"] for a in self.config.areas]).view_as(y)
        return y

    def forward(self, frames: torch.Tensor, sampling_mask: torch.Tensor | None = None,
                t_in: int | None = None) -> torch.Tensor:
        """Predictions of frames 1..T-1 of ``frames`` (B, T, C, H, W), as a backbone gives them:
        the members roll out from ``t_in`` frames (default ``config.t_in``; a sampling mask, if
        given, is handed to them) and their forecasts are combined."""
        head, fc = self.member_forecasts(frames, sampling_mask, t_in)
        t_in = self.config.t_in if t_in is None else int(t_in)
        return torch.cat([head, self.combine(fc, frames[:, t_in - 1])], 1)


class StackGate(nn.Module):
    """The ``stack`` gate: per pixel and lead, weight logits for N members' forecasts and a bounded
    correction, from those forecasts, the last observed frame and the lead as a fraction of the
    trained horizon. Three convolutions (5x5, then 3x3 dilated by 2 and by 4: a 17-pixel reach, as
    far as rain moves in a few 5-minute steps on a 1 km grid) and a 1x1 head that starts at zero:
    the start is the per-lead softmax alone (``start``: other initial logits per member; the radar
    benchmark starts from the equal mean of its first two members)."""

    def __init__(self, members: int, channels: int = 1, width: int = 16, start=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(members * channels + channels + 1, width, 5, padding=2), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU())
        self.head = nn.Conv2d(width, members + channels, 1)  # a logit per member, a correction per channel
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.zero_()
            if start is not None:
                self.head.bias[:members] = torch.as_tensor(start, dtype=self.head.bias.dtype)

    def forward(self, members: torch.Tensor, last: torch.Tensor, lead: torch.Tensor,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """members (N, M, C, H, W), last (N, C, H, W), lead (N,), logits (N, M) added to the
        per-pixel ones -> the forecast (N, C, H, W) in [0, 1]."""
        n, m, c, h, w = members.shape
        x = torch.cat([members.reshape(n, m * c, h, w), last, lead.view(-1, 1, 1, 1).expand(n, 1, h, w)], 1)
        out = self.head(self.body(x))
        logit = out[:, :m] if logits is None else out[:, :m] + logits.view(n, m, 1, 1)
        mix = (torch.softmax(logit, 1)[:, :, None] * members).sum(1)
        return (mix + 0.1 * torch.tanh(out[:, m:])).clamp(0, 1)


def banded(value: torch.Tensor, reach: torch.Tensor, levels) -> torch.Tensor:
    """A forecast ``value`` (N, C, H, W) kept inside rain areas: ``reach`` (N, K, C, H, W, bool)
    says where the rain reaches ``levels[k]`` (K ascending values). Inside an area the value is
    lifted to just above its level, outside held just below, so each level's area is the one drawn
    and every other value is the forecast's. Why: a forecast trained on squared error is smooth,
    and its area above a high threshold shrinks; areas drawn by another field at a calibrated level
    restore it. Reaching a higher level implies the lower ones."""
    lv = torch.as_tensor(list(levels), dtype=value.dtype, device=value.device).view(1, -1, *[1] * (value.dim() - 1))
    reach = reach.flip(1).cummax(1).values.flip(1)
    eps = 1e-4
    lo = torch.where(reach, lv + eps, torch.zeros_like(lv)).amax(1)
    hi = torch.where(reach, torch.ones_like(lv), lv - eps).amin(1)
    return torch.minimum(torch.maximum(value, lo), hi)


def area_source(fc: torch.Tensor, names: list[str], source: str) -> torch.Tensor:
    """The field a rain area is drawn from, ``(..., C, H, W)`` of the members' forecasts ``fc``
    ``(..., N, C, H, W)``: a member's name, or ``mean:A+B`` for the equal mean of members."""
    return torch.stack([fc.select(-4, names.index(p)) for p in area_parts(source)], 0).mean(0)


def area_parts(source: str) -> list[str]:
    """The members an area's ``source`` names: ``NAME``, or ``mean:A+B`` for several."""
    return source[len("mean:"):].split("+") if source.startswith("mean:") else [source]


def check_areas(areas: list, names: list[str]) -> None:
    """Calibrated areas name members of this mixture and come in ascending order of level."""
    for a in areas:
        if not {"source", "value", "level_value"} <= set(a):
            raise ValueError(f"a mixture area needs source, value and level_value, got {sorted(a)}")
        if any(p not in names for p in area_parts(a["source"])):
            raise ValueError(f"a mixture area is drawn from {a['source']!r}, not a member ({', '.join(names)})")
    values = [a["value"] for a in areas]
    if values != sorted(values):
        raise ValueError(f"a mixture's areas must come in ascending order of level, got {values}")


def patch_lcm(patches) -> int:
    """The smallest patch size every member's divides (frames padded to it suit them all)."""
    return math.lcm(*[int(p) for p in patches]) if patches else 1

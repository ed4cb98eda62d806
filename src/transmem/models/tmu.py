"""The Transferable Memory Unit (TMU).

The TMU wraps the cells of any registered backbone at the layers ``tmu_layers``: it is the
backbone's memory hook (see :class:`~transmem.models.base.MemoryHook`). After the backbone cell
computes its raw memory ``M`` at layer l and step t, for every source n (docs/method.md):

    d_n = D_n(M)                      distiller (conv, optional GroupNorm) into source n's space
    a_n = d_n                         distill mode: teachers are regression targets only, so
        = S_n[l', t]                  bank_read mode: the teacher state is read in the forward
    g_n = sigmoid(G_n([x, h_prev]))   transfer gate, per source, position and channel
    w_n = softmax_n(V([x, h_prev]))   optional weighting across sources, per position
    M'  = M + sum_n w_n * g_n * P_n(a_n)
                                      P_n: 1x1 conv, zero-initialised (training starts from the
                                      bare backbone); ``gates=False``: g_n = 1
    L_distill term = sum_n MSE(d_n, S_n[l', t])

``M'`` is the memory carried on. The code below computes exactly this in plain torch ops
(:meth:`_LayerTransfer.gates`, :meth:`_LayerTransfer.mix`, :func:`distill_terms`). In the
default configuration (distill mode, gates, no weighting, linear distiller, no autocast) and
while ``kernels.enabled()``, the same step runs as one fused autograd node instead
(:func:`transmem.models.kernels.distill_step`: projection folded into the distiller, gradient
written by hand, little kept for backward); it is tested equal to the plain path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..options import TMUOptions, check as check_options
from . import kernels
from .base import make_norm
from .registry import create_model, register_model


@dataclass
class TMUConfig(TMUOptions):
    """The user's options (:class:`~transmem.options.TMUOptions`, declared there once) plus what
    the builder fills in: the target backbone and one name and memory width per teacher."""
    backbone: str = "convlstm"
    backbone_config: dict = field(default_factory=dict)
    source_names: list = field(default_factory=list)     # one per teacher
    source_channels: list = field(default_factory=list)  # memory channels of each teacher


def resolve_layers(spec, num_layers: int) -> list[int]:
    """``tmu_layers`` as layer numbers: "bottom" (layer 0), "top" (the last), "all", or a list of
    layer numbers below ``num_layers``."""
    if spec == "bottom":
        return [0]
    if spec == "all":
        return list(range(num_layers))
    if spec == "top":
        return [num_layers - 1]
    layers = sorted({int(l) for l in spec})
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise ValueError(f"tmu_layers {spec} invalid for a backbone with {num_layers} layers")
    return layers


def distill_terms(d, src_ch, targets):
    """sum over sources n of MSE(d_n, S_n) at one step (one term per source); ``d`` holds the
    d_n side by side along channels."""
    return sum(F.mse_loss(dn, s) for dn, s in zip(d.split(src_ch, 1), targets))


class _LayerTransfer(nn.Module):
    """The TMU parts of one backbone layer, for all sources."""

    def __init__(self, in_ch: int, hidden: int, src_ch: list[int], cfg: TMUConfig):
        super().__init__()
        n = len(src_ch)
        self.src_ch = list(src_ch)
        k = cfg.distiller_kernel
        # all distillers fused into one convolution (its output is split per source)
        self.distill = nn.Sequential(nn.Conv2d(hidden, sum(src_ch), k, padding=k // 2),
                                     make_norm(cfg.distiller_norm, sum(src_ch)))
        self.project = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in src_ch)
        for p in self.project:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        kg = cfg.gate_kernel
        out = (n * hidden if cfg.gates else 0) + (n if cfg.weighting == "softmax" else 0)
        self.gate = nn.Conv2d(in_ch + hidden, out, kg, padding=kg // 2) if out else None
        self.n, self.hidden = n, hidden
        self.use_gates, self.softmax = cfg.gates, cfg.weighting == "softmax"

    def fused_projection(self):
        """All projections P_n as one 1x1 convolution (weight, bias): input channel block n maps
        to output block n (a block-diagonal weight). Built once per forward, used at every step."""
        if self.n == 1:
            return self.project[0].weight, self.project[0].bias
        weight = torch.block_diag(*[p.weight.flatten(1) for p in self.project])[:, :, None, None]
        return weight, torch.cat([p.bias for p in self.project])

    def gates(self, x_in, h_prev, xh=None):
        """(g, w): the transfer gates ``g_n = sigmoid(G_n([x, h]))`` (B, n*hidden, h, w) and the
        source weights ``w_n = softmax_n(V([x, h]))`` (B, n, h, w), each None when off.
        ``xh``: [x, h] when the backbone passed it."""
        if self.gate is None:
            return None, None
        z = self.gate(torch.cat([x_in, h_prev], 1) if xh is None else xh)
        g = torch.sigmoid(z[:, : self.n * self.hidden]) if self.use_gates else None
        w = torch.softmax(z[:, z.shape[1] - self.n:], 1) if self.softmax else None
        return g, w

    def mix(self, mem, contrib, g, w, pw, pb):
        """``M' = M + sum_n w_n * g_n * P_n(contrib_n)``, with (pw, pb) from
        :meth:`fused_projection` and the gates g and weights w of :meth:`gates` (None: 1)."""
        c = F.conv2d(contrib, pw, pb)                  # P_n(contrib_n), channel block n
        if g is not None:
            c = g * c
        c = c.unflatten(1, (self.n, self.hidden))
        if w is not None:
            c = c * w[:, :, None]
        return mem + (c[:, 0] if self.n == 1 else c.sum(1))

    @property
    def fusable(self) -> bool:
        """Whether the fused kernel (:func:`kernels.distill_step`) can compute this layer's step:
        gates without softmax weights and a linear distiller, so the projection folds into the
        distiller (one convolution for d and P(d)). Distill mode and no autocast are the
        caller's to check."""
        return (self.use_gates and not self.softmax and isinstance(self.distill[1], nn.Identity)
                and self.gate is not None)

    def kernel_weights(self):
        """(folded weight, folded bias, gate weight, gate bias, conf) for
        :func:`kernels.distill_step` (built once per forward)."""
        conv = self.distill[0]
        w, b = kernels.fold_projection(conv.weight, conv.bias, *self.fused_projection())
        conf = (self.n, self.hidden, tuple(self.src_ch), conv.padding[0], self.gate.padding[0])
        return w, b, self.gate.weight, self.gate.bias, conf


@register_model("tmu", kind="transfer")
class TMUModel(nn.Module):
    """A target backbone with TMUs at ``tmu_layers``. Same protocol as a backbone, plus a bank."""

    config_class = TMUConfig

    @classmethod
    def describe(cls, config: dict) -> str:
        return f"{cls.model_name}({config.get('backbone')}, {len(config.get('source_names') or [])} src)"

    def __init__(self, config: TMUConfig):
        super().__init__()
        check_options(config)
        if len(config.source_names) != len(config.source_channels) or not config.source_names:
            raise ValueError("TMU needs one source name and one channel count per teacher")
        self.config = config
        self.backbone = create_model(config.backbone, config.backbone_config)
        self.layers = resolve_layers(config.tmu_layers, self.backbone.num_layers)
        self.transfer = nn.ModuleDict({
            str(l): _LayerTransfer(self.backbone.layer_input_channels(l),
                                   self.backbone.hidden_channels(l), config.source_channels, config)
            for l in self.layers})

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    def hidden_channels(self, layer: int) -> int:
        return self.backbone.hidden_channels(layer)

    @property
    def num_sources(self) -> int:
        return len(self.config.source_names)

    @property
    def needs_teachers_at_inference(self) -> bool:
        """bank_read mode reads the teachers' states in the forward pass; distill mode does not."""
        return self.config.mode == "bank_read"

    def forward(self, frames, sampling_mask=None, return_memory=False, t_in=None, bank=None,
                return_aux=False, record_maps=False, distill_until: int | None = None):
        """``bank``: list over sources of {layer: (B, T-1, C_n, h, w)} adapted teacher states.
        With a bank, ``aux["distill_loss"]`` is the mean squared distance between every distilled
        memory and its teacher state, averaged over sources, TMU layers and steps (in the graph).
        ``record_maps`` stores per-step gate and source-weight maps in ``aux["maps"]``.
        ``distill_until``: only steps t < distill_until add distillation terms."""
        if self.config.mode == "bank_read" and bank is None:
            raise ValueError("TMU in bank_read mode needs the teachers' memory bank at every call")
        maps: dict[int, list] = {l: [] for l in self.layers}
        losses: list[torch.Tensor] = []  # per step and layer: sum over sources of MSE(D_n(M), S_n)
        read = self.config.mode == "bank_read"
        # bank_read: the teachers' states of each layer side by side along channels, once per call
        bank_cat = {} if not read else {
            l: bank[0][l] if len(bank) == 1 else torch.cat([src[l] for src in bank], 2)
            for l in self.layers}

        # per layer: the fused kernel (same step, see kernels.distill_step) where the switch is
        # on and the configuration allows; it computes in one dtype, so under autocast the plain
        # path lets autocast pick each operation's precision
        mixed = torch.is_autocast_enabled(frames.device.type)
        on = kernels.enabled() and not read and not mixed
        fused = {l: on and self.transfer[str(l)].fusable for l in self.layers}
        # per layer, once per call: the fused projection P (plain path) or the kernel's weights
        prep = {l: self.transfer[str(l)].kernel_weights() if fused[l]
                else self.transfer[str(l)].fused_projection() for l in self.layers}

        terms = [0]  # how many (step, layer, source) MSE terms the losses hold

        def hook(l, t, mem, x_in, h_prev, xh=None):
            if str(l) not in self.transfer:
                return mem
            tr = self.transfer[str(l)]
            # L_distill terms MSE(D_n(M), S_n) per step, layer and source (only when returned)
            wanted = bank is not None and return_aux and (distill_until is None or t < distill_until)
            targets = [bank[n][l][:, t] for n in range(tr.n)] if wanted else []
            if not fused[l]:
                d = tr.distill(mem)                          # d_n = D_n(M), channel block n
                contrib = bank_cat[l][:, t] if read else d   # a_n
                g, w = tr.gates(x_in, h_prev, xh)            # g_n, w_n
                out = tr.mix(mem, contrib, g, w, *prep[l])   # M' = M + sum_n w_n g_n P_n(a_n)
                loss_t = distill_terms(d, tr.src_ch, targets) if targets else None
            else:                                            # the same, as one fused node
                *weights, conf = prep[l]
                out, loss_t, g = kernels.distill_step(mem, x_in, h_prev, xh, *weights, conf,
                                                      record_maps, targets)
                w = None
            if loss_t is not None:
                losses.append(loss_t)
            terms[0] += len(targets)
            if record_maps:
                gate_map = g.unflatten(1, (tr.n, tr.hidden)).mean(2) if g is not None else \
                    mem.new_ones(mem.shape[0], tr.n, *mem.shape[2:])
                maps[l].append({"gate": gate_map.detach(), "weight": None if w is None else w.detach()})
            return out

        result = self.backbone(frames, sampling_mask, return_memory, t_in, memory_hook=hook)
        if not return_aux:
            return result
        # the mean of every (step, layer, source) MSE term
        aux = {"distill_loss": torch.stack(losses).sum() / terms[0] if losses else None}
        if record_maps:
            aux["maps"] = maps
        return result, aux

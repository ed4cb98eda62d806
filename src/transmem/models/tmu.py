"""The Transferable Memory Unit (TMU).

The TMU wraps the cells of any registered backbone at the layers ``tmu_layers``. After the
backbone cell computes its raw memory ``M`` at layer l and step t, for every source n:

* a distiller ``D_n`` (conv, optional GroupNorm) maps ``M`` into source n's memory space,
  ``d_n = D_n(M)``; ``L_distill`` pulls ``d_n`` towards the (adapted) teacher state ``S_n``;
* the contribution is ``d_n`` in ``distill`` mode (teachers are regression targets only, so
  inference needs no teacher) or ``S_n`` in ``bank_read`` mode (teacher states read in the
  forward pass);
* a projection ``P_n`` (1x1 conv, zero-initialised so training starts from the bare backbone)
  maps it back to the target's channels;
* transfer gates ``g_n = sigmoid(G_n([x, h_prev]))`` decide per position and channel how much
  enters; optionally a softmax over sources per position, ``w_n``, weighs them.

The memory carried on is ``M' = M + sum_n w_n * g_n * P_n(contribution_n)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import make_norm
from .registry import create_model, register_model


@dataclass
class TMUConfig:
    backbone: str = "convlstm"
    backbone_config: dict = field(default_factory=dict)
    source_names: list = field(default_factory=list)     # one per teacher
    source_channels: list = field(default_factory=list)  # memory channels of each teacher
    tmu_layers: list | str = "bottom"                    # "bottom" | "all" | list of layer indices
    mode: str = "distill"                                # "distill" | "bank_read"
    gates: bool = True                                   # False: plain sum (ablation)
    weighting: str = "none"                              # "none" | "softmax" across sources
    distiller_kernel: int = 1
    distiller_norm: str = "none"                         # "none" | "group"
    gate_kernel: int = 1


def resolve_layers(spec, num_layers: int) -> list[int]:
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

    def project_all(self, contrib: torch.Tensor) -> torch.Tensor:
        """All projections P_n in one 1x1 convolution: (B, sum C_n, h, w) -> (B, n*hidden, h, w),
        block n of the output being P_n applied to channel block n of the input."""
        if self.n == 1:
            return self.project[0](contrib)
        weight = torch.block_diag(*[p.weight.flatten(1) for p in self.project])[:, :, None, None]
        bias = torch.cat([p.bias for p in self.project])
        return F.conv2d(contrib, weight, bias)


@register_model("tmu")
class TMUModel(nn.Module):
    """A target backbone with TMUs at ``tmu_layers``. Same protocol as a backbone, plus a bank."""

    config_class = TMUConfig

    def __init__(self, config: TMUConfig):
        super().__init__()
        if config.mode not in ("distill", "bank_read"):
            raise ValueError(f"TMU mode must be 'distill' or 'bank_read', got '{config.mode}'")
        if config.weighting not in ("none", "softmax"):
            raise ValueError(f"TMU weighting must be 'none' or 'softmax', got '{config.weighting}'")
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

    def hidden_channels(self, layer: int) -> int:
        return self.backbone.hidden_channels(layer)

    @property
    def num_sources(self) -> int:
        return len(self.config.source_names)

    def forward(self, frames, sampling_mask=None, return_memory=False, t_in=None, bank=None,
                return_aux=False, record_maps=False):
        """``bank``: list over sources of {layer: (B, T-1, C_n, h, w)} adapted teacher states.
        With a bank, ``aux["distill_loss"]`` is the mean squared distance between every distilled
        memory and its teacher state, averaged over sources, TMU layers and steps (in the graph).
        ``record_maps`` stores per-step gate and source-weight maps in ``aux["maps"]``."""
        if self.config.mode == "bank_read" and bank is None:
            raise ValueError("TMU in bank_read mode needs the teachers' memory bank at every call")
        maps: dict[int, list] = {l: [] for l in self.layers}
        distilled: dict[int, list] = {l: [] for l in self.layers}  # D(M) per step, for L_distill
        read = self.config.mode == "bank_read"
        collect = bank is not None and return_aux
        # bank_read: the teachers' states of each layer side by side along channels, once per call
        bank_cat = {} if not read else {
            l: bank[0][l] if len(bank) == 1 else torch.cat([src[l] for src in bank], 2)
            for l in self.layers}

        def hook(l, t, mem, x_in, h_prev):
            tr = self.transfer[str(l)] if str(l) in self.transfer else None
            if tr is None:
                return mem
            d = tr.distill(mem)  # every distiller at once: channel block n is D_n(M)
            if collect:
                distilled[l].append(d)
            c = tr.project_all(bank_cat[l][:, t] if read else d)
            g = w = None
            if tr.gate is not None:
                z = tr.gate(torch.cat([x_in, h_prev], 1))
                if tr.use_gates:
                    g = torch.sigmoid(z[:, : tr.n * tr.hidden])
                    c = g * c
                if tr.softmax:
                    w = torch.softmax(z[:, z.shape[1] - tr.n:], 1)
            c = c.unflatten(1, (tr.n, tr.hidden))
            if w is not None:
                c = c * w[:, :, None]
            out = mem + (c[:, 0] if tr.n == 1 else c.sum(1))
            if record_maps:
                gate_map = g.unflatten(1, (tr.n, tr.hidden)).mean(2) if g is not None else \
                    mem.new_ones(mem.shape[0], tr.n, *mem.shape[2:])
                maps[l].append({"gate": gate_map.detach(), "weight": None if w is None else w.detach()})
            return out

        result = self.backbone(frames, sampling_mask, return_memory, t_in, memory_hook=hook)
        if not return_aux:
            return result
        # L_distill: mean over TMU layers and sources of the MSE over (batch, steps, C_n, h, w),
        # i.e. the mean of the per-step, per-source MSEs (every step has the same size)
        losses = []
        for l in self.layers:
            if distilled[l]:
                d = torch.stack(distilled[l], 1).split(self.transfer[str(l)].src_ch, 2)
                steps = d[0].shape[1]
                losses += [F.mse_loss(d[n], bank[n][l][:, :steps]) for n in range(len(d))]
        aux = {"distill_loss": torch.stack(losses).mean() if losses else None}
        if record_maps:
            aux["maps"] = maps
        return result, aux

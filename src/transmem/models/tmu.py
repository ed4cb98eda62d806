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

from .base import make_norm, pointwise_conv
from .registry import create_model, register_model

TMU_MODES = ("distill", "bank_read")
TMU_WEIGHTINGS = ("none", "softmax")


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


def _conv(x, w, b, pad: int):
    """A convolution of the TMU; a 1x1 one as a batched matmul (see :func:`pointwise_conv`)."""
    if w.shape[-1] != 1:
        return F.conv2d(x, w, b, padding=pad)
    return pointwise_conv(x, w, b)


def _conv_backward(g_y, x, w, pad: int, need):
    """(grad x, grad w, grad b) of :func:`_conv`, each only where ``need`` says."""
    if w.shape[-1] != 1:
        return torch.ops.aten.convolution_backward(g_y, x, w, [w.shape[0]], [1, 1], [pad, pad],
                                                   [1, 1], False, [0, 0], 1, list(need))
    gf, xf = g_y.flatten(2), x.flatten(2)
    g_x = torch.bmm(w.flatten(1).t().expand(x.shape[0], -1, -1), gf).view_as(x) if need[0] else None
    g_w = torch.bmm(gf, xf.transpose(1, 2)).sum(0).view_as(w) if need[1] else None
    g_b = gf.sum((0, 2)) if need[2] else None
    return g_x, g_w, g_b


def _joined(x_in, h_prev):
    """[x, h] when the backbone passed x and h as views of it (see MemoryHook), else None."""
    base = x_in._base
    if base is None or h_prev._base is not base or base.dim() != 4:
        return None
    cx = x_in.shape[1]
    same_grid = (base.shape[0], *base.shape[2:]) == (x_in.shape[0], *x_in.shape[2:])
    if (not same_grid or base.shape[1] != cx + h_prev.shape[1]
            or x_in.stride() != base.stride() or h_prev.stride() != base.stride()
            or x_in.storage_offset() != base.storage_offset()
            or h_prev.storage_offset() != base.storage_offset() + cx * base.stride(1)):
        return None
    return base


def _gate_pre(x_in, h_prev, wg, bg, pad: int, xh=None):
    """G([x, h]), from ``xh = [x, h]`` when given; with a 1x1 gate and no ``xh``, the x and h
    halves of the weight are applied one after the other, so that [x, h] is never built."""
    if xh is not None:
        return _conv(xh, wg, bg, pad)
    if wg.shape[-1] != 1:
        return F.conv2d(torch.cat([x_in, h_prev], 1), wg, bg, padding=pad)
    n, cx = x_in.shape[:2]
    w2 = wg.flatten(1)
    z = torch.baddbmm(bg[None, :, None], w2[:, :cx].expand(n, -1, -1), x_in.flatten(2))
    z = z.baddbmm_(w2[:, cx:].expand(n, -1, -1), h_prev.flatten(2))
    return z.view(n, wg.shape[0], *x_in.shape[2:])


def _gate_pre_backward(g_z, x_in, h_prev, wg, pad: int, need):
    """(grad x, grad h, grad weight, grad bias) of :func:`_gate_pre` where ``need`` says."""
    want_xh = need[0] or need[1]
    cx = x_in.shape[1]
    if wg.shape[-1] != 1:
        g_xh, g_w, g_b = _conv_backward(g_z, torch.cat([x_in, h_prev], 1), wg, pad,
                                        (want_xh, need[2], need[3]))
        g_x, g_h = g_xh.split([cx, h_prev.shape[1]], 1) if want_xh else (None, None)
    else:
        g_x, g_wx, g_b = _conv_backward(g_z, x_in, wg[:, :cx], 0, (need[0], need[2], need[3]))
        g_h, g_wh, _ = _conv_backward(g_z, h_prev, wg[:, cx:], 0, (need[1], need[2], False))
        g_w = torch.cat([g_wx, g_wh], 1) if need[2] else None
    return (g_x if need[0] else None), (g_h if need[1] else None), g_w, g_b


def _distill_mix(mem, x_in, h_prev, w, b, wg, bg, n: int, hidden: int, sum_c: int,
                 pad: int, pad_g: int, xh=None):
    """One TMU step of the default configuration (distill mode, gates, no softmax weighting,
    linear distiller) without autograd: ``[d | c] = conv(M)`` in one convolution whose second
    block is the projection folded into the distiller (c = P(D(M))), ``g = sigmoid(G([x, h]))``,
    ``M' = M + sum_n g_n * c_n``. ``xh``: [x, h] when at hand. Returns (M', d, c, g); under
    autograd only on the ``record_maps`` path (training uses :class:`_DistillMixFn`)."""
    y = _conv(mem, w, b, pad)
    d, c = y[:, :sum_c], y[:, sum_c:]
    g = torch.sigmoid(_gate_pre(x_in, h_prev, wg, bg, pad_g, xh))
    if torch.is_grad_enabled() and (mem.requires_grad or g.requires_grad or c.requires_grad):
        gc = g * c
        return mem + (gc if n == 1 else gc.unflatten(1, (n, hidden)).sum(1)), d, c, g
    out = torch.addcmul(mem, g[:, :hidden], c[:, :hidden])
    for k in range(1, n):  # M' = M + sum_n g_n * c_n, accumulated in place
        out.addcmul_(g[:, k * hidden:(k + 1) * hidden], c[:, k * hidden:(k + 1) * hidden])
    return out, d, c, g


def _distill_terms(d, src_ch, targets):
    """sum over sources n of MSE(D_n(M), S_n) at one step (one term per source)."""
    return sum(F.mse_loss(dn, s) for dn, s in zip(d.split(src_ch, 1), targets))


class _DistillMixFn(torch.autograd.Function):
    """:func:`_distill_mix` (and, given the teacher states of the step, the step's distillation
    terms) as one autograd node, reading either ``xh = [x, h]`` or ``x`` and ``h`` (the other
    None). For backward it keeps M and [x, h] (which the backbone keeps anyway) and references to
    the teacher states, and recomputes [d | c] and the gates there (two small matmuls), instead
    of keeping the distilled memories, projections, gate pre-activations and gates of every
    step: the TMU then adds little to the graph's memory.
    Why per step and not once after the rollout: here d is computed while M is still in cache;
    one pass over all steps' memories at the end measured slower on the CPU."""

    @staticmethod
    def forward(ctx, mem, xh, x_in, h_prev, w, b, wg, bg, conf, *targets):
        n, hidden, src_ch, pad, pad_g = conf
        out, d, _, _ = _distill_mix(mem, x_in, h_prev, w, b, wg, bg, n, hidden, sum(src_ch),
                                    pad, pad_g, xh)
        ctx.save_for_backward(mem, xh, x_in, h_prev, w, b, wg, bg, *targets)
        ctx.conf = conf
        ctx.set_materialize_grads(False)
        if not targets:
            return out
        return out, _distill_terms(d, src_ch, targets)

    @staticmethod
    def backward(ctx, g_out, *g_rest):
        mem, xh, x_in, h_prev, w, b, wg, bg, *targets = ctx.saved_tensors
        n, hidden, src_ch, pad, pad_g = ctx.conf
        sum_c = sum(src_ch)
        g_loss = g_rest[0] if g_rest else None
        if g_out is None:
            g_out = torch.zeros_like(mem)
        # recompute [d | c] (only c when no distillation term needs a gradient)
        y = _conv(mem, w, b, pad) if g_loss is not None else _conv(mem, w[sum_c:], b[sum_c:], pad)
        c = y[:, y.shape[1] - n * hidden:]
        g = torch.sigmoid(_gate_pre(x_in, h_prev, wg, bg, pad_g, xh))
        go = g_out.unsqueeze(1)  # M' sums the n blocks of g * c: each block's gradient is g_out
        g_y = torch.empty_like(y) if g_loss is not None else \
            y.new_zeros(y.shape[0], sum_c + n * hidden, *y.shape[2:])
        torch.mul(g.unflatten(1, (n, hidden)), go, out=g_y[:, sum_c:].unflatten(1, (n, hidden)))
        g_z = torch.ops.aten.sigmoid_backward((c.unflatten(1, (n, hidden)) * go).flatten(1, 2), g)
        if g_loss is not None:  # d/dd_n of MSE(d_n, S_n) = 2 (d_n - S_n) / numel
            for dn, s, gd in zip(y[:, :sum_c].split(src_ch, 1), targets, g_y[:, :sum_c].split(src_ch, 1)):
                torch.sub(dn, s, out=gd).mul_(g_loss * (2.0 / dn.numel()))
        need = ctx.needs_input_grad
        g_mem, g_w, g_b = _conv_backward(g_y, mem, w, pad, (need[0], need[4], need[5]))
        if need[0]:
            g_mem = g_mem.add_(g_out)
        g_xh = g_x = g_h = None
        if xh is not None:
            g_xh, g_wg, g_bg = _conv_backward(g_z, xh, wg, pad_g, (need[1], need[6], need[7]))
        else:
            g_x, g_h, g_wg, g_bg = _gate_pre_backward(g_z, x_in, h_prev, wg, pad_g,
                                                      (need[2], need[3], need[6], need[7]))
        return (g_mem, g_xh, g_x, g_h, g_w, g_b, g_wg, g_bg, None, *([None] * len(targets)))


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

    def mix(self, mem, contrib, x_in, h_prev, pw, pb):
        """M' = M + sum_n w_n * g_n * P_n(contrib_n) with (pw, pb) from :meth:`fused_projection`;
        returns (M', gates (B, n*hidden, h, w) or None, source weights (B, n, h, w) or None)."""
        c = F.conv2d(contrib, pw, pb)
        g = w = None
        if self.gate is not None:
            z = self.gate(torch.cat([x_in, h_prev], 1))
            if self.use_gates:
                g = torch.sigmoid(z[:, : self.n * self.hidden])
                c = g * c
            if self.softmax:
                w = torch.softmax(z[:, z.shape[1] - self.n:], 1)
        c = c.unflatten(1, (self.n, self.hidden))
        if w is not None:
            c = c * w[:, :, None]
        return mem + (c[:, 0] if self.n == 1 else c.sum(1)), g, w

    @property
    def fast(self) -> bool:
        """Default configuration: the distiller is linear and gates without softmax weights,
        so the projection folds into the distiller (one convolution for d and P(d))."""
        return (self.use_gates and not self.softmax and isinstance(self.distill[1], nn.Identity)
                and self.gate is not None)

    def folded(self):
        """(weight, bias) of one convolution M -> [D(M) | P(D(M))] (built once per forward)."""
        conv = self.distill[0]
        pw, pb = self.fused_projection()
        wd = conv.weight
        bd = conv.bias if conv.bias is not None else wd.new_zeros(wd.shape[0])
        p2 = pw.flatten(1)                                    # (n*hidden, sum C_n)
        w_eff = (p2 @ wd.flatten(1)).view(p2.shape[0], *wd.shape[1:])
        b_eff = p2 @ bd + pb
        return torch.cat([wd, w_eff]), torch.cat([bd, b_eff])

    def step_fast(self, mem, x_in, h_prev, w, b, record: bool, targets: list):
        """One step on the default configuration: (M', the step's distillation terms summed
        over sources or None without ``targets``, gates or None)."""
        conf = (self.n, self.hidden, tuple(self.src_ch), self.distill[0].padding[0], self.gate.padding[0])
        xh = _joined(x_in, h_prev)
        if torch.is_grad_enabled() and not record:
            pair = (None, None) if xh is not None else (x_in, h_prev)
            res = _DistillMixFn.apply(mem, xh, *pair, w, b, self.gate.weight, self.gate.bias,
                                      conf, *targets)
            return (res[0], res[1], None) if targets else (res, None, None)
        out, d, _, g = _distill_mix(mem, x_in, h_prev, w, b, self.gate.weight, self.gate.bias,
                                    conf[0], conf[1], sum(self.src_ch), conf[3], conf[4], xh)
        return out, (_distill_terms(d, self.src_ch, targets) if targets else None), g


@register_model("tmu")
class TMUModel(nn.Module):
    """A target backbone with TMUs at ``tmu_layers``. Same protocol as a backbone, plus a bank."""

    config_class = TMUConfig

    def __init__(self, config: TMUConfig):
        super().__init__()
        if config.mode not in TMU_MODES:
            raise ValueError(f"TMU mode must be 'distill' or 'bank_read', got '{config.mode}'")
        if config.weighting not in TMU_WEIGHTINGS:
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

        # the fused node computes in one dtype: under autocast the per-op path lets autocast
        # pick each operation's precision
        mixed = torch.is_autocast_enabled(frames.device.type)
        fast = {l: not read and not mixed and self.transfer[str(l)].fast for l in self.layers}
        # per layer, once per call: the folded [distiller | projection] weights on the fast path,
        # the fused projection otherwise
        prep = {l: self.transfer[str(l)].folded() if fast[l] else self.transfer[str(l)].fused_projection()
                for l in self.layers}

        terms = [0]  # how many (step, layer, source) MSE terms the losses hold

        def hook(l, t, mem, x_in, h_prev):
            tr = self.transfer[str(l)] if str(l) in self.transfer else None
            if tr is None:
                return mem
            w = None
            # L_distill terms MSE(D_n(M), S_n) per step, layer and source (only when returned)
            wanted = bank is not None and return_aux and (distill_until is None or t < distill_until)
            targets = [bank[n][l][:, t] for n in range(tr.n)] if wanted else []
            if fast[l]:
                out, loss_t, g = tr.step_fast(mem, x_in, h_prev, *prep[l], record_maps, targets)
                if loss_t is not None:
                    losses.append(loss_t)
            else:
                d = tr.distill(mem)  # every distiller at once: channel block n is D_n(M)
                out, g, w = tr.mix(mem, bank_cat[l][:, t] if read else d, x_in, h_prev, *prep[l])
                if targets:
                    losses.append(_distill_terms(d, tr.src_ch, targets))
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

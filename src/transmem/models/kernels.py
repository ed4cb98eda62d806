"""Fused CPU kernels: faster implementations of equations that ``base.py`` and ``tmu.py`` state
in plain torch ops. Nothing here defines the method; every function computes what its plain
counterpart computes (equal up to float rounding, tested both ways in tests/test_models.py and
tests/test_tmu.py).

The switch. ``enabled()`` says whether the models use these kernels; on by default (they are
faster on the CPU), off with the environment variable ``TRANSMEM_FUSED=0`` (read at import: use
it for runs that start several processes) or, inside one process, with ``set_enabled(flag)`` or
the context manager ``use_fused(flag)``::

    from transmem.models import kernels
    with kernels.use_fused(False):
        loss = model(frames, ...)   # the plain autograd reference path

What they save:

* :class:`LSTMMemoryFn` / :class:`GatedTanhFn`: the LSTM memory update and ``o * tanh(c)`` as
  one autograd node each. Built from slices and pointwise ops, autograd's backward makes a
  zero-filled gradient of the whole gate tensor for every slice and adds them up; here it is
  written once, block by block.
* :func:`tanh`: on the CPU ``2 * sigmoid(2x) - 1`` (this torch build's CPU tanh is several times
  slower than its sigmoid; the two agree to ~2e-7 absolute).
* :func:`pointwise_conv`: a 1x1 convolution as a batched matmul (oneDNN reorders the input and
  output of a 1x1 convolution to its blocked layout and back at every call, which on the small
  grids of these models costs several times the arithmetic).
* :func:`fold_projection`, :func:`distill_step`, :class:`DistillMixFn`: the TMU step of the
  default configuration (distill mode, gates, no softmax weighting, linear distiller). The
  projection P folds into the distiller D (one convolution gives ``[d | P(d)]``), and the whole
  step -- ``M' = M + sum_n g_n * P_n(D_n(M))`` and its distillation terms -- is one autograd node
  that keeps only M, [x, h] and references to the teacher states for backward (and recomputes
  the rest there), so the TMU adds little to the graph's memory.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F

ENV_VAR = "TRANSMEM_FUSED"


def _from_env(value: str | None) -> bool:
    """The switch's value for ``$TRANSMEM_FUSED``: off for 0/false/no/off, on otherwise."""
    return value is None or value.strip().lower() not in ("0", "false", "no", "off")


_enabled = _from_env(os.environ.get(ENV_VAR))


def enabled() -> bool:
    """Whether the models use the fused kernels (default True; ``TRANSMEM_FUSED=0`` turns off)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the fused kernels on or off in this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def use_fused(flag: bool = True) -> Iterator[None]:
    """``with use_fused(False): ...`` runs the block on the plain autograd path (and restores
    the previous setting after it)."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


# ---------------------------------------------------------------------------------------------
# backbone cells: c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g),  h = o * tanh(c)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) outside autograd (inside the nodes below). On CPU computed as 2*sigmoid(2x) - 1:
    this torch build's CPU tanh is several times slower than its sigmoid; the two agree to
    ~2e-7 absolute."""
    if x.device.type != "cpu":
        return torch.tanh(x)
    return torch.sigmoid(x * 2).mul_(2).sub_(1)


class LSTMMemoryFn(torch.autograd.Function):
    """The LSTM memory update from gate pre-activations ``pre = [i, f, g(, o)]`` as one autograd
    node: ``c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)``, and ``sigmoid(o)`` when ``with_o``.
    Why: built from slices and pointwise ops, autograd's backward makes a zero-filled gradient
    of the whole of ``pre`` for every slice and adds them up; here the gradient of ``pre`` is
    written once, block by block. ``c_prev=None`` means zeros (the first step)."""

    @staticmethod
    def math(pre, c_prev, with_o: bool):
        """(sigmoid([i, f]), tanh(g), c, sigmoid(o) or None), without autograd."""
        hd = pre.shape[1] // (4 if with_o else 3)
        act = torch.sigmoid(pre[:, : 2 * hd])                # i, f
        g = tanh(pre[:, 2 * hd: 3 * hd])
        c = act[:, :hd] * g
        if c_prev is not None:
            c.addcmul_(act[:, hd:], c_prev)
        return act, g, c, (torch.sigmoid(pre[:, 3 * hd:]) if with_o else None)

    @staticmethod
    def forward(ctx, pre, c_prev, with_o: bool):
        act, g, c, o = LSTMMemoryFn.math(pre, c_prev, with_o)
        ctx.save_for_backward(act, g, c_prev, o)
        ctx.set_materialize_grads(False)
        return (c, o) if with_o else c

    @staticmethod
    def backward(ctx, g_c, g_o=None):
        act, g, c_prev, o = ctx.saved_tensors
        hd = g.shape[1]
        d = act.new_empty(act.shape[0], (4 if o is not None else 3) * hd, *act.shape[2:])
        g_c_prev = None
        if g_c is None:
            d[:, : 3 * hd].zero_()
        else:
            torch.mul(g_c, g, out=d[:, :hd])                     # dL/d sigmoid(i)
            if c_prev is None:
                d[:, hd: 2 * hd].zero_()
            else:
                torch.mul(g_c, c_prev, out=d[:, hd: 2 * hd])     # dL/d sigmoid(f)
                if ctx.needs_input_grad[1]:
                    g_c_prev = g_c * act[:, hd:]
            torch.mul(g_c, act[:, :hd], out=d[:, 2 * hd: 3 * hd])  # dL/d tanh(g)
            ifg = d[:, : 2 * hd]
            torch.ops.aten.sigmoid_backward.grad_input(ifg, act, grad_input=ifg)
            gg = d[:, 2 * hd: 3 * hd]
            torch.ops.aten.tanh_backward.grad_input(gg, g, grad_input=gg)
        if o is not None:
            if g_o is None:
                d[:, 3 * hd:].zero_()
            else:
                torch.ops.aten.sigmoid_backward.grad_input(g_o, o, grad_input=d[:, 3 * hd:])
        return d, g_c_prev, None


class GatedTanhFn(torch.autograd.Function):
    """``h = o * tanh(c)`` as one autograd node (it keeps o and tanh(c), as autograd would)."""

    @staticmethod
    def forward(ctx, o, c):
        tc = tanh(c)
        ctx.save_for_backward(o, tc)
        return o * tc

    @staticmethod
    def backward(ctx, g_h):
        o, tc = ctx.saved_tensors
        g_o = g_h * tc if ctx.needs_input_grad[0] else None
        g_c = torch.ops.aten.tanh_backward(g_h * o, tc) if ctx.needs_input_grad[1] else None
        return g_o, g_c


def lstm_memory(pre: torch.Tensor, c_prev: torch.Tensor | None, with_o: bool = False):
    """Fused :func:`transmem.models.base.lstm_memory` (same arguments and results)."""
    if not (torch.is_grad_enabled() and (pre.requires_grad or (c_prev is not None and c_prev.requires_grad))):
        _, _, c, o = LSTMMemoryFn.math(pre, c_prev, with_o)  # no graph: skip the node
        return (c, o) if with_o else c
    return LSTMMemoryFn.apply(pre, c_prev, with_o)


def gated_tanh(o: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Fused :func:`transmem.models.base.gated_tanh`: ``o * tanh(c)``."""
    if not (torch.is_grad_enabled() and (o.requires_grad or c.requires_grad)):
        return o * tanh(c)
    return GatedTanhFn.apply(o, c)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A 1x1 convolution as a batched matmul over positions. Why: oneDNN reorders the input and
    output of a 1x1 convolution to its blocked layout and back at every call, which on the small
    grids of these models costs several times the arithmetic."""
    n, _, hh, ww = x.shape
    w2 = weight.flatten(1).expand(n, -1, -1)
    xf = x.flatten(2)
    y = torch.bmm(w2, xf) if bias is None else torch.baddbmm(bias[None, :, None], w2, xf)
    return y.view(n, weight.shape[0], hh, ww)


# ---------------------------------------------------------------------------------------------
# the TMU step of the default configuration: M' = M + sum_n g_n * P_n(D_n(M))


def conv(x, w, b, pad: int):
    """A convolution of the TMU; a 1x1 one as a batched matmul (see :func:`pointwise_conv`)."""
    if w.shape[-1] != 1:
        return F.conv2d(x, w, b, padding=pad)
    return pointwise_conv(x, w, b)


def _conv_backward(g_y, x, w, pad: int, need):
    """(grad x, grad w, grad b) of :func:`conv`, each only where ``need`` says."""
    if w.shape[-1] != 1:
        return torch.ops.aten.convolution_backward(g_y, x, w, [w.shape[0]], [1, 1], [pad, pad],
                                                   [1, 1], False, [0, 0], 1, list(need))
    gf, xf = g_y.flatten(2), x.flatten(2)
    g_x = torch.bmm(w.flatten(1).t().expand(x.shape[0], -1, -1), gf).view_as(x) if need[0] else None
    g_w = torch.bmm(gf, xf.transpose(1, 2)).sum(0).view_as(w) if need[1] else None
    g_b = gf.sum((0, 2)) if need[2] else None
    return g_x, g_w, g_b


def _gate_pre(x_in, h_prev, wg, bg, pad: int, xh=None):
    """G([x, h]), from ``xh = [x, h]`` when given; with a 1x1 gate and no ``xh``, the x and h
    halves of the weight are applied one after the other, so that [x, h] is never built."""
    if xh is not None:
        return conv(xh, wg, bg, pad)
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


def fold_projection(distill_weight, distill_bias, proj_weight, proj_bias):
    """(weight, bias) of one convolution ``M -> [D(M) | P(D(M))]``, from the distiller's
    convolution D and the (block-diagonal, 1x1) projection P (built once per forward)."""
    wd = distill_weight
    bd = distill_bias if distill_bias is not None else wd.new_zeros(wd.shape[0])
    p2 = proj_weight.flatten(1)                           # (n*hidden, sum C_n)
    w_eff = (p2 @ wd.flatten(1)).view(p2.shape[0], *wd.shape[1:])
    b_eff = p2 @ bd + proj_bias
    return torch.cat([wd, w_eff]), torch.cat([bd, b_eff])


def _mse_terms(d, src_ch, targets):
    """sum over sources n of MSE(d_n, S_n): the TMU's distillation terms of one step (as
    ``tmu.distill_terms``; :meth:`DistillMixFn.backward` holds their gradient)."""
    return sum(F.mse_loss(dn, s) for dn, s in zip(d.split(src_ch, 1), targets))


def distill_mix(mem, x_in, h_prev, w, b, wg, bg, n: int, hidden: int, sum_c: int,
                pad: int, pad_g: int, xh=None):
    """One TMU step of the default configuration without the fused node: ``[d | c] = conv(M)``
    with the folded weights of :func:`fold_projection` (c = P(D(M))), ``g = sigmoid(G([x, h]))``,
    ``M' = M + sum_n g_n * c_n``. ``xh``: [x, h] when at hand. Returns (M', d, c, g); under
    autograd only on the ``record_maps`` path (training uses :class:`DistillMixFn`)."""
    y = conv(mem, w, b, pad)
    d, c = y[:, :sum_c], y[:, sum_c:]
    g = torch.sigmoid(_gate_pre(x_in, h_prev, wg, bg, pad_g, xh))
    if torch.is_grad_enabled() and (mem.requires_grad or g.requires_grad or c.requires_grad):
        gc = g * c
        return mem + (gc if n == 1 else gc.unflatten(1, (n, hidden)).sum(1)), d, c, g
    out = torch.addcmul(mem, g[:, :hidden], c[:, :hidden])
    for k in range(1, n):  # M' = M + sum_n g_n * c_n, accumulated in place
        out.addcmul_(g[:, k * hidden:(k + 1) * hidden], c[:, k * hidden:(k + 1) * hidden])
    return out, d, c, g


class DistillMixFn(torch.autograd.Function):
    """:func:`distill_mix` (and, given the teacher states of the step, the step's distillation
    terms) as one autograd node, reading either ``xh = [x, h]`` or ``x`` and ``h`` (the other
    None). For backward it keeps M and [x, h] (which the backbone keeps anyway) and references to
    the teacher states, and recomputes [d | c] and the gates there (two small matmuls), instead
    of keeping the distilled memories, projections, gate pre-activations and gates of every
    step: the TMU then adds little to the graph's memory.
    Why per step and not once after the rollout: here d is computed while M is still in cache;
    one pass over all steps' memories at the end measured slower on the CPU.
    ``conf = (n, hidden, src_ch, pad, pad_g)``."""

    @staticmethod
    def forward(ctx, mem, xh, x_in, h_prev, w, b, wg, bg, conf, *targets):
        n, hidden, src_ch, pad, pad_g = conf
        out, d, _, _ = distill_mix(mem, x_in, h_prev, w, b, wg, bg, n, hidden, sum(src_ch),
                                   pad, pad_g, xh)
        ctx.save_for_backward(mem, xh, x_in, h_prev, w, b, wg, bg, *targets)
        ctx.conf = conf
        ctx.set_materialize_grads(False)
        if not targets:
            return out
        return out, _mse_terms(d, src_ch, targets)

    @staticmethod
    def backward(ctx, g_out, *g_rest):
        mem, xh, x_in, h_prev, w, b, wg, bg, *targets = ctx.saved_tensors
        n, hidden, src_ch, pad, pad_g = ctx.conf
        sum_c = sum(src_ch)
        g_loss = g_rest[0] if g_rest else None
        if g_out is None:
            g_out = torch.zeros_like(mem)
        # recompute [d | c] (only c when no distillation term needs a gradient)
        y = conv(mem, w, b, pad) if g_loss is not None else conv(mem, w[sum_c:], b[sum_c:], pad)
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


def distill_step(mem, x_in, h_prev, xh, w, b, wg, bg, conf, record: bool, targets: list):
    """One TMU step of the default configuration with the folded weights ``(w, b)`` of
    :func:`fold_projection` and the gate convolution ``(wg, bg)``; ``conf = (n, hidden, src_ch,
    pad, pad_g)``. Returns (M', the step's distillation terms summed over sources or None without
    ``targets``, the gates or None). Under autograd and not recording: one :class:`DistillMixFn`
    node (no gates returned); otherwise :func:`distill_mix`."""
    n, hidden, src_ch, pad, pad_g = conf
    if torch.is_grad_enabled() and not record:
        pair = (xh, None, None) if xh is not None else (None, x_in, h_prev)
        res = DistillMixFn.apply(mem, *pair, w, b, wg, bg, conf, *targets)
        return (res[0], res[1], None) if targets else (res, None, None)
    out, d, _, g = distill_mix(mem, x_in, h_prev, w, b, wg, bg, n, hidden, sum(src_ch), pad,
                               pad_g, xh)
    return out, (_mse_terms(d, src_ch, targets) if targets else None), g

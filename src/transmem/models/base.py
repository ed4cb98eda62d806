"""The backbone protocol every predictive RNN follows.

A backbone sees frames as ``(B, T, C, H, W)``; patching into a coarser grid with ``p*p*C``
channels happens here, inside the model. Subclasses implement one recurrent step over the patched
grid (:meth:`init_state`, :meth:`step`); the rollout, scheduled sampling and the optional memory
output are shared. The *memory* of layer ``l`` is the recurrent cell state ``c`` that the layer
carries to the next step. A ``memory_hook`` (:class:`MemoryHook`) may rewrite it right after the
cell computes it and before the hidden state is read from it: that is how the TMU plugs into any
backbone without edits.

The cell equations (:func:`lstm_memory`, :func:`gated_tanh`, :func:`conv1x1`) are written here in
plain torch ops; while the switch of :mod:`transmem.models.kernels` is on (the default) they run
as fused kernels that compute the same thing faster on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import NORMS, check
from . import kernels


class MemoryHook(Protocol):
    """``hook(layer, t, memory, x_in, h_prev, xh=None) -> memory to carry``.

    Called by every backbone once per layer and step, right after the cell computes its memory
    ``c`` and before ``h`` is read from it; ``x_in`` is the layer's input at step t and
    ``h_prev`` its previous hidden state. A backbone that has the concatenation
    ``[x_in, h_prev]`` (along channels) at hand passes it as ``xh``, so that a hook convolving
    over [x, h] need not build it again (ConvLSTM does, except at t = 0; PredRNN passes
    nothing). A hook must accept ``xh`` and may ignore it."""

    def __call__(self, layer: int, t: int, memory: torch.Tensor, x_in: torch.Tensor,
                 h_prev: torch.Tensor, xh: Optional[torch.Tensor] = None) -> torch.Tensor: ...


@dataclass
class BackboneConfig:
    in_channels: int = 1      # channels of a frame (1 gray, 3 RGB)
    num_layers: int = 2
    hidden: int = 32          # hidden channels of every layer
    filter_size: int = 5
    patch_size: int = 4       # frames are cut into p x p patches: grid H/p x W/p, p*p*C channels
    norm: str = "none"        # "none" | "group": GroupNorm over channels, works at any frame size
    forget_bias: float = 1.0


def patchify(frames: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, C*p*p, H/p, W/p)."""
    if p == 1:
        return frames
    b, t, c, h, w = frames.shape
    x = frames.reshape(b, t, c, h // p, p, w // p, p)
    return x.permute(0, 1, 2, 4, 6, 3, 5).reshape(b, t, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, C*p*p, h, w) -> (B, T, C, h*p, w*p)."""
    if p == 1:
        return x
    b, t, cp, h, w = x.shape
    c = cp // (p * p)
    x = x.reshape(b, t, c, p, p, h, w).permute(0, 1, 2, 5, 3, 6, 4)
    return x.reshape(b, t, c, h * p, w * p)


# --- the cell equations, in plain torch ops ------------------------------------------------
# Each dispatches to its fused kernel (kernels.py: same equation, one autograd node, faster on
# the CPU) while ``kernels.enabled()``; ``TRANSMEM_FUSED=0`` or ``kernels.use_fused(False)``
# runs the plain ops below.


def lstm_memory(pre: torch.Tensor, c_prev: torch.Tensor | None, with_o: bool = False):
    """``c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)`` from ``pre = [i, f, g]`` (channel
    blocks; ``c_prev=None``: zeros, the first step); with ``with_o``, ``pre = [i, f, g, o]`` and
    ``(c, sigmoid(o))`` is returned."""
    if kernels.enabled():
        return kernels.lstm_memory(pre, c_prev, with_o)
    hd = pre.shape[1] // (4 if with_o else 3)
    i, f, g = pre[:, :hd], pre[:, hd: 2 * hd], pre[:, 2 * hd: 3 * hd]
    if c_prev is None:
        c = torch.sigmoid(i) * torch.tanh(g)
    else:
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return (c, torch.sigmoid(pre[:, 3 * hd:])) if with_o else c


def gated_tanh(o: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``h = o * tanh(c)``, the LSTM's hidden state from its output gate and memory."""
    if kernels.enabled():
        return kernels.gated_tanh(o, c)
    return o * torch.tanh(c)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A 1x1 convolution (fused: a batched matmul over positions, see
    :func:`kernels.pointwise_conv`)."""
    if kernels.enabled():
        return kernels.pointwise_conv(x, weight, bias)
    return F.conv2d(x, weight, bias)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    check("norm", kind, NORMS)
    raise AssertionError(kind)  # every name of NORMS is built above


def teacher_forcing_mask(batch: int, steps: int, t_in: int | None, device=None) -> torch.Tensor:
    """Mask for a plain rollout: ground truth for the first t_in frames, own predictions after.
    ``t_in=None`` feeds ground truth at every step (one-step-ahead training)."""
    mask = torch.ones(batch, steps, device=device)
    if t_in is not None:
        mask[:, t_in - 1:] = 0.0
    return mask


class PredictiveRNN(nn.Module):
    """Base class of every backbone. ``forward`` returns predictions of frames 1..T-1."""

    config_class = BackboneConfig
    model_name = "base"
    model_kind = "backbone"
    #: True for a backbone whose output heads start at zero, so that the untrained model repeats
    #: the last frame whatever its memory holds: the registry-wide protocol tests randomise those
    #: heads before checking that the output depends on the memory (a declared opt-out, not a skip)
    starts_as_persistence = False

    @classmethod
    def describe(cls, config: dict) -> str:
        """A short description of a model of this class with ``config`` (a card's), for tables."""
        return cls.model_name

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        p = config.patch_size
        self.frame_channels = config.in_channels * p * p  # channels of the patched grid

    # --- to implement ---------------------------------------------------------------------
    def init_state(self, batch: int, height: int, width: int, ref: torch.Tensor):
        raise NotImplementedError

    def step(self, x: torch.Tensor, state, t: int, hook: Optional[MemoryHook] = None):
        """One step on the patched grid: returns (next frame (B, p*p*C, h, w), state, memories),
        ``memories`` being the list of per-layer memories carried to the next step. At ``t == 0``
        the state is the one :meth:`init_state` made (a backbone may use that to skip work on
        its zeros). ``hook`` (see :class:`MemoryHook`) is called once per layer on the memory
        before ``h`` is read from it; what it returns is carried on."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def hidden_channels(self, layer: int) -> int:
        return self.config.hidden

    def layer_input_channels(self, layer: int) -> int:
        return self.frame_channels if layer == 0 else self.config.hidden

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def patch_size(self) -> int:
        """Frames are cut into ``p x p`` patches: their size must be a multiple of it."""
        return self.config.patch_size

    @property
    def in_channels(self) -> int:
        """Channels of the frames the model reads (1 gray, 3 RGB)."""
        return self.config.in_channels

    @property
    def needs_teachers_at_inference(self) -> bool:
        """A backbone predicts alone (a transfer model that reads teacher states says True)."""
        return False

    def check_frames(self, frames: torch.Tensor) -> None:
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
        c, h, w = frames.shape[2:]
        p = self.patch_size
        if c != self.in_channels:
            raise ValueError(f"model expects {self.in_channels} channels, frames have {c}")
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not divisible by patch size {p}")

    def forward(self, frames: torch.Tensor, sampling_mask: torch.Tensor | None = None,
                return_memory: bool = False, t_in: int | None = None,
                memory_hook: Optional[MemoryHook] = None):
        """Predict frames 1..T-1 of ``frames`` (B, T, C, H, W).

        At step t >= 1 the input is ``m * frames[t] + (1 - m) * prediction[t]`` with
        ``m = sampling_mask[:, t-1]`` (shape (B, T-1) or broadcastable to (B, T-1, C, H, W) in
        frame space). Without a mask: ground truth for the first ``t_in`` frames, then the model's
        own predictions (``t_in=None``: ground truth throughout).
        Returns predictions (B, T-1, C, H, W), and with ``return_memory`` also a list over layers
        of memories (B, T-1, hidden, H/p, W/p).
        """
        self.check_frames(frames)
        b, T = frames.shape[:2]
        p = self.config.patch_size
        x = patchify(frames, p)
        if sampling_mask is None and (t_in is None or t_in >= 1):
            # a plain rollout: which input is read is known ahead, no blending needed
            n_truth = T - 1 if t_in is None else t_in  # steps 0..n_truth-1 read ground truth
            truth_part = keep = None
        else:
            if sampling_mask is None:
                sampling_mask = teacher_forcing_mask(b, T - 1, t_in, device=frames.device)
            mask = sampling_mask.to(frames.dtype)
            if mask.dim() == 2:
                mask = mask[:, :, None, None, None]
            elif mask.shape[-1] == frames.shape[-1] and p > 1:
                mask = patchify(mask.expand(b, T - 1, *frames.shape[2:]), p)
            # vectorised over the clip once: input_t = m_t * x_t + (1 - m_t) * prediction_t
            truth_part, keep = mask * x[:, 1:], 1 - mask
        state = self.init_state(b, x.shape[-2], x.shape[-1], x)
        preds, memories = [], []
        x_gen = None
        for t in range(T - 1):
            if t == 0:
                inp = x[:, 0]
            elif truth_part is None:
                inp = x[:, t] if t < n_truth else x_gen
            else:
                inp = torch.addcmul(truth_part[:, t - 1], keep[:, t - 1], x_gen)
            x_gen, state, mem = self.step(inp, state, t, memory_hook)
            preds.append(x_gen)
            if return_memory:
                memories.append(mem)
        out = unpatchify(torch.stack(preds, 1), p)
        if not return_memory:
            return out
        per_layer = [torch.stack([m[l] for m in memories], 1) for l in range(self.num_layers)]
        return out, per_layer

    # --- memories for a memory bank ---------------------------------------------------------
    #: a subclass whose ``step`` accepts ``depth=k`` (run the bottom k layers only, no output
    #: head, frame returned as None) sets this; others fall back to a full forward
    supports_depth = False

    def memory_depth(self, layer: int) -> int:
        """How many bottom layers must run for layer ``layer``'s memory to be exact (all of them
        unless the backbone says otherwise: in PredRNN the top layer feeds the bottom one)."""
        return self.num_layers

    def ground_truth_memories(self, frames: torch.Tensor, layers) -> dict[int, torch.Tensor]:
        """Memories ``{layer: (B, T-1, hidden, H/p, W/p)}`` of ``layers`` with ground truth read at
        every step: what ``forward(frames, return_memory=True)`` returns for those layers, without
        running the layers above the ones needed nor the output head (its frames are not read)."""
        layers = sorted({int(l) for l in layers})
        if not self.supports_depth:
            _, mems = self.forward(frames, None, return_memory=True, t_in=None)
            return {l: mems[l] for l in layers}
        self.check_frames(frames)
        b, T = frames.shape[:2]
        x = patchify(frames, self.config.patch_size)
        depth = max(self.memory_depth(l) for l in layers)
        state = self.init_state(b, x.shape[-2], x.shape[-1], x)
        kept: dict[int, list] = {l: [] for l in layers}
        for t in range(T - 1):
            _, state, mem = self.step(x[:, t], state, t, None, depth=depth)
            for l in layers:
                kept[l].append(mem[l])
        return {l: torch.stack(v, 1) for l, v in kept.items()}

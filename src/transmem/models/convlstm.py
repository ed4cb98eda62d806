"""ConvLSTM (Shi et al., 2015): a stack of convolutional LSTM cells on the patched frame grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import BackboneConfig, PredictiveRNN, conv1x1, gated_tanh, lstm_memory, make_norm
from .registry import register_model


@dataclass
class ConvLSTMConfig(BackboneConfig):
    pass


class ConvLSTMCell(nn.Module):
    """Gates from one fused convolution over [x, h]; memory c; h = o * tanh(c).

    Speed: without a norm the forget bias rides in the convolution's bias (no extra pass), and
    on the first step (``first=True``: h and c are zeros) the convolution reads x alone and the
    ``f * c`` term is dropped -- both exact up to float rounding."""

    def __init__(self, in_ch: int, hidden: int, k: int, norm: str, forget_bias: float):
        super().__init__()
        self.hidden = hidden
        self.forget_bias = forget_bias
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, k, padding=k // 2)
        self.norm = make_norm(norm, 4 * hidden)
        self._plain = isinstance(self.norm, nn.Identity)
        fb = torch.zeros(4 * hidden)
        fb[hidden:2 * hidden] = forget_bias
        self.register_buffer("_forget", fb, persistent=False)  # not a weight: not saved

    def _gates(self, inp, weight):
        conv = self.conv
        if self._plain:  # the forget bias joins the bias vector (4h numbers, not a map)
            bias = self._forget if conv.bias is None else conv.bias + self._forget
            return F.conv2d(inp, weight, bias, conv.stride, conv.padding)
        gates = self.norm(F.conv2d(inp, weight, conv.bias, conv.stride, conv.padding))
        return gates + self._forget[None, :, None, None]

    def forward(self, x, h, c, hook=None, first: bool = False):
        """``hook(c, x, h, xh)``: rewrites the memory (see MemoryHook); ``xh = [x, h]``, or
        None on the first step, where it is not built."""
        if first:  # h = 0: its half of the fused convolution contributes nothing; c = 0 too
            xh = None
            gates = self._gates(x, self.conv.weight[:, : x.shape[1]])
            c = None
        else:
            xh = torch.cat([x, h], 1)
            gates = self._gates(xh, self.conv.weight)
        c, o = lstm_memory(gates, c, with_o=True)  # c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        if hook is not None:
            c = hook(c, x, h, xh)
        return gated_tanh(o, c), c


@register_model("convlstm")
class ConvLSTM(PredictiveRNN):
    config_class = ConvLSTMConfig
    supports_depth = True

    def __init__(self, config: ConvLSTMConfig):
        super().__init__(config)
        cfg = config
        self.cells = nn.ModuleList(
            ConvLSTMCell(self.layer_input_channels(l), cfg.hidden, cfg.filter_size, cfg.norm,
                         cfg.forget_bias)
            for l in range(cfg.num_layers))
        self.head = nn.Conv2d(cfg.hidden, self.frame_channels, 1, bias=False)

    def init_state(self, batch, height, width, ref):
        z = ref.new_zeros(batch, self.config.hidden, height, width)
        return [(z, z) for _ in range(self.config.num_layers)]

    def memory_depth(self, layer: int) -> int:
        return layer + 1  # a layer reads only the layers below it

    def step(self, x, state, t, hook=None, depth=None):
        """``depth=k``: only the bottom k layers, no head (the frame comes back as None)."""
        new_state, memories = [], []
        inp = x
        n = len(self.cells) if depth is None else depth
        for l in range(n):
            cell = self.cells[l]
            h, c = state[l]
            layer_hook = None if hook is None else (
                lambda m, xi, hp, xh, l=l: hook(l, t, m, xi, hp, xh=xh))
            h, c = cell(inp, h, c, layer_hook, first=t == 0)
            new_state.append((h, c))
            memories.append(c)
            inp = h
        return (conv1x1(inp, self.head.weight) if depth is None else None), new_state, memories

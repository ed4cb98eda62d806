"""PredRNN (Wang et al., 2017): stacked ST-LSTM cells. Besides the per-layer temporal memory c,
a spatiotemporal memory m flows zigzag: up through the layers within a step, then from the top
layer back to the bottom layer at the next step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import BackboneConfig, PredictiveRNN, conv1x1, gated_tanh, lstm_memory, make_norm
from .registry import register_model


@dataclass
class PredRNNConfig(BackboneConfig):
    pass


class STLSTMCell(nn.Module):
    """Spatiotemporal LSTM cell. Parameters as in the paper's code (conv_x, conv_h, conv_m,
    conv_o, conv_last). Speed, exact up to float rounding: the x/h and x/m gate pre-activations
    are summed in one pass each; without a norm the forget biases ride in conv_x's bias and, where
    h or m is known to be zero (first step), its convolution is replaced by its bias."""

    def __init__(self, in_ch: int, hidden: int, k: int, norm: str, forget_bias: float):
        super().__init__()
        pad = k // 2
        self.forget_bias = forget_bias
        self.hidden = hidden
        self.conv_x = nn.Sequential(nn.Conv2d(in_ch, 7 * hidden, k, padding=pad), make_norm(norm, 7 * hidden))
        self.conv_h = nn.Sequential(nn.Conv2d(hidden, 4 * hidden, k, padding=pad), make_norm(norm, 4 * hidden))
        self.conv_m = nn.Sequential(nn.Conv2d(hidden, 3 * hidden, k, padding=pad), make_norm(norm, 3 * hidden))
        self.conv_o = nn.Sequential(nn.Conv2d(2 * hidden, hidden, k, padding=pad), make_norm(norm, hidden))
        self.conv_last = nn.Conv2d(2 * hidden, hidden, 1)
        self._plain = isinstance(self.conv_x[1], nn.Identity)
        fb = torch.zeros(7 * hidden)  # forget gates f_x and f_xm of conv_x's output
        fb[hidden:2 * hidden] = forget_bias
        fb[4 * hidden:5 * hidden] = forget_bias
        self.register_buffer("_forget", fb, persistent=False)  # not a weight: not saved

    def _x_gates(self, x):
        conv = self.conv_x[0]
        if self._plain:
            bias = self._forget if conv.bias is None else conv.bias + self._forget
            return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding)
        return self.conv_x(x) + self._forget[None, :, None, None]

    def _zero_or_conv(self, seq, inp, zero: bool):
        """seq(inp), or, when inp is known to be zeros and there is no norm, just the bias."""
        conv = seq[0]
        if zero and self._plain and conv.bias is not None:
            return conv.bias[None, :, None, None]
        return seq(inp)

    def forward(self, x, h, c, m, hook=None, h_zero: bool = False, m_zero: bool = False):
        hd = self.hidden
        xg = self._x_gates(x)                                  # i, f, g, i', f', g', o from x
        hg = self._zero_or_conv(self.conv_h, h, h_zero)        # i, f, g, o from h
        mg = self._zero_or_conv(self.conv_m, m, m_zero)        # i', f', g' from m
        # c' = sigmoid(f) * c + sigmoid(i) * tanh(g), and m' alike from the x/m gates
        c = lstm_memory(xg[:, : 3 * hd] + hg[:, : 3 * hd], None if h_zero else c)
        if hook is not None:
            c = hook(c, x, h)
        m = lstm_memory(xg[:, 3 * hd: 6 * hd] + mg, None if m_zero else m)
        mem = torch.cat([c, m], 1)
        o = torch.sigmoid(xg[:, 6 * hd:] + hg[:, 3 * hd:] + self.conv_o(mem))
        h = gated_tanh(o, conv1x1(mem, self.conv_last.weight, self.conv_last.bias))
        return h, c, m


@register_model("predrnn")
class PredRNN(PredictiveRNN):
    config_class = PredRNNConfig
    supports_depth = True  # depth = num_layers (see memory_depth): skips only the output head

    def __init__(self, config: PredRNNConfig):
        super().__init__(config)
        cfg = config
        self.cells = nn.ModuleList(
            STLSTMCell(self.layer_input_channels(l), cfg.hidden, cfg.filter_size, cfg.norm,
                       cfg.forget_bias)
            for l in range(cfg.num_layers))
        self.head = nn.Conv2d(cfg.hidden, self.frame_channels, 1, bias=False)

    def init_state(self, batch, height, width, ref):
        z = ref.new_zeros(batch, self.config.hidden, height, width)
        return {"hc": [(z, z) for _ in range(self.config.num_layers)], "m": z}

    def step(self, x, state, t, hook=None, depth=None):
        """``depth``: skip the output head (the frame comes back as None). Every layer runs: the
        zigzag memory makes the bottom layer depend on the top one."""
        m = state["m"]  # from the top layer at the previous step: the zigzag
        new_hc, memories = [], []
        inp = x
        for l, cell in enumerate(self.cells):
            h, c = state["hc"][l]
            # no [x, h] at hand here: the hook gets no xh
            layer_hook = None if hook is None else (lambda mem, xi, hp, l=l: hook(l, t, mem, xi, hp))
            h, c, m = cell(inp, h, c, m, layer_hook, h_zero=t == 0, m_zero=t == 0 and l == 0)
            new_hc.append((h, c))
            memories.append(c)
            inp = h
        frame = conv1x1(inp, self.head.weight) if depth is None else None
        return frame, {"hc": new_hc, "m": m}, memories

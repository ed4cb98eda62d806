"""ConvLSTM (Shi et al., 2015): a stack of convolutional LSTM cells on the patched frame grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BackboneConfig, PredictiveRNN, make_norm
from .registry import register_model


@dataclass
class ConvLSTMConfig(BackboneConfig):
    pass


class ConvLSTMCell(nn.Module):
    """Gates from one fused convolution over [x, h]; memory c; h = o * tanh(c)."""

    def __init__(self, in_ch: int, hidden: int, k: int, norm: str, forget_bias: float):
        super().__init__()
        self.hidden = hidden
        self.forget_bias = forget_bias
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, k, padding=k // 2)
        self.norm = make_norm(norm, 4 * hidden)

    def forward(self, x, h, c, hook=None):
        gates = self.norm(self.conv(torch.cat([x, h], 1)))
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f + self.forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        if hook is not None:
            c = hook(c, x, h)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


@register_model("convlstm")
class ConvLSTM(PredictiveRNN):
    config_class = ConvLSTMConfig

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

    def step(self, x, state, t, hook=None):
        new_state, memories = [], []
        inp = x
        for l, cell in enumerate(self.cells):
            h, c = state[l]
            layer_hook = None if hook is None else (lambda m, xi, hp, l=l: hook(l, t, m, xi, hp))
            h, c = cell(inp, h, c, layer_hook)
            new_state.append((h, c))
            memories.append(c)
            inp = h
        return self.head(inp), new_state, memories

"""PredRNN (Wang et al., 2017): stacked ST-LSTM cells. Besides the per-layer temporal memory c,
a spatiotemporal memory m flows zigzag: up through the layers within a step, then from the top
layer back to the bottom layer at the next step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BackboneConfig, PredictiveRNN, make_norm
from .registry import register_model


@dataclass
class PredRNNConfig(BackboneConfig):
    pass


class STLSTMCell(nn.Module):
    def __init__(self, in_ch: int, hidden: int, k: int, norm: str, forget_bias: float):
        super().__init__()
        pad = k // 2
        self.forget_bias = forget_bias
        self.conv_x = nn.Sequential(nn.Conv2d(in_ch, 7 * hidden, k, padding=pad), make_norm(norm, 7 * hidden))
        self.conv_h = nn.Sequential(nn.Conv2d(hidden, 4 * hidden, k, padding=pad), make_norm(norm, 4 * hidden))
        self.conv_m = nn.Sequential(nn.Conv2d(hidden, 3 * hidden, k, padding=pad), make_norm(norm, 3 * hidden))
        self.conv_o = nn.Sequential(nn.Conv2d(2 * hidden, hidden, k, padding=pad), make_norm(norm, hidden))
        self.conv_last = nn.Conv2d(2 * hidden, hidden, 1)

    def forward(self, x, h, c, m, hook=None):
        i_x, f_x, g_x, i_xm, f_xm, g_xm, o_x = self.conv_x(x).chunk(7, 1)
        i_h, f_h, g_h, o_h = self.conv_h(h).chunk(4, 1)
        i_m, f_m, g_m = self.conv_m(m).chunk(3, 1)
        c = (torch.sigmoid(f_x + f_h + self.forget_bias) * c
             + torch.sigmoid(i_x + i_h) * torch.tanh(g_x + g_h))
        if hook is not None:
            c = hook(c, x, h)
        m = (torch.sigmoid(f_xm + f_m + self.forget_bias) * m
             + torch.sigmoid(i_xm + i_m) * torch.tanh(g_xm + g_m))
        mem = torch.cat([c, m], 1)
        o = torch.sigmoid(o_x + o_h + self.conv_o(mem))
        h = o * torch.tanh(self.conv_last(mem))
        return h, c, m


@register_model("predrnn")
class PredRNN(PredictiveRNN):
    config_class = PredRNNConfig

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

    def step(self, x, state, t, hook=None):
        m = state["m"]  # from the top layer at the previous step: the zigzag
        new_hc, memories = [], []
        inp = x
        for l, cell in enumerate(self.cells):
            h, c = state["hc"][l]
            layer_hook = None if hook is None else (lambda mem, xi, hp, l=l: hook(l, t, mem, xi, hp))
            h, c, m = cell(inp, h, c, m, layer_hook)
            new_hc.append((h, c))
            memories.append(c)
            inp = h
        return self.head(inp), {"hc": new_hc, "m": m}, memories

"""AdvectionRNN: a ConvLSTM that forecasts by moving the current frame along a learned motion field.

Why: a plain predictive RNN has no prior for motion; on small data (radar) it loses to optical
flow extrapolation and is at best level with persistence. Here the network does not draw the next
frame, it predicts *where the current one moves* (semi-Lagrangian advection, as optical-flow
nowcasting does) plus a small source/residual term for growth, decay and inflow. With both heads
zero-initialised an untrained model IS persistence (it repeats the last frame), so training starts
from the strongest simple baseline and can only learn motion and change on top of it.

One step, top to bottom (x_t: the step's input on the patched grid (B, p*p*C, h, w) -- ground
truth or the model's own previous prediction, per the sampling mask; L layers; H = p*h, W = p*w):

    z_0 = x_t ;  z_l = h_{l-1}                                       ConvLSTM stack (Shi et al.)
    i, f, g, o = conv([z_l, h_l])
    c_l = sigmoid(f) * c_l + sigmoid(i) * tanh(g)
    c_l = hook(l, t, c_l, z_l, h_l)                                  the memory (TMU plugs in here)
    h_l = sigmoid(o) * tanh(c_l)

    u_t = upsample_p( box_r( max_flow * tanh(W_u h_L) ) )            motion (x, y), px/step, (B, 2, H, W)
    u_t = u_t + m_t                  (motion_prior "lucas_kanade": m_t, see below; else m_t = 0)
    s_t = W_s h_L                                                    source, patched (B, p*p*C, h, w)
    X_t = unpatchify(x_t)                                            current frame, (B, C, H, W)
    Y_t(q) = X_t(q - u_t(q))                                         backward warp (bilinear)
    x_{t+1} = patchify(Y_t) + s_t                                    the forecast, patched

W_u, W_s: 1x1 convolutions with bias; box_r: a (2r+1)^2 mean on the coarse grid (r =
flow_smoothing, none by default); upsample_p: bilinear to full resolution. W_u and W_s start at
zero: u = 0, s = 0, so x_{t+1} = x_t (persistence, up to float rounding).

Padding (what the warp reads outside the frame): ``"border"`` by default -- the inflow continues
the value at the edge. Where nothing is at the edge (0: no rain after the radar log transform,
the black background of digits) it is the same as ``"zeros"``; where a field crosses the edge, as
rain fields do, it continues it instead of claiming that the field ends exactly at the domain
boundary. ``"zeros"`` draws a false empty band along every inflow edge: on smooth translated
blobs (tests/test_advection.py), warping with the *true* velocity gives a 4-step rollout MSE of
0.0082 with zeros and 0.0009 with border, and the trained model does better with border too
(0.20-0.22 vs 0.23-0.28 of persistence's MSE after 150 steps). The cost of border is a streak:
over k steps the edge pixel is replicated k * |u| pixels deep; the source head can correct it.
``"zeros"`` stays available for data where nothing should enter from outside.

Motion prior (``motion_prior: lucas_kanade``): the network learns a *correction* to a classical
optical-flow estimate instead of the whole motion. At step t >= 1, m_t is the Lucas-Kanade flow
between the previous and the current input frame (brightness constancy I_x u + I_y v + I_t = 0,
least squares over a (2r+1)^2 window, r = ``prior_radius``, Tikhonov-regularised where the window
has no texture), averaged with m_{t-1}; m_0 = 0. It is computed without gradient from whatever the
step reads (ground truth, or the model's own previous forecast in the rollout, which then carries
the motion on). With both heads at zero an untrained model is then an optical-flow extrapolation
instead of persistence. One level (``prior_levels: 1``) is right for motions below ~1 px per step
(radar at 64x64 moves 0.1-0.5), not for the 1-2.5 px of flying digits or the 1-8 px of rain on a
1 km grid; ``prior_levels: k`` estimates it coarse-to-fine over k pyramid levels (each halving the
resolution), which reaches about 2^(k-1) px per step.

The memory of layer l is its cell state c_l, the hook is called once per layer per step, and the
cells are :class:`~transmem.models.convlstm.ConvLSTMCell` used through their public interface, so
TMU, memory bank, zoo, ``ground_truth_memories`` (depth k runs the bottom k layers only) work as
for ConvLSTM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import BackboneConfig, PredictiveRNN, conv1x1, patchify, unpatchify
from .convlstm import ConvLSTMCell
from .registry import register_model

PADDING_MODES = ("border", "zeros")
MOTION_PRIORS = ("none", "lucas_kanade")


@dataclass
class AdvectionConfig(BackboneConfig):
    max_flow: float = 4.0        # bound of the motion field, pixels per step at full resolution
    source: bool = True          # False: pure advection (no source/residual head)
    flow_smoothing: int = 0      # radius of a box filter on the coarse flow (0: none)
    padding: str = "border"      # what the warp reads outside the frame: "border" | "zeros"
    motion_prior: str = "none"   # "lucas_kanade": learn a correction to optical flow between inputs
    prior_radius: int = 8        # the Lucas-Kanade window's radius, pixels at full resolution
    prior_levels: int = 1        # pyramid levels of the prior (1: single scale; 3: motions up to ~8 px/step)

    def __post_init__(self):
        # here, not in the model: a config file with a bad value fails as it is read
        if self.padding not in PADDING_MODES:
            raise ValueError(f"advection padding must be one of {PADDING_MODES}, got '{self.padding}'")
        if self.motion_prior not in MOTION_PRIORS:
            raise ValueError(f"advection motion_prior must be one of {MOTION_PRIORS}, got '{self.motion_prior}'")
        if self.max_flow <= 0 or self.flow_smoothing < 0 or self.prior_radius < 1 or self.prior_levels < 1:
            raise ValueError("advection needs max_flow > 0, flow_smoothing >= 0, prior_radius >= 1 and prior_levels >= 1")


def _layer_hook(hook, layer: int, t: int):
    """The backbone hook bound to one layer and step, in the form a cell calls it. Extra
    arguments a cell may pass (e.g. ``xh``) go through unchanged."""
    if hook is None:
        return None

    def layer_hook(mem, x_in, h_prev, *args, **kwargs):
        return hook(layer, t, mem, x_in, h_prev, *args, **kwargs)
    return layer_hook


def pixel_grid(height: int, width: int, ref: torch.Tensor) -> torch.Tensor:
    """(1, H, W, 2): the pixel centres in grid_sample's coordinates (x then y, in [-1, 1],
    ``align_corners=False``): pixel i sits at (2i + 1) / W - 1."""
    xs = (torch.arange(width, device=ref.device, dtype=ref.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=ref.device, dtype=ref.dtype) * 2 + 1) / height - 1
    return torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1)[None]


def warp(frame: torch.Tensor, flow: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    """Backward warp: ``out(q) = frame(q - flow(q))``, bilinear. frame (B, C, H, W), flow
    (B, 2, H, W) in pixels (x, y), grid from :func:`pixel_grid`. One pixel is 2/W (2/H) in
    grid_sample's coordinates."""
    h, w = frame.shape[-2:]
    scale = flow.new_tensor([2.0 / w, 2.0 / h])
    where = grid - flow.permute(0, 2, 3, 1) * scale
    return F.grid_sample(frame, where.to(frame.dtype), mode="bilinear", padding_mode=padding,
                         align_corners=False)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window around each pixel, clipped to the image: what
    ``avg_pool2d(x, 2r+1, 1, r, count_include_pad=False)`` gives, by running sums along each axis
    (about 30x faster on the CPU for r = 8)."""
    def along(z: torch.Tensor, dim: int) -> torch.Tensor:
        n = z.shape[dim]
        pad = [0, 0] * (z.dim() - 1 - dim % z.dim()) + [radius + 1, radius]
        s = torch.cumsum(F.pad(z, pad), dim)
        return s.narrow(dim, 2 * radius + 1, n) - s.narrow(dim, 0, n)
    ones = x.new_ones(1, 1, *x.shape[-2:])
    return along(along(x, -1), -2) / along(along(ones, -1), -2)


def lucas_kanade(prev: torch.Tensor, cur: torch.Tensor, radius: int, regularise: float = 0.1) -> torch.Tensor:
    """Dense Lucas-Kanade flow (B, 2, H, W) in pixels (x, y) from ``prev`` to ``cur`` (B, C, H, W).

    Least squares of I_x u + I_y v + I_t = 0 over a (2r+1)^2 box around each pixel (channels
    pooled), spatial gradients by central differences of the two frames' mean. The normal
    matrix gets ``regularise`` times its image-mean trace on the diagonal, so that textureless
    windows give ~0 instead of noise."""
    avg = F.pad(0.5 * (prev + cur), (1, 1, 1, 1), mode="replicate")
    ix = 0.5 * (avg[..., 1:-1, 2:] - avg[..., 1:-1, :-2])
    iy = 0.5 * (avg[..., 2:, 1:-1] - avg[..., :-2, 1:-1])
    it = cur - prev
    products = torch.stack([(ix * ix).sum(1), (ix * iy).sum(1), (iy * iy).sum(1),
                            (ix * it).sum(1), (iy * it).sum(1)], 1)
    a, b, c, d, e = box_mean(products, radius).unbind(1)
    lam = regularise * (a + c).mean((-2, -1), keepdim=True) + 1e-12
    a, c = a + lam, c + lam
    det = a * c - b * b
    return torch.stack([b * e - c * d, b * d - a * e], 1) / det[:, None]


def pyramid_lucas_kanade(prev: torch.Tensor, cur: torch.Tensor, radius: int, levels: int) -> torch.Tensor:
    """Coarse-to-fine Lucas-Kanade: the flow is estimated on ``prev`` and ``cur`` averaged down by
    2^(levels-1), then at each finer level upsampled (and scaled) and corrected by the flow that
    remains between ``prev`` warped along it and ``cur``. Lucas-Kanade linearises the image, so a
    single level sees motions up to about a pixel per step; each level doubles that (3 levels:
    the several pixels per 5 minutes of rain on a 1 km grid)."""
    flow = None
    for k in reversed(range(levels)):
        s = 2 ** k
        p = F.avg_pool2d(prev, s, ceil_mode=True) if s > 1 else prev
        c = F.avg_pool2d(cur, s, ceil_mode=True) if s > 1 else cur
        if flow is None:
            flow = lucas_kanade(p, c, radius)
            continue
        h, w = p.shape[-2:]
        scale = flow.new_tensor([w / flow.shape[-1], h / flow.shape[-2]]).view(1, 2, 1, 1)
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        moved = warp(p, flow, pixel_grid(h, w, p), "border")
        flow = flow + lucas_kanade(moved, c, radius)
    return flow


@register_model("advection")
class AdvectionRNN(PredictiveRNN):
    config_class = AdvectionConfig
    supports_depth = True
    starts_as_persistence = True  # both heads start at zero (see the module doc)

    def __init__(self, config: AdvectionConfig):
        super().__init__(config)
        cfg = config
        self.cells = nn.ModuleList(
            ConvLSTMCell(self.layer_input_channels(l), cfg.hidden, cfg.filter_size, cfg.norm,
                         cfg.forget_bias)
            for l in range(cfg.num_layers))
        # both heads read the top hidden state and start at zero: the untrained model is persistence
        self.flow_head = nn.Conv2d(cfg.hidden, 2, 1)
        self.source_head = nn.Conv2d(cfg.hidden, self.frame_channels, 1) if cfg.source else None
        for head in (self.flow_head, self.source_head):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def init_state(self, batch, height, width, ref):
        z = ref.new_zeros(batch, self.config.hidden, height, width)
        p = self.config.patch_size
        # (per-layer (h, c), the full-resolution pixel grid the warp samples from (made once),
        #  the previous input frame and motion prior (none yet))
        return [(z, z) for _ in range(self.config.num_layers)], pixel_grid(height * p, width * p, ref), None, None

    def memory_depth(self, layer: int) -> int:
        return layer + 1  # a layer reads only the layers below it; the heads read none back

    def motion(self, h_top: torch.Tensor) -> torch.Tensor:
        """u = upsample_p(max_flow * tanh(W_u h)): (B, 2, H, W), pixels per step at full res."""
        cfg = self.config
        u = cfg.max_flow * torch.tanh(conv1x1(h_top, self.flow_head.weight, self.flow_head.bias))
        r = cfg.flow_smoothing
        if r:
            u = F.avg_pool2d(u, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
        p = cfg.patch_size
        if p > 1:
            u = F.interpolate(u, scale_factor=p, mode="bilinear", align_corners=False)
        return u

    def step(self, x, state, t, hook=None, depth=None):
        """``depth=k``: only the bottom k layers, no heads (the frame comes back as None)."""
        layers, grid, prev_frame, prior = state
        # ConvLSTM stack: c_l = sigmoid(f) c_l + sigmoid(i) tanh(g), hook, h_l = sigmoid(o) tanh(c_l)
        new_layers, memories = [], []
        inp = x
        n = len(self.cells) if depth is None else depth
        for l in range(n):
            h, c = layers[l]
            h, c = self.cells[l](inp, h, c, _layer_hook(hook, l, t), first=t == 0)
            new_layers.append((h, c))
            memories.append(c)
            inp = h
        if depth is not None:
            return None, (new_layers, grid, None, None), memories
        # heads: motion u and source s from the top hidden state
        p = self.config.patch_size
        u = self.motion(inp)
        frame = unpatchify(x[:, None], p)[:, 0]
        if self.config.motion_prior == "lucas_kanade" and prev_frame is not None:
            with torch.no_grad():  # a fixed input to the correction, not trained through; fp32
                m = pyramid_lucas_kanade(prev_frame.float(), frame.float(), self.config.prior_radius,
                                         self.config.prior_levels).clamp(-self.config.max_flow, self.config.max_flow)
                prior = m if prior is None else 0.5 * (m + prior)
            u = u + prior.to(u.dtype)
        keep = frame.detach() if self.config.motion_prior != "none" else None
        # advect the current frame: Y(q) = X(q - u(q)), then x_{t+1} = patchify(Y) + s
        moved = patchify(warp(frame, u, grid, self.config.padding)[:, None], p)[:, 0]
        if self.source_head is not None:
            moved = moved + conv1x1(inp, self.source_head.weight, self.source_head.bias)
        return moved, (new_layers, grid, keep, prior), memories

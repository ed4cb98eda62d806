"""Advected rain: synthetic radar-like rain-rate clips, a motion-rich pretext task for radar.

Why: the real radar events are few, and a model trained on them alone learns no prior for
motion (optical-flow extrapolation beats it). These clips are made here, from a seed, in any
number and without a download; a model pretrained on them and then finetuned on real radar
starts from "rain fields move, and grow or decay slowly".

One clip (lengths in pixels of the output frame unless said otherwise, rates per frame step):

1. **Rain field.** Two Gaussian random fields with power-law spectra, the kind pysteps' noise
   generators make, from one white noise: a smooth **shape** ``z``, power
   ``∝ (k² + k₀²)^(−β/2)``, ``β`` uniform in [3.1, 3.7] per clip, outer scale
   ``1/k₀ = 0.75·size``, plus **convective cells**, Gaussian bumps (a Poisson number,
   ``extra["cells"]`` per ``size × size`` area, default 1, at most 32 in the domain; radius
   ``0.02–0.05·size``, peak 1–2 standard deviations of ``z``); and a rough **texture** ``t``,
   power ``∝ k^(−3)`` below the scale ``size/8``, unit variance. It rains where ``z > q``,
   ``q`` the clip's ``1 − c`` quantile over the domain, so a fraction ``c`` of it rains at the
   first frame, ``c`` uniform in ``extra["coverage"]`` (default [0.15, 0.45]): a few coherent
   rain areas. There the smooth log-intensity ``Y = σ·(z − q)/std(z)`` (``σ`` uniform in
   [0.45, 0.9] per clip: light to heavy clips) times the texture ``exp(0.3·t)`` gives
   ``log(1 + R)``: the rate rises from 0 at the edges of the rain areas, near log-normal above
   ~1 mm/h, up to tens of mm/h in the cores (rates approach 150 mm/h softly, never more), times
   ``extra["rain_scale"]`` (default 1), in mm/h.
2. **Motion.** A steady velocity field per clip, ``v(p) = u + A·(p − c)``: a uniform part
   ``u``, speed uniform in [``extra["min_speed"]``, ``extra["max_speed"]``] (default [0, 3])
   px/step and a uniform random direction; plus a weak rotation (rate uniform in
   ±``extra["rotation"]``, default 0.005 rad/step) and a divergence-free shear / deformation
   (two rates uniform in ±``extra["shear"]``, default 0.003 per step) about a centre ``c``
   within a quarter frame of the frame centre.
3. **Advection.** Semi-Lagrangian, backward: pixel ``p`` of frame ``t + 1`` takes the value of
   frame ``t`` at the departure point ``p − v(p)``, by bilinear interpolation
   (``torch.nn.functional.grid_sample``). Instead of warping each frame again (which blurs the
   field a little more at every step) the departure points are composed, ``x₀ = p``,
   ``x_{k+1} = x_k − v(x_k)`` (an affine map, ``v`` being linear), and frame ``t`` reads the
   initial field once, at ``x_t``: frame ``t + 1`` is exactly frame ``t`` carried by ``v``, times
   the growth below, with a single interpolation. The field is periodic, on a domain larger
   than the frame by the largest displacement a clip can make (:func:`domain_size`), and the
   frame sits where all its departure points fall inside: no empty border flows in, and no
   rain that left comes back round.
4. **Growth and decay.** At every step the rain moving with the flow is multiplied by a smooth
   random factor field: its smooth log-intensity ``Y`` grows by
   ``g_s = growth·(cos(ωs + φ)·G₁ + sin(ωs + φ)·G₂)`` (so ``1 + R`` is multiplied by
   ``exp(g_s)`` up to the texture, and the rain areas spread or shrink at their edges, new rain
   textured too), ``G₁, G₂`` smooth unit-variance fields carried with the rain (Gaussian
   correlation length ``size/8``), the period ``2π/ω`` uniform in [20, 60] steps, so a region
   grows, then decays; ``growth`` is ``extra["growth"]`` (default 0.05 per step: the standard
   deviation of ``g_s``). The spread of ``Y`` about its mean, which the growth widens, is scaled
   back to ``σ`` at every frame (a factor the same over the frame), so frames keep the first
   one's statistics: no trend in rain area or intensity over a clip, some regions growing while
   others decay.
5. **Output.** Model units, the radar readers' log scale ``rain_to_unit(R, r_max)``,
   ``r_max = extra["r_max"]`` (default 100 mm/h), kept as float16 like the radar readers'
   prepared frames; items are ``{"frames": float32 (T, C, H, W), "mask": bool (T, 1, H, W)}``
   as theirs, the mask all True (no missing data); ``channels = 3`` repeats the field.

With the defaults, at 64×64, the fields have about the statistics of the MeteoSwiss composites
of the project's test events area-averaged to 64×64 (~10 km pixels), their values taken as
5-minute accumulations (pysteps' reading of the AQC product: rate = 12 × value): 25 % of the
pixels at ≥ 0.1 mm/h (real: 17–25 %), mean 0.35 mm/h (0.27–0.42), 8 % above 1 mm/h (9–10 %),
1.0 % above 5 mm/h (0.4–2.2 %), 12 rain areas a frame (8–10), a similar spatial
autocorrelation, and a change along the flow over 30 minutes between FMI's and MeteoSwiss'.
``rain_scale = 1/12`` matches those frames as ``radar_mch`` reads them today (the values taken
as mm/h). Real echoes there move 0.1–0.5 px/step; the default speeds, up to 3 px/step, are
deliberately faster (lower ``max_speed`` to match).

Clip ``i`` of a split is a pure function of ``(seed, split, i)`` and the generation settings
(``size``, ``frames``, ``extra``): each clip draws from its own generator,
``SeedSequence([seed, stream, split code, i])``, so train / val / test never share a stream,
and clips can be made one at a time or in bulk with the same result. The domain size depends
on ``frames`` and the motion settings, so (unlike flying digits) a shorter clip is not the
start of the longer one with the same index.

DataConfig fields used: ``size``, ``frames``, ``channels`` (1, or 3: the field repeated),
``seed``, ``train_clips`` / ``val_clips`` / ``test_clips``, ``extra`` (``max_speed``,
``min_speed``, ``growth``, ``r_max``, ``coverage`` (a fraction or ``[low, high]``),
``rotation``, ``shear``, ``cells``, ``rain_scale``; other keys are ignored with a warning).
Physical units: mm/h, as the radar readers' (:func:`~transmem.data.radar.rain_units`).
"""
from __future__ import annotations

import math
import warnings
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..progress import BlockProgress
from .errors import DataError
from .radar import R_MAX, rain_to_unit, rain_units
from .registry import DataConfig, register_dataset

SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_STREAM = 0xADFEC7            # tells these streams from other generators' with the same seed
_CHUNK = 16                   # clips generated per vectorised block
_PROGRESS_AFTER_S = 2.0       # show a progress bar when generation is expected to take longer

# the fields' fixed shape (lengths as fractions of the frame size)
BETA_RANGE = (3.1, 3.7)       # power-law exponent of the rain field's power spectrum
OUTER_SCALE = 0.75            # 1/k0, in frame sizes
GROWTH_SCALE = 1.0 / 8.0      # correlation length of the growth fields, in frame sizes
CELL_RADIUS = (0.02, 0.05)    # convective cells' Gaussian radius, in frame sizes
CELL_PEAK = (1.0, 2.0)        # their peak, in standard deviations of the rain field
MAX_CELLS = 32                # cells per domain at most
SIGMA_RANGE = (0.45, 0.9)     # log-intensity gain above the rain threshold (per std), uniform per clip
R_CAP = 150.0                 # mm/h: rates approach it smoothly (before rain_scale)
_CAP_SHARPNESS = 2.0
PERIOD_RANGE = (20.0, 60.0)   # steps per growth/decay cycle
_N_UNIFORMS = 16              # scalar uniforms drawn per clip (fixed, so the stream layout is too)
MAX_DOMAIN = 2048             # px: the largest periodic domain generated
TEXTURE = 0.3                 # log(1 + R) = exp(TEXTURE·t)·Y, t the unit-variance texture
TEXTURE_BETA = 3.0            # power-law exponent of the texture's power spectrum
TEXTURE_SCALE = 1.0 / 8.0     # largest scale of the texture, in frame sizes
_SUB = 4                      # the threshold and scale of a clip's field come from every 4th pixel


@dataclass(frozen=True)
class AdvectedOptions:
    """The ``extra`` options of ``advected_rain`` (see the module docstring)."""
    max_speed: float = 3.0
    min_speed: float = 0.0
    growth: float = 0.05
    r_max: float = R_MAX
    coverage: tuple = (0.15, 0.45)
    rotation: float = 0.005
    shear: float = 0.003
    cells: float = 1.0
    rain_scale: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict | None) -> "AdvectedOptions":
        if extra is not None and not isinstance(extra, dict):
            raise DataError(None, f"extra must be a mapping, got {type(extra).__name__}")
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            warnings.warn(f"advected_rain ignores extra keys {unknown}; it reads {sorted(known)}")

        def num(key, positive=False, at_most=None):
            v = extra.get(key, getattr(cls, key))
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = math.nan
            bad = isinstance(v, bool) or not math.isfinite(f) or f < 0 or (positive and f == 0)
            if bad or (at_most is not None and f > at_most):
                what = "positive" if positive else "non-negative"
                limit = f" <= {at_most}" if at_most is not None else ""
                raise DataError(None, f"extra.{key} must be a {what} finite number{limit}, got {v!r}")
            return f

        cov = extra.get("coverage", cls.coverage)
        try:
            lo_hi = (float(cov), float(cov)) if np.isscalar(cov) else tuple(float(c) for c in cov)
        except (TypeError, ValueError):
            lo_hi = ()
        if isinstance(cov, (bool, str)) or len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] < 1.0:
            raise DataError(None, f"extra.coverage must be a fraction in (0, 1) or [low, high] with "
                                  f"0 < low <= high < 1, got {cov!r}")
        o = cls(max_speed=num("max_speed", at_most=64.0), min_speed=num("min_speed"),
                growth=num("growth", at_most=1.0), r_max=num("r_max", positive=True), coverage=lo_hi,
                rotation=num("rotation", at_most=0.2), shear=num("shear", at_most=0.2),
                cells=num("cells", at_most=float(MAX_CELLS)),
                rain_scale=num("rain_scale", positive=True))
        if o.min_speed > o.max_speed:
            raise DataError(None, f"extra.min_speed ({o.min_speed}) is above extra.max_speed ({o.max_speed})")
        return o


def domain_size(size: int, frames: int, opts: AdvectedOptions) -> int:
    """Side of the periodic domain: one that holds every departure point of every clip.

    The departure points of frame ``k`` are ``x_k = p − k·u + w_k`` with ``|w_{j+1} − w_j| =
    |A·(x_j − c)| <= a·(r + j·|u| + |w_j|)``, ``a`` a bound on ``‖A‖`` and ``r`` on ``|p − c|``;
    so ``|w_k| <= e_k``, ``e_0 = 0``, ``e_{j+1} = e_j + a·(r + j·max_speed + e_j)``, and along
    each axis the points span at most ``size − 1 + (T − 1)·max_speed + 2·e_{T−1}``. Raises
    :class:`DataError` beyond ``MAX_DOMAIN``.
    """
    a = opts.rotation + math.sqrt(2.0) * opts.shear
    r = math.sqrt(2.0) * 0.75 * size
    e = 0.0
    for j in range(frames - 1):
        e += a * (r + j * opts.max_speed + e)
    span = size - 1 + (frames - 1) * opts.max_speed + 2.0 * e
    D = int(8 * math.ceil((math.floor(span) + 3) / 8))  # + 2 px of slack, a multiple of 8
    if D > MAX_DOMAIN:
        raise DataError(None, f"advected_rain: clips of {frames} frames with max_speed {opts.max_speed}, "
                              f"rotation {opts.rotation} and shear {opts.shear} can travel "
                              f"{span - size + 1:.0f} px, which needs a domain of {D} px (at most {MAX_DOMAIN}); "
                              f"lower frames, max_speed, rotation or shear")
    return D


def _growth_grid(size: int, D: int) -> tuple[int, int]:
    """The growth fields are made on a grid ``f`` times coarser than the domain (they are smooth):
    ``(f, kmax)``, ``kmax`` the highest wavenumber of their Gaussian spectrum that matters."""
    length = GROWTH_SCALE * size
    f = max(1, min(4, int(length // 2)))
    kmax = min(max(1, int(math.ceil(3.0 * D / (2.0 * math.pi * length)))), D // f // 2 - 1)
    return f, kmax


def _check_args(num_clips, split, size, frames):
    if split not in SPLIT_CODES:
        raise DataError(None, f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    for name, v, lo in (("number of clips", num_clips, 0), ("frames", frames, 1), ("size", size, 8)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise DataError(None, f"{name} must be an integer >= {lo}, got {v!r}")


def _draw(seed: int, split: str, start: int, count: int, D: int, lam: float, kmax: int):
    """Per clip, from its own generator and in this order: 16 uniforms, the number of cells and
    the cells (x, y, radius, peak as uniforms; present), the growth fields' Fourier coefficients
    and the rain field's white noise, drawn as its Fourier transform (D, D/2 + 1)."""
    code = SPLIT_CODES[split]
    key = int(seed) & 0xFFFFFFFFFFFFFFFF  # SeedSequence wants non-negative integers
    u = np.empty((count, _N_UNIFORMS), dtype=np.float64)
    cells = np.zeros((count, MAX_CELLS, 5), dtype=np.float64)
    coef = np.empty((count, 2, 2 * kmax + 1, kmax + 1, 2), dtype=np.float32)
    noise = np.empty((count, D, D // 2 + 1, 2), dtype=np.float32)
    for j in range(count):
        rng = np.random.default_rng([key, _STREAM, code, start + j])
        u[j] = rng.random(_N_UNIFORMS)
        n_cells = min(int(rng.poisson(lam)), MAX_CELLS)
        cells[j, :, :4] = rng.random((MAX_CELLS, 4))
        cells[j, :n_cells, 4] = 1.0
        coef[j] = rng.standard_normal(coef.shape[1:], dtype=np.float32)
        noise[j] = rng.standard_normal(noise.shape[1:], dtype=np.float32)
    return u, cells, coef, noise


def _rain_fields(noise: np.ndarray, beta: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From one white noise (its spectrum, (n, D, D/2 + 1)), the rain field's two parts (n, D, D):
    the smooth **shape**, spectrum times ``(k² + k₀²)^(−β/4)``, and the rough **texture**, spectrum
    times ``k^(−TEXTURE_BETA/4)`` with the scales above ``TEXTURE_SCALE·size`` taken out. One
    transform per clip, so that a clip does not depend on the others of its block."""
    D = noise.shape[1]
    fy = torch.fft.fftfreq(D, dtype=torch.float64)
    fx = torch.fft.rfftfreq(D, dtype=torch.float64)
    k2 = fy[:, None] ** 2 + fx[None, :] ** 2
    shape_filt = torch.exp(-0.25 * beta[:, None, None] * torch.log(k2 + (1.0 / (OUTER_SCALE * size)) ** 2)[None])
    shape_filt[:, 0, 0] = 0.0
    tex_filt = (k2.clamp_min(1e-12) ** (-TEXTURE_BETA / 4) * -torch.expm1(-k2 * (TEXTURE_SCALE * size) ** 2))
    tex_filt[0, 0] = 0.0
    spec = torch.view_as_complex(torch.from_numpy(noise))
    shape = torch.stack([torch.fft.irfft2(sp, s=(D, D)) for sp in spec * shape_filt.float()])
    texture = torch.stack([torch.fft.irfft2(sp, s=(D, D)) for sp in spec * tex_filt.float()])
    return shape, texture


def _smooth_fields(coef: np.ndarray, kmax: int, Dc: int, length: float) -> torch.Tensor:
    """Smooth periodic unit-variance fields (n, 2, Dc, Dc) on the coarse grid (``length`` in its
    cells) from their low-frequency Fourier coefficients (a Gaussian spectrum)."""
    n = coef.shape[0]
    ky = torch.cat([torch.arange(0, kmax + 1), torch.arange(-kmax, 0)]).double()
    kx = torch.arange(0, kmax + 1).double()
    amp = torch.exp(-0.5 * (2 * math.pi * length / Dc) ** 2 * (ky[:, None] ** 2 + kx[None, :] ** 2)).float()
    amp[0, 0] = 0.0
    c = torch.view_as_complex(torch.from_numpy(coef)) * amp
    spec = torch.zeros(n, 2, Dc, Dc // 2 + 1, dtype=torch.complex64)
    spec[:, :, :kmax + 1, :kmax + 1] = c[:, :, :kmax + 1]
    spec[:, :, Dc - kmax:, :kmax + 1] = c[:, :, kmax + 1:]
    g = np.stack([torch.fft.irfft2(sp, s=(Dc, Dc)).numpy() for sp in spec]).astype(np.float64)
    g -= g.mean(axis=(-2, -1), keepdims=True)
    g /= np.maximum(g.std(axis=(-2, -1), keepdims=True), 1e-12)
    return torch.from_numpy(g.astype(np.float32))


def _cells(cells: torch.Tensor, D: int, size: int) -> torch.Tensor | None:
    """The present cells as periodic Gaussians (n, D, D), peaks in units of the field's std
    (all MAX_CELLS slots are summed, absent ones with peak 0, so a clip does not depend on the
    others of its block)."""
    if not bool((cells[..., 4] > 0).any()):
        return None
    rad = size * (CELL_RADIUS[0] + (CELL_RADIUS[1] - CELL_RADIUS[0]) * cells[..., 2])
    peak = (CELL_PEAK[0] + (CELL_PEAK[1] - CELL_PEAK[0]) * cells[..., 3]) * cells[..., 4]
    g = torch.arange(D, dtype=torch.float64)

    def bump(centre):  # (n, k, D): periodic 1-D Gaussian profiles
        d = torch.remainder(g - centre[..., None] * D + D / 2, D) - D / 2
        return torch.exp(-0.5 * (d / rad[..., None]) ** 2)
    ex, ey = bump(cells[..., 0]), bump(cells[..., 1])
    return torch.bmm((ey * peak[..., None]).transpose(1, 2), ex).float()     # (n, y, x)


def _quantiles(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` (n, M), its quantile at ``level`` (n,) (linear interpolation)."""
    xs = torch.from_numpy(np.sort(x.numpy(), axis=1)).double()
    pos = level.clamp(0, 1) * (x.shape[1] - 1)
    lo = pos.floor().long().clamp(max=x.shape[1] - 1)
    hi = (lo + 1).clamp(max=x.shape[1] - 1)
    w = pos - lo.double()
    a, b = xs.gather(1, lo[:, None])[:, 0], xs.gather(1, hi[:, None])[:, 0]
    return a + w * (b - a)


def _flow_maps(u: torch.Tensor, A: torch.Tensor, c: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The departure points of frame t, ``x_t = M_t·p + b_t``: the steps ``x_{k+1} = x_k − u −
    A·(x_k − c)`` composed. ``M`` (n, T, 2, 2), ``b`` (n, T, 2)."""
    n = len(u)
    eye = torch.eye(2, dtype=torch.float64).expand(n, 2, 2)
    step, shift = eye - A, (A @ c[..., None])[..., 0] - u                     # x ↦ step·x + shift
    Ms, bs = [eye], [torch.zeros(n, 2, dtype=torch.float64)]
    for _ in range(frames - 1):
        Ms.append(step @ Ms[-1])
        bs.append((step @ bs[-1][..., None])[..., 0] + shift)
    return torch.stack(Ms, 1), torch.stack(bs, 1)


def _grid(M: torch.Tensor, b: torch.Tensor, pix: torch.Tensor, scale: float) -> torch.Tensor:
    """``grid_sample`` grid (n, T·P, P, 2) of the points ``scale·(M_t·p + b_t) − 1`` for the P×P
    pixels ``p`` with coordinates ``pix`` (the map is affine: one sum of a row and a column part)."""
    n, T = M.shape[:2]
    P = len(pix)
    along_x = (scale * M[..., :, 0, None] * pix).float()                        # (n, T, 2, P)
    along_y = (scale * (M[..., :, 1, None] * pix + b[..., None]) - 1.0).float()
    grid = along_x.transpose(2, 3)[:, :, None, :, :] + along_y.transpose(2, 3)[:, :, :, None, :]
    return grid.reshape(n, T * P, P, 2)


def _render_block(u, cells, coef, noise, size: int, frames: int, opts: AdvectedOptions, f: int, kmax: int):
    """``y`` (n, T, S, S) float32 with rain rate ``R = rain_scale·(exp(y) − 1)`` where ``y > 0``,
    and the clips' parameters."""
    n, D = len(u), noise.shape[1]
    ut = torch.from_numpy(u)
    beta = BETA_RANGE[0] + (BETA_RANGE[1] - BETA_RANGE[0]) * ut[:, 0]
    cov = opts.coverage[0] + (opts.coverage[1] - opts.coverage[0]) * ut[:, 1]
    speed = opts.min_speed + (opts.max_speed - opts.min_speed) * ut[:, 2]
    direction = 2 * math.pi * ut[:, 3]
    vel = torch.stack([speed * torch.cos(direction), speed * torch.sin(direction)], dim=1)   # (x, y) px/step
    omega = opts.rotation * (2 * ut[:, 4] - 1)
    s1, s2 = opts.shear * (2 * ut[:, 5] - 1), opts.shear * (2 * ut[:, 6] - 1)
    A = torch.stack([torch.stack([s1, s2 - omega], -1), torch.stack([s2 + omega, -s1], -1)], dim=1)
    centre = (size - 1) / 2 + (size / 4) * (2 * ut[:, 7:9] - 1)
    period = PERIOD_RANGE[0] + (PERIOD_RANGE[1] - PERIOD_RANGE[0]) * ut[:, 9]
    phase = 2 * math.pi * ut[:, 10]
    sigma = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * ut[:, 11]

    # the rain field at time 0: its smooth shape, thresholded at the clip's (1 − coverage) quantile
    # and scaled by its std, gives the smooth log-intensity Y (> 0 where it rains); the texture,
    # exp(TEXTURE·t) with t of unit variance, multiplies it: log(1 + R) = texture·Y
    z, tex = _rain_fields(noise, beta, size)
    std = torch.from_numpy(np.maximum(z[:, ::_SUB, ::_SUB].reshape(n, -1).double().numpy().std(axis=1), 1e-12))
    blobs = _cells(torch.from_numpy(cells), D, size)
    if blobs is not None:
        z += blobs * std.float()[:, None, None]
    q = _quantiles(z[:, ::_SUB, ::_SUB].reshape(n, -1), 1.0 - cov)
    tstd = torch.from_numpy(np.maximum(tex[:, ::_SUB, ::_SUB].reshape(n, -1).double().numpy().std(axis=1), 1e-12))
    y_mean = sigma * (torch.from_numpy(z[:, ::_SUB, ::_SUB].reshape(n, -1).double().numpy().mean(axis=1)) - q) / std
    fields = torch.stack([(z - q.float()[:, None, None]).mul_((sigma / std).float()[:, None, None]),
                          torch.exp(tex * (TEXTURE / tstd).float()[:, None, None])], dim=1)

    # departure points; put the frame where they all fall inside the domain (it is periodic)
    M, b = _flow_maps(vel, A, centre, frames)
    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=torch.float64)
    ends = torch.einsum("ntij,kj->ntki", M, corners) + b[:, :, None, :]
    b = b - ends.amin(dim=(1, 2))[:, None, :]
    if float((ends.amax(dim=(1, 2)) - ends.amin(dim=(1, 2))).max()) > D - 1:
        raise RuntimeError("advected_rain: departure points outside the domain (domain_size is wrong)")
    pix = torch.arange(size, dtype=torch.float64)
    ys, texture = F.grid_sample(fields, _grid(M, b, pix, 2.0 / (D - 1)), mode="bilinear", padding_mode="border",
                                align_corners=True).reshape(n, 2, frames, size, size).unbind(1)

    # growth: the cumulative log factor sum_{s<t} g_s(x) with g_s = growth·(cos(ωs+φ)·G1 + sin(ωs+φ)·G2),
    # made on a grid f times coarser (frame pixels 0, f, 2f, ...) and interpolated
    Dc = D // f
    G = _smooth_fields(coef, kmax, Dc, GROWTH_SCALE * size / f)
    G = torch.cat([G, G[:, :, :1]], dim=2)
    G = torch.cat([G, G[:, :, :, :1]], dim=3)                                   # periodic: Dc + 1 points
    Sc = -(-(size - 1) // f) + 1
    pix_c = f * torch.arange(Sc, dtype=torch.float64)
    gs = F.grid_sample(G, _grid(M, b, pix_c, 2.0 / D), mode="bilinear", padding_mode="border",
                       align_corners=True).reshape(n, 2, frames, Sc, Sc)
    steps = torch.arange(frames, dtype=torch.float64)
    ang = 2 * math.pi * steps[None] / period[:, None] + phase[:, None]
    a_t = (torch.cumsum(torch.cos(ang), 1) - torch.cos(ang)).float()[..., None, None]
    b_t = (torch.cumsum(torch.sin(ang), 1) - torch.sin(ang)).float()[..., None, None]
    lg = (opts.growth * (a_t * gs[:, 0] + b_t * gs[:, 1])).reshape(n * frames, 1, Sc, Sc)
    if f > 1:
        lg = F.interpolate(lg, size=((Sc - 1) * f + 1,) * 2, mode="bilinear", align_corners=True)
    lg = lg[:, 0, :size, :size].reshape(n, frames, size, size)

    # Y + A_t has the variance σ² + s_t², s_t² = growth²·(a_t² + b_t²): scale its spread about Y's
    # mean back to σ, so the frames keep the first one's statistics (no trend in rain area or
    # intensity over a clip; some regions grow while others decay)
    spread2 = opts.growth ** 2 * (a_t[..., 0, 0].double() ** 2 + b_t[..., 0, 0].double() ** 2)
    keep = (sigma[:, None] / torch.sqrt(sigma[:, None] ** 2 + spread2)).float()[..., None, None]
    y_mean = y_mean.float()[:, None, None, None]
    y = ys.sub_(y_mean).add_(lg).mul_(keep).add_(y_mean).mul_(texture)
    # soft cap: y_cap − softplus(k·(y_cap − y))/k, ≈ y below the cap (R = 50 mm/h → 48.6)
    y_cap = math.log1p(R_CAP)
    y = y_cap - F.softplus(_CAP_SHARPNESS * (y_cap - y)) / _CAP_SHARPNESS
    info = {"velocity": vel.numpy(), "rotation": omega.numpy(), "shear": torch.stack([s1, s2], 1).numpy(),
            "centre": centre.numpy(), "coverage": cov.numpy(), "beta": beta.numpy(), "sigma": sigma.numpy(),
            "growth_period": period.numpy()}
    return y, info


_INFO_SHAPES = {"velocity": (2,), "rotation": (), "shear": (2,), "centre": (2,), "coverage": (), "beta": (),
                "sigma": (), "growth_period": ()}


def _generate(num_clips, split, size, frames, seed, options, start, progress, units: bool):
    _check_args(num_clips, split, size, frames)
    num_clips, size, frames, start = int(num_clips), int(size), int(frames), int(start)
    opts = options if isinstance(options, AdvectedOptions) else AdvectedOptions.from_extra(options)
    D = domain_size(size, frames, opts)
    f, kmax = _growth_grid(size, D)
    lam = opts.cells * (D / size) ** 2
    out = np.empty((num_clips, frames, size, size), dtype=np.float16 if units else np.float32)
    info = {k: np.empty((num_clips, *shape)) for k, shape in _INFO_SHAPES.items()}
    to_unit = 1.0 / math.log(1.0 + opts.r_max)
    chunk = max(1, min(_CHUNK, int(_CHUNK * (192 / D) ** 2)))   # blocks of ~ the same memory
    blocks = list(range(0, num_clips, chunk))
    bar = BlockProgress(num_clips, f"advected rain ({split})", after_s=_PROGRESS_AFTER_S, force=progress)
    for lo in blocks:
        hi = min(lo + chunk, num_clips)
        u, cells, coef, noise = _draw(seed, split, start + lo, hi - lo, D, lam, kmax)
        y, inf = _render_block(u, cells, coef, noise, size, frames, opts, f, kmax)
        if not units:
            out[lo:hi] = y.expm1_().clamp_min_(0.0).mul_(opts.rain_scale).numpy()
        elif opts.rain_scale == 1.0:   # rain_to_unit(exp(y) − 1) = log(exp(y)) / log(1 + r_max), clipped
            out[lo:hi] = y.mul_(to_unit).clamp_(0.0, 1.0).numpy()
        else:
            out[lo:hi] = rain_to_unit(y.expm1_().clamp_min_(0.0).mul_(opts.rain_scale).numpy(), opts.r_max)
        for k in info:
            info[k][lo:hi] = inf[k]
        bar.update(hi, len(blocks))
    bar.close()
    return out, info


def generate_rain(num_clips: int, split: str = "train", size: int = 64, frames: int = 20, seed: int = 0,
                  options: AdvectedOptions | dict | None = None, start: int = 0,
                  progress: bool | None = None) -> tuple[np.ndarray, dict]:
    """Rain rates (mm/h) of clips ``start .. start + num_clips - 1`` of ``split``: float32
    ``(N, T, size, size)``, and ``info``: per-clip parameters as arrays of length N —
    ``velocity`` (N, 2) as (x, y) px/step (x along the width; the uniform part of the motion:
    content moves by +velocity per step), ``rotation`` (rad/step), ``shear`` (N, 2),
    ``centre`` (N, 2, frame pixels, x then y), ``coverage`` (the drawn rain fraction), ``beta``,
    ``sigma``, ``growth_period`` (steps).

    ``options``: :class:`AdvectedOptions` or the ``extra`` mapping. ``progress``: ``None``
    shows a tqdm bar only when generation is expected to take more than about 2 s; ``True`` /
    ``False`` force it on / off.
    """
    return _generate(num_clips, split, size, frames, seed, options, start, progress, units=False)


def generate_clips(num_clips: int, split: str = "train", size: int = 64, frames: int = 20, seed: int = 0,
                   options: AdvectedOptions | dict | None = None, start: int = 0,
                   progress: bool | None = None) -> tuple[np.ndarray, dict]:
    """:func:`generate_rain` in model units, ``rain_to_unit(R, r_max)``: float16
    ``(N, T, size, size)`` in [0, 1], and ``info``."""
    return _generate(num_clips, split, size, frames, seed, options, start, progress, units=True)


class AdvectedRain(Dataset):
    """A split of advected-rain clips, generated in bulk at construction.

    Items are ``{"frames": float32 (T, C, H, W) in [0, 1], "mask": bool (T, 1, H, W)}`` (all
    True), as the radar readers'. ``.clips`` holds the values as float16 ``(N, T, H, W)`` in
    model units; ``.info`` the per-clip parameters (see :func:`generate_rain`).
    """

    def __init__(self, num_clips: int = 2000, split: str = "train", size: int = 64, frames: int = 20,
                 seed: int = 0, options: AdvectedOptions | dict | None = None, channels: int = 1,
                 progress: bool | None = None):
        if isinstance(channels, bool) or channels not in (1, 3):
            raise DataError(None, f"advected_rain: channels must be 1 or 3 (3 repeats the field), got {channels!r}")
        opts = options if isinstance(options, AdvectedOptions) else AdvectedOptions.from_extra(options)
        self.split, self.size, self.frames, self.seed = split, size, frames, seed
        self.channels, self.options = channels, opts
        self.clips, self.info = generate_clips(num_clips, split, size, frames, seed, opts, progress=progress)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.clips[i].astype(np.float32)).unsqueeze(1)
        if self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        return {"frames": x, "mask": torch.ones((self.frames, 1, self.size, self.size), dtype=torch.bool)}


@register_dataset("advected_rain", units=rain_units,
                  extra=tuple(f.name for f in dataclasses.fields(AdvectedOptions)))
def build_advected_rain(cfg: DataConfig) -> dict:
    """Train / val / test :class:`AdvectedRain` from ``size, frames, channels, seed``,
    ``train_clips, val_clips, test_clips`` and ``extra`` (see the module docstring)."""
    if isinstance(cfg.channels, bool) or cfg.channels not in (1, 3):
        raise DataError(None, f"advected_rain: channels must be 1 or 3 (3 repeats the field), got {cfg.channels!r}")
    opts = AdvectedOptions.from_extra(cfg.extra)
    counts = {"train": cfg.train_clips, "val": cfg.val_clips, "test": cfg.test_clips}
    return {s: AdvectedRain(counts[s], s, cfg.size, cfg.frames, cfg.seed, opts, cfg.channels) for s in SPLITS}

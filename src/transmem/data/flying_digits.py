"""Flying digits: the Moving MNIST recipe, generated on the fly, deterministic by seed.

``K`` digits bounce inside a square canvas; each has a random start position and a random
velocity, is reflected by the walls, and the digits are combined by pixel-wise max.

* canvas ``size`` (default 64) and ``frames`` (default 20);
* digit size: 28 px on a canvas of 64 or more; on a smaller canvas the digits shrink with it,
  ``round(28 * size / 64)`` px (32×32 → 14 px), area-averaged from the 28×28 originals;
* start position uniform over the canvas (top-left corner in ``[0, size - d]``), direction
  uniform in ``[0, 2π)``, speed uniform in ``[2, 5] * d / 28`` px per frame; each axis bounces
  off the walls (exact reflection), positions are rounded to whole pixels;
* digits come from the split's own pool of :func:`~transmem.data.mnist.load_digit_pools`
  (built-in rendered glyphs, or real MNIST with ``mnist_dir``), so train / val / test never share
  a digit image.

Clip ``i`` of a split is a pure function of ``(seed, split, i, num_digits, size)`` and the digit
source: every clip draws from its own random generator, so clips can be made one at a time or in
bulk with the same result. ``frames`` only cuts the trajectory: a 10-frame clip is the first 10
frames of the 20-frame clip with the same index.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..progress import BlockProgress
from .errors import DataError
from .mnist import SPLITS, load_digit_pools
from .registry import DataConfig, register_dataset

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPEED_RANGE = (2.0, 5.0)  # px per frame for a 28 px digit; scaled with the digit size
_CHUNK = 256              # clips generated per vectorised block
_PROGRESS_AFTER_S = 2.0   # show a progress bar when generation is expected to take longer


def digit_size_for(size: int) -> int:
    """Side of the digits on a ``size`` canvas: 28 from 64 up, else ``round(28 * size / 64)``."""
    return 28 if size >= 64 else max(1, int(round(28 * size / 64)))


@functools.lru_cache(maxsize=16)
def _pool(mnist_dir: str | None, split: str, d: int) -> np.ndarray:
    pool = load_digit_pools(mnist_dir)[split]
    if d == pool.shape[-1]:
        return pool
    t = torch.from_numpy(pool.astype(np.float32))[:, None]
    small = torch.nn.functional.interpolate(t, size=(d, d), mode="area")[:, 0]
    out = small.round().clamp_(0, 255).to(torch.uint8).numpy()
    out.setflags(write=False)
    return out


def _fold(x: np.ndarray, span: float) -> np.ndarray:
    """Reflect positions into ``[0, span]`` (a ball bouncing between two walls)."""
    if span <= 0:
        return np.zeros_like(x)
    m = np.mod(x, 2.0 * span)
    return span - np.abs(m - span)


def _clip_params(num_digits: int, start: int, count: int, split: str, seed: int, pool_len: int):
    """Per clip: digit indices (n, K) and uniforms (n, K, 4) from the clip's own generator."""
    code = SPLIT_CODES[split]
    key = int(seed) & 0xFFFFFFFFFFFFFFFF  # SeedSequence wants non-negative integers
    idx = np.empty((count, num_digits), dtype=np.int64)
    u = np.empty((count, num_digits, 4), dtype=np.float64)
    for j in range(count):
        rng = np.random.default_rng([key, code, num_digits, start + j])
        idx[j] = rng.integers(pool_len, size=num_digits)
        u[j] = rng.random((num_digits, 4))
    return idx, u


def _render_block(pool: np.ndarray, idx: np.ndarray, u: np.ndarray, size: int, frames: int) -> np.ndarray:
    n, K = idx.shape
    d = pool.shape[-1]
    span = float(size - d)
    t = np.arange(frames, dtype=np.float64)
    x0, y0 = u[..., 0] * span, u[..., 1] * span
    theta = 2.0 * np.pi * u[..., 2]
    speed = (SPEED_RANGE[0] + (SPEED_RANGE[1] - SPEED_RANGE[0]) * u[..., 3]) * d / 28.0
    # Trajectories (n, K, T), bounced and rounded to whole pixels.
    xs = np.rint(_fold(x0[..., None] + (speed * np.cos(theta))[..., None] * t, span)).astype(np.intp)
    ys = np.rint(_fold(y0[..., None] + (speed * np.sin(theta))[..., None] * t, span)).astype(np.intp)
    out = np.zeros((n, frames, size, size), dtype=np.uint8)
    # Every (clip, frame, row, col) has a d×d window onto the canvas; write each digit there.
    win = np.lib.stride_tricks.sliding_window_view(out, (d, d), axis=(2, 3), writeable=True)
    ci = np.arange(n)[:, None]
    ti = t.astype(np.intp)[None, :]
    for k in range(K):
        digits = pool[idx[:, k]][:, None]  # (n, 1, d, d), broadcast over frames
        r, c = ys[:, k], xs[:, k]
        if k == 0:
            win[ci, ti, r, c] = digits
        else:
            cur = win[ci, ti, r, c]
            np.maximum(cur, digits, out=cur)
            win[ci, ti, r, c] = cur
    return out


def _check_args(num_digits, num_clips, split, size, frames):
    if split not in SPLIT_CODES:
        raise DataError(None, f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    if int(num_digits) < 1:
        raise DataError(None, f"num_digits must be >= 1, got {num_digits}")
    if int(num_clips) < 0:
        raise DataError(None, f"number of clips must be >= 0, got {num_clips}")
    if int(frames) < 1:
        raise DataError(None, f"frames must be >= 1, got {frames}")
    if int(size) < 4:
        raise DataError(None, f"canvas size must be >= 4, got {size}")


def generate_clips(num_digits: int, num_clips: int, split: str = "train", size: int = 64, frames: int = 20,
                   seed: int = 0, mnist_dir: str | os.PathLike | None = None, start: int = 0,
                   progress: bool | None = None) -> np.ndarray:
    """Clips ``start .. start + num_clips - 1`` of ``split`` as uint8 ``(N, T, H, W)``.

    ``progress``: ``None`` shows progress (a bar on a terminal, plain lines elsewhere) only when
    generation is expected to take more than about 2 s; ``True`` / ``False`` force it on / off.
    """
    _check_args(num_digits, num_clips, split, size, frames)
    num_digits, num_clips, size, frames, start = int(num_digits), int(num_clips), int(size), int(frames), int(start)
    mdir = None if mnist_dir is None else os.fspath(mnist_dir)
    pool = _pool(mdir, split, digit_size_for(size))
    out = np.empty((num_clips, frames, size, size), dtype=np.uint8)
    blocks = list(range(0, num_clips, _CHUNK))
    bar = BlockProgress(num_clips, f"flying digits ({split})", after_s=_PROGRESS_AFTER_S, force=progress)
    for lo in blocks:
        hi = min(lo + _CHUNK, num_clips)
        idx, u = _clip_params(num_digits, start + lo, hi - lo, split, seed, len(pool))
        out[lo:hi] = _render_block(pool, idx, u, size, frames)
        bar.update(hi, len(blocks))
    bar.close()
    return out


class FlyingDigits(Dataset):
    """A split of flying-digit clips, generated in bulk at construction and kept as uint8.

    Items are ``{"frames": float32 (T, 1, H, W) in [0, 1]}``; ``.clips`` holds the uint8 array.
    """

    def __init__(self, num_digits: int = 2, num_clips: int = 2000, split: str = "train", size: int = 64,
                 frames: int = 20, seed: int = 0, mnist_dir: str | os.PathLike | None = None,
                 progress: bool | None = None):
        self.num_digits, self.split, self.size, self.frames, self.seed = num_digits, split, size, frames, seed
        self.mnist_dir = mnist_dir
        self.clips = generate_clips(num_digits, num_clips, split, size, frames, seed, mnist_dir, progress=progress)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.clips[i]).to(torch.float32).div_(255.0)
        return {"frames": x.unsqueeze(1)}


@register_dataset("flying_digits", extra=(), inflow="zero", describe=lambda cfg: f"flying_digits k={cfg.num_digits}")  # digits bounce on a black canvas
def build_flying_digits(cfg: DataConfig) -> dict:
    """Train / val / test :class:`FlyingDigits` from ``num_digits, size, frames, seed, mnist_dir`` and
    ``train_clips, val_clips, test_clips``."""
    if cfg.channels != 1:
        raise DataError(None, f"flying_digits is grayscale: channels must be 1, got {cfg.channels}")
    counts = {"train": cfg.train_clips, "val": cfg.val_clips, "test": cfg.test_clips}
    return {s: FlyingDigits(cfg.num_digits, counts[s], s, cfg.size, cfg.frames, cfg.seed, cfg.mnist_dir)
            for s in SPLITS}

"""Augmentation of training clips for fields and video: flips, 90° rotations and random crops,
applied to the frames and their validity mask alike, clip by clip.

Why these: precipitation fields and most videos have no preferred orientation at the scale of a
clip, so a flipped or rotated clip is as plausible as the original (the motion flips and rotates
with it), and a crop is a clip of a smaller domain. With little training data (a few radar
events) they multiply what a model sees without inventing physics. Time reversal lives beside
them (:func:`~transmem.training.schedules.reverse_time`).

The random numbers are drawn from the caller's generator for the *global* batch (``world *
batch`` clips) and each process keeps its own rows, as the sampling masks do, so a step is a
pure function of (seed, step) on any number of processes.
"""
from __future__ import annotations

import torch

from ..choices import AUGMENTS, check


def draw_augment(n: int, ops, generator: torch.Generator, square: bool) -> torch.Tensor:
    """Per clip ``[flip left-right, flip up-down, quarter turns]`` as an (n, 3) integer tensor.
    Rotations need square frames (a rotated clip must keep its size)."""
    for op in ops:
        check("augment", op, AUGMENTS)
    params = torch.zeros(n, 3, dtype=torch.long)
    if "flip" in ops:
        params[:, :2] = torch.randint(0, 2, (n, 2), generator=generator)
    if "rot90" in ops:
        if not square:
            raise ValueError("rot90 augmentation needs square frames")
        params[:, 2] = torch.randint(0, 4, (n,), generator=generator)
    return params


def draw_crops(n: int, height: int, width: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Top-left corners (n, 2) of ``crop`` x ``crop`` windows inside ``height`` x ``width``."""
    if crop > min(height, width):
        raise ValueError(f"crop size {crop} is larger than the frames ({height}x{width})")
    top = torch.randint(0, height - crop + 1, (n,), generator=generator)
    left = torch.randint(0, width - crop + 1, (n,), generator=generator)
    return torch.stack([top, left], 1)


def _transform(x: torch.Tensor, p, corner, crop: int) -> torch.Tensor:
    """One clip (T, C, H, W): flips, then quarter turns, then the crop; frames that are not square
    (a native radar grid) are cropped first, so that the square crop can turn."""
    if crop and x.shape[-1] != x.shape[-2]:
        top, left = int(corner[0]), int(corner[1])
        return _transform(x[..., top:top + crop, left:left + crop], p, None, 0)
    if p[0]:
        x = x.flip(-1)
    if p[1]:
        x = x.flip(-2)
    if p[2]:
        x = torch.rot90(x, int(p[2]), dims=(-2, -1))
    if crop:
        top, left = int(corner[0]), int(corner[1])
        x = x[..., top:top + crop, left:left + crop]
    return x


def augment_clips(frames: torch.Tensor, valid: torch.Tensor | None, ops, crop: int,
                  generator: torch.Generator, world: int = 1, rank: int = 0):
    """``frames`` (B, T, C, H, W) and ``valid`` (B, T, 1, H, W) or None, each clip transformed
    the same way in both. Returns new tensors (the inputs are not changed)."""
    b, _, _, h, w = frames.shape
    params = draw_augment(world * b, ops, generator, square=h == w or bool(crop))[rank::world]
    corners = draw_crops(world * b, h, w, crop, generator)[rank::world] if crop else [None] * b
    frames = torch.stack([_transform(f, p, c, crop) for f, p, c in zip(frames, params, corners)])
    if valid is not None:
        valid = torch.stack([_transform(v, p, c, crop) for v, p, c in zip(valid, params, corners)])
    return frames, valid

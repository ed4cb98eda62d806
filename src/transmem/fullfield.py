"""Forecasts of whole fields of any size from a model trained on crops.

Every backbone is fully convolutional, so a model trained on 128×128 crops of a 1 km radar
composite can run on the whole composite. Two things stand in the way, and this wrapper owns both:

* **Patch size**: a model that reshapes frames into p×p patches needs H and W divisible by p.
  The field is padded at the bottom and right to the next multiple (edge values repeated, as the
  advection backbone's ``border`` padding continues the field) and the forecast cropped back.
* **Memory**: a 2200×1900 composite through a recurrent network for 18 steps holds a few GiB of
  activations. With ``tile`` set, the field is cut into overlapping tiles of at most ``tile``
  pixels a side, each forecast on its own, and the tiles are blended with weights that fall
  linearly to zero across the ``overlap`` band, so there is no visible seam. Inside a tile the
  model sees ``overlap / 2`` pixels of context beyond the part it mostly decides.

The wrapper has a model's ``rollout`` / ``t_in`` / ``device`` interface (so evaluate, blend and
predict use it unchanged) and is the identity when the field already fits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .blend import Wrapped


def pad_to_multiple(frames: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """``frames`` (B, T, C, H, W) padded at the bottom/right by edge replication so that H and W are
    multiples of ``multiple`` (a patch size: whole fields of any size forecast by a patched model);
    returns ``(padded, H, W)`` (the original size, to crop back)."""
    h, w = frames.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return frames, h, w
    b, t, c = frames.shape[:3]
    flat = frames.reshape(b * t, c, h, w)
    flat = F.pad(flat, (0, pw, 0, ph), mode="replicate")
    return flat.reshape(b, t, c, h + ph, w + pw), h, w


def tile_starts(size: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``size``, neighbours overlapping by at least
    ``overlap``, every start a multiple of ``multiple``; the last tile ends at ``size``."""
    if size <= tile:
        return [0]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def ramp(length: int, start: int, size: int, overlap: int, device, dtype) -> Tensor:
    """Blend weights along one axis for a tile at ``start``: 1 inside, falling linearly to ~0 over
    ``overlap`` pixels at every edge that borders another tile (not at the field's own edge)."""
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap <= 0:
        return w
    edge = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
    if start > 0:
        w[:overlap] = edge
    if start + length < size:
        w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


class FullFieldForecaster(Wrapped):
    """``inner`` (anything with ``rollout``, ``t_in``, ``device``) run on fields of any size:
    padded to a multiple of ``multiple`` (the model's patch size), and tiled when a side is larger
    than ``tile`` (None: never), tiles overlapping by ``overlap`` pixels and blended seamlessly."""

    def __init__(self, inner, multiple: int = 1, tile: int | None = None, overlap: int = 64):
        super().__init__(inner)
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        if tile is not None and (tile < 2 * overlap or tile % multiple):
            raise ValueError(f"tile ({tile}) must be a multiple of {multiple} and at least twice the overlap ({overlap})")
        self.multiple, self.tile, self.overlap = int(multiple), tile, int(overlap)

    @property
    def needs_teachers_at_inference(self) -> bool:
        return bool(getattr(self.inner, "needs_teachers_at_inference", False))

    @torch.no_grad()
    def rollout(self, frames: Tensor) -> Tensor:
        padded, h, w = pad_to_multiple(frames, self.multiple)
        hp, wp = padded.shape[-2:]
        if self.tile is None or (hp <= self.tile and wp <= self.tile):
            return self.inner.rollout(padded)[..., :h, :w]
        tile_h, tile_w = min(self.tile, hp), min(self.tile, wp)
        out = weight = None
        for top in tile_starts(hp, tile_h, self.overlap, self.multiple):
            for left in tile_starts(wp, tile_w, self.overlap, self.multiple):
                pred = self.inner.rollout(padded[..., top:top + tile_h, left:left + tile_w])
                if out is None:
                    out = pred.new_zeros(*pred.shape[:3], hp, wp)
                    weight = pred.new_zeros(hp, wp)
                wy = ramp(tile_h, top, hp, self.overlap, pred.device, pred.dtype)
                wx = ramp(tile_w, left, wp, self.overlap, pred.device, pred.dtype)
                wt = wy[:, None] * wx[None, :]
                out[..., top:top + tile_h, left:left + tile_w] += pred * wt
                weight[top:top + tile_h, left:left + tile_w] += wt
        return (out / weight)[..., :h, :w]

    forward = rollout

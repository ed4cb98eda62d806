"""Image files that hold many frames: multi-page TIFF (microscopy stacks) and animated PNG / WebP.

:func:`frame_count` says how many frames a file holds (1 for an ordinary image) without decoding
them; :func:`read_stack` decodes all (or the first ``max_frames``) as ``(T, H, W)`` gray or
``(T, H, W, 3)`` RGB, with the same value rules as single images
(:func:`transmem.data.frames.read_image`): 8-bit as uint8, 16-bit as uint16 (scaled by 1/65535
later), float already in [0, 1] (a float stack outside [0, 1] is an error: rescale it first).

TIFF goes through ``tifffile`` when it is installed (``pip install 'transmem[io]'``: any page
count, ImageJ hyperstacks, 16-bit and float pages) and through Pillow's page iterator otherwise;
PNG / WebP animations through Pillow. A stack is one *sequence* of the frame readers; a folder of
stacks is several sequences.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from .clips import unit_floats, why
from .errors import DataError

STACK_EXTS = frozenset({".tif", ".tiff", ".png", ".apng", ".webp"})


def _tifffile():
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def image_array(im) -> np.ndarray:
    """A decoded Pillow image as ``(H, W)`` (gray: uint8, or uint16 for 16-bit; float32 in
    [0, 1] for 32-bit float) or ``(H, W, 3)`` uint8 RGB."""
    mode = im.mode
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)
    if mode == "LA":
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def _tiff_frames(series) -> tuple[int, bool]:
    """(frames, rgb) of a tifffile series: every axis but Y, X (and S, samples) counts frames."""
    axes, shape = series.axes, series.shape
    rgb = axes.endswith("S") and shape[-1] in (3, 4)
    n = 1
    for ax, d in zip(axes, shape):
        if ax not in "YXS":
            n *= int(d)
    return n, rgb


def frame_count(path: str | os.PathLike) -> int:
    """Frames in an image file: TIFF pages, animation frames; 1 for an ordinary image."""
    p = Path(path)
    suf = p.suffix.lower()
    if suf not in STACK_EXTS:
        return 1
    tf = _tifffile() if suf in (".tif", ".tiff") else None
    try:
        if tf is not None:
            with tf.TiffFile(os.fspath(p)) as t:
                return _tiff_frames(t.series[0])[0] if t.series else len(t.pages)
        with Image.open(os.fspath(p)) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception as e:  # truncated or not an image
        raise DataError(p, f"cannot read image ({why(e, p)})") from None


def is_wide_image(path: str | os.PathLike) -> bool:
    """Whether an image file holds integer samples of more than 8 bits (16-bit PNG / TIFF pages),
    from its header (nothing decoded)."""
    p = Path(path)
    tf = _tifffile() if p.suffix.lower() in (".tif", ".tiff") else None
    try:
        if tf is not None:
            with tf.TiffFile(os.fspath(p)) as t:
                dt = np.dtype(t.series[0].dtype) if t.series else np.dtype(t.pages[0].dtype)
            return dt.kind in "iu" and dt.itemsize > 1
        with Image.open(os.fspath(p)) as im:
            return im.mode.startswith("I")
    except Exception as e:  # truncated or not an image
        raise DataError(p, f"cannot read image ({why(e, p)})") from None


def data_white(files, max_frames: int | None = None) -> int | None:
    """The white level the 16-bit images among ``files`` hold: their largest raw value (None
    when none is 16-bit, or all are 0). Frames read with it span the data's own range in [0, 1]
    instead of a sliver of 0..65535 (12-bit microscopy in 16-bit pages reaches at most 4095)."""
    top = None
    for f in files:
        if not is_wide_image(f):
            continue
        a = _read_stack(Path(f), max_frames) if frame_count(f) > 1 else _read_single(Path(f))
        if a.dtype.kind in "iu":
            m = int(a.max()) if a.size else 0
            top = m if top is None else max(top, m)
    return top if top else None


def _read_single(p: Path) -> np.ndarray:
    try:
        with Image.open(os.fspath(p)) as im:
            im.load()
            return image_array(im)
    except Exception as e:
        raise DataError(p, f"cannot read image ({why(e, p)})") from None


def _pages_pillow(p: Path, max_frames: int | None) -> list[np.ndarray]:
    out = []
    with Image.open(os.fspath(p)) as im:
        for k, page in enumerate(ImageSequence.Iterator(im)):
            if max_frames and k >= max_frames:
                break
            out.append(image_array(page.copy()))
    return out


def read_stack(path: str | os.PathLike, max_frames: int | None = None, white: float | None = None) -> np.ndarray:
    """All frames of a stack as ``(T, H, W)`` (uint8 / uint16 / float32 in [0, 1]) or
    ``(T, H, W, 3)`` uint8. ``white``: the raw value shown as white (e.g. 4095 for 12-bit
    microscopy in 16-bit pages): frames become float32 ``raw / white`` clipped to [0, 1]. The
    readers pass the white level the data holds (:func:`data_white`) unless ``extra.white``
    declares one; called without, a 16-bit stack that uses less than 1/16 of its range gives a
    warning naming the key."""
    a = _read_stack(Path(path), max_frames)
    if white is not None:
        if a.dtype.kind == "f":
            raise DataError(path, "extra.white applies to integer stacks; float pages are already in [0, 1]")
        return np.clip(a.astype(np.float32) / np.float32(white), 0.0, 1.0)
    if a.dtype == np.uint16 and 0 < int(a.max()) < 4096:
        warnings.warn(f"{path}: this 16-bit stack uses values up to {int(a.max())} of 65535 (12-bit data?), so it "
                      f"is read dark with few grey levels; set extra.white: {int(a.max())} (the value shown as white)")
    return a


def _read_stack(p: Path, max_frames: int | None) -> np.ndarray:
    suf = p.suffix.lower()
    tf = _tifffile() if suf in (".tif", ".tiff") else None
    try:
        if tf is not None:
            with tf.TiffFile(os.fspath(p)) as t:
                a = t.series[0].asarray()
                _, rgb = _tiff_frames(t.series[0])
            a = a.reshape((-1,) + a.shape[-3:]) if rgb else a.reshape((-1,) + a.shape[-2:])
            if max_frames:
                a = a[:max_frames]
            if rgb:
                a = a[..., :3]
            frames = list(a)
        else:
            frames = _pages_pillow(p, max_frames)
    except DataError:
        raise
    except Exception as e:  # UnidentifiedImageError, truncated data, tifffile errors, ...
        raise DataError(p, f"cannot read image stack ({why(e, p)})") from None
    if not frames:
        raise DataError(p, "no frames in the image stack")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DataError(p, f"pages of different sizes in one stack: {sorted(shapes)[:3]}")
    a = np.stack(frames)
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 65535:
            raise DataError(p, f"{a.dtype} stack with values in [{a.min()}, {a.max()}]: expected 8- or 16-bit")
        return a.astype(np.uint16)
    if a.dtype.kind == "f":
        return unit_floats(a, p, "the float stack's values")
    raise DataError(p, f"unsupported stack dtype {a.dtype}")

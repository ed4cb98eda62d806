"""Video files as frame sequences: mp4, avi, mov, mkv, webm, ... through PyAV (FFmpeg, bundled in
its wheel: ``pip install transmem[video]``) and animated GIF through Pillow.

Registered dataset ``"video"``: ``cfg.path`` is one video file or a folder searched recursively
for video files; each file is one sequence (and its own event for the split, unless
``extra["group_regex"]`` groups several files into one event). Frames are decoded as RGB,
converted to ``cfg.channels`` (BT.601 luma for gray), brought to ``cfg.size`` by
``cfg.resize`` and stored as uint8.

``extra`` keys: ``max_frames`` (decode at most this many frames per file), ``aspect``
(``"crop"`` | ``"stretch"``), ``crop`` ([top, left, height, width] in source pixels),
``group_regex``, ``splits``, ``split_order`` (``"hash"`` | ``"name"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .clips import (CLIP_KEYS, SequenceSpec, build_clip_datasets, fit_frames, fit_options, group_events, natural_key, opt,
                    opt_int, quantize_uint8, require_path, to_channels, why)
from .errors import DataError
from ..files import walk
from .registry import DataConfig, register_dataset

VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                        ".ogv", ".3gp", ".ts", ".mts", ".y4m"})
GIF_EXTS = frozenset({".gif"})
_CHUNK = 32  # frames converted and resized together


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS | GIF_EXTS


def decode_video(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield the frames of a video file as ``(H, W, 3)`` uint8 RGB, in presentation order.

    Raises :class:`DataError` for a file PyAV cannot open or decode (and when PyAV is missing).
    """
    try:
        import av
    except ImportError:
        raise DataError(path, "reading video needs PyAV: pip install 'transmem[video]'") from None
    try:
        container = av.open(os.fspath(path), mode="r")
    except Exception as e:  # av.error.*, OSError, ...: everything becomes one DataError
        raise DataError(path, f"cannot open as video ({why(e, path)})") from None
    try:
        if not container.streams.video:
            raise DataError(path, "no video stream in the file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = 0
        for frame in container.decode(stream):
            if max_frames is not None and n >= max_frames:
                break
            yield frame.to_ndarray(format="rgb24")
            n += 1
    except DataError:
        raise
    except Exception as e:
        raise DataError(path, f"cannot decode video ({why(e, path)})") from None
    finally:
        try:
            container.close()
        except Exception:
            pass


def decode_gif(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield the frames of an (animated) GIF as ``(H, W, 3)`` uint8 RGB, composited as shown."""
    from PIL import Image, ImageSequence
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "GIF":
                raise DataError(path, f"not a GIF file (Pillow reads it as {im.format})")
            for n, frame in enumerate(ImageSequence.Iterator(im)):
                if max_frames is not None and n >= max_frames:
                    break
                yield np.asarray(frame.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # UnidentifiedImageError, truncated file, LZW errors, ...
        raise DataError(path, f"cannot read GIF ({why(e, path)})") from None


def iter_frames(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video or GIF file (dispatch on the extension)."""
    if Path(path).suffix.lower() in GIF_EXTS:
        return decode_gif(path, max_frames)
    return decode_video(path, max_frames)


def prepare_frames(chunks: Iterator[tuple[Path, np.ndarray]], channels: int, size: int | None, mode: str,
                   aspect: str = "crop", crop=None, where=None, white: float | None = None) -> np.ndarray:
    """Turn an iterator of ``(file, frame)`` (frame ``(H, W)`` / ``(H, W, C)``, uint8, uint16 or
    float in [0, 1]) into prepared frames ``(T, channels, size, size)``, checking that every frame
    has the size of the first. 8-bit frames stay uint8; frames of more precision (16-bit, float,
    or integer frames scaled by ``white``, the raw value shown as white) become float16 in
    [0, 1], so that a 16-bit image keeps its grey levels (float16 holds 2048 steps per octave)."""
    out, buf = [], []
    first = None
    wide = white is not None

    def flush():
        x = fit_frames(to_channels(np.stack(buf), channels, where), size, mode, aspect=aspect, crop=crop, path=where)
        out.append(x)
        buf.clear()

    for src, fr in chunks:
        wide = wide or np.asarray(fr).dtype != np.uint8
        fr = _as_unit_float(fr, src, white)
        if first is None:
            first = (fr.shape, src)
        elif fr.shape != first[0]:
            raise DataError(src, f"mixed frame sizes: {_shape_str(fr.shape)} here, {_shape_str(first[0])} "
                                 f"in the first frame ({Path(first[1]).name})")
        buf.append(fr)
        if len(buf) >= _CHUNK:
            flush()
            if not wide:  # 8-bit so far: keep the chunks as uint8 (a float16 copy is made if wider come)
                out[-1] = quantize_uint8(out[-1])
    if buf:
        flush()
        if not wide:
            out[-1] = quantize_uint8(out[-1])
    if not out:
        raise DataError(where, "no frames")
    if not wide:
        return np.concatenate(out, axis=0)
    return np.concatenate([as_unit(c).astype(np.float16) for c in out], axis=0)


def as_unit(x: np.ndarray) -> np.ndarray:
    """Prepared frames (uint8, or float16 / float32 in [0, 1]) as float32 in [0, 1]."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1 / 255)
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _shape_str(shape) -> str:
    s = f"{shape[1]}x{shape[0]}"
    return s + (f"x{shape[2]}" if len(shape) > 2 else "")


def _as_unit_float(fr: np.ndarray, src, white: float | None = None) -> np.ndarray:
    fr = np.asarray(fr)
    if white is not None and fr.dtype.kind in "iu":
        return np.clip(fr.astype(np.float32) / np.float32(white), 0.0, 1.0)
    if fr.dtype == np.uint8:
        return fr.astype(np.float32) * np.float32(1 / 255)
    if fr.dtype == np.uint16:
        return fr.astype(np.float32) * np.float32(1 / 65535)
    if fr.dtype.kind == "f":
        fr = fr.astype(np.float32)
        if not np.isfinite(fr).all():
            raise DataError(src, "frame holds NaN or infinite values")
        return np.clip(fr, 0.0, 1.0)
    if fr.dtype == np.bool_:
        return fr.astype(np.float32)
    raise DataError(src, f"unsupported pixel type {fr.dtype}")


def read_video(path: str | os.PathLike, channels: int = 1, size: int | None = None, resize: str = "resize", *,
               aspect: str = "crop", crop=None, max_frames: int | None = None) -> np.ndarray:
    """Decode a video or GIF file into prepared uint8 frames ``(T, channels, H, W)``.

    ``size=None`` or ``resize="none"`` keeps the native size. Raises :class:`DataError` for
    unreadable, truncated, empty or unsupported files and for frames of mixed sizes.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file")
    frames = ((p, fr) for fr in iter_frames(p, max_frames))
    try:
        return prepare_frames(frames, channels, size, resize, aspect, crop, where=p)
    except DataError as e:
        if e.problem == "no frames":
            raise DataError(p, "no frames could be decoded (empty or truncated file?)") from None
        raise


def find_video_files(root: Path) -> list[Path]:
    """Video and GIF files under ``root`` (recursive, symlinks followed), in natural name order."""
    found = []
    for d, dirs, files in walk(root):  # loop-safe, regular files only
        dirs.sort(key=natural_key)
        for f in sorted(files, key=natural_key):
            if not f.startswith(".") and is_video_file(f):
                found.append(Path(d) / f)
    return found


def video_specs(cfg: DataConfig, files: list[Path], root: Path, *, group_regex: str | None = None) -> list[SequenceSpec]:
    """One :class:`SequenceSpec` per video file; names are paths relative to ``root``."""
    fo = fit_options(cfg)
    maxf = opt_int(cfg, "max_frames")
    names = [f.name if f == root else os.path.relpath(f, root) for f in files]
    events = group_events(names, group_regex, cfg.path)
    specs = []
    for f, n, e in zip(files, names, events):
        def load(f=f):
            return read_video(f, cfg.channels, fo["size"], fo["mode"], aspect=fo["aspect"], crop=fo["crop"],
                              max_frames=maxf), None
        specs.append(SequenceSpec(n, e, [f], load))
    return specs


@register_dataset("video", extra=CLIP_KEYS + ("group_regex",))
def build_video(cfg: DataConfig) -> dict:
    """Clips from one video file or a folder of video files (each file one sequence)."""
    root = require_path(cfg, "a video file or a folder of video files")
    if root.is_file():
        if not is_video_file(root):
            raise DataError(root, f"unsupported video format '{root.suffix}'; known: "
                                  f"{', '.join(sorted(VIDEO_EXTS | GIF_EXTS))}")
        files = [root]
    else:
        files = find_video_files(root)
        if not files:
            raise DataError(root, "empty folder: no video files found")
    specs = video_specs(cfg, files, root, group_regex=opt(cfg, "group_regex"))
    return build_clip_datasets(cfg, "video", specs, what="sequences")

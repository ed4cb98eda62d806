"""Shared machinery of the file readers (video, frame folders, KTH, radar, HDF5).

A reader finds its *sequences* (a video file, a folder of frames, a gap-free run of radar
frames), each belonging to an *event* (the unit that a split never cuts: a radar event folder,
a KTH person, or the sequence itself), and hands them to :func:`build_clip_datasets`, which

1. decodes every sequence once into *prepared* frames: ``(T, C, H, W)`` at the final size and
   channel count, stored as ``uint8`` (images, video) or ``float16`` in [0, 1] (radar, with a
   ``bool`` validity mask);
2. keeps them in memory, or, with ``cfg.cache_dir``, in an on-disk cache that later runs open
   with ``mmap`` instead of decoding again (see :func:`cache_key`);
3. splits the *events* into train / val / test by ``cfg.split`` (deterministic, never one event
   in two splits) or by an explicit ``extra["splits"]`` mapping;
4. cuts each sequence into clips of ``cfg.frames`` frames, a new clip every ``cfg.stride``
   frames; a clip never crosses the end of a sequence (a radar time gap ends a sequence).

The helpers for channels (:func:`to_channels`) and size (:func:`fit_frames`,
:func:`fit_masked`) are shared by all readers, so every reader treats ``cfg.channels``,
``cfg.size`` and ``cfg.resize`` alike.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..choices import RESIZE_MODES, problem
from ..files import atomic_folder
from ..progress import BlockProgress
from .errors import DataError
from .registry import DataConfig

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
_PROGRESS_AFTER_S = 5.0  # reading expected to take longer than this shows its progress
# ``extra`` keys that only steer the split / windowing; they do not change the prepared frames,
# so they stay out of the cache key.
SPLIT_ONLY_KEYS = frozenset({"splits", "split_order", "group_regex"})
#: ``extra`` keys every reader built on :func:`build_clip_datasets` reads: the region and aspect
#: (:func:`fit_options`), the split (:func:`make_splits`: ``splits``, ``split_order``, ``blocks``)
CLIP_KEYS = ("aspect", "crop", "splits", "split_order", "blocks", "max_frames")
# ITU-R BT.601 luma weights (the same as Pillow's "L" conversion).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_bytes(path: Any, n: int = -1) -> bytes:
    """The first ``n`` bytes of a file (all with ``n = -1``): for sniffing a format or parsing a
    small file; an OS error is a :class:`DataError` naming the file."""
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None


def unit_floats(a: np.ndarray, path: Any, what: str = "float values") -> np.ndarray:
    """Float frames as float32 in [0, 1]: NaN, infinities or values outside [0, 1] (beyond
    rounding) are a :class:`DataError` naming ``path`` -- scaling unknown values would be a guess."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(path, f"{what} hold NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise DataError(path, f"{what} span [{lo:.4g}, {hi:.4g}]; frames must be in [0, 1] (rescale them)")
    return np.clip(a, 0.0, 1.0)


def why(e: BaseException, path: Any = None) -> str:
    """``"TypeName: message"`` of a library exception, without the file path it may repeat and
    cut to a reasonable length (the :class:`DataError` already names the file)."""
    msg = str(e)
    if path is not None:
        for form in {os.fspath(path), os.path.abspath(os.fspath(path))}:
            msg = msg.replace(f"'{form}'", "").replace(form, "")
    msg = " ".join(msg.split()).strip(" :") or "no details"
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(e).__name__}: {msg}"


# --------------------------------------------------------------------------------------------
# names and times
# --------------------------------------------------------------------------------------------
def natural_key(name: str) -> tuple:
    """Sort key that orders ``frame2`` before ``frame10`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts)


def parse_time(name: str, regex: str | re.Pattern, fmt: str | None = None) -> float | None:
    """Time stamp (seconds, or the bare number) parsed from a file name; ``None`` when absent.

    ``regex`` is searched in ``name``; its named group ``t`` (or else its first group, or else
    the whole match) is the time text. With ``fmt`` (a :func:`datetime.strptime` format) the
    text is a date and the result is seconds since the epoch (UTC, naive); without it the text
    must be a number (frame index, seconds, ...).
    """
    pat = re.compile(regex) if isinstance(regex, str) else regex
    m = pat.search(name)
    if m is None:
        return None
    if "t" in pat.groupindex:
        text = m.group("t")
    elif pat.groups:
        text = m.group(1)
    else:
        text = m.group(0)
    if fmt:
        try:
            return (datetime.strptime(text, fmt) - datetime(1970, 1, 1)).total_seconds()
        except ValueError:
            return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def split_at_gaps(times: list[float], max_gap: float | None = None) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of sorted ``times`` with no step larger than ``max_gap``.

    Without ``max_gap`` the gap limit is 1.5 × the median step (a radar archive every 5
    minutes with one missing file splits there). Fewer than 3 times: one run.
    """
    n = len(times)
    if n < 2:
        return [(0, n)] if n else []
    steps = np.diff(np.asarray(times, dtype=np.float64))
    if max_gap is None:
        if n < 3:
            return [(0, n)]
        max_gap = 1.5 * float(np.median(steps))
    runs, a = [], 0
    for i, s in enumerate(steps):
        if s > max_gap:
            runs.append((a, i + 1))
            a = i + 1
    runs.append((a, n))
    return runs


# --------------------------------------------------------------------------------------------
# channels and size
# --------------------------------------------------------------------------------------------
def to_channels(x: np.ndarray, channels: int, path: Any = None) -> np.ndarray:
    """``(T, H, W)`` or ``(T, H, W, C)`` (C = 1, 3 or 4; float) → ``(T, channels, H, W)`` float32.

    RGB → gray uses the BT.601 luma weights; gray → RGB repeats the channel; an alpha channel
    is dropped.
    """
    if channels not in (1, 3):
        raise DataError(path, f"channels must be 1 or 3, got {channels}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(path, f"cannot read frames of shape {tuple(x.shape)} as gray or RGB")
    if x.shape[-1] == 4:
        x = x[..., :3]
    c = x.shape[-1]
    if channels == 1 and c == 3:
        x = (x @ _LUMA)[..., None]
    elif channels == 3 and c == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _crop_box(h: int, w: int, size: int, mode: str, aspect: str, box, path) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of an (h, w) frame that is kept."""
    if box is not None:
        try:
            top, left, bh, bw = (int(v) for v in box)
        except (TypeError, ValueError):
            raise DataError(path, f"extra.crop must be [top, left, height, width], got {box!r}") from None
        if top < 0 or left < 0 or bh < 1 or bw < 1 or top + bh > h or left + bw > w:
            raise DataError(path, f"extra.crop {[top, left, bh, bw]} does not fit in a {h}x{w} frame")
        return top, left, bh, bw
    if mode == "crop":
        if h < size or w < size:
            raise DataError(path, f"frame of {h}x{w} is smaller than size {size}; use resize='resize'")
        return (h - size) // 2, (w - size) // 2, size, size
    if mode == "resize" and aspect == "crop":
        s = min(h, w)
        return (h - s) // 2, (w - s) // 2, s, s
    return 0, 0, h, w


def source_pixels_per_pixel(h: int, w: int, size: int | None, mode: str = "resize", aspect: str = "crop",
                            box=None) -> tuple[float, float]:
    """(down, across): how many pixels of an (h, w) source frame one pixel of the fitted frame
    spans (:func:`fit_masked`'s crop and resize); (1, 1) where nothing is resized. A reader turns
    its file's grid spacing into the spacing of its frames with it."""
    if size is None or mode != "resize":
        return 1.0, 1.0
    _, _, bh, bw = _crop_box(h, w, size, mode, aspect, box, None)
    return bh / size, bw / size


def _resize_tensor(t: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(out_hw):
        return t
    if t.shape[-2] >= out_hw[0] and t.shape[-1] >= out_hw[1]:
        return F.interpolate(t, size=out_hw, mode="area")  # exact area average when shrinking
    return F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)


def _check_fit_args(size, mode, aspect, path):
    if mode not in RESIZE_MODES:
        raise DataError(path, problem("resize", mode, RESIZE_MODES))
    if aspect not in ("crop", "stretch"):
        raise DataError(path, f"extra.aspect must be 'crop' or 'stretch', got {aspect!r}")
    if mode != "none" and (not isinstance(size, (int, np.integer)) or size < 1):
        raise DataError(path, f"size must be a positive integer, got {size!r}")


def fit_frames(x: np.ndarray, size: int | None, mode: str = "resize", *, aspect: str = "crop",
               crop=None, path: Any = None) -> np.ndarray:
    """Bring ``(T, C, H, W)`` frames to ``size × size``.

    * ``mode="resize"``: center-crop to a square first (``aspect="crop"``, default: no
      distortion) or not (``aspect="stretch"``), then area-average when shrinking (every source
      pixel counts, the right thing for radar fields and for aliasing-free video) or bilinear
      interpolation when growing;
    * ``mode="crop"``: the central ``size × size`` window, no scaling (frames must be at least
      that big);
    * ``mode="none"`` (or ``size=None``): unchanged.

    ``crop=[top, left, height, width]`` (``extra["crop"]``) picks a region in native pixels
    first, for every mode.
    """
    if size is None:
        mode = "none"
    _check_fit_args(size, mode, aspect, path)
    x = np.asarray(x, dtype=np.float32)
    h, w = x.shape[-2:]
    top, left, bh, bw = _crop_box(h, w, size, mode, aspect, crop, path)
    x = x[..., top:top + bh, left:left + bw]
    if mode != "resize":
        return np.ascontiguousarray(x)
    t = torch.from_numpy(np.ascontiguousarray(x))
    return _resize_tensor(t, (size, size)).numpy()


def fit_masked(values: np.ndarray, valid: np.ndarray, size: int | None, mode: str = "resize", *,
               aspect: str = "crop", crop=None, path: Any = None,
               min_valid: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_frames` for fields with missing values (radar).

    When shrinking, each output pixel is the mean over the *valid* source pixels under it, and
    it is valid when at least ``min_valid`` of them are; invalid output pixels are 0.
    """
    if size is None:
        mode = "none"
    _check_fit_args(size, mode, aspect, path)
    values = np.asarray(values, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    h, w = values.shape[-2:]
    top, left, bh, bw = _crop_box(h, w, size, mode, aspect, crop, path)
    values = values[..., top:top + bh, left:left + bw]
    valid = valid[..., top:top + bh, left:left + bw]
    values = np.where(valid, values, np.float32(0))
    if mode != "resize" or (bh, bw) == (size, size):
        return np.ascontiguousarray(values), np.ascontiguousarray(valid)
    m = torch.from_numpy(np.ascontiguousarray(valid, dtype=np.float32))
    v = torch.from_numpy(np.ascontiguousarray(values)) * m
    num = _resize_tensor(v, (size, size))
    den = _resize_tensor(m, (size, size))
    out_valid = den >= min_valid - 1e-6
    out = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    out = torch.where(out_valid, out, torch.zeros_like(out))
    return out.numpy(), out_valid.numpy()


def quantize_uint8(x: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] → uint8 (rounded)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
def opt(cfg: DataConfig, key: str, default=None):
    """``cfg.extra[key]`` or ``default``."""
    extra = cfg.extra or {}
    if not isinstance(extra, dict):
        raise DataError(cfg.path, f"extra must be a mapping, got {type(extra).__name__}")
    return extra.get(key, default)


def window_inflow(cfg: DataConfig) -> str | None:
    """The inflow of a reader that can read a sub-window of its field (``extra.crop``, or an
    ``isel`` / ``sel`` selection of a gridded file): there the frame edge lies inside the scene,
    where rain does come in, so the reference nowcasts keep the last frame where nothing is known
    (``"last"``); zeros there handicapped every optical-flow nowcast on tiles of wide rain. None
    (the default for the kind of data: zero for rain) when the whole field is read."""
    return "last" if any(opt(cfg, k) is not None for k in ("crop", "isel", "sel")) else None


def opt_int(cfg: DataConfig, key: str, default=None, minimum: int = 1):
    v = opt(cfg, key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise DataError(cfg.path, f"extra.{key} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def opt_float(cfg: DataConfig, key: str, default=None, positive: bool = False):
    v = opt(cfg, key, default)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DataError(cfg.path, f"extra.{key} must be a number, got {v!r}") from None
    if not math.isfinite(f) or (positive and f <= 0):
        raise DataError(cfg.path, f"extra.{key} must be a {'positive ' if positive else ''}finite number, got {v!r}")
    return f


def fit_options(cfg: DataConfig) -> dict:
    """The size options every reader passes to :func:`fit_frames` / :func:`fit_masked`."""
    return {"size": cfg.size, "mode": cfg.resize, "aspect": opt(cfg, "aspect", "crop"),
            "crop": opt(cfg, "crop")}


def require_path(cfg: DataConfig, what: str) -> Path:
    if not cfg.path:
        raise DataError(None, f"dataset '{cfg.name}' needs path: {what}")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise DataError(p, "no such file or folder")
    return p


# --------------------------------------------------------------------------------------------
# sequences, prepared store, cache
# --------------------------------------------------------------------------------------------
@dataclass
class SequenceSpec:
    """One sequence a reader found, not decoded yet.

    ``load()`` returns ``(frames, mask)``: frames ``(T, C, H, W)`` uint8 or float16 at the final
    size, mask ``(T, 1, H, W)`` bool or ``None``. ``files`` fingerprint the cache.
    """
    name: str
    event: str
    files: list[Path]
    load: Callable[[], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class Prepared:
    """All prepared sequences, concatenated along time (in memory or memory-mapped)."""
    data: np.ndarray | None
    mask: np.ndarray | None
    names: list[str]
    events: list[str]
    offsets: list[int]
    lengths: list[int]
    cache_path: str | None = None
    meta: dict = field(default_factory=dict)

    def __getstate__(self):  # DataLoader workers reopen the memmap instead of pickling it
        st = dict(self.__dict__)
        if self.cache_path is not None:
            st["data"] = st["mask"] = None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        if self.cache_path is not None and self.data is None:
            self.data, self.mask = _open_arrays(Path(self.cache_path))

    def sequence(self, i: int) -> np.ndarray:
        a = self.offsets[i]
        return self.data[a:a + self.lengths[i]]


def _fingerprint(files: Iterable[Path]) -> list:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([os.path.abspath(f), -1, -1])
    return out


def cache_key(cfg: DataConfig, reader: str, files: Iterable[Path], params: dict | None = None) -> tuple[str, dict]:
    """``(key, meta)``: the key names the cache folder; ``meta`` is the JSON stored beside it.

    The key hashes everything that changes the prepared frames: the reader, the resolved
    path, ``size``, ``channels``, ``resize``, ``extra`` (less the split-only keys
    ``splits``, ``split_order``, ``group_regex``), reader parameters, and the path, size and
    modification time of every input file. ``frames``, ``stride``, ``split`` and ``seed`` act
    after the cache (windowing and splitting are cheap views on the memory map), so changing
    them reuses the same prepared frames.
    """
    extra = {k: v for k, v in (cfg.extra or {}).items() if k not in SPLIT_ONLY_KEYS}
    meta = {
        "cache_version": CACHE_VERSION,
        "reader": reader,
        "path": os.path.abspath(os.fspath(cfg.path)) if cfg.path else None,
        "size": cfg.size,
        "channels": cfg.channels,
        "resize": cfg.resize,
        "extra": extra,
        "params": params or {},
        "files": _fingerprint(files),
    }
    blob = json.dumps(meta, sort_keys=True, default=str).encode()
    return f"{reader}-{hashlib.sha256(blob).hexdigest()[:20]}", meta


def _open_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    data = np.load(folder / "frames.npy", mmap_mode="r", allow_pickle=False)
    mpath = folder / "mask.npy"
    mask = np.load(mpath, mmap_mode="r", allow_pickle=False) if mpath.exists() else None
    return data, mask


def _open_cache(folder: Path) -> Prepared | None:
    try:
        info = json.loads((folder / "index.json").read_text())
        data, mask = _open_arrays(folder)
        total = sum(info["lengths"])
        if data.shape[0] != total or (mask is not None and mask.shape[0] != total):
            return None
        if mask is None and info.get("has_mask"):
            return None
        return Prepared(data, mask, info["names"], info["events"], info["offsets"], info["lengths"],
                        cache_path=str(folder), meta=info)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _write_cache(root: Path, key: str, prep: Prepared, meta: dict) -> Prepared:
    """Write atomically: everything goes into a temporary folder that is renamed at the end."""
    final = root / key
    try:
        with atomic_folder(final, replace=True) as tmp:  # a stale or broken copy is replaced
            np.save(tmp / "frames.npy", np.ascontiguousarray(prep.data))
            if prep.mask is not None:
                np.save(tmp / "mask.npy", np.ascontiguousarray(prep.mask))
            info = dict(meta, names=prep.names, events=prep.events, offsets=prep.offsets,
                        lengths=prep.lengths, has_mask=prep.mask is not None,
                        dtype=str(prep.data.dtype), shape=list(prep.data.shape))
            with open(tmp / "index.json", "w") as fh:
                json.dump(info, fh, indent=1, default=str)
    except OSError as e:  # also when another process renamed its copy in at the same moment
        if not (final / "index.json").is_file():
            warnings.warn(f"{root}: cannot write the data cache ({e}); continuing without it")
            return prep
    opened = _open_cache(final)
    return opened if opened is not None else prep


def prepare(cfg: DataConfig, reader: str, specs: list[SequenceSpec], params: dict | None = None) -> Prepared:
    """Decode every sequence (or open the cache that holds them) into one :class:`Prepared`."""
    if not specs:
        raise DataError(cfg.path, "no sequences found (empty folder?)")
    files = [f for s in specs for f in s.files]
    key = meta = None
    if cfg.cache_dir:
        key, meta = cache_key(cfg, reader, files, params)
        hit = _open_cache(Path(cfg.cache_dir).expanduser() / key)
        if hit is not None and hit.names == [s.name for s in specs]:
            hit.events = [s.event for s in specs]  # grouping is cheap and may change (group_regex)
            return hit
    datas, masks, lengths = [], [], []
    shape0 = None
    # reading that will take more than a few seconds says how far it is (a bar on a terminal, else
    # a plain line per ~10 %, on standard error); judged after the first sequence
    bar = BlockProgress(len(specs), f"reading {reader} data", unit="sequence", after_s=_PROGRESS_AFTER_S)
    for k, s in enumerate(specs):
        data, mask = s.load()
        bar.update(k + 1, len(specs))
        if data.ndim != 4 or data.shape[0] == 0:
            raise DataError(s.files[0] if s.files else cfg.path, "no frames decoded")
        if shape0 is None:
            shape0 = (data.shape[1:], s.name)
        elif data.shape[1:] != shape0[0]:
            raise DataError(s.files[0] if s.files else cfg.path,
                            f"mixed frame sizes: {s.name} has frames of {tuple(data.shape[1:])}, "
                            f"{shape0[1]} has {tuple(shape0[0])}; set resize='resize' or 'crop'")
        datas.append(data)
        masks.append(mask)
        lengths.append(int(data.shape[0]))
    bar.close()
    has_mask = [m is not None for m in masks]
    if any(has_mask) and not all(has_mask):
        raise DataError(cfg.path, "internal: some sequences have a mask and some do not")
    data = np.concatenate(datas, axis=0) if len(datas) > 1 else datas[0]
    mask = (np.concatenate(masks, axis=0) if len(masks) > 1 else masks[0]) if all(has_mask) else None
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    prep = Prepared(data, mask, [s.name for s in specs], [s.event for s in specs], offsets, lengths)
    if cfg.cache_dir:
        prep = _write_cache(Path(cfg.cache_dir).expanduser(), key, prep, meta)
    return prep


# --------------------------------------------------------------------------------------------
# splits and clips
# --------------------------------------------------------------------------------------------
def _split_fractions(cfg: DataConfig) -> list[float]:
    try:
        fr = [float(v) for v in cfg.split]
    except (TypeError, ValueError):
        raise DataError(cfg.path, f"split must be 3 fractions (train, val, test), got {cfg.split!r}") from None
    if len(fr) != 3 or any(not math.isfinite(v) or v < 0 for v in fr) or sum(fr) <= 0:
        raise DataError(cfg.path, f"split must be 3 non-negative fractions (train, val, test), got {cfg.split!r}")
    s = sum(fr)
    return [v / s for v in fr]


def split_fractions(cfg: DataConfig) -> list[float]:
    """``cfg.split`` checked and normalised to sum 1 (what :func:`make_splits` cuts by)."""
    return _split_fractions(cfg)


def _order(events: list[str], how: str, path) -> list[str]:
    if how == "name":
        return sorted(events, key=natural_key)
    if how == "hash":  # fixed pseudo-random order, independent of cfg.seed and of the file system
        return sorted(events, key=lambda e: hashlib.sha1(e.encode()).hexdigest())
    raise DataError(path, f"extra.split_order must be 'hash' or 'name', got {how!r}")


def split_events(events: list[str], fractions, *, explicit: dict | None = None, order: str = "hash",
                 path: Any = None, what: str = "events") -> dict[str, list[str]]:
    """Assign whole events to splits: ``{"train": [...], "val": [...], "test": [...]}``.

    With ``explicit`` (``extra["splits"]``) the caller names the events of each split (events
    named nowhere are left out). Otherwise events are put in a fixed order (``"hash"``:
    pseudo-random but stable; ``"name"``: sorted by name, i.e. chronological for date-named
    radar events, so train precedes val precedes test in time) and cut by the fractions; every
    split with a positive fraction gets at least one event, so fewer events than such splits
    is an error.
    """
    events = list(dict.fromkeys(events))
    if explicit is not None:
        if not isinstance(explicit, dict) or set(explicit) - set(SPLITS):
            raise DataError(path, f"extra.splits must map some of {list(SPLITS)} to lists of {what}, got {explicit!r}")
        out, seen = {}, {}
        for sp in SPLITS:
            names = explicit.get(sp) or []
            if isinstance(names, str):
                names = [names]
            out[sp] = []
            for n in names:
                n = str(n)
                if n not in events:
                    raise DataError(path, f"extra.splits.{sp} names '{n}', which is not one of the {what} found: {', '.join(events)}")
                if n in seen:
                    raise DataError(path, f"extra.splits puts '{n}' in both {seen[n]} and {sp}")
                seen[n] = sp
                out[sp].append(n)
        return out
    fr = list(fractions)
    positive = [i for i, f in enumerate(fr) if f > 0]
    n = len(events)
    if n < len(positive):
        need = ", ".join(SPLITS[i] for i in positive)
        one = what[:-1] if what.endswith("s") else what
        raise DataError(path, f"only {n} {one if n == 1 else what} ({', '.join(events) or 'none'}) for "
                              f"{len(positive)} splits with a positive fraction ({need}); one {one} never goes "
                              f"into two splits: give more {what}, set a zero fraction (e.g. split=[1, 0, 0]), "
                              f"or name the {what} of each split with "
                              f"extra.splits={{'train': [...], 'val': [...], 'test': [...]}}"
                              + ("" if what == "blocks" else ", or cut each sequence into time blocks "
                                 "(train first, then val, then test) with extra.blocks: N"))
    counts = [0, 0, 0]
    for i in positive:
        counts[i] = max(1, int(math.floor(fr[i] * n)))
    while sum(counts) > n:  # take from the split that has the most above its share
        i = max((j for j in positive if counts[j] > 1), key=lambda j: counts[j] - fr[j] * n)
        counts[i] -= 1
    while sum(counts) < n:  # give to the split furthest below its share
        i = max(positive, key=lambda j: fr[j] * n - counts[j])
        counts[i] += 1
    ordered = _order(events, order, path)
    out, a = {}, 0
    for sp, c in zip(SPLITS, counts):
        out[sp] = ordered[a:a + c]
        a += c
    return out


def window_starts(length: int, frames: int, stride: int) -> range:
    """Start indices of the clips of ``frames`` frames, every ``stride`` frames."""
    return range(0, max(0, length - frames + 1), stride)


class ClipDataset(Dataset):
    """Clips of one split. Item ``i``: ``{"frames": float32 (T, C, H, W) in [0, 1]}`` (+ ``mask``).

    ``clips[i]`` is ``(sequence name, start frame)``; ``events`` the events this split holds.
    """

    def __init__(self, prep: Prepared, clips: list[tuple[int, int]], frames: int, events: list[str]):
        self.prep = prep
        self._clips = clips
        self.frames = frames
        self.events = list(events)

    @property
    def clips(self) -> list[tuple[str, int]]:
        return [(self.prep.names[i], s) for i, s in self._clips]

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        seq, start = self._clips[idx]
        a = self.prep.offsets[seq] + start
        raw = np.asarray(self.prep.data[a:a + self.frames])
        x = torch.from_numpy(raw.astype(np.float32))
        if raw.dtype == np.uint8:
            x = x / 255.0
        item = {"frames": x}
        if self.prep.mask is not None:
            item["mask"] = torch.from_numpy(np.array(self.prep.mask[a:a + self.frames], dtype=bool))
        return item


def _time_blocks(cfg: DataConfig, prep: Prepared, usable: list[int], n_blocks: int):
    """``[(sequence, start, stop, event)]``: every usable sequence cut into ``n_blocks``
    contiguous blocks of at least ``frames`` (a short tail joins the block before it), each its own
    event ``<event>/bNNN``, as the ``xarray`` reader cuts a long series."""
    T = int(cfg.frames)
    out = []
    for i in usable:
        n = prep.lengths[i]
        size = max(T, math.ceil(n / n_blocks))
        parts = [[a, min(a + size, n)] for a in range(0, n, size)]
        if len(parts) > 1 and parts[-1][1] - parts[-1][0] < T:
            parts[-2][1] = parts.pop()[1]
        out += [(i, a, b, f"{prep.events[i]}/b{k:03d}") for k, (a, b) in enumerate(parts)]
    return out


def make_splits(cfg: DataConfig, prep: Prepared, *, order: str = "hash", what: str = "events",
                blocks: bool = True) -> dict[str, ClipDataset]:
    """Window the prepared sequences and split them by event (see :func:`split_events`). With
    ``extra.blocks`` (and ``blocks``, for readers that do not cut their series themselves) every
    sequence is first cut into that many contiguous time blocks, the events of the split, put in
    time order (``split_order`` default ``name``): one long sequence splits without cutting a clip."""
    T = cfg.frames
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise DataError(cfg.path, f"frames must be a positive integer, got {T!r}")
    if isinstance(cfg.stride, bool) or not isinstance(cfg.stride, (int, np.integer)) or cfg.stride < 1:
        raise DataError(cfg.path, f"stride must be a positive integer, got {cfg.stride!r}")
    fractions = _split_fractions(cfg)
    usable = [i for i, n in enumerate(prep.lengths) if n >= T]
    if not usable:
        longest = max(prep.lengths)
        raise DataError(cfg.path, f"too few frames: the longest sequence has {longest}, a clip needs "
                                  f"frames={T}")
    short = [prep.names[i] for i in range(len(prep.names)) if prep.lengths[i] < T]
    if short:
        warnings.warn(f"{cfg.path}: {len(short)} sequence(s) shorter than frames={T} are left out: "
                      f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}")
    n_blocks = opt_int(cfg, "blocks") if blocks else None
    if n_blocks:
        parts = _time_blocks(cfg, prep, usable, n_blocks)
        order = "name"
    else:
        parts = [(i, 0, prep.lengths[i], prep.events[i]) for i in usable]
    explicit = opt(cfg, "splits")
    # explicit names are checked against every event found; fractions share out the usable ones
    every = prep.events if explicit is not None and not n_blocks else [p[3] for p in parts]
    events = list(dict.fromkeys(every))
    groups = split_events(events, fractions, explicit=explicit, order=opt(cfg, "split_order", order),
                          path=cfg.path, what=what if not n_blocks else "blocks")
    out = {}
    for sp in SPLITS:
        evs = set(groups[sp])
        clips = [(i, a + s) for i, a, b, ev in parts if ev in evs for s in window_starts(b - a, T, cfg.stride)]
        out[sp] = ClipDataset(prep, clips, T, groups[sp])
    return out


def build_clip_datasets(cfg: DataConfig, reader: str, specs: list[SequenceSpec], *, order: str = "hash",
                        what: str = "events", params: dict | None = None, blocks: bool = True) -> dict[str, ClipDataset]:
    """:func:`prepare` then :func:`make_splits`: what every reader's registered builder returns."""
    prep = prepare(cfg, reader, specs, params)
    return make_splits(cfg, prep, order=order, what=what, blocks=blocks)


def group_events(names: list[str], regex: str | None, path=None) -> list[str]:
    """Event of each sequence name: the first match of ``regex`` (e.g. ``person\\d+``), else the name."""
    if not regex:
        return list(names)
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise DataError(path, f"extra.group_regex is not a valid regular expression: {e}") from None
    out = []
    for n in names:
        m = pat.search(n)
        out.append(m.group(0) if m else n)
    return out

"""Readers for clips stored as NumPy arrays: the Moving MNIST ``.npy`` and PredRNN's ``.npz``.

``npy`` (``DataConfig.name = "npy"``): one array, by default in the layout of the standard Moving
MNIST file ``mnist_test_seq.npy``: ``[T, N, H, W]`` (20 frames × 10,000 sequences × 64 × 64,
uint8). Other layouts through ``cfg.extra["layout"]``: ``"TNHW"`` (default), ``"NTHW"``,
``"NTCHW"``, ``"NTHWC"``. The file is memory-mapped; frames are read when an item is asked for.

``npz`` (``DataConfig.name = "npz"``): PredRNN's layout, keys
  * ``clips``: int ``(2, n, 2)``: ``clips[0, i] = [start, length]`` of the input part of sequence
    ``i`` and ``clips[1, i]`` the same for its output part, which must follow the input directly;
  * ``dims``: ``(1, 3)`` = ``(C, H, W)``;
  * ``input_raw_data``: ``(N_frames, C, H, W)``, uint8 or float in [0, 1].
An uncompressed archive (``np.savez``) is memory-mapped; a compressed one is read into memory.

Both: values are uint8 (divided by 255) or float already in [0, 1] (checked once, at build);
sequences are split contiguously, in file order, into train / val / test by ``cfg.split`` (normalised
to sum 1; with ``extra.blocks: N`` each sequence is first cut into N contiguous time blocks, so one
long sequence splits by time: train first, then val, then test); each
sequence gives windows of ``cfg.frames`` frames starting every ``cfg.stride`` frames (a sequence
shorter than ``cfg.frames`` is an error); frames are resized (``cfg.resize = "resize"``, area
interpolation to ``size × size``), centre-cropped (``"crop"``) or kept (``"none"``); channels
are converted 3 → 1 (luma) or 1 → 3 (repeat) to match ``cfg.channels``.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError
from .registry import DataConfig, register_dataset

NPY_LAYOUTS = ("TNHW", "NTHW", "NTCHW", "NTHWC")
NPZ_KEYS = ("clips", "dims", "input_raw_data")
RESIZE_MODES = ("resize", "crop", "none")
_FLOAT_TOL = 1e-6
_CHECK_CHUNK = 1 << 24  # elements per block when checking the value range of float arrays


# --------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------
def open_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an ``.npy`` file (read-only). :class:`DataError` if missing or not an ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if zipfile.is_zipfile(path):
        raise DataError(path, "is an .npz archive, not an .npy array (use the 'npz' reader)")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataError(path, "not an .npy file (no NumPy header)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if "object" in str(e).lower():
            raise DataError(path, "holds Python objects; only numeric arrays are supported") from None
        raise DataError(path, f"not a readable .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(path, "not an .npy array")
    return arr


def _npz_member_memmap(path: Path, name: str) -> np.ndarray | None:
    """Memory-map member ``name`` of an uncompressed npz; ``None`` when that is not possible."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(name + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject:
        return None
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PredRNN keys of an ``.npz``; ``input_raw_data`` memory-mapped when stored uncompressed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise DataError(path, "not an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(path, f"missing key(s) {', '.join(missing)}; the PredRNN layout needs "
                                      f"{', '.join(NPZ_KEYS)} (found: {', '.join(z.files) or 'none'})")
            out = {k: z[k] for k in ("clips", "dims")}
            raw = _npz_member_memmap(path, "input_raw_data")
            out["input_raw_data"] = raw if raw is not None else z["input_raw_data"]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, f"not a readable .npz file ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _check_values(path: Path, arr: np.ndarray) -> None:
    if arr.dtype == np.uint8:
        return
    if arr.dtype.kind != "f":
        raise DataError(path, f"unsupported dtype {arr.dtype}; expected uint8 (0..255) or float in [0, 1]")
    contiguous = arr.flags.c_contiguous or arr.flags.f_contiguous
    flat = arr.reshape(-1, order="A") if contiguous else np.asarray(arr).ravel()  # a view, no copy, if contiguous
    lo, hi = np.inf, -np.inf
    for i in range(0, flat.size, _CHECK_CHUNK):
        block = np.asarray(flat[i:i + _CHECK_CHUNK])
        if np.isnan(block).any():
            raise DataError(path, "float data contains NaN")
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if lo < -_FLOAT_TOL or hi > 1 + _FLOAT_TOL:
        raise DataError(path, f"float values must be in [0, 1], found [{lo:g}, {hi:g}]; rescale them first")


def _split_counts(path: Path, n: int, fractions, what: str = "sequences") -> list[int]:
    """Units (sequences, or time blocks) per split: the fractions normalised to sum 1, as every
    reader cuts them (``split: [21, 3, 7]`` is 21/31, 3/31, 7/31)."""
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        fr = []
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0 or not all(np.isfinite(fr)):
        raise DataError(path, f"split must be three non-negative fractions (train, val, test), got {list(fractions)}")
    total = sum(fr)
    fr = [f / total for f in fr]
    n_train, n_val = int(n * fr[0]), int(n * fr[1])
    counts = [n_train, n_val, n - n_train - n_val]
    for name, f, c in zip(("train", "val", "test"), fr, counts):
        if f > 0 and c == 0:
            hint = ("; cut long sequences into time blocks with extra.blocks: N" if what == "sequences" else "")
            raise DataError(path, f"{n} {what} are too few for a {name} split of {f:.3g}{hint}")
    return counts


def _units(lengths: np.ndarray, frames: int, n_blocks: int | None) -> list[tuple[int, int, int]]:
    """``(sequence, start, stop)`` in file order: whole sequences, or with ``extra.blocks`` each
    cut into that many contiguous time blocks of at least ``frames`` (a short tail joins the block
    before it), so that one long sequence splits into train / val / test by time."""
    out = []
    for s, n in enumerate(int(v) for v in lengths):
        if not n_blocks:
            out.append((s, 0, n))
            continue
        size = max(frames, -(-n // n_blocks))
        parts = [[a, min(a + size, n)] for a in range(0, n, size)]
        if len(parts) > 1 and parts[-1][1] - parts[-1][0] < frames:
            parts[-2][1] = parts.pop()[1]
        out += [(s, a, b) for a, b in parts]
    return out


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class _Source:
    """Frames of sequence ``s`` as ``(t, C, H, W)``; reopens its (memory-mapped) file after pickling."""

    def __init__(self, path: Path, kind: str, layout: str, array: np.ndarray, starts: np.ndarray | None = None):
        self.path, self.kind, self.layout, self.starts = path, kind, layout, starts
        self._array = array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = open_npy(self.path) if self.kind == "npy" else open_npz(self.path)["input_raw_data"]
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self._array, np.memmap) or self.kind == "npy":
            state["_array"] = None  # workers reopen the file instead of receiving a copy
        return state

    def read(self, s: int, t0: int, t1: int) -> np.ndarray:
        a = self.array
        if self.kind == "npz":
            st = int(self.starts[s])
            return np.asarray(a[st + t0: st + t1])
        if self.layout == "TNHW":
            return np.asarray(a[t0:t1, s])[:, None]
        if self.layout == "NTHW":
            return np.asarray(a[s, t0:t1])[:, None]
        if self.layout == "NTCHW":
            return np.asarray(a[s, t0:t1])
        return np.asarray(a[s, t0:t1]).transpose(0, 3, 1, 2)  # NTHWC


class ArrayClips(Dataset):
    """Windows of ``frames`` frames cut from sequences of an array; items ``{"frames": (T, C, H, W)}``."""

    def __init__(self, source: _Source, windows: np.ndarray, frames: int, in_channels: int, channels: int,
                 resize: str, size: int, hw: tuple[int, int]):
        self.source, self.windows, self.frames = source, windows, frames
        self.in_channels, self.channels, self.resize, self.size, self.hw = in_channels, channels, resize, size, hw

    @property
    def array(self) -> np.ndarray:
        """The underlying array (an ``np.memmap`` when the file could be memory-mapped)."""
        return self.source.array

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        s, t0 = (int(v) for v in self.windows[i])
        x = self.source.read(s, t0, t0 + self.frames)
        if x.dtype == np.uint8:
            t = torch.from_numpy(np.array(x, dtype=np.float32)).div_(255.0)  # a writable copy
        else:
            t = torch.from_numpy(np.array(x, dtype=np.float32)).clamp_(0.0, 1.0)
        if self.in_channels != self.channels:
            if self.channels == 1:  # RGB -> luma (ITU-R BT.601)
                w = torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype).view(1, 3, 1, 1)
                t = (t * w).sum(1, keepdim=True)
            else:
                t = t.expand(-1, self.channels, -1, -1).contiguous()
        H, W = self.hw
        if self.resize == "resize" and (H, W) != (self.size, self.size):
            t = F.interpolate(t, size=(self.size, self.size), mode="area")
        elif self.resize == "crop" and (H, W) != (self.size, self.size):
            top, left = (H - self.size) // 2, (W - self.size) // 2
            t = t[:, :, top:top + self.size, left:left + self.size].contiguous()
        return {"frames": t}


def _build(cfg: DataConfig, source: _Source, lengths: np.ndarray, in_channels: int, hw: tuple[int, int]) -> dict:
    path = source.path
    frames, stride = int(cfg.frames), int(cfg.stride)
    if frames < 1:
        raise DataError(path, f"frames must be >= 1, got {frames}")
    if stride < 1:
        raise DataError(path, f"stride must be >= 1, got {stride}")
    short = np.flatnonzero(lengths < frames)
    if len(short):
        raise DataError(path, f"sequence {int(short[0])} has {int(lengths[short[0]])} frames, fewer than "
                              f"frames={frames} ({len(short)} such sequences)")
    if cfg.resize not in RESIZE_MODES:
        raise DataError(path, f"resize must be one of {', '.join(RESIZE_MODES)}, got '{cfg.resize}'")
    if cfg.resize == "crop" and min(hw) < cfg.size:
        raise DataError(path, f"frames of {hw[0]}x{hw[1]} are smaller than the crop size {cfg.size}")
    if in_channels != cfg.channels and {in_channels, cfg.channels} != {1, 3}:
        raise DataError(path, f"data has {in_channels} channels, cannot convert to channels={cfg.channels}")
    n_blocks = (cfg.extra or {}).get("blocks")
    if n_blocks is not None and (isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1):
        raise DataError(path, f"extra.blocks must be an integer >= 1, got {n_blocks!r}")
    units = _units(lengths, frames, n_blocks)
    counts = _split_counts(path, len(units), cfg.split, "time blocks" if n_blocks else "sequences")
    out, first = {}, 0
    for name, count in zip(("train", "val", "test"), counts):
        wins = [(s, t0) for s, a, b in units[first:first + count] for t0 in range(a, b - frames + 1, stride)]
        windows = np.asarray(wins, dtype=np.int64).reshape(-1, 2)
        out[name] = ArrayClips(source, windows, frames, in_channels, int(cfg.channels), cfg.resize, int(cfg.size), hw)
        first += count
    return out


def _require_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError(None, f"data.path is required for the '{cfg.name}' reader")
    return Path(cfg.path)


@register_dataset("npy", extra=("layout", "blocks"))
def build_npy(cfg: DataConfig) -> dict:
    """Moving MNIST style ``.npy`` (default layout ``[T, N, H, W]``), memory-mapped."""
    path = _require_path(cfg)
    layout = str(cfg.extra.get("layout", "TNHW")).upper()
    if layout not in NPY_LAYOUTS:
        raise DataError(path, f"unknown layout '{layout}'; expected one of {', '.join(NPY_LAYOUTS)}")
    arr = open_npy(path)
    if arr.ndim != len(layout):
        raise DataError(path, f"expected a {len(layout)}-d array [{', '.join(layout)}], got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise DataError(path, f"empty array of shape {tuple(arr.shape)}")
    dims = dict(zip(layout, arr.shape))
    C = dims.get("C", 1)
    if C not in (1, 3):
        raise DataError(path, f"expected 1 or 3 channels, got {C} (shape {tuple(arr.shape)}, layout {layout})")
    _check_values(path, arr)
    lengths = np.full(dims["N"], dims["T"], dtype=np.int64)
    return _build(cfg, _Source(path, "npy", layout, arr), lengths, C, (dims["H"], dims["W"]))


@register_dataset("npz", extra=("blocks",))
def build_npz(cfg: DataConfig) -> dict:
    """PredRNN ``.npz`` (``clips``, ``dims``, ``input_raw_data``)."""
    path = _require_path(cfg)
    z = open_npz(path)
    clips, dims, raw = z["clips"], z["dims"], z["input_raw_data"]
    if clips.dtype.kind not in "iu" or clips.ndim != 3 or clips.shape[0] != 2 or clips.shape[2] != 2:
        raise DataError(path, f"'clips' must be an integer array of shape (2, n_clips, 2), got {clips.dtype} {clips.shape}")
    if clips.shape[1] == 0:
        raise DataError(path, "'clips' holds no sequence")
    if dims.dtype.kind not in "iu" or dims.shape != (1, 3):
        raise DataError(path, f"'dims' must be an integer array of shape (1, 3) = (C, H, W), got {dims.dtype} {dims.shape}")
    if raw.ndim != 4:
        raise DataError(path, f"'input_raw_data' must be 4-d (N_frames, C, H, W), got shape {tuple(raw.shape)}")
    if tuple(int(v) for v in dims[0]) != tuple(raw.shape[1:]):
        raise DataError(path, f"inconsistent 'dims' {tuple(int(v) for v in dims[0])} and 'input_raw_data' frames "
                              f"{tuple(raw.shape[1:])}")
    C = int(raw.shape[1])
    if C not in (1, 3):
        raise DataError(path, f"expected 1 or 3 channels, got {C}")
    c = clips.astype(np.int64)
    in_start, in_len, out_start, out_len = c[0, :, 0], c[0, :, 1], c[1, :, 0], c[1, :, 1]
    bad = np.flatnonzero((in_start < 0) | (in_len < 1) | (out_len < 0) | (out_start != in_start + in_len)
                         | (out_start + out_len > raw.shape[0]))
    if len(bad):
        i = int(bad[0])
        raise DataError(path, f"inconsistent 'clips' at sequence {i}: input [start {in_start[i]}, length {in_len[i]}], "
                              f"output [start {out_start[i]}, length {out_len[i]}] (output must follow the input, "
                              f"within {raw.shape[0]} frames); {len(bad)} bad sequences")
    _check_values(path, raw)
    source = _Source(path, "npz", "NTCHW", raw, starts=in_start)
    return _build(cfg, source, in_len + out_len, C, (int(raw.shape[2]), int(raw.shape[3])))

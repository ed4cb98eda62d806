"""Generic HDF5 / NetCDF4 precipitation arrays through h5py (``pip install transmem[radar]``).

Registered dataset ``"hdf5"``. ``cfg.path`` is one file or a folder searched recursively for
``.h5 .hdf5 .hdf .he5 .nc .nc4 .cdf`` files. In each file one dataset is read (``extra`` keys):

* ``dataset``: its path in the file (e.g. ``"/precip"``); without it, the file's only numeric
  2-D or 3-D dataset is taken (several: an error that lists them);
* ``time_axis`` (default 0): which axis of a 3-D dataset is time; a 4-D dataset with a
  singleton axis 1 (``(T, 1, H, W)``) is read as 3-D;
* ``scale``, ``offset``: physical value = raw · scale + offset (defaults: the CF attributes
  ``scale_factor`` / ``add_offset`` when present, else 1 and 0);
* ``nodata``: raw value, or list of raw values, that mean "no data" (default: the attributes
  ``_FillValue`` / ``missing_value`` when present); NaN and ±inf are always no data;
* ``undetect``: raw value(s) meaning "no rain" (R = 0);
* ``units``: what the physical value is: ``"mm/h"`` (default; negative rates become 0) or
  ``"dBZ"`` (converted by Z = a·R^b with ``a``, ``b``; defaults 223, 1.53);
* ``r_max`` (default 100 mm/h), ``aspect``, ``crop``: as for radar (:mod:`transmem.data.radar`).

A file with a 3-D dataset is one event (its frames in array order). Files with a 2-D dataset
are single frames: the files of one folder form one event, ordered by name (natural order) or
by the time in their names (``time_regex`` / ``time_format``, as for frame folders; with
``max_gap`` a larger step splits the sequence). NetCDF3 (classic) files are not HDF5 and are
rejected with a hint to convert them. Values become rain rate, then log-scaled [0, 1] with a
``mask`` of valid pixels, exactly as the radar readers do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .clips import (SequenceSpec, build_clip_datasets, fit_options, natural_key, opt, opt_float, opt_int,
                    parse_time, require_path, split_at_gaps, why)
from .errors import DataError
from .radar import FMI_A, FMI_B, R_MAX, dbz_to_rainrate, prepare_rain_frames, rain_units
from .registry import DataConfig, register_dataset

H5_EXTS = frozenset({".h5", ".hdf5", ".hdf", ".he5", ".nc", ".nc4", ".cdf"})
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_hdf5_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in H5_EXTS


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError(None, "reading HDF5/NetCDF4 needs h5py: pip install 'transmem[radar]'") from None
    return h5py


def open_h5(path: str | os.PathLike):
    """Open an HDF5 / NetCDF4 file read-only; every failure is a :class:`DataError`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    if head[:3] == b"CDF":
        raise DataError(path, "NetCDF3 (classic) file: only NetCDF4/HDF5 can be read; convert it "
                              "(e.g. nccopy -k nc4 in.nc out.nc)")
    h5py = _h5py()
    try:
        return h5py.File(os.fspath(path), "r")
    except Exception as e:  # OSError "unable to open", truncated superblock, ...
        kind = "not an HDF5 file" if head != _HDF5_MAGIC else "unreadable or truncated HDF5 file"
        raise DataError(path, f"{kind} ({why(e, path)})") from None


def _numeric_datasets(f) -> list[tuple[str, tuple]]:
    h5py = _h5py()
    out = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "iuf" and obj.ndim in (2, 3, 4):
            out.append(("/" + name, obj.shape))
    f.visititems(visit)
    return out


def pick_dataset(f, name: str | None, path):
    """The dataset to read: ``name``, or the only numeric 2-D/3-D dataset of the file."""
    h5py = _h5py()
    if name:
        try:
            ds = f[name]
        except Exception:
            found = ", ".join(n for n, _ in _numeric_datasets(f)) or "none"
            raise DataError(path, f"no dataset '{name}' in the file (numeric datasets: {found})") from None
        if not isinstance(ds, h5py.Dataset):
            raise DataError(path, f"'{name}' is a group, not a dataset")
        return ds
    cands = _numeric_datasets(f)
    if len(cands) != 1:
        listed = ", ".join(f"{n} {s}" for n, s in cands) or "none"
        raise DataError(path, f"set extra.dataset: the file has {len(cands)} numeric 2-D/3-D datasets ({listed})")
    return f[cands[0][0]]


def _attr(ds, *names):
    for n in names:
        if n in ds.attrs:
            try:
                v = np.asarray(ds.attrs[n], dtype=np.float64).ravel()
                if v.size:
                    return v
            except (TypeError, ValueError):
                continue
    return None


def _values(cfg: DataConfig, key: str):
    v = opt(cfg, key)
    if v is None:
        return None
    try:
        a = np.asarray(v if isinstance(v, (list, tuple)) else [v], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DataError(cfg.path, f"extra.{key} must be a number or a list of numbers, got {v!r}") from None
    return a


class _Reader:
    """How raw values of one dataset become rain rate (mm/h, NaN = no data)."""

    def __init__(self, cfg: DataConfig, ds, path):
        self.path = path
        kind = ds.dtype.kind
        if kind not in "iuf":
            raise DataError(path, f"dataset {ds.name} holds {ds.dtype}, not numbers")
        shape = ds.shape
        if len(shape) == 4 and shape[1] == 1:
            self.squeeze = True
            shape = (shape[0],) + shape[2:]
        elif len(shape) in (2, 3):
            self.squeeze = False
        else:
            raise DataError(path, f"dataset {ds.name} has shape {shape}; expected (H, W), (T, H, W) or (T, 1, H, W)")
        self.shape = shape
        self.time_axis = opt_int(cfg, "time_axis", 0, minimum=0) if len(shape) == 3 else None
        if self.time_axis is not None and self.time_axis > 2:
            raise DataError(path, f"extra.time_axis must be 0, 1 or 2, got {self.time_axis}")
        sc = opt_float(cfg, "scale")
        off = opt_float(cfg, "offset")
        a_sc, a_off = _attr(ds, "scale_factor", "gain"), _attr(ds, "add_offset", "offset")
        self.scale = sc if sc is not None else (float(a_sc[0]) if a_sc is not None else 1.0)
        self.offset = off if off is not None else (float(a_off[0]) if a_off is not None else 0.0)
        nd = _values(cfg, "nodata")
        self.nodata = nd if nd is not None else _attr(ds, "_FillValue", "missing_value", "nodata")
        self.undetect = _values(cfg, "undetect")
        self.units = opt(cfg, "units", "mm/h")
        if self.units not in ("mm/h", "dBZ"):
            raise DataError(cfg.path, f"extra.units must be 'mm/h' or 'dBZ', got {self.units!r}")
        self.a = opt_float(cfg, "a", FMI_A, positive=True)
        self.b = opt_float(cfg, "b", FMI_B, positive=True)

    @property
    def n_frames(self) -> int:
        return 1 if len(self.shape) == 2 else self.shape[self.time_axis]

    def frame(self, ds, t: int) -> np.ndarray:
        if len(self.shape) == 2:
            raw = ds[()]
        elif self.squeeze:
            raw = ds[t, 0]
        else:
            idx = [slice(None)] * 3
            idx[self.time_axis] = t
            raw = ds[tuple(idx)]
        raw = np.asarray(raw, dtype=np.float64)
        bad = ~np.isfinite(raw)
        if self.nodata is not None:
            bad |= np.isin(raw, self.nodata)
        zero = np.isin(raw, self.undetect) if self.undetect is not None else None
        phys = raw * self.scale + self.offset
        with np.errstate(invalid="ignore", over="ignore"):
            if self.units == "dBZ":
                r = dbz_to_rainrate(phys, self.a, self.b).astype(np.float64)
            else:
                r = np.maximum(phys, 0.0)
        if zero is not None:
            r[zero] = 0.0
        r[bad | ~np.isfinite(r)] = np.nan
        return r.astype(np.float32)


def read_h5_frames(cfg: DataConfig, files: list[Path], where=None) -> tuple[np.ndarray, np.ndarray]:
    """All frames of ``files`` (in order; each a 2-D or 3-D dataset) → ``(values, mask)``."""
    fo = fit_options(cfg)
    r_max = opt_float(cfg, "r_max", R_MAX, positive=True)
    maxf = opt_int(cfg, "max_frames")

    def frames():
        n = 0
        for p in files:
            f = open_h5(p)
            try:
                ds, rd = _guard(p, lambda: _dataset_reader(cfg, f, p))
                for t in range(rd.n_frames):
                    if maxf and n >= maxf:
                        return
                    try:
                        fr = rd.frame(ds, t)
                    except DataError:
                        raise
                    except Exception as e:  # h5py read errors on corrupt chunks, ...
                        raise DataError(p, f"cannot read frame {t} of {ds.name} ({why(e, p)})") from None
                    yield (p, fr)
                    n += 1
            finally:
                f.close()
    return prepare_rain_frames(frames(), fo, cfg.channels, r_max, where=where)


def _guard(p, fn):
    try:
        return fn()
    except DataError:
        raise
    except Exception as e:  # h5py errors on a damaged file
        raise DataError(p, f"unreadable HDF5 content ({why(e, p)})") from None


def _dataset_reader(cfg: DataConfig, f, p):
    ds = pick_dataset(f, opt(cfg, "dataset"), p)
    return ds, _Reader(cfg, ds, p)


def _dims(cfg: DataConfig, p: Path) -> int:
    f = open_h5(p)
    try:
        _, rd = _guard(p, lambda: _dataset_reader(cfg, f, p))
        return len(rd.shape)
    finally:
        f.close()


def _h5_specs(cfg: DataConfig) -> list[SequenceSpec]:
    root = require_path(cfg, "an HDF5/NetCDF4 file or a folder of them")
    if root.is_file():
        files = [root]
    else:
        files = []
        for d, dirs, fs in os.walk(root, followlinks=True):
            dirs.sort(key=natural_key)
            files += [Path(d) / f for f in sorted(fs, key=natural_key) if is_hdf5_file(f)]
        if not files:
            raise DataError(root, f"empty folder: no HDF5/NetCDF4 files ({', '.join(sorted(H5_EXTS))})")
    base = root.parent if root.is_file() else root
    specs = []
    singles: dict[Path, list[Path]] = {}
    for p in files:
        if _dims(cfg, p) == 3:
            name = os.path.relpath(p, base)
            specs.append(SequenceSpec(name, name, [p], lambda p=p: read_h5_frames(cfg, [p], where=p)))
        else:
            singles.setdefault(p.parent, []).append(p)
    regex, fmt = opt(cfg, "time_regex"), opt(cfg, "time_format")
    max_gap = opt_float(cfg, "max_gap", positive=True)
    for folder, fs in singles.items():
        event = folder.name if folder == base else os.path.relpath(folder, base)
        times = None
        if regex:
            try:
                pat = re.compile(regex)
            except re.error as e:
                raise DataError(cfg.path, f"extra.time_regex is not a valid regular expression: {e}") from None
            timed = []
            for p in fs:
                t = parse_time(p.name, pat, fmt)
                if t is None:
                    raise DataError(p, f"no time in the file name (time_regex={regex!r})")
                timed.append((t, p))
            timed.sort(key=lambda tp: (tp[0], natural_key(tp[1].name)))
            fs, times = [p for _, p in timed], [t for t, _ in timed]
        runs = split_at_gaps(times, max_gap) if (times and max_gap) else [(0, len(fs))]
        for k, (a, b) in enumerate(runs):
            part = fs[a:b]
            specs.append(SequenceSpec(event if len(runs) == 1 else f"{event}#{k}", event, part,
                                      lambda part=part, folder=folder: read_h5_frames(cfg, part, where=folder)))
    return specs


@register_dataset("hdf5", units=rain_units)
def build_hdf5(cfg: DataConfig) -> dict:
    """Clips of log-scaled rain rate (+ mask) from HDF5 / NetCDF4 arrays."""
    specs = _h5_specs(cfg)
    return build_clip_datasets(cfg, "hdf5", specs, order="name", what="events")


def describe(path: str | os.PathLike) -> list[tuple[str, tuple, str]]:
    """``(name, shape, dtype)`` of every dataset of a file, to help choose ``extra["dataset"]``."""
    h5py = _h5py()
    f = open_h5(path)
    out: list[Any] = []
    try:
        f.visititems(lambda n, o: out.append(("/" + n, o.shape, str(o.dtype))) if isinstance(o, h5py.Dataset) else None)
    finally:
        f.close()
    return out

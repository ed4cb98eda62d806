"""Generic HDF5 / NetCDF4 precipitation arrays through h5py (``pip install transmem[radar]``).

Registered dataset ``"hdf5"``. ``cfg.path`` is one file or a folder searched recursively for
``.h5 .hdf5 .hdf .he5 .nc .nc4 .cdf`` files. In each file one dataset is read (``extra`` keys):

* ``dataset``: its path in the file (e.g. ``"/precip"``); without it, the file's only numeric
  2-D or 3-D dataset is taken (several: an error that lists them);
* ``time_axis`` (default 0): which axis of a 3-D dataset is time; a 4-D dataset with a
  singleton axis 1 (``(T, 1, H, W)``) is read as 3-D;
* what the file declares is read first (:mod:`transmem.data.conventions`): ODIM ``what``
  groups (gain, offset, nodata, undetect, quantity; ``extra["quantity"]`` picks the dataset of
  an ODIM file), KNMI ``image1/calibration`` attributes, CF attributes; the keys below override it;
* ``scale``, ``offset``: physical value = raw · scale + offset (default from the file, else 1, 0);
* ``nodata``: raw value, or list of raw values, that mean "no data" (default from the file;
  ``[]`` = none); NaN and ±inf are always no data. A file that declares none while a large share
  of its pixels holds a tell-tale fill value is refused, naming this key;
* ``undetect``: raw value(s) meaning "no rain" (R = 0);
* ``units``: what the physical value is: ``"mm/h"`` (default; negative rates become 0), ``"mm"``
  (an accumulation over ``accumulation_minutes``) or ``"dBZ"`` (converted by Z = a·R^b with
  ``a``, ``b``; defaults 200, 1.6 for ODIM / KNMI files as pysteps, else 223, 1.53);
* ``r_max`` (default 100 mm/h), ``aspect``, ``crop``: as for radar (:mod:`transmem.data.radar`).

A file with a 3-D dataset is one event (its frames in array order). Files with a 2-D dataset
are single frames: the files of one folder form one event, ordered by name (natural order) or
by the time in their names (``time_regex`` / ``time_format``, as for frame folders; with
``max_gap`` a larger step splits the sequence). NetCDF3 (classic) files are not HDF5 and are
rejected with a hint to read them with ``name: xarray``. Values become rain rate, then log-scaled [0, 1] with a
``mask`` of valid pixels, exactly as the radar readers do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .clips import (CLIP_KEYS, window_inflow, SequenceSpec, read_bytes, build_clip_datasets, fit_options, natural_key, opt, opt_float, opt_int,
                    parse_time, require_path, source_pixels_per_pixel, split_at_gaps, why)
from .errors import DataError
from ..files import walk
from .conventions import (MP_A, MP_B, UNITS, file_conventions, is_knmi, is_odim, odim_pick, refuse_undeclared_fill)
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
    head = read_bytes(path, 8)
    if head[:3] == b"CDF":
        raise DataError(path, "NetCDF3 (classic) file: not HDF5; read it with name: xarray "
                              "(pip install 'transmem[io]') or convert it (nccopy -k nc4 in.nc out.nc)")
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


def pick_dataset(f, name: str | None, path, quantity: str | None = None):
    """The dataset to read: ``name``, or the only numeric 2-D/3-D dataset of the file (in an ODIM
    file, the one whose quantity is ``quantity``, default the first of RATE, ACRR, DBZH, TH)."""
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
    if len(cands) > 1 and is_odim(f):  # ODIM: the dataset whose ``what/quantity`` is precipitation
        cands = odim_pick(f, cands, quantity, path)
    if len(cands) > 1 and "/image1/image_data" in dict(cands) and is_knmi(f["/image1/image_data"]):
        cands = [c for c in cands if c[0] == "/image1/image_data"]  # KNMI: not the colour palette
    if len(cands) != 1:
        listed = ", ".join(f"{n} {s}" for n, s in cands) or "none"
        raise DataError(path, f"set extra.dataset: the file has {len(cands)} numeric 2-D/3-D datasets ({listed})")
    return f[cands[0][0]]


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
        meta = file_conventions(ds, path)  # ODIM ``what`` / KNMI ``calibration`` / CF attributes
        self.convention = meta.get("convention", "CF")
        if "problem" in meta and opt(cfg, "units") is None and (meta["convention"] != "KNMI" or opt(cfg, "scale") is None):
            raise DataError(path, meta["problem"])
        sc = opt_float(cfg, "scale")
        off = opt_float(cfg, "offset")
        self.scale = sc if sc is not None else meta.get("scale", 1.0)
        self.offset = off if off is not None else meta.get("offset", 0.0)
        nd = _values(cfg, "nodata")
        self.nodata = nd if nd is not None else meta.get("nodata")
        ud = _values(cfg, "undetect")
        self.undetect = ud if ud is not None else meta.get("undetect")
        self.units = opt(cfg, "units") or meta.get("units") or "mm/h"
        if self.units not in UNITS:
            raise DataError(cfg.path, f"extra.units must be one of {', '.join(UNITS)}, got {self.units!r}")
        self.minutes = opt_float(cfg, "accumulation_minutes", positive=True) or meta.get("minutes")
        if self.units == "mm" and not self.minutes:
            raise DataError(path, f"{ds.name} holds accumulations (mm) over an unknown period: set "
                                  f"extra.accumulation_minutes")
        dza, dzb = (MP_A, MP_B) if self.convention in ("ODIM", "KNMI") else (FMI_A, FMI_B)
        self.a = opt_float(cfg, "a", dza, positive=True)
        self.b = opt_float(cfg, "b", dzb, positive=True)
        self.checked = False
        self.dtype = ds.dtype
        self.ds_name = ds.name

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
        if self.nodata is None and not self.checked:
            refuse_undeclared_fill(raw, self.dtype, self.path, self.ds_name, rain=self.units != "dBZ")
        self.checked = True
        bad = ~np.isfinite(raw)
        if self.nodata is not None:
            bad |= np.isin(raw, self.nodata)
        zero = np.isin(raw, self.undetect) if self.undetect is not None else None
        phys = raw * self.scale + self.offset
        with np.errstate(invalid="ignore", over="ignore"):
            if self.units == "dBZ":
                r = dbz_to_rainrate(phys, self.a, self.b).astype(np.float64)
            elif self.units == "mm":
                r = np.maximum(phys, 0.0) * (60.0 / self.minutes)
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
    ds = pick_dataset(f, opt(cfg, "dataset"), p, opt(cfg, "quantity"))
    return ds, _Reader(cfg, ds, p)


def _dims(cfg: DataConfig, p: Path) -> int:
    f = open_h5(p)
    try:
        _, rd = _guard(p, lambda: _dataset_reader(cfg, f, p))
        return len(rd.shape)
    finally:
        f.close()


def _h5_files(root: Path):
    """The HDF5/NetCDF4 files of a file or a folder, in natural order (loop-safe, regular files only)."""
    if root.is_file():
        yield root
        return
    for d, dirs, fs in walk(root):
        dirs.sort(key=natural_key)
        yield from (Path(d) / f for f in sorted(fs, key=natural_key) if is_hdf5_file(f))


def _h5_specs(cfg: DataConfig) -> list[SequenceSpec]:
    root = require_path(cfg, "an HDF5/NetCDF4 file or a folder of them")
    files = list(_h5_files(root))
    if not files:  # a folder without any
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


#: the ``extra`` keys of the HDF5 reader
HDF5_KEYS = CLIP_KEYS + ("dataset", "quantity", "scale", "offset", "nodata", "undetect", "units", "time_axis", "a",
                         "b", "accumulation_minutes", "r_max", "time_regex", "time_format", "max_gap")


#: the keys of a model's ``extra`` that say how ``predict`` reads its input's values (not which
#: files or frames training took: ``max_frames``, splits, ...)
INPUT_KEYS = ("dataset", "quantity", "scale", "offset", "nodata", "undetect", "units", "time_axis", "a", "b",
              "accumulation_minutes", "r_max", "time_regex", "time_format", "crop", "aspect")


def read_h5_input(path: str | os.PathLike, cfg: DataConfig, last: int | None = None):
    """``transmem predict``'s input for an HDF5 model (``register_dataset(read_input=)``): an HDF5
    file, or a folder of them in name order, read with the model's file conventions
    (:data:`INPUT_KEYS`); None for any other input (read by its extension)."""
    p = Path(path).expanduser()
    if p.is_file() and is_hdf5_file(p):
        files = [p]
    elif p.is_dir():
        try:
            named = [p / n for n in os.listdir(p) if is_hdf5_file(n)]
        except OSError as e:
            raise DataError(p, f"cannot list folder ({e.strerror or e})") from None
        odd = sorted(q for q in named if not (q.is_file() or q.is_dir()))  # a FIFO, device or socket
        if odd:
            raise DataError(odd[0], "named like an HDF5 file but not a regular file: the forecast would start from "
                                    "an older frame; remove it or give a folder of regular files")
        files = sorted((q for q in named if q.is_file()), key=lambda q: natural_key(q.name))
        if not files:
            return None
    else:
        return None
    extra = cfg.extra or {}
    read = DataConfig(name=cfg.name, path=os.fspath(p), size=None if cfg.resize == "none" else cfg.size,
                      channels=cfg.channels, resize=cfg.resize, extra={k: extra[k] for k in INPUT_KEYS if k in extra})
    x, mask = read_h5_frames(read, files, where=p)
    return np.ascontiguousarray(x, dtype=np.float32), mask, None


def odim_pixel_km(cfg: DataConfig) -> float | None:
    """km per pixel of the frames as read, from the first file's ODIM ``where`` group (``xscale``,
    ``yscale`` in metres, ``xsize``, ``ysize``) and the crop and resize of the config; None where
    the file says nothing (not ODIM, a polar volume) or the pixels are not square after fitting."""
    try:
        first = next(_h5_files(require_path(cfg, "an HDF5/NetCDF4 file or a folder of them")), None)
        if first is None:
            return None
        with open_h5(first) as f:
            where = dict(f["where"].attrs) if "where" in f else {}
    except (DataError, OSError):
        return None
    if not all(k in where for k in ("xscale", "yscale", "xsize", "ysize")):
        return None
    down, across = source_pixels_per_pixel(int(where["ysize"]), int(where["xsize"]), cfg.size, cfg.resize,
                                           opt(cfg, "aspect") or "crop", opt(cfg, "crop"))
    ky, kx = float(where["yscale"]) / 1e3 * down, float(where["xscale"]) / 1e3 * across
    return kx if abs(kx - ky) <= 0.01 * max(kx, ky) else None


@register_dataset("hdf5", units=rain_units, extra=HDF5_KEYS, read_input=read_h5_input, inflow=window_inflow,
                  pixel_km=odim_pixel_km)
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

"""Gridded fields through xarray: netCDF3 / netCDF4, GRIB, zarr (``pip install 'transmem[io]'``;
GRIB needs ``transmem[grib]``, zarr ``transmem[zarr]``).

Registered datasets:

* ``"xarray"`` -- any variable of any such source. ``cfg.path`` is a file, a zarr store, or a
  folder of files (all read and concatenated along time). ``extra`` keys:

  * ``variable``: the data variable (default: the only one with two or more dimensions);
  * ``engine``: xarray engine (default from the file: ``scipy`` for netCDF3, ``h5netcdf`` for
    netCDF4/HDF5, ``cfgrib`` for ``.grib*``, ``zarr`` for a ``.zarr`` store);
  * ``time``: the time coordinate (default ``valid_time``, then ``time``, then the first datetime
    coordinate); frames are sorted by it, two frames at one time are an error, and a step larger
    than ``max_gap`` seconds (default 1.5 × the median step) splits sequences, as for radar;
    ``time_regex`` / ``time_format`` take the time from the file names instead (one frame a file);
  * ``select: {dim: value}``: a value along a further dimension (a pressure level, an ensemble
    member; the nearest is taken); other dimensions of length 1 are dropped;
  * ``isel: {dim: [start, stop]}`` crops by index, ``sel: {dim: [lo, hi]}`` by coordinate range
    (either order); then ``size`` / ``resize`` / ``crop`` / ``aspect`` act as for every reader;
  * ``nodata``: value(s) that mean missing besides the CF ``_FillValue`` (which xarray already
    masks); a field that declares none while a large share of its pixels holds a tell-tale
    constant is refused (:func:`transmem.data.conventions.refuse_undeclared_fill`);
  * ``quantity``: ``rain`` (a rain rate in mm/h, log-scaled as radar; ``units: dBZ`` converts
    reflectivity by Z = a R^b) or ``field`` (anything else). Default: ``rain`` when the variable's
    ``units`` is a rain rate (``mm/h``, ``mm h-1``, or ``kg m-2 s-1`` times 3600), else ``field``;
  * ``normalize``: for a field, ``minmax`` (default: x = (v - lo) / (hi - lo), with lo, hi the
    train split's minimum and maximum widened by ``margin`` = 0.1 of the range each side) or
    ``meanstd`` (x = 0.5 + (v - mean) / (span · std), ``span`` = 8); values outside [0, 1] clip.
    The statistics are fitted on the **train split only** and written into
    ``extra["normalization"]`` of the config, so they are stored in the run's ``config.yaml`` and on
    the model card; a config that already holds them uses them as they are;
  * ``blocks`` (default 10): every gap-free sequence is cut into this many contiguous blocks
    (each at least ``frames`` long), the *events* that the split puts in train / val / test by time
    (``split_order: name``), so a single long series can be split without cutting a clip.

* ``"radar_mrms"`` -- NOAA MRMS ``PrecipRate`` GRIB2 files: the ``xarray`` reader with MRMS's
  conventions: cfgrib, rain rate in mm/h, ``-3`` = no coverage (masked, never rain), the time from
  the names ``PrecipRate_00.00_YYYYMMDD-hhmmss.grib2``.

The frames of every item are ``(T, C, H, W)`` in [0, 1] with a ``mask`` (True where valid).
:func:`read_grid_input` (both readers' ``read_input``) reads one input for ``transmem predict``
through :func:`read_grid`, with the run's options, and returns the frames with their times and
coordinates (after crop and resize), which :func:`write_forecast_netcdf` writes as CF-netCDF.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .clips import (CLIP_KEYS, window_inflow, SequenceSpec, read_bytes, build_clip_datasets, fit_frames, fit_masked, fit_options, natural_key, opt,
                    opt_float, opt_int, parse_time, require_path, split_at_gaps, split_events, split_fractions, why)
from .conventions import refuse_undeclared_fill
from .errors import DataError
from .radar import FMI_A, FMI_B, R_MAX, dbz_to_rainrate, rain_to_unit, rain_units
from .registry import DataConfig, Grid, Units, register_dataset

GRID_EXTS = frozenset({".nc", ".nc4", ".nc3", ".cdf", ".netcdf", ".grib", ".grib2", ".grb", ".grb2", ".zarr"})
_GRIB_EXTS = (".grib", ".grib2", ".grb", ".grb2")
_RATE_UNITS = {"mm/h", "mm h-1", "mm hr-1", "mm/hr", "mm.h-1", "mmh-1", "mm h**-1"}
_FLUX_UNITS = {"kg m-2 s-1", "kg m**-2 s**-1", "kg/m2/s", "mm s-1", "mm/s"}
NORMALIZE = ("minmax", "meanstd")
MARGIN, SPAN, BLOCKS = 0.1, 8.0, 10
MRMS_NODATA = -3.0
MRMS_TIME = (r"_(\d{8}-\d{6})\.grib2", "%Y%m%d-%H%M%S")


def _xr():
    try:  # before ecCodes: eckitlib's bundled PROJ loaded ahead of pyproj's crashes the process at exit
        import pyproj  # noqa: F401
    except ImportError:
        pass
    try:
        import xarray
    except ImportError:
        raise DataError(None, "reading netCDF / GRIB / zarr needs xarray: pip install 'transmem[io]'") from None
    return xarray


def is_grid_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in GRID_EXTS


def _engine(path: Path, engine: str | None) -> tuple[str, dict]:
    if engine:
        return engine, ({"indexpath": ""} if engine == "cfgrib" else {})
    if path.is_dir() or path.suffix.lower() == ".zarr":
        return "zarr", {}
    if path.suffix.lower() in _GRIB_EXTS:
        return "cfgrib", {"indexpath": ""}
    head = read_bytes(path, 8)
    if head[:3] == b"CDF":
        return "scipy", {}
    if head[:4] == b"GRIB":
        return "cfgrib", {"indexpath": ""}
    return "h5netcdf", {}


_EXTRA_OF = {"cfgrib": ("cfgrib", "grib"), "zarr": ("zarr", "zarr"), "h5netcdf": ("h5netcdf", "io"),
             "scipy": ("scipy", "io")}


def open_grid(path: str | os.PathLike, engine: str | None = None):
    """``xarray.open_dataset`` with the engine the file needs; every failure is a one-line
    :class:`DataError` (a missing engine names the extra that installs it)."""
    xr = _xr()
    p = Path(path)
    eng, kw = _engine(p, engine)
    try:
        return xr.open_dataset(os.fspath(p), engine=eng, backend_kwargs=kw or None, decode_timedelta=False)
    except ValueError as e:
        if "unrecognized engine" in str(e) or "found the following matches" in str(e):
            mod, extra = _EXTRA_OF.get(eng, (eng, "io"))
            raise DataError(p, f"the {eng} engine is not installed: pip install 'transmem[{extra}]' ({mod})") from None
        raise DataError(p, f"cannot open with xarray ({why(e, p)})") from None
    except ModuleNotFoundError as e:
        mod, extra = _EXTRA_OF.get(eng, (e.name, "io"))
        raise DataError(p, f"the {eng} engine needs {e.name}: pip install 'transmem[{extra}]'") from None
    except Exception as e:  # OSError, RuntimeError of eccodes, truncated files, ...
        raise DataError(p, f"cannot open with xarray engine {eng} ({why(e, p)})") from None


# --------------------------------------------------------------------------------------------
# one variable as frames
# --------------------------------------------------------------------------------------------
def _pick_variable(ds, name: str | None, path):
    if name:
        if name not in ds.data_vars:
            raise DataError(path, f"no variable '{name}' (variables: {', '.join(map(str, ds.data_vars)) or 'none'})")
        return ds[name]
    cands = [v for v in ds.data_vars if ds[v].ndim >= 2 and ds[v].dtype.kind in "iuf"]
    if len(cands) != 1:
        listed = ", ".join(f"{v} {tuple(ds[v].dims)}" for v in cands) or "none"
        raise DataError(path, f"set extra.variable: {len(cands)} gridded variables ({listed})")
    return ds[cands[0]]


def _time_name(da, want: str | None, path) -> str | None:
    if want:
        if want not in da.coords:
            raise DataError(path, f"no time coordinate '{want}' on {da.name} (coordinates: {', '.join(map(str, da.coords))})")
        return want
    for n in ("valid_time", "time"):
        if n in da.coords:
            return n
    for n, c in da.coords.items():
        if np.issubdtype(c.dtype, np.datetime64):
            return str(n)
    return None


def _mapping(cfg: DataConfig, key: str) -> dict:
    v = opt(cfg, key) or {}
    if not isinstance(v, dict):
        raise DataError(cfg.path, f"extra.{key} must be a mapping {{dim: ...}}, got {v!r}")
    return v


def _crop(da, cfg: DataConfig, path):
    for dim, val in _mapping(cfg, "select").items():
        if dim not in da.dims:
            raise DataError(path, f"extra.select: no dimension '{dim}' (dimensions: {', '.join(da.dims)})")
        try:
            da = da.sel({dim: val}, method="nearest")
        except Exception as e:
            raise DataError(path, f"extra.select.{dim}={val!r}: {why(e)}") from None
    for key in ("isel", "sel"):
        for dim, rng in _mapping(cfg, key).items():
            if dim not in da.dims:
                raise DataError(path, f"extra.{key}: no dimension '{dim}' (dimensions: {', '.join(da.dims)})")
            try:
                a, b = rng
            except (TypeError, ValueError):
                raise DataError(path, f"extra.{key}.{dim} must be [start, stop], got {rng!r}") from None
            if key == "isel":
                da = da.isel({dim: slice(int(a), int(b))})
            else:
                c = da[dim].values
                lo, hi = min(a, b), max(a, b)
                da = da.isel({dim: np.flatnonzero((c >= lo) & (c <= hi))})
            if da.sizes[dim] == 0:
                raise DataError(path, f"extra.{key}.{dim}={list(rng)} leaves no {dim}")
    return da


def _frames_of(da, tname: str | None, path):
    """``da`` as (time dim or None, y dim, x dim), dropping length-1 dims."""
    tdim = None
    if tname is not None and da[tname].ndim == 1:
        tdim = da[tname].dims[0]
    drop = [d for d in da.dims if d != tdim and da.sizes[d] == 1]
    da = da.squeeze(drop) if drop else da
    space = [d for d in da.dims if d != tdim]
    if len(space) != 2:
        raise DataError(path, f"{da.name} has dimensions {tuple(da.dims)}: expected time and two spatial dimensions "
                              f"(pick the others with extra.select: {{dim: value}})")
    return da.transpose(*([tdim] if tdim else []), *space), tdim, space


def _times(da, tname, tdim, n: int, path) -> list:
    if tname is None:
        return [None] * n
    t = np.asarray(da[tname].values)
    if tdim is None:
        t = t.reshape(-1)[:1]
    return list(t)


def _quantity(cfg: DataConfig, units: str) -> tuple[str, float]:
    """``(quantity, factor to mm/h)``."""
    q = opt(cfg, "quantity")
    u = units.strip().lower()
    if q is None:
        q = "rain" if (u in _RATE_UNITS or u in _FLUX_UNITS) else "field"
    if q not in ("rain", "field"):
        raise DataError(cfg.path, f"extra.quantity must be 'rain' or 'field', got {q!r}")
    return q, (3600.0 if u in _FLUX_UNITS else 1.0)


def _grid_files(cfg: DataConfig) -> list[Path]:
    root = require_path(cfg, "a netCDF / GRIB file, a zarr store, or a folder of them")
    if root.is_file() or root.suffix.lower() == ".zarr":
        return [root]
    files = []
    for d, dirs, fs in os.walk(root, followlinks=True):
        dirs[:] = sorted((x for x in dirs if not x.lower().endswith(".zarr")), key=natural_key)
        files += [Path(d) / f for f in sorted(fs, key=natural_key) if is_grid_file(f)]
        files += [Path(d) / x for x in os.listdir(d) if x.lower().endswith(".zarr")]
    if not files:
        raise DataError(root, f"empty folder: no netCDF / GRIB / zarr files ({', '.join(sorted(GRID_EXTS))})")
    return files


@dataclass
class _Frame:
    time: Any
    file: Path
    index: int


def _catalogue(cfg: DataConfig, files: list[Path]) -> list[_Frame]:
    """Every frame of ``files`` with its time, sorted by time (file names with ``time_regex``)."""
    regex = opt(cfg, "time_regex")
    out = []
    if regex:
        pat = re.compile(regex)
        for f in files:
            t = parse_time(f.name, pat, opt(cfg, "time_format"))
            if t is None:
                raise DataError(f, f"no time in the file name (time_regex={regex!r})")
            out.append(_Frame(np.datetime64(int(t), "s") if opt(cfg, "time_format") else t, f, -1))
    else:
        for f in files:
            ds = open_grid(f, opt(cfg, "engine"))
            try:
                da = _crop(_pick_variable(ds, opt(cfg, "variable"), f), cfg, f)
                tname = _time_name(da, opt(cfg, "time"), f)
                da, tdim, _ = _frames_of(da, tname, f)
                n = da.sizes[tdim] if tdim else 1
                out += [_Frame(t, f, k if tdim else -1) for k, t in enumerate(_times(da, tname, tdim, n, f))]
            finally:
                ds.close()
    if any(fr.time is None for fr in out):
        if len(files) > 1 and any(fr.time is not None for fr in out):
            raise DataError(cfg.path, "some files have a time coordinate and some do not")
        return out  # no times at all: file order, then array order
    out.sort(key=lambda fr: (fr.time, natural_key(fr.file.name), fr.index))
    for a, b in zip(out, out[1:]):
        if a.time == b.time:
            raise DataError(b.file, f"two frames at one time ({a.time}) (also in {a.file.name})")
    return out


def _seconds(t) -> float:
    if isinstance(t, np.datetime64):
        return float((t - np.datetime64("1970-01-01T00:00:00")) / np.timedelta64(1, "s"))
    return float(t)


def _grid_mapping(da, ds) -> dict:
    """The CF grid mapping (projection) of a variable, ``{"name", "attrs"}``, or ``{}``: the
    variable named by its ``grid_mapping`` attribute (kept in ``attrs`` or, once xarray decoded
    it, in ``encoding``), with its numbers and strings (``grid_mapping_name``, ``crs_wkt``, ...)."""
    name = da.attrs.get("grid_mapping") or da.encoding.get("grid_mapping")
    if not isinstance(name, str) or not name.strip():
        return {}
    name = name.split(":")[0].split()[0]  # the extended form "crs: x y" names the variable first
    var = None
    for holder in (da.coords, getattr(ds, "variables", {})):
        if name in holder:
            var = holder[name]
            break
    if var is None:
        return {}
    keep = {}
    for k, v in var.attrs.items():
        if isinstance(v, (str, int, float, np.number)):
            keep[k] = v.item() if isinstance(v, np.generic) else v
        elif isinstance(v, (list, tuple, np.ndarray)) and np.asarray(v).dtype.kind in "iuf":
            keep[k] = [float(x) for x in np.asarray(v).ravel()]
    return {"name": name, "attrs": keep} if keep else {}


class _Decoder:
    """Reads frames (physical values, NaN = missing) at the final size, one file open at a time."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.fo = fit_options(cfg)
        self.grid: Grid | None = None
        self.quantity = None
        self.factor = 1.0
        self.checked = False
        nd = opt(cfg, "nodata")
        self.nodata = None if nd is None else np.asarray(nd if isinstance(nd, (list, tuple)) else [nd], dtype=np.float64)
        self.dbz = opt(cfg, "units") == "dBZ"
        self.a = opt_float(cfg, "a", FMI_A, positive=True)
        self.b = opt_float(cfg, "b", FMI_B, positive=True)

    def _describe(self, da, space, f, ds=None):
        attrs = {k: v for k, v in da.attrs.items() if isinstance(v, (str, int, float, np.number))}
        units = str(da.attrs.get("units", "") or "")
        if units.lower() == "unknown":
            units = ""
        self.quantity, self.factor = _quantity(self.cfg, "dBZ" if self.dbz else units)
        if self.dbz:
            self.quantity = "rain"
        g = Grid(variable=str(da.name), units="mm/h" if self.quantity == "rain" else units, attrs=attrs,
                 y_name=str(space[0]), x_name=str(space[1]))
        H, W = da.sizes[space[0]], da.sizes[space[1]]
        for axis, dim in ((0, space[0]), (1, space[1])):
            if dim in da.coords and da[dim].ndim == 1:
                c = np.asarray(da[dim].values, dtype=np.float64)
                cattrs = {k: v for k, v in da[dim].attrs.items() if isinstance(v, (str, int, float, np.number))}
            else:
                c, cattrs = np.arange(H if axis == 0 else W, dtype=np.float64), {"long_name": f"{dim} index"}
            grid2d = np.broadcast_to(c[:, None] if axis == 0 else c[None, :], (H, W))[None, None]
            fitted = fit_frames(grid2d, self.fo["size"], self.fo["mode"], aspect=self.fo["aspect"],
                                crop=self.fo["crop"], path=f)[0, 0]
            if axis == 0:
                g.y, g.y_attrs = fitted[:, 0].astype(np.float64), cattrs
            else:
                g.x, g.x_attrs = fitted[0, :].astype(np.float64), cattrs
        g.crs = _grid_mapping(da, ds)
        self.grid = g

    def frames(self, items: list[_Frame]):
        """Yield ``(file, time, values float32 (S, S), valid bool (S, S))`` for ``items``."""
        by_file: dict[Path, list[_Frame]] = {}
        for it in items:
            by_file.setdefault(it.file, []).append(it)
        cache: dict = {}
        for it in items:
            if it.file not in cache:
                cache.clear()
                cache[it.file] = self._load(it.file, [i.index for i in by_file[it.file]])
            v, m = cache[it.file][it.index]
            yield it.file, it.time, v, m

    def _load(self, f: Path, indices: list[int]) -> dict:
        cfg = self.cfg
        ds = open_grid(f, opt(cfg, "engine"))
        try:
            da = _crop(_pick_variable(ds, opt(cfg, "variable"), f), cfg, f)
            tname = _time_name(da, opt(cfg, "time"), f) if not opt(cfg, "time_regex") else None
            da, tdim, space = _frames_of(da, tname, f)
            if self.grid is None:
                self._describe(da, space, f, ds)
            out = {}
            for k in indices:
                try:
                    raw = np.asarray((da.isel({tdim: k}) if tdim else da).values, dtype=np.float64)
                except Exception as e:
                    raise DataError(f, f"cannot read frame {k} of {da.name} ({why(e, f)})") from None
                out[k] = self._physical(raw, da, f)
            return out
        finally:
            ds.close()

    def _physical(self, raw: np.ndarray, da, f):
        if self.nodata is None and not self.checked:
            refuse_undeclared_fill(raw, da.encoding.get("dtype", raw.dtype), f, str(da.name),
                                   rain=self.quantity == "rain" and not self.dbz)
        self.checked = True
        valid = np.isfinite(raw)
        if self.nodata is not None and self.nodata.size:
            valid &= ~np.isin(raw, self.nodata)
        v = np.where(valid, raw, 0.0)
        if self.quantity == "rain":
            with np.errstate(invalid="ignore", over="ignore"):
                v = dbz_to_rainrate(v, self.a, self.b) if self.dbz else np.maximum(v, 0.0) * self.factor
        if not valid.any():
            raise DataError(f, f"frame of {da.name} is all no-data")
        fv, fm = fit_masked(v[None, None].astype(np.float32), valid[None, None], self.fo["size"], self.fo["mode"],
                            aspect=self.fo["aspect"], crop=self.fo["crop"], path=f)
        if not fm.any():
            raise DataError(f, "frame is all no-data in the cropped region")
        return fv[0, 0], fm[0, 0]


# --------------------------------------------------------------------------------------------
# normalisation (fields)
# --------------------------------------------------------------------------------------------
def field_units(norm: dict) -> Units:
    """The maps between [0, 1] and physical values of a fitted ``extra["normalization"]``."""
    kind = norm.get("kind")
    if kind == "minmax":
        lo, hi = float(norm["lo"]), float(norm["hi"])
        scale, shift = hi - lo, lo
    elif kind == "meanstd":
        span = float(norm.get("span", SPAN)) * float(norm["std"])
        scale, shift = span, float(norm["mean"]) - 0.5 * span
    else:
        raise DataError(None, f"extra.normalization.kind must be one of {', '.join(NORMALIZE)}, got {kind!r}")
    if not scale > 0:
        raise DataError(None, f"extra.normalization spans nothing ({norm}); the train split is constant")

    def to_phys(x):
        return x * scale + shift

    def from_phys(v):
        return (v - shift) / scale
    return Units(str(norm.get("units", "")) or "1", to_phys, from_phys)


def fit_normalization(values: list[np.ndarray], masks: list[np.ndarray], kind: str, cfg: DataConfig, grid: Grid) -> dict:
    vs = np.concatenate([v[m] for v, m in zip(values, masks)]).astype(np.float64)
    if vs.size == 0:
        raise DataError(cfg.path, "no valid value in the train split to fit the normalisation on")
    norm: dict[str, Any] = {"kind": kind, "variable": grid.variable, "units": grid.units, "fitted_on": "train"}
    if kind == "minmax":
        lo, hi = float(vs.min()), float(vs.max())
        m = opt_float(cfg, "margin", MARGIN)
        if m is None or m < 0:
            raise DataError(cfg.path, f"extra.margin must be >= 0, got {m!r}")
        pad = (hi - lo) * m if hi > lo else max(abs(lo), 1.0) * 0.5
        norm.update(lo=lo - pad, hi=hi + pad)
    else:
        std = float(vs.std())
        norm.update(mean=float(vs.mean()), std=std if std > 0 else max(abs(float(vs.mean())), 1.0) * 0.1,
                    span=opt_float(cfg, "span", SPAN, positive=True))
    return norm


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def _runs(cfg: DataConfig, cat: list[_Frame]) -> list[list[_Frame]]:
    if not cat or cat[0].time is None:
        return [cat]
    gap = opt_float(cfg, "max_gap", positive=True)
    return [cat[a:b] for a, b in split_at_gaps([_seconds(fr.time) for fr in cat], gap)]


def _label(t) -> str:
    if isinstance(t, np.datetime64):
        return str(np.datetime_as_string(t, unit="m")).replace("-", "").replace(":", "")
    return "start" if t is None else f"t{t:g}"


def _blocks(cfg: DataConfig, runs: list[list[_Frame]]) -> list[tuple[str, list[_Frame]]]:
    """(event name, frames): every run cut into ``blocks`` contiguous parts of at least ``frames``."""
    n_blocks = opt_int(cfg, "blocks", BLOCKS)
    out = []
    for r in runs:
        size = max(int(cfg.frames), math.ceil(len(r) / n_blocks))
        head = _label(r[0].time)
        parts = [r[a:a + size] for a in range(0, len(r), size)]
        if len(parts) > 1 and len(parts[-1]) < cfg.frames:  # a short tail joins the block before it
            tail = parts.pop()
            parts[-1] = parts[-1] + tail
        out += [(f"{head}/b{k:03d}", p) for k, p in enumerate(parts)]
    return out


def _plan(cfg: DataConfig) -> list[tuple[str, list[_Frame]]]:
    """The blocks (events) of the source and their frames, from the catalogue alone."""
    cat = _catalogue(cfg, _grid_files(cfg))
    maxf = opt_int(cfg, "max_frames")
    return _blocks(cfg, _runs(cfg, cat[:maxf] if maxf else cat))


def _decode(dec: _Decoder, part: list[_Frame]) -> tuple[np.ndarray, np.ndarray]:
    vals, masks = [], []
    for _, _, v, m in dec.frames(part):
        vals.append(v)
        masks.append(m)
    return np.stack(vals), np.stack(masks)


def _files_of(part: list[_Frame]) -> list[Path]:
    return sorted({fr.file for fr in part}, key=lambda p: natural_key(str(p)))


def _train_events(cfg: DataConfig, names: list[str], lengths: list[int]) -> list[str]:
    """The events :func:`transmem.data.clips.make_splits` will put in train (same rule)."""
    usable = [n for n, k in zip(names, lengths) if k >= cfg.frames]
    explicit = opt(cfg, "splits")
    events = list(dict.fromkeys(names if explicit is not None else usable))
    groups = split_events(events, split_fractions(cfg), explicit=explicit, order=opt(cfg, "split_order", "name"),
                          path=cfg.path, what="events")
    return groups["train"]


def _to_unit(cfg: DataConfig, dec: _Decoder, v: np.ndarray) -> np.ndarray:
    if dec.quantity == "rain":
        return rain_to_unit(v, opt_float(cfg, "r_max", R_MAX, positive=True))
    u = field_units(cfg.extra["normalization"])
    return np.clip(u.from_physical(v.astype(np.float64)), 0.0, 1.0).astype(np.float32)


def _pack(cfg: DataConfig, dec: _Decoder, v: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _to_unit(cfg, dec, v)[:, None]
    if cfg.channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif cfg.channels != 1:
        raise DataError(cfg.path, f"channels must be 1 or 3, got {cfg.channels}")
    return x.astype(np.float16), m[:, None]


def build_grid(cfg: DataConfig, reader: str = "xarray") -> dict:
    """Rain, or a field whose normalisation is given, is decoded block by block when the clips are
    prepared (so ``cache_dir`` spares decoding again); a field is decoded whole first, to fit its
    normalisation on the train split."""
    plan = _plan(cfg)
    dec = _Decoder(cfg)
    if opt(cfg, "quantity") == "rain" or opt(cfg, "units") == "dBZ" or opt(cfg, "normalization") is not None:
        if opt(cfg, "quantity") is None:
            cfg.extra = dict(cfg.extra or {}, quantity="rain" if opt(cfg, "units") == "dBZ" else "field")
        specs = [SequenceSpec(name, name, _files_of(part), lambda part=part: _pack(cfg, dec, *_decode(dec, part)))
                 for name, part in plan]
        return build_clip_datasets(cfg, reader, specs, order="name", what="events", blocks=False)
    seqs = [(name, part, *_decode(dec, part)) for name, part in plan]
    if "quantity" not in (cfg.extra or {}):  # said in the run's config, so units follow it
        cfg.extra = dict(cfg.extra or {}, quantity=dec.quantity)
    if dec.quantity == "field":
        kind = opt(cfg, "normalize", "minmax")
        if kind not in NORMALIZE:
            raise DataError(cfg.path, f"extra.normalize must be one of {', '.join(NORMALIZE)}, got {kind!r}")
        train = set(_train_events(cfg, [s[0] for s in seqs], [len(s[1]) for s in seqs]))
        picked = [s for s in seqs if s[0] in train]
        norm = fit_normalization([s[2] for s in picked], [s[3] for s in picked], kind, cfg, dec.grid)
        field_units(norm)  # checks it
        cfg.extra = dict(cfg.extra or {}, normalization=norm)  # stored with the run's config and card
    specs = [SequenceSpec(name, name, _files_of(part), lambda data=_pack(cfg, dec, v, m): data)
             for name, part, v, m in seqs]
    return build_clip_datasets(cfg, reader, specs, order="name", what="events", blocks=False)


def grid_units(cfg: DataConfig) -> Units | None:
    """mm/h for rain; the fitted normalisation's units for a field (None before it is fitted)."""
    extra = cfg.extra or {}
    norm = extra.get("normalization")
    if norm is not None:
        return field_units(norm)
    q = extra.get("quantity")
    if q == "rain" or cfg.name == "radar_mrms" or extra.get("units") == "dBZ":
        return rain_units(cfg)
    return None


def _last_run(path, times: list, extra: dict) -> tuple[int, int]:
    """``(start, stop)`` of the last gap-free run of dated frames, split as the datasets split
    (a step over ``extra.max_gap`` seconds, else 1.5 x the median step), with a line saying so
    when there is a gap; all the frames when they have no dates."""
    a, b = 0, len(times)
    if len(times) >= 3 and all(isinstance(t, np.datetime64) for t in times):
        secs = (np.asarray(times, dtype="datetime64[s]") - np.datetime64(0, "s")).astype(np.float64)
        gap = extra.get("max_gap")
        runs = split_at_gaps(list(secs), float(gap) if gap else None)
        if len(runs) > 1:
            a, b = runs[-1]
            print(f"{path}: {len(runs) - 1} gap(s) in time; forecasting from the {b - a} frames "
                  f"after {str(times[a - 1])[:16]}")
    return a, b


def read_grid_input(path: str | os.PathLike, cfg: DataConfig, last: int | None = None):
    """``transmem predict``'s input for a gridded model (``register_dataset(read_input=)``), read
    as its data was (variable, crop, the fitted normalisation, MRMS's conventions), with its
    coordinates and times: the forecast starts from the last gap-free run, and only its ``last``
    frames are decoded."""
    extra = cfg.extra or {}

    def pick(times):
        a, b = _last_run(path, times, extra)
        return slice(max(a, b - last) if last else a, b)
    frames, mask, grid = read_grid(path, cfg.to_dict(), cfg.size, cfg.channels, pick=pick)
    a, b = _last_run(path, grid.times, extra)
    grid.times = list(grid.times[a:b])
    return frames[a:b], mask[a:b], grid


#: the ``extra`` keys of the ``xarray`` and ``radar_mrms`` readers
GRID_KEYS = CLIP_KEYS + ("variable", "engine", "time", "time_regex", "time_format", "select", "isel", "sel",
                         "nodata", "units", "a", "b", "quantity", "normalize", "normalization", "margin", "span",
                         "max_gap", "r_max")


@register_dataset("xarray", units=grid_units, extra=GRID_KEYS, read_input=read_grid_input, inflow=window_inflow)
def build_xarray(cfg: DataConfig) -> dict:
    """Clips of any variable of netCDF / GRIB / zarr sources (rain log-scaled, fields normalised)."""
    return build_grid(cfg, "xarray")


def mrms_config(cfg: DataConfig) -> DataConfig:
    """``cfg`` with MRMS's conventions as defaults (the user's extra keys win)."""
    extra = {"engine": "cfgrib", "nodata": MRMS_NODATA, "quantity": "rain", "time_regex": MRMS_TIME[0],
             "time_format": MRMS_TIME[1]}
    extra.update(cfg.extra or {})
    cfg.extra = extra
    return cfg


@register_dataset("radar_mrms", units=rain_units, extra=GRID_KEYS, read_input=read_grid_input, inflow=window_inflow)
def build_radar_mrms(cfg: DataConfig) -> dict:
    """NOAA MRMS PrecipRate GRIB2 → log-scaled rain rate clips with a validity mask."""
    return build_grid(mrms_config(cfg), "radar_mrms")


# --------------------------------------------------------------------------------------------
# one input for predict, and CF-netCDF out
# --------------------------------------------------------------------------------------------
def read_grid(path: str | os.PathLike, data: dict, size: int | None, channels: int = 1, pick=None,
              **extra_over) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Frames of a gridded input read as the run's data config ``data`` says (variable, crop,
    normalisation, ...): ``(frames float32 (T, C, S, S) in [0, 1], mask, Grid)``. ``pick(times)``
    (a slice of the frames in time order) selects the frames to decode: the others are never
    read (xarray reads lazily), e.g. only the last ``T_in`` of a long archive for ``predict``."""
    extra = dict(data.get("extra") or {}, **extra_over)
    cfg = DataConfig(name=data.get("name", "xarray"), path=os.fspath(path), size=size, channels=channels,
                     resize=data.get("resize", "resize"), extra=extra)
    if cfg.name == "radar_mrms":
        cfg = mrms_config(cfg)
    files = _grid_files(cfg)
    cat = _catalogue(cfg, files)
    if pick is not None:
        cat = cat[pick([fr.time for fr in cat])]
    dec = _Decoder(cfg)
    vals, masks = [], []
    for _, _, v, m in dec.frames(cat):
        vals.append(v)
        masks.append(m)
    if not vals:
        raise DataError(path, "no frames")
    v, m = np.stack(vals), np.stack(masks)
    if dec.quantity == "field" and "normalization" not in extra:
        raise DataError(path, "the model's card holds no fitted normalisation for this field (extra.normalization)")
    x = _to_unit(cfg, dec, v)[:, None]
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    dec.grid.times = [fr.time for fr in cat]
    return x.astype(np.float32), m[:, None], dec.grid


def write_forecast_netcdf(path: str | os.PathLike, observed: np.ndarray, forecast: np.ndarray,
                          grid: Grid | None, units: str = "1", obs_mask: np.ndarray | None = None,
                          extra_forecasts: dict | None = None, attrs: dict | None = None) -> None:
    """CF-netCDF of a forecast: ``forecast (time, y, x)`` at the valid time of each lead with a
    ``lead_time`` coordinate (minutes), ``observed (time_observed, y, x)`` (no data as NaN), the
    spatial coordinates with their attributes, and ``units`` on every field. Without times, leads
    are counted in steps; without coordinates, ``y`` / ``x`` are pixel indices."""
    xr = _xr()
    g = grid or Grid()
    T_obs, H, W = observed.shape
    T_out = forecast.shape[0]
    y = g.y if g.y is not None and len(g.y) == H else np.arange(H, dtype=np.float64)
    x = g.x if g.x is not None and len(g.x) == W else np.arange(W, dtype=np.float64)
    ty, tx = (g.y_name, g.x_name) if g.y is not None else ("y", "x")
    obs = observed.astype(np.float32)
    if obs_mask is not None:
        obs = np.where(obs_mask, obs, np.float32(np.nan))
    times = g.times[-T_obs:] if g.times and len(g.times) >= T_obs else []
    dated = len(times) == T_obs and all(isinstance(t, np.datetime64) for t in times)
    coords: dict[str, Any] = {ty: (ty, y, dict(g.y_attrs)), tx: (tx, x, dict(g.x_attrs))}
    lead_steps = np.arange(1, T_out + 1)
    if dated and T_obs >= 2:
        step = np.median(np.diff(np.asarray(times, dtype="datetime64[s]")).astype(np.int64))
        step = np.timedelta64(int(step), "s")
        last = np.asarray(times[-1], dtype="datetime64[s]")
        valid = np.array([last + k * step for k in lead_steps], dtype="datetime64[ns]")
        lead = (lead_steps * step / np.timedelta64(1, "m")).astype(np.float64)
        coords["time"] = ("time", valid, {"standard_name": "time", "long_name": "valid time of the forecast"})
        coords["lead_time"] = ("time", lead, {"units": "minutes", "long_name": "time after the last observed frame"})
        coords["time_observed"] = ("time_observed", np.asarray(times, dtype="datetime64[ns]"),
                                   {"standard_name": "time", "long_name": "time of the observed frame"})
    else:
        coords["time"] = ("time", lead_steps, {"long_name": "lead (steps after the last observed frame)"})
        coords["lead_time"] = ("time", lead_steps.astype(np.float64), {"units": "1", "long_name": "lead in steps"})
        coords["time_observed"] = ("time_observed", np.arange(-T_obs + 1, 1),
                                   {"long_name": "observed frame (0 = last)"})
    name = g.variable or "field"
    fattrs = {"units": units, "long_name": f"forecast of {name}"}
    oattrs = {"units": units, "long_name": f"observed {name}"}
    crs_var = {}
    if g.crs and g.y is not None:  # the input's projection, as a CF grid-mapping variable
        cname = g.crs["name"] if g.crs["name"] not in ("forecast", "observed", ty, tx) else "crs"
        crs_var[cname] = ((), np.int32(0), dict(g.crs["attrs"]))
        fattrs["grid_mapping"] = oattrs["grid_mapping"] = cname
    data_vars = {
        "forecast": (("time", ty, tx), forecast.astype(np.float32), fattrs),
        "observed": (("time_observed", ty, tx), obs, oattrs),
        **crs_var,
    }
    for k, f in (extra_forecasts or {}).items():
        data_vars[f"forecast_{k}"] = (("time", ty, tx), f.astype(np.float32), dict(fattrs, long_name=f"{k} forecast"))
    ds = xr.Dataset(data_vars, coords=coords, attrs={"Conventions": "CF-1.8", **(attrs or {})})
    enc = {"time": {"units": "minutes since 1970-01-01 00:00:00"},
           "time_observed": {"units": "minutes since 1970-01-01 00:00:00"}} if dated else {}
    eng = "h5netcdf"
    try:
        import h5netcdf  # noqa: F401
    except ImportError:
        eng = "scipy"
    try:
        ds.to_netcdf(os.fspath(path), engine=eng, encoding=enc)
    except Exception as e:
        raise DataError(path, f"cannot write netCDF ({why(e, path)})") from None

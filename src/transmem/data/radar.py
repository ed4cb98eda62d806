"""Precipitation radar composites: FMI PGM(.gz), MeteoSwiss palette GIF, and the unit transforms.

Every radar frame becomes a **rain rate** R (mm/h) with missing values, which is then

1. cropped / area-averaged to ``cfg.size`` (``cfg.resize="resize"``, the default: center-crop
   to a square, then each output pixel is the mean rain rate over the *valid* source pixels
   under it, and is valid when at least half of them are; so a 1226×760 FMI field becomes the
   central 760×760 square averaged down to e.g. 64×64; ``extra["crop"] = [top, left, height,
   width]`` picks another region, ``extra["aspect"] = "stretch"`` keeps the whole field,
   distorted);
2. log-scaled to [0, 1]: ``x = log10(1 + R) / log10(1 + R_max)``, clipped at ``R_max``
   (``extra["r_max"]``, default 100 mm/h); :func:`unit_to_rain` inverts it;
3. stored as float16, with ``mask`` (bool, True where valid) beside it.

Unit transforms (all numpy, elementwise):

* FMI level v (uint8): ``v = 255`` is no data; ``dBZ = (v − 64) / 2``; v = 0 (−32 dBZ, the
  lowest level, FMI's "no echo") is taken as R = 0 (``extra["zero_level"]``).
* dBZ ↔ R by the Z–R relation ``Z = a·R^b`` with ``Z = 10^(dBZ/10)`` (mm⁶/m³): FMI's
  defaults ``a = 223``, ``b = 1.53`` (``extra["a"]``, ``extra["b"]``).
* MeteoSwiss palette index i: ``i < 2`` or ``251 ≤ i ≤ 254`` is no rain (0 mm/h), ``255`` no
  data, otherwise the 5-minute total ``(10^((i − 71.5)/20) / 316)^(1/1.5)`` mm, i.e. a rate
  ``R = 12 ·`` that in mm/h (pysteps' reading of the
  MeteoSwiss scale).

Frame times come from the file names, never from the directory order: FMI
``YYYYMMDDHHMM_...pgm.gz``; MeteoSwiss ``AQCyyjjjhhmm?_00005.801.gif`` (yy = year − 2000,
jjj = day of year). A folder that directly holds such files is one **event**; within an event a
step larger than 1.5× the median step (or ``extra["max_gap_minutes"]``) splits it into
sequences. Splits are by event (chronological by default: ``split_order="name"``), never
cutting one; with fewer events than splits, name them with ``extra["splits"]``.
"""
from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import numpy as np

from .clips import (CLIP_KEYS, window_inflow, SequenceSpec, build_clip_datasets, read_bytes, fit_masked, fit_options, natural_key, opt, opt_float,
                    opt_int, require_path, split_at_gaps, why)
from .errors import DataError
from ..files import walk
from .registry import DataConfig, Grid, Units, register_dataset

FMI_A, FMI_B = 223.0, 1.53
R_MAX = 100.0
FMI_NODATA = 255


# --------------------------------------------------------------------------------------------
# unit transforms
# --------------------------------------------------------------------------------------------
def fmi_level_to_dbz(v) -> np.ndarray:
    """FMI 8-bit level → reflectivity: ``dBZ = (v − 64) / 2`` (no-data handling is the caller's)."""
    return (np.asarray(v, dtype=np.float32) - np.float32(64)) / np.float32(2)


def dbz_to_rainrate(dbz, a: float = FMI_A, b: float = FMI_B) -> np.ndarray:
    """Reflectivity (dBZ) → rain rate R (mm/h): ``Z = 10^(dBZ/10)``, ``R = (Z / a)^(1/b)``."""
    z = np.power(10.0, np.asarray(dbz, dtype=np.float64) / 10.0)
    return np.power(z / a, 1.0 / b).astype(np.float32)


def rainrate_to_dbz(rate, a: float = FMI_A, b: float = FMI_B) -> np.ndarray:
    """Rain rate R (mm/h) → reflectivity (dBZ): ``dBZ = 10·log10(a·R^b)``; R = 0 gives −inf."""
    r = np.asarray(rate, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(a * np.power(r, b))).astype(np.float32)


def fmi_level_to_rainrate(v, a: float = FMI_A, b: float = FMI_B, nodata: int = FMI_NODATA,
                          zero_level: int | None = 0) -> np.ndarray:
    """FMI level → rain rate (mm/h), NaN where ``v == nodata``, 0 where ``v <= zero_level``."""
    v = np.asarray(v)
    r = dbz_to_rainrate(fmi_level_to_dbz(v), a, b)
    if zero_level is not None:
        r = np.where(v <= zero_level, np.float32(0), r)
    return np.where(v == nodata, np.float32(np.nan), r).astype(np.float32)


MCH_ACCUMULATION_MIN = 5.0  # the AQC composite's values are rain totals over 5 minutes


def mch_index_to_rainrate(i) -> np.ndarray:
    """MeteoSwiss palette index → rain rate (mm/h): NaN for 255, 0 for i < 2 and 251..254,
    else ``12 · (10^((i − 71.5)/20) / 316)^(1/1.5)``. The palette's formula gives the 5-minute
    rain total in mm (pysteps' ``import_mch_gif`` builds this table "[mm/5min]"), so the rate
    is 60/5 = 12 times it."""
    i = np.asarray(i)
    fi = i.astype(np.float64)
    total = np.power(np.power(10.0, (fi - 71.5) / 20.0) / 316.0, 1.0 / 1.5)
    r = total * (60.0 / MCH_ACCUMULATION_MIN)
    r = np.where((i < 2) | ((i >= 251) & (i <= 254)), 0.0, r)
    r = np.where(i == 255, np.nan, r)
    return r.astype(np.float32)


def rain_to_unit(rate, r_max: float = R_MAX) -> np.ndarray:
    """Rain rate (mm/h) → [0, 1]: ``log10(1 + R) / log10(1 + R_max)``, clipped (R ≥ R_max → 1,
    R ≤ 0 → 0); NaN stays NaN."""
    r = np.asarray(rate, dtype=np.float32)
    x = np.log10(1.0 + np.clip(r, 0.0, r_max)) / np.float32(np.log10(1.0 + r_max))
    return x.astype(np.float32)


def unit_to_rain(x, r_max: float = R_MAX) -> np.ndarray:
    """Inverse of :func:`rain_to_unit` on [0, 1]: ``R = 10^(x·log10(1 + R_max)) − 1``."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return (np.power(10.0, x * np.log10(1.0 + r_max)) - 1.0).astype(np.float32)


def rain_units(cfg: DataConfig) -> Units:
    """The units every rain-rate reader declares: mm/h through the log scale above, with the
    run's ``extra["r_max"]``. Works on numpy arrays and on torch tensors (for metrics)."""
    r_max = float((cfg.extra or {}).get("r_max", R_MAX))

    def to_mmh(x):
        if hasattr(x, "clamp"):  # a torch tensor (metrics on the device), without importing torch
            return 10.0 ** (x.clamp(0, 1) * np.log10(1.0 + r_max)) - 1.0
        return unit_to_rain(x, r_max)
    return Units("mm/h", to_mmh, lambda r: rain_to_unit(r, r_max), precipitation=True)


_MCH_LUT = mch_index_to_rainrate(np.arange(256))


# --------------------------------------------------------------------------------------------
# file formats
# --------------------------------------------------------------------------------------------
def _pgm_tokens(buf: bytes, count: int, path) -> tuple[list[int], int]:
    """The first ``count`` header integers after the magic, skipping ``#`` comments."""
    pos, out, n = 2, [], len(buf)
    while len(out) < count:
        while pos < n and buf[pos] in b" \t\r\n":
            pos += 1
        if pos < n and buf[pos] == ord("#"):
            end = buf.find(b"\n", pos)
            if end < 0:
                raise DataError(path, "truncated PGM header")
            pos = end + 1
            continue
        start = pos
        while pos < n and buf[pos] in b"0123456789":
            pos += 1
        if start == pos:
            raise DataError(path, "truncated or malformed PGM header")
        out.append(int(buf[start:pos]))
    if pos >= n or buf[pos] not in b" \t\r\n":
        raise DataError(path, "malformed PGM header")
    return out, pos + 1


def read_pgm(path: str | os.PathLike) -> np.ndarray:
    """A binary (P5) PGM image, gzip-compressed or not, as ``(H, W)`` uint8 (or uint16 when
    maxval > 255). Raises :class:`DataError` for unreadable, truncated or non-PGM files."""
    raw = read_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, f"corrupt or truncated gzip data ({e})") from None
    if raw[:2] != b"P5":
        raise DataError(path, "not a binary PGM (P5) image")
    (w, h, maxval), start = _pgm_tokens(raw, 3, path)
    if w < 1 or h < 1 or not 0 < maxval < 65536:
        raise DataError(path, f"bad PGM header: {w}x{h}, maxval {maxval}")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    need = w * h * dtype.itemsize
    if len(raw) - start < need:
        raise DataError(path, f"truncated PGM: {len(raw) - start} bytes of pixels, {need} needed for {w}x{h}")
    a = np.frombuffer(raw, dtype=dtype, count=w * h, offset=start).reshape(h, w)
    return a if dtype == np.uint8 else a.astype(np.uint16)


def read_mch_gif(path: str | os.PathLike) -> np.ndarray:
    """The palette indices of a MeteoSwiss GIF as ``(H, W)`` uint8 (the colors are not used)."""
    from PIL import Image
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "GIF" or im.mode != "P":
                raise DataError(path, f"not a palette GIF (format {im.format}, mode {im.mode})")
            im.load()
            return np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # UnidentifiedImageError, truncated data, ...
        raise DataError(path, f"cannot read GIF ({why(e, path)})") from None


_FMI_TIME = re.compile(r"(?<!\d)(\d{12})(?!\d)")
_MCH_TIME = re.compile(r"AQC(\d{2})(\d{3})(\d{2})(\d{2})")


def parse_fmi_time(name: str) -> datetime | None:
    """``YYYYMMDDHHMM`` (12 digits, e.g. ``201609281445_fmi...pgm.gz``) → datetime, else None."""
    m = _FMI_TIME.search(name)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%d%H%M")
    except ValueError:
        return None


def parse_mch_time(name: str) -> datetime | None:
    """``AQCyyjjjhhmm`` (yy = year − 2000, jjj = day of year) → datetime, else None."""
    m = _MCH_TIME.search(name)
    if not m:
        return None
    yy, jjj, hh, mm = (int(g) for g in m.groups())
    if not (1 <= jjj <= 366 and hh < 24 and mm < 60):
        return None
    t = datetime(2000 + yy, 1, 1) + timedelta(days=jjj - 1, hours=hh, minutes=mm)
    return t if t.year == 2000 + yy else None


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
class _Source:
    def __init__(self, key, what, accept, parse, expected, decode_name, to_rain):
        self.key, self.what, self.accept, self.parse = key, what, accept, parse
        self.expected, self.decode_name, self.to_rain = expected, decode_name, to_rain

    def decode(self, path):  # looked up at call time, so tests can patch the module function
        return globals()[self.decode_name](path)


def _fmi_to_rain(cfg: DataConfig | None):
    a = opt_float(cfg, "a", FMI_A, positive=True) if cfg else FMI_A
    b = opt_float(cfg, "b", FMI_B, positive=True) if cfg else FMI_B
    nodata = opt_int(cfg, "nodata", FMI_NODATA, minimum=0) if cfg else FMI_NODATA
    zl = opt(cfg, "zero_level", 0) if cfg else 0
    if zl is not None and (isinstance(zl, bool) or not isinstance(zl, (int, np.integer))):
        raise DataError(cfg.path, f"extra.zero_level must be an integer or null, got {zl!r}")
    lut = fmi_level_to_rainrate(np.arange(256), a, b, nodata, zl)

    def to_rain(v):
        return lut[v] if v.dtype == np.uint8 else fmi_level_to_rainrate(v, a, b, nodata, zl)
    return to_rain


def _mch_to_rain(cfg: DataConfig | None):
    return lambda i: _MCH_LUT[i]


FMI = _Source("radar_fmi", "FMI PGM", lambda n: n.lower().endswith((".pgm.gz", ".pgm")), parse_fmi_time,
              "YYYYMMDDHHMM_...pgm.gz", "read_pgm", _fmi_to_rain)
MCH = _Source("radar_mch", "MeteoSwiss GIF", lambda n: n.lower().endswith(".gif"), parse_mch_time,
              "AQCyyjjjhhmm..._00005.801.gif", "read_mch_gif", _mch_to_rain)


def find_events(root: str | os.PathLike, src: _Source) -> dict[str, list[tuple[datetime, Path]]]:
    """``{event: [(time, file), ...]}`` sorted by time, one event per folder holding radar files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, f"expected a folder of {src.what} files (or of event folders), got a file")
    events = {}
    for d, dirs, files in walk(root):  # loop-safe, regular files only
        dirs.sort(key=natural_key)
        found = []
        for f in files:
            if f.startswith(".") or not src.accept(f):
                continue
            t = src.parse(f)
            if t is None:
                raise DataError(Path(d) / f, f"no valid time in the file name (expected {src.expected})")
            found.append((t, Path(d) / f))
        if not found:
            continue
        found.sort(key=lambda tf: (tf[0], tf[1].name))
        for (t0, f0), (t1, f1) in zip(found, found[1:]):
            if t0 == t1:
                raise DataError(f1, f"same time ({t1:%Y-%m-%d %H:%M}) as {f0.name}")
        name = root.name if Path(d) == root else os.path.relpath(d, root)
        events[name] = found
    if not events:
        raise DataError(root, f"empty folder: no {src.what} files ({src.expected}) found")
    return events


def prepare_rain_frames(frames: Iterator[tuple[Path, np.ndarray]], cfg_fit: dict, channels: int = 1,
                        r_max: float = R_MAX, where=None) -> tuple[np.ndarray, np.ndarray]:
    """``(file, rain rate (H, W) with NaN = no data)`` frames → ``(values float16 (T, C, S, S) in
    [0, 1], mask bool (T, 1, S, S))``: crop/area-average (see :func:`fit_masked`), log-scale."""
    vals, masks, first = [], [], None
    for src, r in frames:
        r = np.asarray(r, dtype=np.float32)
        if r.ndim != 2 or r.size == 0:
            raise DataError(src, f"expected a 2-D field, got shape {tuple(r.shape)}")
        if first is None:
            first = (r.shape, src)
        elif r.shape != first[0]:
            raise DataError(src, f"mixed frame sizes: {r.shape[0]}x{r.shape[1]} here, {first[0][0]}x{first[0][1]} "
                                 f"in {Path(first[1]).name}")
        valid = np.isfinite(r)
        if not valid.any():
            raise DataError(src, "radar frame is all no-data")
        v, m = fit_masked(r[None, None], valid[None, None], cfg_fit["size"], cfg_fit["mode"],
                          aspect=cfg_fit["aspect"], crop=cfg_fit["crop"], path=src)
        if not m.any():
            raise DataError(src, "radar frame is all no-data in the cropped region")
        vals.append(rain_to_unit(v, r_max).astype(np.float16))
        masks.append(m)
    if not vals:
        raise DataError(where, "no radar frames")
    x = np.concatenate(vals, axis=0)
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif channels != 1:
        raise DataError(where, f"channels must be 1 or 3, got {channels}")
    return x, np.concatenate(masks, axis=0)


def read_radar_files(files: list[Path], kind: str = "fmi", channels: int = 1, size: int | None = None,
                     resize: str = "resize", *, aspect: str = "crop", crop=None, r_max: float = R_MAX,
                     cfg: DataConfig | None = None, where=None) -> tuple[np.ndarray, np.ndarray]:
    """Read radar files in the given order → ``(values float16 (T, C, H, W) in [0, 1], mask)``."""
    src = {"fmi": FMI, "mch": MCH}[kind]
    to_rain = src.to_rain(cfg)
    fo = {"size": size, "mode": resize, "aspect": aspect, "crop": crop}
    return prepare_rain_frames(((f, to_rain(src.decode(f))) for f in files), fo, channels, r_max, where)


def read_radar_folder(folder: str | os.PathLike, kind: str | None = None, channels: int = 1,
                      size: int | None = None, resize: str = "resize", **kw) -> tuple[np.ndarray, np.ndarray]:
    """All radar files of one folder (FMI or MeteoSwiss, guessed from the names when ``kind`` is
    None), sorted by the time in their names → ``(values, mask)`` as :func:`read_radar_files`."""
    folder = Path(folder)
    if kind is None:
        kind = radar_kind(folder)
        if kind is None:
            raise DataError(folder, "no FMI (.pgm.gz) or MeteoSwiss (AQC*.gif) radar files found")
    src = {"fmi": FMI, "mch": MCH}[kind]
    events = find_events(folder, src)
    if len(events) > 1:
        raise DataError(folder, f"holds {len(events)} radar events ({', '.join(events)}); point at one")
    (files,) = events.values()
    return read_radar_files([f for _, f in files], kind, channels, size, resize, where=folder, **kw)


def radar_kind(folder: Path) -> str | None:
    """"fmi", "mch" or None from the names of the files directly in ``folder``."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    if any(FMI.accept(n) and parse_fmi_time(n) for n in names):
        return "fmi"
    if any(MCH.accept(n) and parse_mch_time(n) for n in names):
        return "mch"
    return None


def _radar_specs(cfg: DataConfig, src: _Source) -> list[SequenceSpec]:
    root = require_path(cfg, f"a folder of {src.what} files, or of event folders holding them")
    events = find_events(root, src)
    wanted = opt(cfg, "events")
    if wanted is not None:
        wanted = [str(w) for w in ([wanted] if isinstance(wanted, str) else wanted)]
        missing = [w for w in wanted if w not in events]
        if missing:
            raise DataError(root, f"extra.events names {missing}, not among the events found: {', '.join(events)}")
        events = {k: v for k, v in events.items() if k in wanted}
    fo = fit_options(cfg)
    r_max = opt_float(cfg, "r_max", R_MAX, positive=True)
    gap = opt_float(cfg, "max_gap_minutes", positive=True)
    maxf = opt_int(cfg, "max_frames")
    to_rain = src.to_rain(cfg)
    specs = []
    for ev, items in events.items():
        items = items[:maxf] if maxf else items
        times = [(t - datetime(1970, 1, 1)).total_seconds() for t, _ in items]
        runs = split_at_gaps(times, gap * 60 if gap else None)
        for k, (a, b) in enumerate(runs):
            part = [f for _, f in items[a:b]]

            def load(part=part, ev=ev):
                frames = ((f, to_rain(src.decode(f))) for f in part)
                return prepare_rain_frames(frames, fo, cfg.channels, r_max, where=part[0].parent)
            specs.append(SequenceSpec(ev if len(runs) == 1 else f"{ev}#{k}", ev, part, load))
    return specs


#: the ``extra`` keys of the FMI and MeteoSwiss readers
RADAR_KEYS = CLIP_KEYS + ("a", "b", "nodata", "zero_level", "events", "r_max", "max_gap_minutes")


def composite_pixel_km(native_hw: tuple[int, int]):
    """km per pixel of a 1 km composite of ``native_hw`` pixels as read: 1 at its own grid or a
    crop; squared (the shorter side) and scaled to ``size`` otherwise."""
    def km(cfg: DataConfig) -> float:
        if cfg.resize != "resize" or cfg.size is None:
            return 1.0
        box = opt(cfg, "crop")
        side = min(box[2], box[3]) if isinstance(box, (list, tuple)) and len(box) == 4 else min(native_hw)
        return float(side) / float(cfg.size)
    return km


#: pysteps' importer (and its arguments) of each composite, for its grid
_IMPORTERS = {"fmi": ("fmi_pgm", {"gzipped": True}), "mch": ("mch_gif", {"product": "AQC", "unit": "mm", "accutime": 5.0})}


def composite_grid(path: str | os.PathLike, cfg: DataConfig) -> Grid | None:
    """The projected coordinates (cell centres in metres, north up) and the CF grid mapping of a
    folder of FMI or MeteoSwiss composites read at their own grid (``cfg``: no resize, no crop),
    from pysteps' importer metadata of its last file: FMI's from the PGM header, the MeteoSwiss
    CCS4 product grid as pysteps declares it. None for any other input or reading, and without
    pysteps and pyproj. ``transmem predict`` writes its CF-netCDF on it."""
    p = Path(path)
    kind = radar_kind(p) if p.is_dir() else None
    if kind is None or cfg.resize != "none" or opt(cfg, "crop") is not None:
        return None
    try:
        import pyproj
        from pysteps.io import get_method
    except ImportError:
        return None
    importer, kwargs = _IMPORTERS[kind]
    events = find_events(p, FMI if kind == "fmi" else MCH)
    _, _, meta = get_method(importer, "importer")(str(max(events.items())[1][-1][1]), **kwargs)
    H = int(round((meta["y2"] - meta["y1"]) / meta["ypixelsize"]))
    W = int(round((meta["x2"] - meta["x1"]) / meta["xpixelsize"]))
    x = meta["x1"] + (np.arange(W) + 0.5) * meta["xpixelsize"]
    y = meta["y2"] - (np.arange(H) + 0.5) * meta["ypixelsize"]  # row 0 is the north edge
    if meta.get("yorigin", "upper") == "lower":
        y = y[::-1]
    with warnings.catch_warnings():  # CF has no name for some parameters; crs_wkt keeps them all
        warnings.simplefilter("ignore", UserWarning)
        cf = pyproj.CRS.from_proj4(meta["projection"]).to_cf()
    return Grid(y=y, x=x, y_name="y", x_name="x",
                y_attrs={"standard_name": "projection_y_coordinate", "units": "m"},
                x_attrs={"standard_name": "projection_x_coordinate", "units": "m"},
                crs={"name": "crs", "attrs": {**cf, "proj4": meta["projection"]}})


@register_dataset("radar_fmi", units=rain_units, extra=RADAR_KEYS, pixel_km=composite_pixel_km((1226, 760)),
                  inflow=window_inflow)
def build_radar_fmi(cfg: DataConfig) -> dict:
    """FMI reflectivity composites → log-scaled rain rate clips with a validity mask."""
    return build_clip_datasets(cfg, "radar_fmi", _radar_specs(cfg, FMI), order="name", what="events")


@register_dataset("radar_mch", units=rain_units, extra=RADAR_KEYS, pixel_km=composite_pixel_km((640, 710)),
                  inflow=window_inflow)
def build_radar_mch(cfg: DataConfig) -> dict:
    """MeteoSwiss rain-rate composites → log-scaled rain rate clips with a validity mask."""
    return build_clip_datasets(cfg, "radar_mch", _radar_specs(cfg, MCH), order="name", what="events")

"""Any radar format pysteps imports, through pysteps' own importers (``pip install
'transmem[nowcast]'``; some importers need more: pyproj, pygrib, h5py, and netCDF4, which
``transmem[io]`` installs).

Registered dataset ``"pysteps"``. ``cfg.path`` is a folder; every folder under it that directly
holds matching files is one **event**, as for the FMI / MeteoSwiss readers. ``extra`` keys:

* ``importer`` (required): a pysteps importer name -- ``bom_rf3``, ``dwd_hdf5``, ``dwd_radolan``,
  ``fmi_geotiff``, ``fmi_pgm``, ``knmi_hdf5``, ``mch_gif``, ``mch_hdf5``, ``mch_metranet``,
  ``mrms_grib``, ``odim_hdf5``, ``opera_hdf5``, ``saf_crri``;
* ``importer_kwargs``: keyword arguments for it (e.g. ``{gzipped: true}`` for ``fmi_pgm``,
  ``{product: AQC, unit: mm, accutime: 5}`` for ``mch_gif``);
* ``time_regex`` / ``time_format`` (required): the time of each frame from its file name; files
  whose names do not match are ignored; a step over 1.5 × the median (or ``max_gap_minutes``)
  splits an event into sequences;
* ``a``, ``b``: the Z–R relation for reflectivity (default: the importer's ``zr_a``, ``zr_b``,
  else Marshall–Palmer 200, 1.6); ``r_max``, ``crop``, ``aspect``, ``max_frames``, ``splits``.

What the importer returns is turned into a rain rate from its metadata: ``unit`` mm/h as it is,
``mm`` divided by ``accutime`` (minutes), ``dBZ`` by Z = a R^b; NaN is no data. Then the frames go
through the radar path (crop / area-average, log scale, mask).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .clips import (CLIP_KEYS, window_inflow, SequenceSpec, build_clip_datasets, fit_options, natural_key, opt, opt_float, opt_int,
                    parse_time, require_path, split_at_gaps, why)
from .conventions import MP_A, MP_B
from .errors import DataError
from .radar import R_MAX, dbz_to_rainrate, prepare_rain_frames, rain_units
from .registry import DataConfig, register_dataset


def pysteps_importer(name: str, path=None):
    """pysteps' importer ``name``; a one-line :class:`DataError` when pysteps or the name is missing."""
    try:
        from pysteps.io import get_method
    except ImportError as e:
        raise DataError(path, f"name: pysteps needs pysteps: pip install 'transmem[nowcast]' ({e})") from None
    try:
        return get_method(name, "importer")
    except ValueError as e:
        raise DataError(path, f"extra.importer {name!r}: {why(e)}") from None


def to_rainrate(precip: np.ndarray, meta: dict, a: float | None, b: float | None, path) -> np.ndarray:
    """A pysteps field and its metadata → rain rate (mm/h, NaN = no data)."""
    r = np.array(precip, dtype=np.float64)
    unit, transform = meta.get("unit"), meta.get("transform")
    if transform not in (None, "dB") or (transform == "dB" and unit != "dBZ"):
        raise DataError(path, f"pysteps returned a {transform}-transformed {unit} field: not read")
    if unit == "mm/h":
        pass
    elif unit == "mm":
        acc = meta.get("accutime")
        if not acc or acc <= 0:
            raise DataError(path, "pysteps returned accumulations (mm) without accutime")
        r = r * (60.0 / float(acc))
    elif unit == "dBZ":
        za = a if a is not None else float(meta.get("zr_a") or MP_A)
        zb = b if b is not None else float(meta.get("zr_b") or MP_B)
        with np.errstate(over="ignore", invalid="ignore"):
            r = dbz_to_rainrate(r, za, zb).astype(np.float64)
    else:
        raise DataError(path, f"pysteps returned unit {unit!r}: only mm/h, mm and dBZ are read")
    with np.errstate(invalid="ignore"):
        r = np.where(np.isfinite(r), np.maximum(r, 0.0), np.nan)
    return r.astype(np.float32)


def _events(cfg: DataConfig, root: Path) -> dict[str, list[tuple[float, Path]]]:
    regex, fmt = opt(cfg, "time_regex"), opt(cfg, "time_format")
    if not regex:
        raise DataError(cfg.path, "name: pysteps needs extra.time_regex (and time_format) for the frame times")
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise DataError(cfg.path, f"extra.time_regex is not a valid regular expression: {e}") from None
    events = {}
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort(key=natural_key)
        found = []
        for f in files:
            t = None if f.startswith(".") else parse_time(f, pat, fmt)
            if t is not None:
                found.append((t, Path(d) / f))
        if not found:
            continue
        found.sort(key=lambda tf: (tf[0], natural_key(tf[1].name)))
        for (t0, f0), (t1, f1) in zip(found, found[1:]):
            if t0 == t1:
                raise DataError(f1, f"same time as {f0.name}")
        events[root.name if Path(d) == root else os.path.relpath(d, root)] = found
    if not events:
        raise DataError(root, f"no file name matches extra.time_regex={regex!r}")
    return events


@register_dataset("pysteps", units=rain_units, extra=CLIP_KEYS + ("importer", "importer_kwargs", "a", "b", "r_max",
                                                                  "max_gap_minutes", "time_regex", "time_format"),
                  inflow=window_inflow)
def build_pysteps(cfg: DataConfig) -> dict:
    """Radar composites read by pysteps' importers → log-scaled rain rate clips with a mask."""
    root = require_path(cfg, "a folder of radar files (or of event folders)")
    if not root.is_dir():
        raise DataError(root, "expected a folder of radar files (or of event folders), got a file")
    name = opt(cfg, "importer")
    if not name:
        raise DataError(cfg.path, "name: pysteps needs extra.importer (e.g. opera_hdf5, knmi_hdf5, mrms_grib)")
    importer = pysteps_importer(name, cfg.path)
    kwargs = opt(cfg, "importer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError(cfg.path, f"extra.importer_kwargs must be a mapping, got {kwargs!r}")
    a, b = opt_float(cfg, "a", positive=True), opt_float(cfg, "b", positive=True)
    fo = fit_options(cfg)
    r_max = opt_float(cfg, "r_max", R_MAX, positive=True)
    gap = opt_float(cfg, "max_gap_minutes", positive=True)
    maxf = opt_int(cfg, "max_frames")

    def rate(f: Path) -> np.ndarray:
        try:
            precip, _, meta = importer(os.fspath(f), **kwargs)
        except DataError:
            raise
        except Exception as e:  # whatever the importer raises on a bad or foreign file
            raise DataError(f, f"pysteps importer {name} failed ({why(e, f)})") from None
        return to_rainrate(precip, meta, a, b, f)

    specs = []
    for ev, items in _events(cfg, root).items():
        items = items[:maxf] if maxf else items
        fmt_given = bool(opt(cfg, "time_format"))
        runs = split_at_gaps([t for t, _ in items], (gap * 60 if fmt_given else gap) if gap else None)
        for k, (i, j) in enumerate(runs):
            part = [f for _, f in items[i:j]]

            def load(part=part):
                return prepare_rain_frames(((f, rate(f)) for f in part), fo, cfg.channels, r_max, where=part[0].parent)
            specs.append(SequenceSpec(ev if len(runs) == 1 else f"{ev}#{k}", ev, part, load))
    return build_clip_datasets(cfg, "pysteps", specs, order="name", what="events")

"""What a gridded file says about its own values: ODIM ``what`` groups, KNMI ``calibration``
attributes, CF attributes -- and the refusal to guess when it says nothing.

:func:`file_conventions` reads, for one HDF5 dataset, how raw values become physical ones:

* **ODIM_H5** (OPERA, most European national composites): the ``what`` groups at data, dataset and
  file level (the lowest level wins) give ``gain``, ``offset``, ``nodata``, ``undetect`` and
  ``quantity``: ``RATE`` is a rain rate (mm/h), ``ACRR`` an accumulation (mm) over
  ``startdate/starttime`` .. ``enddate/endtime``, ``DBZH`` / ``TH`` (and ``DBZV``, ``TV``) a
  reflectivity in dBZ, turned into rain rate by Marshall–Palmer ``Z = 200 R^1.6`` as pysteps does.
  ``undetect`` is "measured, no echo" (rain 0), ``nodata`` is "not measured" (masked).
* **KNMI** (``image1/image_data`` with an ``image1/calibration`` group): the formula
  ``calibration_formulas = "GEO=<gain>*PV+<offset>"``, no data = ``calibration_missing_data`` and
  ``calibration_out_of_image``; the unit from ``image1.image_geo_parameter``
  (``PRECIP_[MM]``: an accumulation in mm, by default over 5 minutes as pysteps assumes;
  ``REFLECTIVITY_[DBZ]``: dBZ).
* **CF / plain HDF5**: ``scale_factor`` (or ``gain``), ``add_offset`` (or ``offset``),
  ``_FillValue`` / ``missing_value`` (or ``nodata``) and a ``units`` attribute when it names a
  rain rate or dBZ.

:func:`refuse_undeclared_fill`: a field that declares no fill value, but where a large share of
the pixels holds the dtype's extreme or a usual fill constant (65535, -9999, 9.96921e36, ...), is
refused with one line naming ``extra.nodata`` -- such a value read as data turns "no radar" into
the heaviest rain of the map.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import numpy as np

from .errors import DataError

MP_A, MP_B = 200.0, 1.6                  # Marshall–Palmer Z = a R^b (pysteps' default for dBZ)
UNITS = ("mm/h", "mm", "dBZ")            # what the physical value of a rain field can be
ODIM_RATE = {"RATE": "mm/h", "ACRR": "mm", "DBZH": "dBZ", "TH": "dBZ", "DBZV": "dBZ", "TV": "dBZ"}
ODIM_PREFERENCE = ("RATE", "ACRR", "DBZH", "TH")
KNMI_MINUTES = 5.0                       # the KNMI 5-minute accumulation product (pysteps' default)
FILL_SHARE = 0.05                        # a share of pixels at one tell-tale value that is refused
TELL_TALE = (-9999.0, -999.0, -99.0, -9999000.0, -8888000.0, 9999.0, 99999.0, -32767.0, -32768.0,
             32767.0, 65535.0, 255.0, 9.969209968386869e36, 1e20, -1e20, -1e30, 1e30, -3.4028234663852886e38,
             3.4028234663852886e38)
_RATE_UNITS = {"mm/h", "mm h-1", "mm hr-1", "mm/hr", "mm.h-1", "mmh-1"}
_DBZ_UNITS = {"dbz"}


def _text(v) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", "replace").strip("\x00 ")
    if isinstance(v, np.ndarray):
        return _text(v.ravel()[0]) if v.size else ""
    return str(v).strip()


def _num(v) -> np.ndarray | None:
    """An attribute as float64 numbers; None when absent (``np.asarray(None, float)`` would be NaN:
    a missing ODIM ``gain`` read that way made every pixel NaN) or not numeric."""
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return a if a.size else None


def _attrs(obj, *names):
    for n in names:
        if n in obj.attrs:
            a = _num(obj.attrs[n])
            if a is not None:
                return a
    return None


# --------------------------------------------------------------------------------------------
# ODIM
# --------------------------------------------------------------------------------------------
def is_odim(f) -> bool:
    conv = _text(f.attrs.get("Conventions", b""))
    return conv.upper().startswith("ODIM") or ("what" in f and any(k.startswith("dataset") for k in f))


def odim_what(ds) -> dict[str, Any]:
    """The ``what`` attributes that apply to ``ds`` (file, then dataset, then data level)."""
    chain, g = [], ds.parent
    while True:
        chain.append(g)
        if g.name == "/":
            break
        g = g.parent
    merged: dict[str, Any] = {}
    for g in reversed(chain):  # root first, so lower levels override
        if "what" in g and hasattr(g["what"], "attrs"):
            merged.update(dict(g["what"].attrs))
    return merged


def odim_quantity(ds) -> str:
    return _text(odim_what(ds).get("quantity", b"")).upper()


def odim_pick(f, cands: list[tuple[str, tuple]], quantity: str | None, path) -> list[tuple[str, tuple]]:
    """Of an ODIM file's datasets, the one holding ``quantity`` (default: the first of RATE,
    ACRR, DBZH, TH present)."""
    by_q: dict[str, list] = {}
    for n, s in cands:
        by_q.setdefault(odim_quantity(f[n]), []).append((n, s))
    if quantity:
        q = str(quantity).upper()
        if q not in by_q:
            raise DataError(path, f"no ODIM dataset with quantity {q} (quantities: {', '.join(sorted(by_q))})")
        return by_q[q]
    for q in ODIM_PREFERENCE:
        if q in by_q:
            return by_q[q]
    return cands


def _odim_minutes(what: dict) -> float | None:
    try:
        t0 = datetime.strptime(_text(what["startdate"]) + _text(what["starttime"]), "%Y%m%d%H%M%S")
        t1 = datetime.strptime(_text(what["enddate"]) + _text(what["endtime"]), "%Y%m%d%H%M%S")
    except (KeyError, ValueError):
        return None
    m = (t1 - t0).total_seconds() / 60.0
    return m if m > 0 else None


def _odim(ds, path) -> dict:
    what = odim_what(ds)
    q = _text(what.get("quantity", b"")).upper()
    out: dict[str, Any] = {"convention": "ODIM", "quantity": q}
    for key, name in (("scale", "gain"), ("offset", "offset")):
        a = _num(what.get(name))
        if a is not None:
            out[key] = float(a[0])
    for key in ("nodata", "undetect"):
        a = _num(what.get(key))
        if a is not None:
            out[key] = a
    out["units"] = ODIM_RATE.get(q)
    if out["units"] == "mm":
        out["minutes"] = _odim_minutes(what)
    if out["units"] is None:
        out["problem"] = (f"ODIM quantity {q or '(none)'} of {ds.name} is not precipitation "
                          f"({', '.join(ODIM_RATE)}); pick another with extra.quantity or extra.dataset")
    return out


# --------------------------------------------------------------------------------------------
# KNMI
# --------------------------------------------------------------------------------------------
_KNMI_FORMULA = re.compile(r"GEO\s*=\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*\*\s*PV\s*\+?\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)?")


def is_knmi(ds) -> bool:
    return ds.name.endswith("/image_data") and "calibration" in ds.parent


def _knmi(ds, path) -> dict:
    cal = ds.parent["calibration"]
    out: dict[str, Any] = {"convention": "KNMI"}
    formula = _text(cal.attrs.get("calibration_formulas", b""))
    m = _KNMI_FORMULA.search(formula)
    if not m:
        out["problem"] = (f"KNMI calibration formula {formula!r} of {ds.name} not understood "
                          f"(expected GEO=<gain>*PV+<offset>); set extra.scale and extra.offset")
        return out
    out["scale"] = float(m.group(1))
    out["offset"] = float(m.group(2) or 0.0)
    fills = [a for a in (_attrs(cal, "calibration_missing_data"), _attrs(cal, "calibration_out_of_image"))
             if a is not None]
    if fills:
        out["nodata"] = np.unique(np.concatenate(fills))
    param = _text(ds.parent.attrs.get("image_geo_parameter", b"")).upper()
    if "DBZ" in param:
        out["units"] = "dBZ"
    elif "MM" in param:
        out["units"], out["minutes"] = "mm", KNMI_MINUTES
    return out


# --------------------------------------------------------------------------------------------
# all
# --------------------------------------------------------------------------------------------
def file_conventions(ds, path) -> dict:
    """``{"convention", "scale", "offset", "nodata", "undetect", "units", "minutes", "problem"}``
    (keys present only when the file says them) for the HDF5 dataset ``ds``."""
    f = ds.file
    if is_knmi(ds):
        return _knmi(ds, path)
    if is_odim(f) and odim_what(ds):
        return _odim(ds, path)
    out: dict[str, Any] = {"convention": "CF"}
    a = _attrs(ds, "scale_factor", "gain")
    if a is not None:
        out["scale"] = float(a[0])
    a = _attrs(ds, "add_offset", "offset")
    if a is not None:
        out["offset"] = float(a[0])
    a = _attrs(ds, "_FillValue", "missing_value", "nodata")
    if a is not None:
        out["nodata"] = a
    given = _text(ds.attrs.get("units", b"")).strip()
    u = given.lower()
    if u in _RATE_UNITS:
        out["units"] = "mm/h"
    elif u in _DBZ_UNITS:
        out["units"] = "dBZ"
    elif u == "mm":
        out["units"] = "mm"
    elif u and u not in ("1", "-", "none", "unknown"):
        out["problem"] = (f"{ds.name} is in {given!r}, not a rain rate, accumulation or reflectivity: read any "
                          f"quantity with name: xarray, or set extra.units if it is rain")
    return out


def undeclared_fill(raw: np.ndarray, dtype, rain: bool = False) -> tuple[float, float, str] | None:
    """``(value, share, why)`` when one tell-tale fill value covers at least :data:`FILL_SHARE` of
    ``raw`` (the dtype's maximum or minimum, a usual fill constant, or -- in a rain field, which
    cannot be negative -- any negative constant), else None."""
    a = np.asarray(raw)
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a.ravel()
    if finite.size == 0:
        return None
    cands: list[tuple[float, str]] = []
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        cands.append((float(info.max), f"the maximum of {dt}"))
        if dt.kind == "i":
            cands.append((float(info.min), f"the minimum of {dt}"))
    elif dt.kind == "f":
        info = np.finfo(dt)
        cands += [(float(info.max), f"the maximum of {dt}"), (float(-info.max), f"the minimum of {dt}")]
    cands += [(v, "a usual fill value") for v in TELL_TALE]
    vals, counts = np.unique(finite, return_counts=True)
    if rain and vals.size and vals[0] < 0:
        neg = np.flatnonzero(vals < 0)
        j = neg[np.argmax(counts[neg])]
        cands.append((float(vals[j]), "a negative value in a rain field"))
    best = None
    for v, why in cands:
        i = np.searchsorted(vals, v)
        for j in (i - 1, i):
            if 0 <= j < len(vals) and np.isclose(vals[j], v, rtol=1e-6, atol=0):
                share = counts[j] / a.size
                if share >= FILL_SHARE and (best is None or share > best[1]):
                    best = (float(vals[j]), float(share), why)
    return best


def refuse_undeclared_fill(raw: np.ndarray, dtype, path, name: str = "the field", rain: bool = False) -> None:
    """:class:`DataError` when :func:`undeclared_fill` finds a fill value the file did not declare."""
    hit = undeclared_fill(raw, dtype, rain)
    if hit is not None:
        v, share, why = hit
        raise DataError(path, f"{share:.0%} of the pixels of {name} hold {v:g} ({why}) and the file declares "
                              f"no fill value: set extra.nodata: {v:g} if it means no data (or extra.nodata: [] "
                              f"if it is a real value); it is not read as data")

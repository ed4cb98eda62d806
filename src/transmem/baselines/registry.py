"""The table of reference nowcasts, in pysteps' ``get_method(name)`` style.

A reference nowcast is one function registered under a name::

    @register_baseline("sprog", scale="dbr", inputs=3, rain_only=True, needs=("pysteps", "cv2"))
    def sprog(past, n_leads, ctx):
        ...  # past: (k, C, H, W) float64 in the declared scale -> (n_leads, C, H, W)

The function sees numpy only, one clip at a time, already in the scale it declares (``values``:
the model's [0, 1] values, log-scaled rain for radar; ``physical``: the data's units, mm/h for
rain; ``dbr``: pysteps' decibel rain, 10·log10(R) with R < 0.1 mm/h at −15 dB). It may return
NaN where it knows nothing (rain advected in from outside the domain): the forecaster fills those
pixels by the data's *inflow* rule (:class:`Context`). :class:`transmem.baselines.BaselineForecaster`
does the rest (tensors, units, no-data, clipping), so every registered name is scored, blended
and written exactly like a model.

Dropping a file into this package that registers a function is enough: :func:`load_all` imports
every module here, and any package that declares an entry point in the group
``transmem.baselines`` (pysteps' plugin style), once, on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

SCALES = ("values", "physical", "dbr")
INFLOWS = ("zero", "last")  # what enters the frame where nothing is known: no rain, or the last frame
DBR_THRESHOLD_MMH = 0.1     # pysteps' gallery: dB transform with threshold 0.1 mm/h ...
DBR_ZERO = -15.0            # ... and zerovalue -15 dBR
ENTRY_POINT_GROUP = "transmem.baselines"
FIRST = ("persistence_nowcast", "extrapolation")  # listed first; the other modules follow by name
PIP_NAMES = {"pysteps": "transmem[nowcast]", "cv2": "transmem[nowcast]", "skimage": "scikit-image"}


class BaselineUnavailable(UserError, RuntimeError):
    """A baseline whose optional dependency is missing (the message is one line)."""


@dataclass
class Context:
    """What a reference nowcast may need besides the past frames.

    ``rain``: the data is a precipitation field. ``inflow``: ``zero`` (rain: nothing is known to
    come in) or ``last`` (any other field: persistence where nothing is known). ``threshold``: the
    smallest rain in the method's scale (0.1 mm/h mapped there). ``kmperpixel`` and ``timestep``
    (minutes): the grid, for methods whose perturbations are physical (STEPS). ``seed``: for
    ensembles, fixed so that a score is a function of the clip. ``options``: the method's own
    keyword overrides. ``scale``: the scale the method was handed the frames in."""
    rain: bool = False
    inflow: str = "last"
    threshold: float = 0.0
    kmperpixel: float = 1.0
    timestep: float = 5.0
    seed: int = 0
    options: dict = field(default_factory=dict)
    scale: str = "values"  # the scale ``past`` is in (set by the forecaster)


@dataclass(frozen=True)
class BaselineSpec:
    name: str
    forecast: Callable[[np.ndarray, int, Context], np.ndarray]
    scale: str = "values"
    inputs: int = 1             # past frames the method reads (fewer: it falls back to persistence)
    rain_only: bool = False     # a precipitation method: in the default lists only for rain data
    default: bool = True        # in the default lists (evaluate's rows, zoo rank, predict --baselines)
    needs: tuple[str, ...] = () # importable modules it needs (the `nowcast` extra)
    doc: str = ""


_BASELINES: dict[str, BaselineSpec] = {}
_loaded = False


def register_baseline(name: str, *, scale: str = "values", inputs: int = 1, rain_only: bool = False,
                      default: bool = True, needs: tuple[str, ...] = ()):
    """Register ``fn(past, n_leads, ctx)`` as the reference nowcast ``name`` (see the module doc)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not name or any(c in name for c in ":, /"):
        raise ValueError(f"a baseline name needs no ':', ',', ' ' or '/': {name!r}")

    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        _BASELINES[name] = BaselineSpec(name, fn, scale, int(inputs), rain_only, default, tuple(needs),
                                        doc[0] if doc else "")
        return fn
    return deco


def load_all() -> None:
    """Import every module of this package, then the ``transmem.baselines`` entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(__package__)
    names = sorted((i.name for i in pkgutil.iter_modules(package.__path__)),
                   key=lambda n: (n not in FIRST, FIRST.index(n) if n in FIRST else 0, n))
    for name in names:
        if name not in ("registry", "forecaster"):
            importlib.import_module(f"{__package__}.{name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()  # the plugin's module registers its functions as it is imported


def list_baselines(rain: bool | None = None, defaults_only: bool = False) -> list[str]:
    """Registered names, in registration order. ``rain``: keep the ones that apply to the data
    (False drops the precipitation methods); ``defaults_only``: the ones shown by default."""
    load_all()
    return [n for n, s in _BASELINES.items()
            if (rain is None or rain or not s.rain_only) and (not defaults_only or s.default)]


def get_method(name: str) -> BaselineSpec:
    """The registered :class:`BaselineSpec` ``name``; ValueError naming the choices otherwise."""
    load_all()
    if name not in _BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(_BASELINES)}")
    return _BASELINES[name]


def missing_dependency(spec: BaselineSpec) -> str | None:
    """None when ``spec`` can run here, else why not (one line)."""
    for module in spec.needs:
        try:
            if module == "pysteps":
                quiet_pysteps()
            else:
                importlib.import_module(module)
        except Exception as e:  # ImportError, or pysteps failing on a bad pystepsrc
            first = (str(e).strip().splitlines() or [""])[0]
            pip = " ".join(sorted({f"'{PIP_NAMES.get(m, m)}'" for m in spec.needs}))
            return (f"{spec.name} needs {' and '.join(spec.needs)}: pip install {pip} "
                    f"({type(e).__name__}{': ' + first if first else ''})")
    return None


# ------------------------------------------------------------------ pysteps, shared by the methods
def quiet_pysteps():
    """``pysteps``, imported with its banner and warnings swallowed."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pysteps  # noqa: F401  (parent first: a hidden ``pysteps`` hides the submodules too)
        import pysteps.extrapolation
        import pysteps.motion
        import pysteps.nowcasts
        return pysteps


def finite(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
    return np.nan_to_num(np.asarray(a, dtype=np.float64), nan=fill, posinf=fill, neginf=fill)


def motion_field(past: np.ndarray, frames: int = 3, **lk_kwargs) -> np.ndarray:
    """pysteps' dense Lucas--Kanade on the last ``frames`` of ``past`` ``(k, H, W)`` -> ``(2, H, W)``;
    zero (persistence) with fewer than two frames or nothing trackable."""
    k = min(int(frames), past.shape[0])
    if k < 2:
        return np.zeros((2, *past.shape[-2:]))
    pysteps = quiet_pysteps()
    # quietly: LK's outlier filter warns on sparse rain (degrees of freedom), noise on a user's terminal
    v = pysteps_call(pysteps.motion.get_method("LK"), past[-k:], verbose=False, **lk_kwargs)
    return finite(v)


def pysteps_call(fn, *args, **kwargs):
    """Run a pysteps nowcast with its prints and warnings silenced, and numpy's errors ignored."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


#: what pysteps raises on a field that gives its nowcast nothing to fit: uniform rain (a cascade
#: level without variance), rain in the last frame only (non-finite correlations), a singular
#: correlation matrix (two wet pixels, a straight rain edge), an empty wet area
DEGENERATE = ("non-finite", "Singular matrix", "zero-size array")


def nowcast_or_advect(call, last: np.ndarray, velocity: np.ndarray, n_leads: int) -> np.ndarray:
    """``call()``, a pysteps nowcast of one channel ``(n_leads, H, W)``; where pysteps finds the field
    degenerate (:data:`DEGENERATE`), ``last`` advected along ``velocity`` instead: what the cascade
    nowcasts tend to when nothing in the field evolves. Crops of a 1 km composite, as a mixture
    trains on, meet such fields; one odd crop should not end a training run or an evaluation."""
    try:
        return call()
    except ValueError as e:  # numpy's LinAlgError is a ValueError
        if not any(s in str(e) for s in DEGENERATE):
            raise
    advect = quiet_pysteps().extrapolation.get_method("semilagrangian")
    return pysteps_call(advect, last, velocity, n_leads, outval=np.nan)


def cascade_call(fn, frames: np.ndarray, velocity: np.ndarray, n_leads: int, ar_order: int, **kwargs):
    """A pysteps cascade nowcast (S-PROG, STEPS) on the last ``ar_order + 1`` of ``frames`` with
    an AR(``ar_order``) model per level. Where pysteps finds the fitted process nonstationary
    (sparse rain: a level's lag-1 and lag-2 correlations of a few wet pixels admit no stationary
    AR(2)), the same nowcast with AR(1) on the last two frames, which is always stationary: one odd
    clip should not end an evaluation or a training run that scores it."""
    try:
        return pysteps_call(fn, frames[-(ar_order + 1):], velocity, n_leads, ar_order=ar_order, **kwargs)
    except RuntimeError as e:
        if ar_order == 1 or "nonstationary" not in str(e):
            raise
    return pysteps_call(fn, frames[-2:], velocity, n_leads, ar_order=1, **kwargs)


def to_dbr(rate: np.ndarray) -> np.ndarray:
    """Rain rate (mm/h) -> pysteps' dBR (10·log10 R; below 0.1 mm/h: −15)."""
    rate = finite(rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(np.maximum(rate, 1e-12))
    return np.where(rate >= DBR_THRESHOLD_MMH, db, DBR_ZERO)


def from_dbr(db: np.ndarray) -> np.ndarray:
    """pysteps' dBR -> mm/h (below the −10 dB threshold: 0; NaN stays NaN)."""
    db = np.asarray(db, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        rate = np.power(10.0, db / 10.0)
    return np.where(db < 10.0 * np.log10(DBR_THRESHOLD_MMH), 0.0, rate)

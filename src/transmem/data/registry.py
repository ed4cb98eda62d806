"""Dataset registry: every source of clips is a function registered by name.

A builder takes a :class:`DataConfig` and returns ``{split: torch Dataset}``; every item of every
dataset is a dict ``{"frames": float32 (T, C, H, W) in [0, 1]}`` plus, for sources with missing
values (radar), ``"mask": bool (T, 1, H, W)`` that is True where the value is valid.

A reader whose values stand for a physical quantity declares it when it registers
(``units=``): a function of the data config that returns :class:`Units`, the unit's name and the
maps between the model's [0, 1] values and physical values. Metrics in physical units (CSI at a
rain rate), forecasts written in mm/h and the baselines that work in physical units all read it
from here, through :func:`physical_units`.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import DataError

_DATASETS: dict[str, Callable[["DataConfig"], dict]] = {}
_UNITS: dict[str, Callable[["DataConfig"], "Units"]] = {}
_EXTRA_KEYS: dict[str, tuple[str, ...]] = {}  # reader -> the data.extra keys it reads
_INFLOWS: dict[str, Any] = {}  # dataset -> the inflow its reference nowcasts assume
_DESCRIBE: dict[str, Callable] = {}  # dataset -> a short description of a config (zoo tables)
_PIXEL_KM: dict[str, Callable] = {}  # dataset -> km per pixel of its frames as read
_READ_INPUT: dict[str, Callable] = {}  # dataset -> how `transmem predict` reads an input in its format
_NOT_LOADED: dict[str, str] = {}  # reader module -> why it could not be imported


@dataclass(frozen=True)
class Units:
    """``name`` (e.g. "mm/h"); ``to_physical`` and ``from_physical`` map arrays or tensors between
    the model's [0, 1] values and physical values, elementwise. ``precipitation``: the values are
    a rain rate (the reference nowcasts' thresholds, dB scale and inflow depend on it)."""
    name: str
    to_physical: Callable[[Any], Any]
    from_physical: Callable[[Any], Any]
    precipitation: bool = False


@dataclass
class Grid:
    """What a gridded input is, besides its values: the variable, its units, the time of each
    frame, and the spatial coordinates (1-D, after crop/resize) with their attributes: what a
    reader's ``read_input`` (:func:`register_dataset`) returns beside the frames of a forecast's
    input (the xarray reader from the file, the radar composites from their projection)."""
    variable: str = ""
    units: str = ""
    attrs: dict = field(default_factory=dict)
    times: list = field(default_factory=list)        # numpy datetime64 (or float) per frame
    y_name: str = "y"
    x_name: str = "x"
    y: Any = None                                    # 1-D numpy array, or None
    x: Any = None
    y_attrs: dict = field(default_factory=dict)
    x_attrs: dict = field(default_factory=dict)
    crs: dict = field(default_factory=dict)          # CF grid mapping: {"name": ..., "attrs": {...}}


def register_dataset(name: str, units: Callable[["DataConfig"], Units] | None = None,
                     extra: tuple[str, ...] | None = None,
                     inflow: str | Callable[["DataConfig"], str | None] | None = None,
                     pixel_km: Callable[["DataConfig"], float | None] | None = None,
                     describe: Callable[["DataConfig"], str] | None = None,
                     read_input: Callable[[Any, "DataConfig", "int | None"], Any] | None = None):
    """Register a builder under ``name``. ``extra``: every ``data.extra`` key the reader reads
    (a key outside it is refused by :func:`build_datasets`, naming the valid ones); ``None``
    leaves the reader's keys unchecked (a reader registered from outside transmem). ``inflow``:
    what the reference nowcasts should assume enters the frame from outside when the kind of
    data does not say (``"zero"``: a scene on a known empty background, as generated digits;
    default: zero for rain, the last frame for anything else), or a function of the config giving
    it (None: that default). ``pixel_km``: a function of the
    config giving the grid spacing of the frames as read (km per pixel), for reference nowcasts
    whose perturbations are physical (STEPS). ``describe``: a function of the config giving the
    short description a zoo table shows (default: the name). ``read_input``: how ``transmem
    predict`` reads one input (a file or folder) for a model trained on this data:
    ``read_input(path, cfg, last) -> (frames, mask, grid)``, ``cfg`` the model's data config
    (``size``, ``channels``, ``resize`` and the fitted ``extra`` as in training), ``last`` the
    frames the forecast needs (None: all; the reader may read only those), ``frames`` float32
    ``(T, C, H, W)`` in [0, 1], ``mask`` bool ``(T, 1, H, W)`` (True where valid), ``grid`` a
    :class:`Grid` or None (with one, ``predict`` writes CF-netCDF on its coordinates and times);
    it returns None for an input that is not in its format, which ``predict`` then reads by its
    extension (:mod:`transmem.data.inputs`), as it does for a reader that declares none."""
    def deco(fn):
        _DATASETS[name] = fn
        if units is not None:
            _UNITS[name] = units
        if extra is not None:
            _EXTRA_KEYS[name] = tuple(sorted(set(extra)))
        if inflow is not None:
            _INFLOWS[name] = inflow
        if pixel_km is not None:
            _PIXEL_KM[name] = pixel_km
        if describe is not None:
            _DESCRIBE[name] = describe
        if read_input is not None:
            _READ_INPUT[name] = read_input
        return fn
    return deco


def _entry(table: dict, cfg: "DataConfig | dict") -> tuple[Any, "DataConfig"]:
    """What the dataset's reader declared in ``table`` (:func:`register_dataset`; None when it
    declared nothing), and the config as a :class:`DataConfig`."""
    _import_builtin_readers()
    if isinstance(cfg, dict):
        cfg = DataConfig.from_dict(cfg)
    return table.get(cfg.name), cfg


def _declared(table: dict, cfg: "DataConfig | dict"):
    """What the dataset's reader declared in ``table``, evaluated on the config when it is a
    function of it; None when it declared nothing."""
    value, cfg = _entry(table, cfg)
    return value(cfg) if callable(value) else value


def pixel_km(cfg: "DataConfig | dict") -> float | None:
    """The grid spacing (km per pixel) of a dataset's frames as read, where its reader knows it."""
    return _declared(_PIXEL_KM, cfg)


def describe(cfg: "DataConfig | dict") -> str:
    """A short description of the data a config names (its reader's ``describe``, else the name);
    a config that does not parse is described by its name alone."""
    try:
        return _declared(_DESCRIBE, cfg) or (cfg.name if isinstance(cfg, DataConfig) else cfg.get("name", "?"))
    except (DataError, TypeError, ValueError):
        return str(cfg.get("name", "?")) if isinstance(cfg, dict) else "?"


def read_input(path, cfg: "DataConfig | dict", last: int | None = None):
    """``(frames, mask, grid)`` of a forecast's input read by the reader of ``cfg`` (a model's data
    config) as it declared (``register_dataset(read_input=)``); None when it declared nothing or
    the input is not in its format."""
    fn, cfg = _entry(_READ_INPUT, cfg)
    return None if fn is None else fn(path, cfg, last)


def inflow_hint(cfg: "DataConfig | dict") -> str | None:
    """The inflow a dataset declared (:func:`register_dataset`), or None."""
    return _declared(_INFLOWS, cfg)


def extra_keys(name: str) -> tuple[str, ...] | None:
    """The ``data.extra`` keys the reader ``name`` reads (None: not declared)."""
    _import_builtin_readers()
    return _EXTRA_KEYS.get(name)


def check_extra(cfg: "DataConfig") -> None:
    """Refuse a ``data.extra`` key the reader does not read (a typo such as ``blokcs`` would
    otherwise be ignored silently), naming the valid keys."""
    extra = cfg.extra or {}
    if not isinstance(extra, dict):
        raise DataError(None, f"data.extra: expected a mapping, got {type(extra).__name__}")
    known = extra_keys(cfg.name)
    if known is None:
        return
    unknown = sorted(str(k) for k in set(extra) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(None, f"data.extra.{unknown[0]}: not a key of the '{cfg.name}' reader{hint}; "
                              f"its keys: {', '.join(known) or 'none'}")


def list_datasets() -> list[str]:
    _import_builtin_readers()
    return sorted(_DATASETS)


def physical_units(cfg: "DataConfig | dict") -> Units | None:
    """The physical units of a dataset's values (None: plain intensities in [0, 1])."""
    return _declared(_UNITS, cfg)


@dataclass
class DataConfig:
    """Where clips come from and how they are cut. Unused fields are ignored by a reader."""
    name: str = "flying_digits"       # registry key
    path: str | None = None           # file or folder for readers
    frames: int = 20                  # T = T_in + T_out frames per clip
    size: int = 64                    # square frame size after resize/crop (generators: canvas)
    channels: int = 1                 # 1 = grayscale, 3 = RGB
    seed: int = 0
    # flying digits
    num_digits: int = 2
    mnist_dir: str | None = None      # real MNIST IDX files; None = built-in digit source
    train_clips: int = 2000
    val_clips: int = 200
    test_clips: int = 200
    # readers
    stride: int = 1                   # frames between successive clip starts
    resize: str = "resize"            # "resize" | "crop" | "none"
    split: tuple = (0.8, 0.1, 0.1)    # fractions of sequences / events for train / val / test
    cache_dir: str | None = None      # on-disk memory-mapped cache of prepared clips
    extra: dict = field(default_factory=dict)  # reader-specific options (dataset path, scale, ...)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(None, f"unknown data config keys: {sorted(unknown)}")
        d = dict(d)
        if "split" in d:
            d["split"] = tuple(d["split"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["split"] = list(d["split"])
        return d


def build_datasets(cfg: DataConfig) -> dict:
    """Return ``{"train": Dataset, "val": Dataset, "test": Dataset}`` for ``cfg``.

    A builder may write into ``cfg.extra`` what it fitted on the train split (the ``xarray``
    reader's ``normalization``): the run saves ``cfg`` afterwards, so the fit is stored in its
    ``config.yaml`` and on the model card, and ``physical_units(cfg)`` reads it from there."""
    _import_builtin_readers()
    if cfg.name not in _DATASETS:
        missing = "".join(f"; reader module '{m}' not loaded ({why})" for m, why in _NOT_LOADED.items())
        raise DataError(cfg.path, f"unknown dataset '{cfg.name}'; known: {', '.join(sorted(_DATASETS))}{missing}")
    check_extra(cfg)
    return _DATASETS[cfg.name](cfg)


#: ``extra`` keys a reader fits on the data and writes into the config (see build_datasets): the
#: ``xarray`` reader's ``normalization``, the frame readers' ``white`` (16-bit images)
FITTED_KEYS = ("normalization", "white")


#: generators: they draw frames of ``size x size`` whatever ``resize`` says
GENERATORS = ("flying_digits", "advected_rain")


def frame_size_of(datasets: dict) -> tuple[int, int] | None:
    """``(height, width)`` of the frames the datasets hold (the first clip of the first split that
    has one), or None when every split is empty. With ``resize: none`` this is the data's native
    size, which ``data.size`` does not describe."""
    for split in ("train", "val", "test"):
        ds = datasets.get(split)
        if ds is not None and len(ds) > 0:
            h, w = ds[0]["frames"].shape[-2:]
            return int(h), int(w)
    return None


def adopt_fitted(cfg: DataConfig, model_data: dict | None) -> list[str]:
    """Give ``cfg`` what a model was trained with -- the fitted keys of its card's ``data.extra``
    -- when ``cfg`` uses the same reader and fits none of its own, so that a model evaluated on
    other data sees it normalised as in training. Returns the keys taken."""
    if not model_data or model_data.get("name") != cfg.name:
        return []
    theirs = model_data.get("extra") or {}
    taken = [k for k in FITTED_KEYS if k in theirs and k not in (cfg.extra or {})]
    if taken:
        cfg.extra = dict(cfg.extra or {}, **{k: theirs[k] for k in taken})
    return taken


#: optional dependency -> the extra that installs it
_EXTRAS = {"av": "video", "h5py": "radar"}


_SCANNED = False
READER_ENTRY_POINTS = "transmem.readers"  # a package of yours adds a reader by an entry point here


def _import_builtin_readers() -> None:
    """Importing the reader modules registers them: every module of this package (a package scan,
    so a new reader is one file with ``@register_dataset``), then the ``transmem.readers`` entry
    points. A reader whose optional dependency is missing is recorded with the reason (named in
    the error when its dataset is asked for); any other import failure is an error. Done once
    per process (a reader registered later, as tests do, calls ``register_dataset`` itself)."""
    global _SCANNED
    if _SCANNED:
        return
    package = importlib.import_module(__package__)
    mods = [f"{__package__}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if m.name != "registry"]
    for ep in entry_points(group=READER_ENTRY_POINTS):
        mods.append(ep.value.split(":")[0])
    for mod in mods:
        if mod in _NOT_LOADED:
            continue
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            dep = (e.name or "").split(".")[0]
            if dep not in _EXTRAS:
                raise
            _NOT_LOADED[mod] = f"needs {dep}: pip install 'transmem[{_EXTRAS[dep]}]'"
    _SCANNED = True

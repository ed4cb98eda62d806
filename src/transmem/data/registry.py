"""Dataset registry: every source of clips is a function registered by name.

A builder takes a :class:`DataConfig` and returns ``{split: torch Dataset}``; every item of every
dataset is a dict ``{"frames": float32 (T, C, H, W) in [0, 1]}`` plus, for sources with missing
values (radar), ``"mask": bool (T, 1, H, W)`` that is True where the value is valid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import DataError

_DATASETS: dict[str, Callable[["DataConfig"], dict]] = {}


def register_dataset(name: str):
    def deco(fn):
        _DATASETS[name] = fn
        return fn
    return deco


def list_datasets() -> list[str]:
    _import_builtin_readers()
    return sorted(_DATASETS)


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
    """Return ``{"train": Dataset, "val": Dataset, "test": Dataset}`` for ``cfg``."""
    _import_builtin_readers()
    if cfg.name not in _DATASETS:
        raise DataError(cfg.path, f"unknown dataset '{cfg.name}'; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[cfg.name](cfg)


def _import_builtin_readers() -> None:
    # Importing the reader modules registers them; optional ones may be missing a dependency.
    import importlib
    for mod in ("flying_digits", "arrays", "video", "frames", "radar", "hdf5"):
        try:
            importlib.import_module(f"transmem.data.{mod}")
        except ModuleNotFoundError as e:  # a module not written yet, or an optional extra missing
            if not (e.name or "").startswith(("transmem.data.", "av", "h5py")):
                raise

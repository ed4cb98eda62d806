"""Experiment configuration: YAML plus ``--section.key value`` overrides.

Every section is a small dataclass; unknown keys are errors; the effective config is saved beside
the results so that any run can be repeated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import CONFIG_CHOICES
from .data.registry import DataConfig
from .models import build_config


class ConfigError(ValueError):
    """A bad configuration (one-line message)."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    t_in: int = 10
    schedule: str = "linear"          # scheduled sampling: linear | reverse | none
    sampling_stop: float = 0.5        # fraction of the steps over which sampling decays
    sampling_start: float = 0.0       # reverse schedule: fraction where the change starts
    reverse_time_prob: float = 0.0    # time-reversed clips as augmentation
    augment: list = field(default_factory=list)  # spatial augmentation: [flip, rot90]
    crop: int = 0                     # train on random crop x crop windows (0: whole frames)
    l1_weight: float = 0.0
    val_every: int = 0                # validate every N steps (0: once, at the end)
    val_batches: int = 0              # limit validation batches (0: all)
    select_best: bool = True          # keep the checkpoint with the best validation MSE
    ckpt_every: int = 200
    seed: int = 0
    precision: str = "32-true"        # e.g. bf16-mixed on a GPU; fp32 is fastest on these CPUs
    compile: bool = False             # torch.compile the model (slower on CPU here; try on GPU)
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"            # "ddp" for multi-process / multi-node through Lightning
    num_workers: int = 0
    progress: bool = True
    threads: int = 0                  # torch intra-op threads (0: torch's default)


@dataclass
class TransferConfig:
    teachers: list = field(default_factory=list)  # zoo entries (folders or names in the zoo root)
    distill_weight: float = 0.1       # lambda in L = L_pred + lambda * L_distill (must be > 0 to transfer)
    distill_decay: str = "none"       # none | linear | cosine: lambda falls to 0 by the last step
    distill_span: str = "all"         # all | input: distill at every step or only while both read inputs
    mode: str = "distill"             # distill | bank_read
    tmu_layers: Any = "bottom"        # bottom | all | top | [layer, ...]
    gates: bool = True
    weighting: str = "none"           # none | softmax
    teacher_inputs: str = "ground_truth"  # ground_truth | own
    cache_bank: str = "memory"        # memory | disk | none (ground_truth teachers only)
    init_from: Any = None             # zoo entry whose weights initialise the target backbone
    distiller_kernel: int = 1
    gate_kernel: int = 1


@dataclass
class EvalConfig:
    batch_size: int = 32
    split: str = "test"
    thresholds: list = field(default_factory=list)  # rain thresholds (mm/h) for CSI/POD/FAR/HSS
    examples: int = 3                 # test clips shown as GIFs and grids


@dataclass
class Experiment:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"name": "convlstm"})
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return {"data": self.data.to_dict(), "model": dict(self.model),
                "train": dataclasses.asdict(self.train),
                "transfer": dataclasses.asdict(self.transfer), "eval": dataclasses.asdict(self.eval)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "transfer": TransferConfig, "eval": EvalConfig}


def _coerce(value: Any, like: Any, key: str) -> Any:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(like, int) and not isinstance(like, bool):
        if isinstance(value, (int, float)) and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(like, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(like, (list, tuple)) and isinstance(value, str):
        return [v for v in value.split(",") if v]
    return value




def _section(cls, data: dict, name: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown keys in '{name}': {unknown}; known: {sorted(known)}")
    default = cls()
    kw = {k: _coerce(v, getattr(default, k), f"{name}.{k}") for k, v in data.items()}
    for k, v in kw.items():
        allowed = CONFIG_CHOICES.get(f"{name}.{k}")
        for item in (v if isinstance(v, list) else [v]) if allowed else []:
            if item not in allowed:
                raise ConfigError(f"{name}.{k}: expected one of {', '.join(allowed)}, got {item!r}")
    if cls is DataConfig and "split" in kw:
        kw["split"] = tuple(kw["split"])
    return cls(**kw)


def load_experiment(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    base: dict | None = None) -> Experiment:
    """Build an :class:`Experiment` from ``base`` dict, then the YAML file, then overrides
    ``{"train.steps": "100", ...}``."""
    raw: dict = _deep_copy(base or {})
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the config must be a mapping of sections")
        for k, v in loaded.items():
            if not isinstance(v, dict):
                raise ConfigError(f"{p}: section '{k}' must be a mapping")
            raw.setdefault(k, {}).update(v)
    for key, value in (overrides or {}).items():
        if "." not in key:
            raise ConfigError(f"--{key}: overrides are written --section.key value (e.g. --train.steps 100)")
        sec, k = key.split(".", 1)
        raw.setdefault(sec, {})[k] = value
    unknown = sorted(set(raw) - set(_SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; known: data, model, train, transfer, eval")
    exp = Experiment()
    for name, cls in _SECTIONS.items():
        if name in raw:
            setattr(exp, name, _section(cls, raw[name], name))
    if "model" in raw:
        model = {"name": "convlstm", **raw["model"]}
        name = model.pop("name")
        try:
            cfg = build_config(name, {k: v for k, v in model.items()})
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
        # coerce the override strings through the dataclass defaults
        cfg_default = build_config(name)
        coerced = {k: _coerce(v, getattr(cfg_default, k), f"model.{k}") for k, v in model.items()}
        exp.model = {"name": name, **coerced}
    return exp


def _deep_copy(d: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}

"""Experiment configuration: YAML plus ``--section.key value`` overrides.

Every section is a small dataclass; unknown keys are errors; the effective config is saved beside
the results so that any run can be repeated.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import CONFIG_CHOICES, NORMS, TRANSFER_MODES
from .errors import UserError
from .options import TMUOptions, check as check_tmu_options
from .data.registry import GENERATORS, DataConfig
from .files import read_small_file


class ConfigError(UserError, ValueError):
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
class TransferConfig(TMUOptions):
    """The TMU's options (:class:`~transmem.options.TMUOptions`: tmu_layers, mode, gates,
    weighting, distiller_kernel, distiller_norm, gate_kernel; declared there once) plus how the
    target trains with its teachers."""
    teachers: list = field(default_factory=list)  # zoo entries (folders or names in the zoo root)
    distill_weight: float = 0.1       # lambda in L = L_pred + lambda * L_distill (must be > 0 to transfer)
    distill_decay: str = "none"       # none | linear | cosine: lambda falls to 0 by the last step
    distill_span: str = "all"         # all | input: distill at every step or only while both read inputs
    teacher_inputs: str = "ground_truth"  # ground_truth | own
    cache_bank: str = "memory"        # memory | disk | none (ground_truth teachers only)
    init_from: Any = None             # zoo entry whose weights initialise the target backbone


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
    """``value`` (from YAML, or an override string parsed as YAML) as the type of the setting's
    default ``like``: ``true`` is not a step count, ``3`` is not a switch, ``[1, 2`` is not a list."""
    if isinstance(value, str) and not isinstance(like, str):
        try:
            value = load_yaml_text(value, key)
        except ConfigError:
            if isinstance(like, (list, tuple)) and value.lstrip()[:1] in "[{":
                raise ConfigError(f"{key}: malformed list {value!r} (write a,b or [a, b])") from None
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(like, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(like, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return value
    if isinstance(like, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("precision"):
            return str(value)  # precision 32 means "32"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(like, (list, tuple)):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if isinstance(like, dict) and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# YAML: safe, bounded, no duplicate keys

#: a config file larger than this is refused (configs are a few kB)
MAX_CONFIG_BYTES = 1 << 20
#: nodes of a YAML document after aliases are expanded (an "alias bomb" of a few hundred bytes
#: expands to billions)
MAX_YAML_NODES = 100_000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(root) -> int:
    """Nodes of a composed document counting every alias as a full copy (memoised, so an alias
    bomb is measured without being expanded); stops counting past the limit."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        k = id(node)
        if k in sizes:
            return sizes[k]
        sizes[k] = 1  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(a) + size(b) for a, b in node.value)
        else:
            n = 1
        sizes[k] = n = min(n, MAX_YAML_NODES + 1)
        return n

    return size(root)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse one YAML document safely: no Python objects, no duplicate keys, at most
    ``MAX_YAML_NODES`` nodes once aliases are expanded. Errors are one-line ConfigErrors naming
    ``where``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values "
                              "(aliases of aliases?); refusing to load")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({problem}{at})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike) -> dict:
    """A config file as a dict of sections; every problem is a one-line ConfigError naming it."""
    p = Path(path)
    try:
        raw = read_small_file(p, MAX_CONFIG_BYTES, "config file (YAML)")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                          "a config is a YAML file") from None
    loaded = load_yaml_text(text, str(p))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections")
    for k, v in loaded.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{p}: section '{k}' must be a mapping")
    return loaded




def _parse_any(value: Any, key: str) -> Any:
    """A setting of several types (``devices``, ``tmu_layers``, ``init_from``): an override
    string is read as YAML; the range checks in :func:`validate` decide what is allowed."""
    return load_yaml_text(value, key) if isinstance(value, str) else value


def _section(cls, data: dict, name: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown keys in '{name}': {unknown}; known: {sorted(known)}")
    default = cls()
    kw = {k: (_parse_any(v, f"{name}.{k}") if known[k].type in ("Any", Any)
              else _coerce(v, getattr(default, k), f"{name}.{k}")) for k, v in data.items()}
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
        for k, v in read_config_file(path).items():
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
        from .models import build_config, kind_problem  # torch: only for a config that names a model
        try:
            if why := kind_problem(name, "backbone"):  # the model a run trains (a TMU's target backbone)
                raise ConfigError(f"model.name: {why}: the model section names the backbone a run trains",
                                  where="model.name")
            # coerce the override strings through the dataclass defaults (unknown keys pass as they
            # are), then build the model's config: it refuses unknown keys and bad values
            cfg_default = build_config(name)
            coerced = {k: _coerce(v, getattr(cfg_default, k), f"model.{k}") if hasattr(cfg_default, k) else v
                       for k, v in model.items()}
            build_config(name, coerced)
        except ConfigError:
            raise
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
        exp.model = {"name": name, **coerced}
    validate(exp)
    return exp


# --------------------------------------------------------------------------------------------
# ranges: every value checked before a run folder exists

#: upper bounds: beyond these a value is a typo (or an attack), not an experiment
LIMITS = {"size": 8192, "frames": 10_000, "clips": 10_000_000, "batch_size": 1_000_000,
          "steps": 10**9, "lr": 10.0, "hidden": 4096, "num_layers": 64, "filter_size": 63,
          "patch_size": 256, "threads": 4096, "workers": 1024}


def _int_in(value, key: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{key}={value}: must be {rng}")


def _num_in(value, key: str, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        rng = (f"> {lo}" if lo_open else f">= {lo}") + ("" if hi is None else f" and <= {hi}")
        raise ConfigError(f"{key}={value}: must be {rng}")


def check_model_config(cfg: dict, where: str = "model") -> None:
    """Range checks of a backbone config (a dict of its dataclass fields): sizes that can be
    built, finite numbers. ``where`` prefixes the key in the message (``model``, a card's path)."""
    for k, v in cfg.items():
        key = f"{where}.{k}"
        if k == "name":
            continue
        if k == "in_channels":
            if v not in (1, 3) or isinstance(v, bool):
                raise ConfigError(f"{key}={v!r}: must be 1 or 3")
        elif k == "num_layers":
            _int_in(v, key, 1, LIMITS["num_layers"])
        elif k in ("hidden", "filter_size", "patch_size"):
            _int_in(v, key, 1, LIMITS[k])
            if k == "filter_size" and v % 2 == 0:
                raise ConfigError(f"{key}={v}: must be odd (same-size convolutions)")
        elif k == "norm":
            if v not in NORMS:
                raise ConfigError(f"{key}: expected one of {', '.join(NORMS)}, got {v!r}")
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        elif isinstance(v, int):
            _int_in(v, key, 0, 1_000_000)
        elif isinstance(v, float):
            _num_in(v, key, -1e6, 1e6)


def patch_problem(patch, hw: tuple[int, int], whose: str = "the data's", what: str = "frames") -> str | None:
    """Why a model of patch size ``patch`` cannot read ``what`` of ``hw`` (one line), or None."""
    h, w = hw
    if isinstance(patch, int) and patch > 0 and (h % patch or w % patch):
        return f"patch size {patch} does not divide {whose} {h}x{w} {what}"
    return None


def check_patch(patch, hw: tuple[int, int] | None, resize: str = "resize", crop: int = 0,
                who: str = "the model's") -> None:
    """The one check that a patch size fits what a run feeds the model: a one-line ConfigError
    starting with ``who`` (the config key, a zoo entry, ``"the model's"``), with a hint, before
    anything is created. Whole frames that are only forecast (validation, evaluate, predict) are
    padded to the patch size, so their size ``hw`` (None: unknown yet) matters only for training
    on whole frames (no ``crop``); a training ``crop`` must divide by the patch size and fit the
    frames."""
    why = None if hw is None or crop else patch_problem(patch, hw)
    if why:
        h, w = hw
        if resize == "none":
            hint = (f"data.resize is none, so frames keep their native {h}x{w}: train on crops "
                    f"(train.crop, a multiple of {patch}; whole frames are padded for evaluation), give a patch "
                    f"size that divides both, or set --data.resize resize (or crop) with a data.size divisible by {patch}")
        else:
            hint = f"set data.size to a multiple of {patch}, e.g. --data.size {max(patch, h // patch * patch)}"
        raise ConfigError(f"{who} {why} ({hint}); nothing was trained or written")
    fits = hw is None or crop <= min(hw)
    if crop and ((isinstance(patch, int) and patch > 0 and crop % patch) or not fits):
        size = "" if hw is None else f" and be at most the data's frame size {hw[0]}x{hw[1]}"
        raise ConfigError(f"train.crop={crop} must divide by the model's patch size {patch}{size}")


def implied_memory_bytes(exp: "Experiment") -> dict[str, int]:
    """Rough memory the sizes imply: ``data`` (generated clips held in memory as uint8) and
    ``batch``: one training batch through the model (on ``train.crop`` windows when set),
    activations and gradients, or one evaluation batch of whole frames (no gradients), the larger."""
    d, t, m = exp.data, exp.train, exp.model
    pixels = d.frames * d.channels * d.size * d.size
    generated = d.name in ("flying_digits", "advected")
    data = (d.train_clips + d.val_clips + d.test_clips) * pixels if generated else 0
    width = d.channels + 2 * int(m.get("num_layers", 2)) * int(m.get("hidden", 32))
    side = min(t.crop, d.size) if t.crop else d.size
    train = t.batch_size * d.frames * side * side * width * 4 * 4
    evaluation = exp.eval.batch_size * d.frames * d.size * d.size * width * 4
    return {"data": data, "batch": max(train, evaluation)}


def _memory_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def validate(exp: "Experiment") -> None:
    """Range, type and finiteness checks of every setting, and the memory the sizes imply; each
    failure is a one-line ConfigError naming the key. Called by :func:`load_experiment`."""
    d, t, tr, ev = exp.data, exp.train, exp.transfer, exp.eval
    if not isinstance(d.name, str) or not d.name:
        raise ConfigError(f"data.name: expected a dataset name, got {d.name!r}")
    for k in ("path", "mnist_dir", "cache_dir"):
        v = getattr(d, k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"data.{k}: expected a path, got {v!r}")
    _int_in(d.frames, "data.frames", 2, LIMITS["frames"])
    _int_in(d.size, "data.size", 1, LIMITS["size"])
    if d.channels not in (1, 3) or isinstance(d.channels, bool):
        raise ConfigError(f"data.channels={d.channels!r}: must be 1 (gray) or 3 (RGB)")
    _int_in(d.seed, "data.seed", 0, 2**63 - 1)
    _int_in(d.num_digits, "data.num_digits", 0, 100)
    for k in ("train_clips", "val_clips", "test_clips"):
        _int_in(getattr(d, k), f"data.{k}", 0, LIMITS["clips"])
    _int_in(d.stride, "data.stride", 1, LIMITS["frames"])
    if len(d.split) != 3:
        raise ConfigError(f"data.split: expected 3 fractions (train, val, test), got {list(d.split)!r}")
    for v in d.split:  # fractions, or shares normalised to sum 1 ([21, 3, 7]: as the readers cut them)
        _num_in(v, "data.split", 0.0, 1e9)
    if sum(d.split) <= 0:
        raise ConfigError(f"data.split: the fractions {list(d.split)!r} sum to 0")
    if not isinstance(d.extra, dict):
        raise ConfigError(f"data.extra: expected a mapping, got {d.extra!r}")

    _int_in(t.steps, "train.steps", 1, LIMITS["steps"])
    _int_in(t.batch_size, "train.batch_size", 1, LIMITS["batch_size"])
    _num_in(t.lr, "train.lr", 0.0, LIMITS["lr"], lo_open=True)
    _int_in(t.t_in, "train.t_in", 1, LIMITS["frames"])
    if t.t_in >= d.frames:
        raise ConfigError(f"train.t_in={t.t_in} must be smaller than data.frames={d.frames}")
    for k in ("sampling_stop", "sampling_start", "reverse_time_prob"):
        _num_in(getattr(t, k), f"train.{k}", 0.0, 1.0)
    _num_in(t.l1_weight, "train.l1_weight", 0.0, 1e6)
    _int_in(t.crop, "train.crop", 0, LIMITS["size"])
    # resize: none keeps a reader's native frame size, which data.size does not describe: the checks
    # against the real size run once the data is read (api.check_patch_fits)
    native = d.resize == "none" and d.name not in GENERATORS
    _int_in(t.val_every, "train.val_every", 0)
    _int_in(t.val_batches, "train.val_batches", 0)
    _int_in(t.ckpt_every, "train.ckpt_every", 1)
    _int_in(t.seed, "train.seed", 0, 2**63 - 1)
    _int_in(t.num_nodes, "train.num_nodes", 1, 100_000)
    _int_in(t.num_workers, "train.num_workers", 0, LIMITS["workers"])
    _int_in(t.threads, "train.threads", 0, LIMITS["threads"])
    if t.strategy != "auto":  # Lightning's names (imported only for a strategy other than auto)
        from lightning.pytorch.strategies import StrategyRegistry
        strategies = ["auto", *StrategyRegistry.available_strategies()]
    if t.strategy != "auto" and t.strategy not in strategies:
        raise ConfigError(f"train.strategy: expected one of auto, ddp, ddp_spawn, fsdp, deepspeed, ... "
                          f"(Lightning's names), got {t.strategy!r}")
    if t.accelerator in ("gpu", "cuda", "mps"):
        import torch
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator={t.accelerator}: torch sees no CUDA GPU on this machine "
                          "(use auto or cpu)")
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator=mps: not available on this machine (use auto or cpu)")
    dev = t.devices
    ok = (dev == "auto" or (isinstance(dev, int) and not isinstance(dev, bool) and (dev >= 1 or dev == -1))
          or (isinstance(dev, str) and dev.replace(",", "").strip().isdigit())
          or (isinstance(dev, list) and dev and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in dev)))
    if not ok:
        raise ConfigError(f"train.devices: expected a count >= 1, -1, 'auto' or a list of device ids, got {dev!r}")

    _num_in(tr.distill_weight, "transfer.distill_weight", 0.0, 1e6)
    check_tmu_options(tr, "transfer.", ConfigError, choices={"mode": TRANSFER_MODES})
    if not isinstance(tr.teachers, list) or not all(isinstance(x, str) for x in tr.teachers):
        raise ConfigError(f"transfer.teachers: expected a list of zoo entries, got {tr.teachers!r}")
    if tr.init_from is not None and not isinstance(tr.init_from, str):
        raise ConfigError(f"transfer.init_from: expected a zoo entry, got {tr.init_from!r}")

    _int_in(ev.batch_size, "eval.batch_size", 1, LIMITS["batch_size"])
    _int_in(ev.examples, "eval.examples", 0, 1000)
    for v in ev.thresholds:
        _num_in(v, "eval.thresholds", 0.0, 1e6)

    check_model_config(exp.model)
    patch = exp.model.get("patch_size")
    # with resize: none the real frame size is known once the data is read (api.check_patch_fits)
    check_patch(patch, None if native else (d.size, d.size), d.resize, t.crop, f"model.patch_size={patch}:")
    need, limit = implied_memory_bytes(exp), _memory_limit()
    for what, n in need.items():
        if n > limit:
            cause = ("data.size, data.frames and the clip counts" if what == "data"
                     else "train.batch_size / eval.batch_size, data.size (train.crop), data.frames and the model's "
                          "hidden size")
            raise ConfigError(f"{cause} imply about {n / 2**30:.0f} GiB of {what} in memory, more than this "
                              f"machine's {limit / 2**30:.0f} GiB; lower them")


def _deep_copy(d: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}

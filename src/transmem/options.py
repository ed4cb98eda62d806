"""The TMU's options, declared once: each field of :class:`TMUOptions` carries its default, its
help text and its allowed values. The model's config (:class:`~transmem.models.tmu.TMUConfig`),
the experiment's ``transfer`` section (:class:`~transmem.config.TransferConfig`), the builder
(:func:`~transmem.transfer.build_tmu`) and the ``transfer`` command's flags all derive from it,
and :func:`check` is the one owner of their checks. Torch-free: the config and ``--help`` read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .choices import NORMS, TMU_MODES, TMU_WEIGHTINGS, check as check_choice
from .errors import ChoiceError

#: ``tmu_layers`` by name (besides a list of layer numbers)
LAYER_NAMES = ("bottom", "top", "all")
#: the largest distiller / gate kernel (beyond it a value is a typo)
MAX_KERNEL = 63
MAX_LAYER = 63


def _option(default, help: str, choices: tuple | None = None, kernel: bool = False):
    return field(default=default, metadata={"help": help, "choices": choices, "kernel": kernel})


@dataclass
class TMUOptions:
    """What a user chooses about a TMU (the rest of its config -- backbone, sources -- is filled in
    by the builder)."""
    tmu_layers: Any = _option("bottom", "backbone layers that get a TMU: bottom, top, all, or a list "
                                        "of layer numbers such as [0, 1]")
    mode: str = _option("distill", "distill: the teachers are regression targets only; bank_read: "
                                   "their states are also read (they then run at inference)", TMU_MODES)
    gates: bool = _option(True, "per-source transfer gates (false: a plain sum, the ablation)")
    weighting: str = _option("none", "weighting across sources: none, or a softmax per position", TMU_WEIGHTINGS)
    distiller_kernel: int = _option(1, "kernel size of the distillers (odd)", kernel=True)
    distiller_norm: str = _option("none", "normalisation after the distillers", NORMS)
    gate_kernel: int = _option(1, "kernel size of the gate convolution (odd)", kernel=True)


NAMES = tuple(f.name for f in fields(TMUOptions))


def tmu_options(source) -> TMUOptions:
    """The TMU options held by ``source``: a TMUOptions (or subclass, such as the config's
    ``transfer`` section), a dict (unknown keys ignored), or None (the defaults)."""
    if source is None:
        return TMUOptions()
    if isinstance(source, dict):
        return TMUOptions(**{k: source[k] for k in NAMES if k in source})
    return TMUOptions(**{k: getattr(source, k) for k in NAMES})


def check(opts, prefix: str = "", error: type = ChoiceError, choices: dict | None = None) -> None:
    """Every check of the TMU options of ``opts`` (anything with their fields); ``prefix`` names
    where they sit (``"transfer."`` in a config), ``error`` is the error type to raise and
    ``choices`` widens an option's allowed values (the config's ``transfer.mode`` also takes
    ``mixture``, a transfer mode that builds no TMU)."""
    for f in fields(TMUOptions):
        key, value = prefix + f.name, getattr(opts, f.name)
        if f.metadata["choices"]:
            check_choice(key, value, (choices or {}).get(f.name, f.metadata["choices"]), error)
        elif f.metadata["kernel"]:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KERNEL \
                    or value % 2 == 0:
                raise error(f"{key}={value!r}: must be an odd integer from 1 to {MAX_KERNEL} "
                            "(a same-size convolution)")
        elif isinstance(f.default, bool) and not isinstance(value, bool):
            raise error(f"{key}: expected true/false, got {value!r}")
    layers, key = opts.tmu_layers, prefix + "tmu_layers"
    if not (layers in LAYER_NAMES or (isinstance(layers, (list, tuple)) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_LAYER for i in layers))):
        raise error(f"{key}: expected {', '.join(LAYER_NAMES)} or a list of layer numbers, got {layers!r}")


def flag(name: str) -> str:
    """The command-line flag of option ``name`` (``tmu_layers`` -> ``--tmu-layers``)."""
    return "--" + name.replace("_", "-")

"""Backbones and the TMU. Importing this package registers every model in it: each module of this
folder is imported (a package scan), so a new backbone is one file with ``@register_model``, and
no import list needs an edit; another package adds one by an entry point in ``transmem.models``."""
import importlib as _importlib
import pkgutil as _pkgutil

from .registry import (build_config, build_model, create_model, describe_model, get_model_class, kind_problem,
                       list_models, model_kind, register_model)
from .base import PredictiveRNN, BackboneConfig, MemoryHook, patchify, unpatchify
from . import kernels  # the fused-kernel switch: kernels.enabled() / use_fused(flag)

for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "base", "kernels"):
        _importlib.import_module(f"{__name__}.{_module.name}")  # registration


def _load_plugins() -> None:
    """Backbones from other packages: each entry point in the group ``transmem.models`` names a
    module that registers its models as it is imported."""
    from importlib.metadata import entry_points
    for ep in entry_points(group="transmem.models"):
        _importlib.import_module(ep.value.split(":")[0])


_load_plugins()

__all__ = ["create_model", "build_model", "describe_model", "model_kind", "kind_problem", "list_models", "get_model_class",
           "register_model", "build_config",
           "PredictiveRNN", "BackboneConfig", "MemoryHook", "patchify", "unpatchify", "kernels"]

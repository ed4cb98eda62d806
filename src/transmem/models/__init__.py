"""Backbones and the TMU. Importing this package registers every model in it: each module of this
folder is imported (a package scan), so a new backbone is one file with ``@register_model``, and
no import list needs an edit."""
import importlib as _importlib
import pkgutil as _pkgutil

from .registry import create_model, list_models, get_model_class, register_model, build_config
from .base import PredictiveRNN, BackboneConfig, MemoryHook, patchify, unpatchify
from . import kernels  # the fused-kernel switch: kernels.enabled() / use_fused(flag)

for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "base", "kernels"):
        _importlib.import_module(f"{__name__}.{_module.name}")  # registration

__all__ = ["create_model", "list_models", "get_model_class", "register_model", "build_config",
           "PredictiveRNN", "BackboneConfig", "MemoryHook", "patchify", "unpatchify", "kernels"]

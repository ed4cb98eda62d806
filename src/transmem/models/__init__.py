"""Backbones and the TMU. Importing this package registers every built-in model."""
from .registry import create_model, list_models, get_model_class, register_model, build_config
from .base import PredictiveRNN, BackboneConfig, MemoryHook, patchify, unpatchify
from . import kernels  # the fused-kernel switch: kernels.enabled() / use_fused(flag)
from . import convlstm, predrnn, tmu, advection  # noqa: F401  (registration)

__all__ = ["create_model", "list_models", "get_model_class", "register_model", "build_config",
           "PredictiveRNN", "BackboneConfig", "MemoryHook", "patchify", "unpatchify", "kernels"]

"""Model registry in the style of timm: ``@register_model("name")`` on a class, then
``create_model("name", **config)``. A backbone is one new file plus the decorator; the TMU and the
memory bank only use the :class:`~transmem.models.base.PredictiveRNN` protocol."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

_MODELS: dict[str, type] = {}


def register_model(name: str):
    def deco(cls):
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model '{name}' is already registered")
        cls.model_name = name
        _MODELS[name] = cls
        return cls
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_class(name: str) -> type:
    if name not in _MODELS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    return _MODELS[name]


def build_config(name: str, config: Any = None, **overrides):
    """A model's own dataclass config from a dict, an instance or keyword overrides."""
    cls = get_model_class(name).config_class
    if config is None:
        config = {}
    if not isinstance(config, dict):
        config = {f.name: getattr(config, f.name) for f in fields(config)}
    merged = {**config, **overrides}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown {name} config keys: {unknown}; known: {sorted(known)}")
    return cls(**merged)


def create_model(name: str, config: Any = None, **overrides):
    """``create_model("predrnn", num_layers=2, hidden=32)`` -> a ready nn.Module."""
    return get_model_class(name)(build_config(name, config, **overrides))

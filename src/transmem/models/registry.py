"""Model registry in the style of timm: ``@register_model("name")`` on a class, then
``create_model("name", **config)``. A backbone is one new file plus the decorator; the TMU and the
memory bank only use the :class:`~transmem.models.base.PredictiveRNN` protocol.

Every model has a *kind*: ``"backbone"`` (a predictive RNN that runs alone, the default),
``"transfer"`` (a model that wraps a backbone and draws on teachers, such as the TMU) or
``"mixture"`` (frozen members' forecasts combined by learned weights);
``list_models(kind=...)`` lists one kind, and :func:`model_kind` is the one test of what a model
is. :func:`build_model` is the one path from a config (or a zoo card) to a model (timm's
``build_model_with_cfg``): the API, the zoo and the benchmark build through it."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ..choices import MODEL_KINDS, check
from ..errors import WrongKind

_MODELS: dict[str, type] = {}
_KINDS: dict[str, str] = {}


def _check_kind(kind: str) -> None:
    check("model kind", kind, MODEL_KINDS)


def register_model(name: str, kind: str = "backbone"):
    """Class decorator: register a model under ``name`` as a ``kind`` (one of
    ``choices.MODEL_KINDS``); the class gets ``model_name`` and ``model_kind``."""
    _check_kind(kind)

    def deco(cls):
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model '{name}' is already registered")
        cls.model_name = name
        cls.model_kind = kind
        _MODELS[name] = cls
        _KINDS[name] = kind
        return cls
    return deco


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; every model, or only those of ``kind``."""
    if kind is None:
        return sorted(_MODELS)
    _check_kind(kind)
    return sorted(n for n in _MODELS if _KINDS[n] == kind)


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


#: what each kind is, in the words of an error that finds another
KIND_TEXT = {"backbone": "a backbone", "transfer": "a transfer target with its own teachers",
             "mixture": "a mixture of frozen members with its weights"}


def describe_model(name: str, config: dict) -> str:
    """A short description of a ``name`` model with ``config`` (a card's), for tables: the class's
    ``describe``; the bare name for a model that is not registered."""
    cls = _MODELS.get(name)
    describe = getattr(cls, "describe", None)
    return describe(config) if describe is not None else name


def model_kind(name: str) -> str:
    """The kind of the registered model ``name``: the one test of what a model is."""
    return get_model_class(name).model_kind


def kind_problem(name: str, kind: str) -> str | None:
    """Why a ``name`` model cannot serve where a ``kind`` is needed (one line), or None."""
    check("model kind", kind, MODEL_KINDS)
    have = model_kind(name)
    if have == kind:
        return None
    return f"a '{name}' model ({KIND_TEXT[have]}), not {KIND_TEXT[kind].split(' with ')[0]}"


def build_model(name: str, config: Any = None, *, kind: str | None = None, seed: int | None = None,
                state: dict | None = None, where: str = "model"):
    """The one builder from a config to a model: the registered class ``name`` and its dataclass
    config (a dict, e.g. a zoo card's ``config``; unknown keys refused). ``kind``: the kind the
    caller needs (a :class:`~transmem.errors.WrongKind` naming ``where`` otherwise, before anything
    is built); ``seed``:
    the initial weights are drawn right after seeding with it (a function of the seed alone);
    ``state``: weights to load (strict)."""
    if kind is not None and (why := kind_problem(name, kind)):
        raise WrongKind(f"{where}: {why}", where=where)
    if seed is not None:
        torch.manual_seed(seed)
    model = create_model(name, config)
    if state is not None:
        model.load_state_dict(state)
    return model

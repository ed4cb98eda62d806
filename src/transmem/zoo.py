"""The model zoo: a zoo entry is a folder with ``weights.safetensors`` and ``card.json``.

The card names the model and its config, the data it was trained on, frame size, channels,
T_in/T_out, the training budget, metrics and the sha256 of the weights. Loading verifies the
checksum and never unpickles anything. Entries are written to a temporary folder and renamed, so
an interrupted save never leaves a half-written entry in place of a good one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_folder
from .models import create_model

CARD = "card.json"
WEIGHTS = "weights.safetensors"
CARD_VERSION = 1


class ZooError(ValueError):
    """A zoo entry that is missing, incomplete or tampered with (one-line message)."""


def default_root() -> Path:
    return Path(os.environ.get("TRANSMEM_ZOO", "zoo"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_config_dict(model: torch.nn.Module) -> dict:
    return dataclasses.asdict(model.config)


def save_entry(model: torch.nn.Module, path: str | os.PathLike, card: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` as a zoo entry at ``path``. Refuses to replace an existing entry unless
    ``overwrite``; the replacement is atomic (the old entry stays intact until the rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ZooError(f"{path}: zoo entry already exists (choose another name or folder; nothing was changed)")
    with atomic_folder(path, replace=overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        full = {
            "card_version": CARD_VERSION,
            "name": path.name,
            "model": model.model_name,
            "config": model_config_dict(model),
            "params": sum(p.numel() for p in model.parameters()),
            **(card or {}),
            "sha256": sha256_file(tmp / WEIGHTS),
        }
        (tmp / CARD).write_text(json.dumps(full, indent=2, sort_keys=False))
    return path


def resolve(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A zoo reference is a folder holding ``card.json``, or a name under the zoo root."""
    p = Path(ref)
    if (p / CARD).is_file():
        return p
    q = Path(root or default_root()) / str(ref)
    if (q / CARD).is_file():
        return q
    raise ZooError(f"{ref}: no zoo entry here (a folder with {CARD} and {WEIGHTS}), "
                   f"nor under the zoo root {Path(root or default_root())}")


def read_card(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        card = json.loads((path / CARD).read_text())
    except FileNotFoundError:
        raise ZooError(f"{path / CARD}: missing card") from None
    except json.JSONDecodeError as e:
        raise ZooError(f"{path / CARD}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("model", "config", "sha256"):
        if key not in card:
            raise ZooError(f"{path / CARD}: card lacks the key '{key}'")
    return card


def load_entry(ref: str | os.PathLike, root=None):
    """Return ``(model, card)``; the model is in eval mode. The weights' sha256 must match."""
    path = resolve(ref, root)
    card = read_card(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ZooError(f"{weights}: missing weights")
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise ZooError(f"{weights}: sha256 {digest[:12]}... does not match the card "
                       f"({card['sha256'][:12]}...): file changed or tampered with; refusing to load")
    try:
        model = create_model(card["model"], card["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise ZooError(f"{path / CARD}: cannot build model '{card['model']}': {e}") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise ZooError(f"{weights}: unreadable safetensors file ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ZooError(f"{weights}: weights do not fit the card's model "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, card


def list_entries(root: str | os.PathLike | None = None) -> list[tuple[Path, dict]]:
    root = Path(root or default_root())
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / CARD).is_file():
            try:
                out.append((d, read_card(d)))
            except ZooError:
                continue
    return out

"""The model zoo: a zoo entry is a folder with ``weights.safetensors`` and ``card.json``.

The card names the model and its config, the data it was trained on, frame size, channels,
T_in/T_out, the training budget, metrics and the sha256 of the weights. Loading verifies the
checksum and never unpickles anything. Entries are written to a temporary folder and renamed, so
an interrupted save never leaves a half-written entry in place of a good one.

:func:`rank` ranks the entries for a target task (which can serve it, their zero-shot error and
their error after a short finetuning probe); ``finetune --from auto`` and ``transfer --teachers
auto[:K]`` / ``--init-from auto`` choose with it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from . import choices
from .baselines import BaselineUnavailable, baseline_for_data, default_baselines, get_method
from .config import ConfigError, patch_problem
from .errors import Diverged, UserError
from .data import DataConfig, build_datasets, frame_size_of, physical_units
from .data import describe as describe_data
from .files import OutputPathError, atomic_folder, check_output_dir, read_small_file
from .models import build_model, describe_model, kind_problem
from .models.tmu import resolve_layers
from .progress import eval_progress
from .training import ForecastModule, SamplingSchedule, evaluate, forecast_loss
from .training.samplers import StepSampler
from .transfer import MemoryBank, TeacherMismatch, convert_channels

CARD = "card.json"
WEIGHTS = "weights.safetensors"
CARD_VERSION = 1


class ZooError(UserError, ValueError):
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
        _save_weights(state, tmp / WEIGHTS)
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


def _save_weights(state: dict, path: Path) -> None:
    """``save_file`` with safetensors' ``SafetensorError`` (not an OSError) for a failed write
    turned into the OSError it reports, so that :func:`~transmem.files.atomic_folder` ends it in
    one line with the free space (disk full while saving an entry)."""
    try:
        save_file(state, str(path))
    except OSError:
        raise
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        text = " ".join(str(e).split())
        m = re.search(r"os error (\d+)", text)
        code = int(m.group(1)) if m else 5
        raise OSError(code, os.strerror(code) if m else text, str(path)) from None


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


#: a card larger than this is refused (cards are a few kB)
MAX_CARD_BYTES = 1 << 20
#: a card may not describe a model larger than this many parameters (8 GiB of float32)
MAX_PARAMS = 1 << 31
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _card_problem(card: Any) -> str | None:
    """Why ``card`` (parsed JSON) is not a usable card, or None: the schema, with bounded sizes."""
    if not isinstance(card, dict):
        return f"the card must be a JSON object, got {type(card).__name__ if card is not None else 'null'}"
    for key in ("model", "config", "sha256"):
        if key not in card:
            return f"card lacks the key '{key}'"
    if not isinstance(card["model"], str) or not card["model"]:
        return f"'model' must be a model name, got {card['model']!r}"
    if not isinstance(card["config"], dict):
        return f"'config' must be an object, got {card['config']!r}"
    if not isinstance(card["sha256"], str) or not _HEX64.fullmatch(card["sha256"]):
        return "'sha256' must be 64 lowercase hex digits"

    def int_in(key, lo, hi, value):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"'{key}' must be an integer between {lo} and {hi}, got {value!r}"
        return None

    checks = {"t_in": (1, 10_000), "t_out": (1, 10_000), "channels": (1, 3), "params": (0, MAX_PARAMS),
              "card_version": (0, 1000)}
    for key, (lo, hi) in checks.items():
        if key in card and (why := int_in(key, lo, hi, card[key])):
            return why
    if "channels" in card and card["channels"] not in (1, 3):
        return f"'channels' must be 1 or 3, got {card['channels']!r}"
    if "frame_size" in card:
        fs = card["frame_size"]
        if not (isinstance(fs, list) and len(fs) == 2):
            return f"'frame_size' must be [height, width], got {fs!r}"
        for v in fs:
            if why := int_in("frame_size", 1, 8192, v):
                return why
    for key in ("name",):
        if key in card and not isinstance(card[key], str):
            return f"'{key}' must be a string, got {card[key]!r}"
    for key in ("data", "metrics", "train", "transfer"):
        if key in card and not isinstance(card[key], dict):
            return f"'{key}' must be an object, got {card[key]!r}"
    if "teachers" in card:
        ts = card["teachers"]
        if not isinstance(ts, list) or len(ts) > 1000:
            return f"'teachers' must be a list, got {ts!r}"
        for i, t in enumerate(ts):
            if not (isinstance(t, dict) and isinstance(t.get("entry"), str) and isinstance(t.get("name"), str)
                    and isinstance(t.get("sha256"), str) and _HEX64.fullmatch(t["sha256"])):
                return f"teachers[{i}] must hold 'name', 'entry' and a 64-hex 'sha256'"

    def bounded(v, key, depth=0):
        if depth > 16:  # a mixture's card holds the data config its baselines read, which may nest parts
            return f"'{key}' is nested too deeply"
        if isinstance(v, bool) or v is None:
            return None
        if isinstance(v, (int, float)):
            if not math.isfinite(v) or abs(v) > 1_000_000:
                return f"'{key}' = {v!r} is out of range"
            return None
        if isinstance(v, str):
            return f"'{key}' is too long" if len(v) > 10_000 else None
        if isinstance(v, list):
            return next((w for w in (bounded(x, key, depth + 1) for x in v[:1001]) if w), None) \
                if len(v) <= 1000 else f"'{key}' is too long"
        if isinstance(v, dict):
            return next((w for w in (bounded(x, f"{key}.{k}", depth + 1) for k, x in v.items()) if w), None)
        return f"'{key}' has an unexpected value {v!r}"

    if why := bounded(card["config"], "config"):
        return why
    cfg = card["config"]
    for sub in ([cfg] + ([cfg["backbone_config"]] if isinstance(cfg.get("backbone_config"), dict) else [])):
        for key, (lo, hi) in {"hidden": (1, 4096), "num_layers": (1, 64), "filter_size": (1, 63),
                              "patch_size": (1, 256), "in_channels": (1, 3)}.items():
            if key in sub and (why := int_in(f"config.{key}", lo, hi, sub[key])):
                return why
    unknown = sorted(set(card.get("data", {})) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        return f"'data' holds unknown keys {unknown[:3]}"
    extra = card.get("data", {}).get("extra", {})
    if not isinstance(extra, dict):
        return f"'data.extra' must be an object, got {extra!r}"
    r_max = extra.get("r_max")
    if r_max is not None and (isinstance(r_max, bool) or not isinstance(r_max, (int, float))
                              or not 0 < r_max <= 1e6):
        return f"'data.extra.r_max' must be a positive number, got {r_max!r}"
    backbone = cfg["backbone_config"] if isinstance(cfg.get("backbone_config"), dict) else cfg
    if isinstance(backbone.get("filter_size"), int) and backbone["filter_size"] % 2 == 0:
        return f"'config.filter_size' {backbone['filter_size']} must be odd"
    patch = backbone.get("patch_size")
    if "frame_size" in card and isinstance(patch, int) and any(v % patch for v in card["frame_size"]):
        return f"'frame_size' {card['frame_size']} is not divisible by the model's patch size {patch}"
    if "channels" in card and backbone is cfg and "in_channels" in cfg and cfg["in_channels"] != card["channels"]:
        return f"'channels' {card['channels']} is not the model's in_channels {cfg['in_channels']}"
    return None


def read_card(path: str | os.PathLike) -> dict:
    """The card of the entry at ``path``, checked against the card schema (types, bounded sizes);
    every problem is a one-line :class:`ZooError` naming the card."""
    path = Path(path)
    f = path / CARD
    try:
        raw = read_small_file(f, MAX_CARD_BYTES, "zoo card")
    except ValueError as e:
        raise ZooError(str(e)) from None
    try:
        card = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ZooError(f"{f}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ZooError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ZooError(f"{f}: JSON nested too deeply") from None
    why = _card_problem(card)
    if why:
        raise ZooError(f"{f}: {why}")
    return card


def _check_weights_fit(path: Path, weights: Path, model_name: str, config: dict) -> None:
    """The tensors in ``weights`` (read from the safetensors header only) must be exactly those
    of the card's model (built on the meta device: nothing is allocated), shape for shape."""
    try:
        with torch.device("meta"):
            meta = build_model(model_name, config)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ZooError(f"{path / CARD}: cannot build model '{model_name}': {' '.join(str(e).split())}") from None
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    params = sum(math.prod(s) for s in want.values())
    if params > MAX_PARAMS:
        raise ZooError(f"{path / CARD}: describes a model of {params:,} values, more than {MAX_PARAMS:,}; refusing")
    try:
        with safe_open(str(weights), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ZooError(f"{weights}: unreadable safetensors file ({' '.join(str(e).split())})") from None
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise ZooError(f"{weights}: weights do not fit the card's model "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bad = [(k, have[k], want[k]) for k in want if have[k] != want[k]]
    if bad:
        k, h, w = bad[0]
        raise ZooError(f"{weights}: weights do not fit the card's model ({len(bad)} tensors of other shapes, "
                       f"e.g. {k}: {list(h)} in the file, {list(w)} for the card's config)")


def load_entry(ref: str | os.PathLike, root=None, expect_sha256: str | None = None, kind: str | None = None,
               role: str = ""):
    """Return ``(model, card)``; the model is in eval mode. The card must pass the schema, the
    weights' sha256 must match it (and ``expect_sha256``, the checksum another card recorded for
    this entry, when given), their shapes must fit the card's model and their values be finite.
    ``kind``: the model kind the caller needs (``"backbone"``), checked from the card before any
    weight is read; ``role`` says why, in the error (``"teachers are backbone entries"``)."""
    path = resolve(ref, root)
    card = read_card(path)
    if kind is not None:
        try:
            why = kind_problem(card["model"], kind)
        except KeyError as e:
            raise ZooError(f"{path / CARD}: {e.args[0]}") from None
        if why:
            raise ZooError(f"{path}: {why}" + (f": {role}" if role else ""))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ZooError(f"{weights}: missing weights")
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise ZooError(f"{weights}: sha256 {digest[:12]}... does not match the card "
                       f"({card['sha256'][:12]}...): file changed or tampered with; refusing to load")
    if expect_sha256 is not None and digest != expect_sha256:
        raise ZooError(f"{path}: its weights' sha256 {digest[:12]}... is not the {expect_sha256[:12]}... "
                       "recorded for it: the entry was replaced or another entry sits at this path; refusing")
    _check_weights_fit(path, weights, card["model"], card["config"])
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise ZooError(f"{weights}: unreadable safetensors file ({e})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ZooError(f"{weights}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}); "
                       "refusing to load")
    try:  # the names and shapes were checked against the card's model above
        model = build_model(card["model"], card["config"], state=state)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ZooError(f"{path / CARD}: cannot build model '{card['model']}': {' '.join(str(e).split())}") from None
    model.eval()
    return model, card


def scan_entries(root: str | os.PathLike | None = None) -> list[tuple[Path, dict | None, str | None]]:
    """Every folder under ``root`` holding a ``card.json``, as ``(path, card, None)`` or, for an
    entry whose card is unusable, ``(path, None, problem)``: one bad entry never hides the rest.
    Reads the cards only (not the weights)."""
    root = Path(root or default_root())
    out = []
    if root.exists() and not root.is_dir():
        raise ZooError(f"{root}: not a folder; the zoo root is a folder of entries")
    if not root.is_dir():
        return out
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        raise ZooError(f"{root}: cannot list the zoo ({e.strerror or e})") from None
    for n in names:
        d = root / n
        if n.startswith(".") or not d.is_dir() or not (d / CARD).exists():
            continue
        try:
            out.append((d, read_card(d), None))
        except ZooError as e:
            msg = " ".join(str(e).split())
            out.append((d, None, msg.split(": ", 1)[1] if msg.startswith(str(d)) else msg))
    return out


def format_rows(rows: list[tuple]) -> str:
    """Rows of strings as left-aligned columns (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_table(entries) -> str:
    """The zoo as a table; ``entries`` as :func:`scan_entries` gives them (or ``(path, card)``
    pairs): an unusable entry is a row with its problem. The model and the data are described by
    their registries (``describe`` of the model class and of the reader)."""
    rows = [("name", "backbone", "data", "frame", "T_in->T_out", "steps", "test MSE/frame")]
    for path, card, *problem in entries:
        if card is None:
            rows.append((path.name, f"unusable: {problem[0] if problem else 'bad card'}", "", "", "", "", ""))
            continue
        size = card.get("frame_size", ["?", "?"])
        mse = card.get("metrics", {}).get("mse")
        rows.append((path.name, describe_model(card.get("model", "?"), card.get("config") or {}),
                     describe_data(card.get("data") or {}), f"{size[0]}x{size[1]}",
                     f"{card.get('t_in', '?')}->{card.get('t_out', '?')}",
                     str(card.get("train", {}).get("steps", "?")),
                     f"{mse:.2f}" if isinstance(mse, (int, float)) else "-"))
    return "(zoo is empty)" if len(rows) == 1 else format_rows(rows)


def list_entries(root: str | os.PathLike | None = None) -> list[tuple[Path, dict]]:
    """The usable entries under ``root`` as ``(path, card)`` (see :func:`scan_entries`)."""
    return [(d, card) for d, card, _ in scan_entries(root) if card is not None]


def check_new_entry(path: str | os.PathLike) -> Path:
    """Check, before anything is trained, that a new entry can be saved at ``path``: nothing is
    there yet and its folder can be written."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ZooError(f"{path}: zoo entry already exists (choose another name or folder; nothing was changed)")
    try:
        check_output_dir(path, what="zoo entry")
    except OutputPathError as e:
        raise ZooError(str(e)) from None
    return path


# --------------------------------------------------------------------------------------------
# ranking: which zoo entries serve a target, and how well (``transmem zoo rank``, ``auto``)

PROBE_STEPS = choices.PROBE_STEPS  # default K of the finetuning probe
USES = ("finetune", "teacher")
_AUTO = re.compile(r"auto(?::(\d+))?")


def parse_auto(ref) -> int | None:
    """``"auto"`` -> 1, ``"auto:K"`` -> K, anything else -> None (a zoo reference). A list holding
    one such string (``--teachers auto:2``) counts as that string; ``auto`` beside other
    references is an error."""
    if isinstance(ref, (list, tuple)):
        found = [r for r in ref if parse_auto(r) is not None]
        if found and len(ref) > 1:
            raise ZooError(f"{' '.join(map(str, ref))}: 'auto' picks the entries itself; give it alone")
        return parse_auto(ref[0]) if found else None
    m = _AUTO.fullmatch(str(ref).strip())
    if m is None:
        return None
    k = int(m.group(1) or 1)
    if k < 1:
        raise ZooError(f"{ref}: auto:K needs K >= 1")
    return k


@dataclasses.dataclass
class Ranking:
    """The zoo ranked for one target (see :func:`rank`). ``rows``: best first, usable entries
    sorted by ``score`` then the unusable ones with their ``reason``; ``baselines``: the
    baselines' MSE on the same clips (None where one is not installed)."""

    target: dict
    probe_steps: int
    seed: int
    rows: list
    baselines: dict
    wall_s: float = 0.0

    @property
    def score_key(self) -> str:
        return "probe_mse" if self.probe_steps > 0 else "zero_shot_mse"

    def usable(self, use: str | None = None) -> list[dict]:
        """Usable rows, best first; ``use`` ("finetune" or "teacher"): only those that serve so."""
        if use is not None and use not in USES:
            raise ValueError(f"use must be one of {USES} or None, got {use!r}")
        return [r for r in self.rows if r["usable"] and (use is None or use in r["uses"])]

    def top_rows(self, k: int = 1, use: str | None = None) -> list[dict]:
        """The ``k`` best usable rows (for ``use``); a one-line :class:`ZooError` when fewer."""
        rows = self.usable(use)
        if len(rows) < k:
            how = f" as a {use} source" if use else ""
            why = "; ".join(f"{r['name']}: {r['reason']}" for r in self.rows
                            if not r["usable"] or (use and use not in r["uses"]))
            raise ZooError(f"{self.target.get('zoo', 'the zoo')}: {len(rows)} of {len(self.rows)} entries "
                           f"can serve this target{how}, {k} asked"
                           + (f" ({why})" if why else " (the zoo is empty)"))
        return rows[:k]

    def top(self, k: int = 1, use: str | None = None) -> list[str]:
        """Names of the ``k`` best usable entries (see :meth:`top_rows`)."""
        return [r["name"] for r in self.top_rows(k, use)]

    def to_dict(self) -> dict:
        return {"target": self.target, "probe_steps": self.probe_steps, "seed": self.seed,
                "score": self.score_key, "rows": self.rows, "baselines": self.baselines,
                "wall_s": round(self.wall_s, 1)}

    @classmethod
    def from_dict(cls, d: dict) -> "Ranking":
        return cls(d["target"], d["probe_steps"], d["seed"], d["rows"], d["baselines"], d.get("wall_s", 0.0))

    def format(self) -> str:
        """The ranking as a table: one row per entry (best first, unusable ones last with the
        reason) and one per baseline, MSE per frame on the target's validation clips."""
        def num(x):
            return f"{x:.4g}" if isinstance(x, (int, float)) else "-"
        k = self.probe_steps
        rows = [("rank", "name", "model", "usable as", "zero-shot MSE",
                 f"probe MSE ({k} steps)" if k else "probe MSE", "note")]
        for r in self.rows:
            rows.append((str(r["rank"] or "-"), r["name"], r.get("model") or "?",
                         ", ".join(r["uses"]) if r["usable"] else "unusable",
                         num(r["zero_shot_mse"]), num(r["probe_mse"]), r["reason"] or ""))
        for name, mse in self.baselines.items():
            rows.append(("-", name, "baseline", "reference", num(mse), "-",
                         "" if mse is not None else "not installed: pip install 'transmem[nowcast]'"))
        t = self.target
        head = (f"{len(self.rows)} zoo entries ({t.get('zoo')}) ranked for {t['data'].get('name')} "
                f"(validation: {t.get('val_clips')} clips, "
                f"score: {self.score_key}, seed {self.seed}, {self.wall_s:.1f} s)")
        return head + "\n" + format_rows(rows)

    def summary(self, chosen: list[dict], use: str, file: str = "ranking.json") -> dict:
        """What a card says about an ``auto`` choice: the chosen entries and their scores."""
        keys = ("name", "rank", "score", "zero_shot_mse", "probe_mse")
        return {"file": file, "use": use, "probe_steps": self.probe_steps, "score": self.score_key,
                "chosen": [{k: r[k] for k in keys} | {"entry": r["path"]} for r in chosen],
                "usable": len(self.usable(use)), "entries": len(self.rows), "baselines": self.baselines}


class _Adapted(torch.nn.Module):
    """An entry whose frames have other channels than the target's (gray <-> RGB): the target's
    frames are converted to the entry's channels and its forecasts back, by the bank's adapter."""

    model_kind = "backbone"  # a backbone behind an adapter

    def __init__(self, model: torch.nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    def forward(self, frames, sampling_mask=None, t_in=None):
        x = convert_channels(frames, self.model.in_channels)
        return convert_channels(self.model(x, sampling_mask, t_in=t_in), self.channels)


def serves(model: torch.nn.Module, card: dict, exp, target_probe: torch.nn.Module,
           hw: tuple[int, int] | None = None) -> tuple[list[str], str | None]:
    """``(uses, reason)``: how a loaded entry can serve ``exp``'s target -- ``finetune`` (start
    the target from it: a backbone reading the target's channels) and ``teacher`` (a frozen
    source in a memory bank, through the bank's adapters, for a TMU on ``target_probe``'s
    backbone) -- and, when it serves neither way, why not (one line). ``hw``: the target's frame
    size as its data has it (``resize: none`` keeps the native size), default ``data.size``; with
    ``train.crop`` the patch size must divide the crop instead (training reads crops)."""
    why = kind_problem(card["model"], "backbone")
    if why:
        return [], f"{why}: it can neither start a finetune nor be a teacher (rank its teachers instead)"
    crop = exp.train.crop  # training reads these windows; whole frames are padded for forecasts
    why = (patch_problem(model.patch_size, (crop, crop), "the target's", "training crops") if crop
           else patch_problem(model.patch_size, hw or (exp.data.size, exp.data.size), "the target's"))
    if why:
        return [], f"its {why}"
    uses, reason = [], None
    if model.in_channels == exp.data.channels:
        uses.append("finetune")
    try:
        layers = resolve_layers(exp.transfer.tmu_layers, target_probe.num_layers)
        MemoryBank([copy.deepcopy(model)], [card.get("name", "entry")], target_probe, layers,
                   frame_channels=exp.data.channels).source_channels()
        uses.append("teacher")
    except (TeacherMismatch, ValueError) as e:
        reason = " ".join(str(e).split())
    return uses, (reason if not uses else None)


def _forecaster(model: torch.nn.Module, exp) -> torch.nn.Module:
    same = model.in_channels == exp.data.channels
    return model if same else _Adapted(model, exp.data.channels)


def _rollout(model: torch.nn.Module, exp) -> ForecastModule:
    """A model rolled out from the target's ``t_in`` frames (what :func:`_val_mse` scores)."""
    return ForecastModule(model, SamplingSchedule(kind="none", t_in=exp.train.t_in, frames=exp.data.frames))


def _val_mse(forecaster, exp, val) -> float:
    """Per-frame MSE (the evaluation's ``mse``) of a forecaster (a baseline, or a model through
    :func:`_rollout`) on the clips ``val``."""
    return float(evaluate(forecaster, val, exp.eval.batch_size)["mse"])


def probe(model: torch.nn.Module, exp, train, steps: int, seed: int = 0) -> torch.nn.Module:
    """Finetune ``model`` in place for ``steps`` optimizer steps on the clips ``train``: Adam at
    ``exp.train.lr``, the training loss (:func:`~transmem.training.forecast_loss`, with its L1
    term), the target's sampling schedule squeezed into the ``steps`` (as if they were the whole
    run), no augmentation. The clip order and the sampling masks are functions of ``seed``, as
    in training; nothing is written. Returns the model, in eval mode."""
    t = exp.train
    sched = SamplingSchedule(kind=t.schedule, t_in=t.t_in, frames=exp.data.frames,
                             stop_step=max(int(t.sampling_stop * steps), 1),
                             start_step=int(t.sampling_start * steps))
    bs = min(t.batch_size, len(train))
    order = StepSampler(len(train), bs, seed)
    per_epoch = len(train) // bs
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=t.lr)
    model.train()
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        idx = order.order(epoch)[k * bs:(k + 1) * bs].tolist()
        batch = default_collate([train[i] for i in idx])
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + step)
        mask = sched.mask(step, len(idx), None, g)
        loss, _, _ = forecast_loss(model, batch["frames"], mask, batch.get("mask"), l1_weight=t.l1_weight)
        if not torch.isfinite(loss):
            raise Diverged(f"probe loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _score_entry(path: Path, exp, datasets, probe_steps: int, seed: int, target_probe, hw=None) -> dict:
    row = {"name": path.name, "path": str(path), "usable": False, "reason": None, "uses": [],
           "model": None, "zero_shot_mse": None, "probe_mse": None, "score": None, "rank": None}
    try:
        model, card = load_entry(path)
    except ZooError as e:
        row["reason"] = " ".join(str(e).split())
        return row
    row["model"] = card.get("model")
    row["uses"], row["reason"] = serves(model, card, exp, target_probe, hw)
    if not row["uses"]:
        return row
    forecaster = _forecaster(model, exp)
    row["zero_shot_mse"] = _finite(_val_mse(_rollout(forecaster, exp), exp, datasets["val"]))
    if probe_steps > 0:
        torch.manual_seed(seed)  # anything random in the model's own layers
        try:
            probe(forecaster, exp, datasets["train"], probe_steps, seed)
            row["probe_mse"] = _finite(_val_mse(_rollout(forecaster, exp), exp, datasets["val"]))
        except FloatingPointError as e:
            row["reason"] = f"the finetuning probe diverged ({e}): lower train.lr"
    row["score"] = row["probe_mse"] if probe_steps > 0 else row["zero_shot_mse"]
    if row["score"] is None:
        row["uses"], row["reason"] = [], row["reason"] or "its forecasts are not finite"
        return row
    row["usable"] = True
    return row


def baseline_mses(exp, val) -> dict:
    """The baselines' per-frame MSE on ``val``, each in the units it works in for this data (as
    ``api.load_baseline`` builds them: physical units where the reader declares them); None for
    a baseline that is not installed or needs more input frames than the target's ``t_in``."""
    units = physical_units(exp.data)
    out = {}
    for name in default_baselines(units):
        if get_method(name).inputs > exp.train.t_in:  # e.g. anvil reads 4 frames
            out[name] = None
            continue
        try:
            forecaster = baseline_for_data(name, exp.train.t_in, exp.data)
        except BaselineUnavailable:
            out[name] = None
            continue
        out[name] = _finite(_val_mse(forecaster, exp, val))
    return out


def candidates(zoo_root=None, entries=None) -> tuple[list[Path], str]:
    """``(entry folders, where)``: ``entries`` (references, resolved under ``zoo_root``), or every
    entry under ``zoo_root`` (default :func:`default_root`)."""
    if entries is not None:
        return [resolve(e, zoo_root) for e in entries], "the given entries"
    root = Path(zoo_root or default_root())
    return [p for p, _ in list_entries(root)], str(root)


def rank(target, zoo_root=None, entries=None, probe_steps: int = PROBE_STEPS, seed: int = 0,
         progress: bool = True, datasets: dict | None = None) -> Ranking:
    """Rank the zoo for ``target`` (an :class:`~transmem.config.Experiment`): for every entry,
    whether it can serve the target (:func:`serves`; the others keep their reason), its zero-shot
    forecast MSE on the target's validation clips, and (``probe_steps`` > 0) the MSE after a
    finetuning :func:`probe` of that many steps on the target's training clips; the entries are
    ranked by the probe's MSE (the zero-shot MSE when ``probe_steps`` is 0). The baselines' MSE
    on the same clips is given for scale. Deterministic for a ``seed``; writes nothing.
    ``datasets``: the target's splits when already built."""
    if probe_steps < 0:
        raise ZooError(f"probe_steps={probe_steps}: must be 0 (zero-shot only) or more")
    t0 = time.time()
    paths, where = candidates(zoo_root, entries)
    datasets = datasets or build_datasets(target.data)
    for split in ("val",) + (("train",) if probe_steps else ()):
        if datasets.get(split) is None or len(datasets[split]) == 0:
            raise ZooError(f"{target.data.name}: the target has no {split} clips to rank the zoo on "
                           f"(data.{split}_clips or the data's split)")
    cfg = dict(target.model)
    try:  # the target's backbone: what a teacher's memory is adapted to
        target_probe = build_model(cfg.pop("name", None), cfg, kind="backbone")
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"model: the target's backbone does not build ({' '.join(str(e).split())})") from None
    hw = frame_size_of(datasets)  # the frames as the data has them (resize: none keeps the native size)
    jobs = [("entry", p) for p in paths] + [("baselines", None)]
    if progress:
        jobs = eval_progress(jobs, len(jobs), "zoo rank", unit="entry")
    rows, base = [], {}
    for kind, path in jobs:
        if kind == "baselines":
            base = baseline_mses(target, datasets["val"])
        else:
            rows.append(_score_entry(path, target, datasets, probe_steps, seed, target_probe, hw))
    good = sorted((r for r in rows if r["usable"]), key=lambda r: (r["score"], r["name"]))
    bad = sorted((r for r in rows if not r["usable"]), key=lambda r: r["name"])
    for i, r in enumerate(good):
        r["rank"] = i + 1
    info = {"zoo": where, "data": target.data.to_dict(), "t_in": target.train.t_in,
            "val_clips": len(datasets["val"]), "train_clips": len(datasets["train"])}
    return Ranking(info, probe_steps, seed, good + bad, base, time.time() - t0)

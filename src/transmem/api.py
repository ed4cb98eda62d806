"""The Python API behind every command: pretrain, scratch, finetune, transfer, evaluate.

Each ``run_*`` function takes an :class:`~transmem.config.Experiment` and a run folder, and leaves
in it: ``config.yaml`` (the effective config), ``checkpoints/``, ``logs/``, ``model/`` (a zoo
entry) and ``metrics.json``. A run folder that already holds results is never overwritten.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import zoo
from .config import ConfigError, Experiment
from .data import build_datasets
from .models import create_model
from .training import ForecastModule, SamplingSchedule, evaluate, fit
from .transfer import BankCache, MemoryBank


class RunFolderError(ValueError):
    """The run folder cannot be used (exists, unwritable): one-line message."""


def prepare_run_dir(out: str | os.PathLike, resume: bool = False) -> Path:
    """Create the run folder; refuse one that holds a previous run unless resuming."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunFolderError(f"{out}: run folder exists and is not empty; pass --resume to continue "
                             "that run, or choose another --out (nothing was changed)")
    if resume and not (out / "checkpoints" / "last.ckpt").is_file():
        raise RunFolderError(f"{out}: --resume asked but {out}/checkpoints/last.ckpt does not exist")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e.strerror})") from None
    return out


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)


def schedule_for(exp: Experiment) -> SamplingSchedule:
    t = exp.train
    return SamplingSchedule(kind=t.schedule, t_in=t.t_in, frames=exp.data.frames,
                            stop_step=max(int(t.sampling_stop * t.steps), 1),
                            start_step=int(t.sampling_start * t.steps))


def _module(exp: Experiment, model, bank=None, cache=None) -> ForecastModule:
    t = exp.train
    return ForecastModule(model, schedule_for(exp), lr=t.lr, bank=bank,
                          distill_weight=exp.transfer.distill_weight if bank is not None else 0.0,
                          bank_cache=cache, reverse_prob=t.reverse_time_prob, l1_weight=t.l1_weight,
                          seed=t.seed)


def _card(exp: Experiment, model, metrics: dict, wall_s: float, kind: str, extra=None) -> dict:
    d = exp.data
    return {
        "kind": kind,
        "data": d.to_dict(),
        "frame_size": [d.size, d.size],
        "channels": d.channels,
        "t_in": exp.train.t_in,
        "t_out": d.frames - exp.train.t_in,
        "train": {"steps": exp.train.steps, "batch_size": exp.train.batch_size, "lr": exp.train.lr,
                  "seed": exp.train.seed, "wall_s": round(wall_s, 1)},
        "metrics": {k: metrics[k] for k in ("mse", "mse_pixel", "mae", "ssim", "psnr") if k in metrics},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def _finish(exp, out: Path, module: ForecastModule, datasets, wall: float, kind: str, extra=None,
            zoo_name: str | None = None, zoo_root=None) -> dict:
    metrics = evaluate(module, datasets[exp.eval.split], exp.eval.batch_size,
                       thresholds=exp.eval.thresholds or None, progress=exp.train.progress)
    metrics["train_wall_s"] = round(wall, 2)
    metrics["train_steps"] = exp.train.steps
    write_json(out / "metrics.json", metrics)
    card = _card(exp, module.model, metrics, wall, kind, extra)
    zoo.save_entry(module.model, out / "model", card, overwrite=True)
    if zoo_name:
        zoo.save_entry(module.model, Path(zoo_root or zoo.default_root()) / zoo_name, card)
    return metrics


def _check_data(exp: Experiment):
    if exp.train.t_in >= exp.data.frames:
        raise ConfigError(f"train.t_in={exp.train.t_in} must be smaller than data.frames={exp.data.frames}")
    return build_datasets(exp.data)


def run_train(exp: Experiment, out, resume=False, init_from=None, zoo_name=None, zoo_root=None,
              datasets=None, kind: str | None = None) -> dict:
    """Pretrain (a zoo model), train from scratch, or finetune (``init_from`` a zoo entry)."""
    out = prepare_run_dir(out, resume)
    datasets = datasets or _check_data(exp)
    extra = {}
    if init_from:
        model, card = zoo.load_entry(init_from)
        model.train()
        exp.model = {"name": card["model"], **card["config"]}
        extra["init_from"] = {"entry": str(init_from), "sha256": card["sha256"]}
    else:
        cfg = dict(exp.model)
        model = create_model(cfg.pop("name"), cfg)
    if model.config.in_channels != exp.data.channels:
        raise ConfigError(f"model reads {model.config.in_channels}-channel frames but data.channels={exp.data.channels}")
    exp.save(out / "config.yaml")
    module = _module(exp, model)
    t0 = time.time()
    fit(module, datasets["train"], datasets.get("val"), exp.train, out, resume=resume)
    kind = kind or ("finetune" if init_from else "pretrain")
    return _finish(exp, out, module, datasets, time.time() - t0, kind, extra, zoo_name, zoo_root)


def build_transfer(exp: Experiment, teachers: list | None = None):
    """Load the teachers and build (TMU model, memory bank) for ``exp``."""
    tr = exp.transfer
    refs = teachers if teachers is not None else tr.teachers
    if not refs:
        raise ConfigError("transfer needs at least one teacher (--teachers ZOO_A [ZOO_B ...])")
    loaded = [zoo.load_entry(r) for r in refs]
    names = [c.get("name", Path(str(r)).name) for r, (_, c) in zip(refs, loaded)]
    if tr.init_from:
        init_model, init_card = zoo.load_entry(tr.init_from)
        backbone_name, backbone_cfg = init_card["model"], dict(init_card["config"])
    else:
        cfg = dict(exp.model)
        backbone_name = cfg.pop("name")
        backbone_cfg = asdict(create_model(backbone_name, cfg).config)
    from .models.tmu import resolve_layers
    probe = create_model(backbone_name, backbone_cfg)
    layers = resolve_layers(tr.tmu_layers, probe.num_layers)
    bank = MemoryBank([m for m, _ in loaded], names, probe, layers, tr.teacher_inputs,
                      frame_channels=exp.data.channels)
    model = create_model("tmu", backbone=backbone_name, backbone_config=backbone_cfg,
                         source_names=names, source_channels=bank.source_channels(),
                         tmu_layers=layers, mode=tr.mode, gates=tr.gates, weighting=tr.weighting,
                         distiller_kernel=tr.distiller_kernel, gate_kernel=tr.gate_kernel)
    if tr.init_from:
        model.backbone.load_state_dict(init_model.state_dict())
    teachers_card = [{"name": n, "entry": str(r), "sha256": c["sha256"], "model": c["model"]}
                     for n, r, (_, c) in zip(names, refs, loaded)]
    return model, bank, teachers_card


def run_transfer(exp: Experiment, out, resume=False, teachers=None, zoo_name=None, zoo_root=None,
                 datasets=None) -> dict:
    out = prepare_run_dir(out, resume)
    datasets = datasets or _check_data(exp)
    model, bank, teachers_card = build_transfer(exp, teachers)
    if teachers is not None:
        exp.transfer.teachers = [str(t) for t in teachers]
    exp.save(out / "config.yaml")
    tr = exp.transfer
    cache = None
    if tr.cache_bank != "none" and tr.teacher_inputs == "ground_truth" and exp.train.reverse_time_prob == 0:
        cache = BankCache(len(datasets["train"]),
                          directory=(out / "bank_cache") if tr.cache_bank == "disk" else None)
    module = _module(exp, model, bank, cache)
    t0 = time.time()
    fit(module, datasets["train"], datasets.get("val"), exp.train, out, resume=resume)
    extra = {"teachers": teachers_card, "transfer": asdict(tr)}
    return _finish(exp, out, module, datasets, time.time() - t0, "transfer", extra, zoo_name, zoo_root)


def load_for_inference(ref, exp: Experiment | None = None) -> tuple[ForecastModule, dict]:
    """A zoo entry wrapped for rollout. TMU targets in distill mode run alone; bank_read ones load
    the teachers listed on their card."""
    model, card = zoo.load_entry(ref)
    bank = None
    if card["model"] == "tmu" and card["config"]["mode"] == "bank_read":
        teachers = [zoo.load_entry(t["entry"])[0] for t in card["teachers"]]
        bank = MemoryBank(teachers, [t["name"] for t in card["teachers"]], model,
                          model.layers, "own", frame_channels=model.backbone.config.in_channels)
    frames = card.get("t_in", 10) + card.get("t_out", 10)
    sched = SamplingSchedule(kind="none", t_in=card.get("t_in", 10), frames=frames)
    module = ForecastModule(model, sched, bank=bank)
    module.eval()
    return module, card


def run_evaluate(ref, exp: Experiment, out, datasets=None) -> dict:
    out = Path(out)
    if (out / "metrics.json").exists():
        raise RunFolderError(f"{out / 'metrics.json'}: exists; choose another --out (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    module, card = load_for_inference(ref)
    if exp.train.t_in != module.t_in:
        module.t_in = exp.train.t_in
    datasets = datasets or _check_data(exp)
    metrics = evaluate(module, datasets[exp.eval.split], exp.eval.batch_size,
                       thresholds=exp.eval.thresholds or None, progress=exp.train.progress)
    metrics["model"] = str(ref)
    write_json(out / "metrics.json", metrics)
    return metrics

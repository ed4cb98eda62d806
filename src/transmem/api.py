"""The Python API behind every command: pretrain, scratch, finetune, transfer, evaluate.

Each ``run_*`` function takes an :class:`~transmem.config.Experiment` and a run folder, and leaves
in it: ``config.yaml`` (the effective config), ``checkpoints/``, ``logs/``, ``model/`` (a zoo
entry) and ``metrics.json``. A run folder that already holds results is never overwritten.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import zoo
from .config import ConfigError, Experiment
from .data import build_datasets, physical_units
from .files import write_json
from .models import create_model
from .training import ForecastModule, SamplingSchedule, evaluate, fit, is_launch_rank_zero
from .baselines import create_baseline
from .blend import BlendForecaster
from .transfer import BankCache, MemoryBank, build_tmu


class RunFolderError(ValueError):
    """The run folder cannot be used (exists, unwritable): one-line message."""


# Free space a run folder must have before training starts (checkpoints, logs, results). Override
# with the environment variable TRANSMEM_MIN_FREE_MB (0 turns the check off).
MIN_FREE_MB = 200


def _min_free_bytes() -> int:
    raw = os.environ.get("TRANSMEM_MIN_FREE_MB", "").strip()
    try:
        mb = float(raw) if raw else MIN_FREE_MB
    except ValueError:
        raise RunFolderError(f"TRANSMEM_MIN_FREE_MB={raw!r}: expected a number of megabytes") from None
    return int(mb * 1024 * 1024)


def _check_free_space(out: Path) -> None:
    need = _min_free_bytes()
    if need <= 0:
        return
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # no answer from this file system: the write probe still runs
    if free < need:
        raise RunFolderError(f"{out}: only {free / 2**20:.0f} MiB free on its file system, below the "
                             f"{need / 2**20:.0f} MiB transmem requires for checkpoints and results "
                             "(free some space, choose another --out, or set TRANSMEM_MIN_FREE_MB)")


def _wait_for_rank_zero(out: Path, timeout_s: float = 600.0) -> None:
    """Processes other than global rank 0 wait until rank 0 has claimed the run folder (it has
    passed its checks once anything appears in it), so that they never make a fresh folder look
    taken to it."""
    deadline = time.monotonic() + timeout_s
    while not (out.is_dir() and any(out.iterdir())):
        if time.monotonic() > deadline:
            raise RunFolderError(f"{out}: rank 0 did not create the run folder within {timeout_s:.0f} s")
        time.sleep(0.2)


def prepare_run_dir(out: str | os.PathLike, resume: bool = False) -> Path:
    """Create the run folder; refuse one that holds a previous run unless resuming, one that
    cannot be written, and one whose file system has less than ``MIN_FREE_MB`` free.

    Resuming needs the folder of an earlier run (its ``config.yaml``); a run stopped before its
    first checkpoint resumes from step 0. In a distributed launch only global rank 0 checks the
    folder; the other processes wait for it (see docs/reliability.md)."""
    out = Path(out)
    if not is_launch_rank_zero():
        _wait_for_rank_zero(out)
        return out
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunFolderError(f"{out}: run folder exists and is not empty; pass --resume to continue "
                             "that run, or choose another --out (nothing was changed)")
    if resume and not (out / "checkpoints" / "last.ckpt").is_file() and not (out / "config.yaml").is_file():
        raise RunFolderError(f"{out}: --resume asked but there is no earlier run here "
                             f"(no {out}/checkpoints/last.ckpt nor {out}/config.yaml)")
    _check_free_space(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e.strerror or e})") from None
    return out


def schedule_for(exp: Experiment) -> SamplingSchedule:
    t = exp.train
    return SamplingSchedule(kind=t.schedule, t_in=t.t_in, frames=exp.data.frames,
                            stop_step=max(int(t.sampling_stop * t.steps), 1),
                            start_step=int(t.sampling_start * t.steps))


def _module(exp: Experiment, model, bank=None, cache=None) -> ForecastModule:
    t = exp.train
    patch = getattr(model, "backbone", model).config.patch_size
    if t.crop and (t.crop % patch or t.crop > exp.data.size):
        raise ConfigError(f"train.crop={t.crop} must divide by the model's patch size {patch} and be at "
                          f"most data.size={exp.data.size}")
    return ForecastModule(model, schedule_for(exp), lr=t.lr, bank=bank,
                          distill_weight=exp.transfer.distill_weight if bank is not None else 0.0,
                          bank_cache=cache, reverse_prob=t.reverse_time_prob, l1_weight=t.l1_weight,
                          seed=t.seed, augment=t.augment, crop=t.crop,
                          distill_decay=exp.transfer.distill_decay, total_steps=t.steps,
                          distill_span=exp.transfer.distill_span)


def _card(exp: Experiment, metrics: dict, wall_s: float, kind: str, extra=None) -> dict:
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


def evaluate_forecaster(exp: Experiment, module, datasets) -> dict:
    """Per-frame metrics of any forecaster (a trained module or a baseline) on ``exp``'s eval
    split, with CSI/POD/FAR in physical units where the data declares them."""
    split = datasets.get(exp.eval.split)
    if split is None or len(split) == 0:
        raise ConfigError(f"eval.split '{exp.eval.split}' has no clips to evaluate on")
    units = physical_units(exp.data)
    return evaluate(module, split, exp.eval.batch_size, thresholds=exp.eval.thresholds or None,
                    to_physical=None if units is None else units.to_physical, progress=exp.train.progress)


def _finish(exp, out: Path, module: ForecastModule, datasets, wall: float, kind: str, extra=None,
            zoo_name: str | None = None, zoo_root=None) -> dict:
    metrics = evaluate_forecaster(exp, module, datasets)
    metrics["train_wall_s"] = round(wall, 2)
    metrics["train_steps"] = exp.train.steps
    write_json(out / "metrics.json", metrics)
    card = _card(exp, metrics, wall, kind, extra)
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
    """Pretrain (a zoo model), train from scratch, or finetune (``init_from`` a zoo entry).
    ``exp`` is not changed: the run works on its own copy."""
    exp = copy.deepcopy(exp)
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
        torch.manual_seed(exp.train.seed)  # initial weights are a function of the seed
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
    init_state = None
    if tr.init_from:
        init_model, init_card = zoo.load_entry(tr.init_from)
        backbone_name, backbone_cfg = init_card["model"], dict(init_card["config"])
        init_state = init_model.state_dict()
    else:
        cfg = dict(exp.model)
        backbone_name = cfg.pop("name")
        backbone_cfg = asdict(create_model(backbone_name, cfg).config)
    model, bank = build_tmu(backbone_name, backbone_cfg, [m for m, _ in loaded], names,
                            frame_channels=exp.data.channels, tmu_layers=tr.tmu_layers, mode=tr.mode,
                            gates=tr.gates, weighting=tr.weighting, distiller_kernel=tr.distiller_kernel,
                            gate_kernel=tr.gate_kernel, teacher_inputs=tr.teacher_inputs,
                            seed=exp.train.seed,  # initial weights are a function of the seed
                            backbone_state=init_state)
    teachers_card = [{"name": n, "entry": str(r), "sha256": c["sha256"], "model": c["model"]}
                     for n, r, (_, c) in zip(names, refs, loaded)]
    return model, bank, teachers_card


def transfer_caveats(tr) -> list[str]:
    """Settings that train but are known to mislead (each a one-line message)."""
    out = []
    if tr.mode == "bank_read" and tr.teacher_inputs == "ground_truth":
        out.append("bank_read with teacher_inputs ground_truth: in training the teachers read true "
                   "frames that the target only predicts, at test time they roll out on their own; "
                   "the benchmark found this mismatch costly, prefer --transfer.teacher_inputs own")
    return out


def run_transfer(exp: Experiment, out, resume=False, teachers=None, zoo_name=None, zoo_root=None,
                 datasets=None) -> dict:
    """Train a TMU target that draws on zoo teachers. ``exp`` is not changed (see run_train)."""
    exp = copy.deepcopy(exp)
    out = prepare_run_dir(out, resume)
    for msg in transfer_caveats(exp.transfer):
        warnings.warn(msg, stacklevel=2)
    datasets = datasets or _check_data(exp)
    model, bank, teachers_card = build_transfer(exp, teachers)
    if teachers is not None:
        exp.transfer.teachers = [str(t) for t in teachers]
    exp.save(out / "config.yaml")
    tr = exp.transfer
    cache = None
    augmented = exp.train.reverse_time_prob > 0 or exp.train.augment or exp.train.crop
    if tr.cache_bank != "none" and tr.teacher_inputs == "ground_truth" and not augmented:
        cache = BankCache(len(datasets["train"]),
                          directory=(out / "bank_cache") if tr.cache_bank == "disk" else None)
    module = _module(exp, model, bank, cache)
    t0 = time.time()
    fit(module, datasets["train"], datasets.get("val"), exp.train, out, resume=resume)
    extra = {"teachers": teachers_card, "transfer": asdict(tr)}
    return _finish(exp, out, module, datasets, time.time() - t0, "transfer", extra, zoo_name, zoo_root)


def load_for_inference(ref) -> tuple[ForecastModule, dict]:
    """A zoo entry wrapped for rollout. A model that needs its teachers at inference (a TMU in
    bank_read mode) gets those listed on its card; any other runs alone."""
    model, card = zoo.load_entry(ref)
    bank = None
    if model.needs_teachers_at_inference:
        teachers = [zoo.load_entry(t["entry"])[0] for t in card["teachers"]]
        bank = MemoryBank(teachers, [t["name"] for t in card["teachers"]], model,
                          model.layers, "own", frame_channels=model.backbone.config.in_channels)
    frames = card.get("t_in", 10) + card.get("t_out", 10)
    sched = SamplingSchedule(kind="none", t_in=card.get("t_in", 10), frames=frames)
    module = ForecastModule(model, sched, bank=bank)
    module.eval()
    return module, card


def load_baseline(name: str, exp: Experiment, physical: bool = True, inflow: str = "zero"):
    """A baseline forecaster (persistence, extrapolation) for ``exp``'s data: it works in the
    physical units the data's reader declares (mm/h for radar), else -- or with ``physical=False``
    -- on the [0, 1] values. ``inflow``: see :func:`transmem.baselines.extrapolate`."""
    units = physical_units(exp.data) if physical else None
    return create_baseline(name, exp.train.t_in, None if units is None else units.to_physical,
                           None if units is None else units.from_physical, inflow)


def blend_with_baseline(forecaster, baseline: str, exp: Experiment, weight=0.5) -> BlendForecaster:
    """``weight * forecaster + (1 - weight) * baseline``, the baseline run on the model's own
    values (log-scaled rain for radar: extrapolation of those beat extrapolation in mm/h on our
    radar benchmark, alone and in the blend)."""
    return BlendForecaster(forecaster, load_baseline(baseline, exp, physical=False), weight)


def _refuse_earlier_metrics(out: Path) -> None:
    if (out / "metrics.json").exists():
        raise RunFolderError(f"{out / 'metrics.json'}: exists; choose another --out (nothing was changed)")


def eval_datasets(exp: Experiment, out) -> dict:
    """Check ``out`` (no earlier metrics.json) and build the data, before anything is written."""
    _refuse_earlier_metrics(Path(out))
    return _check_data(exp)


def run_evaluate(forecaster, exp: Experiment, out, datasets=None, label: str | None = None) -> dict:
    """Per-frame metrics of a loaded forecaster (a zoo model from :func:`load_for_inference` or a
    baseline from :func:`load_baseline`) on ``exp``'s eval split, written to ``out/metrics.json``."""
    out = Path(out)
    _refuse_earlier_metrics(out)
    datasets = datasets or _check_data(exp)
    forecaster.t_in = exp.train.t_in
    metrics = evaluate_forecaster(exp, forecaster, datasets)
    if label:
        metrics["model"] = label
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    return metrics

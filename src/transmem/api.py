"""The Python API behind every command: pretrain, scratch, finetune, transfer, evaluate.

Each ``run_*`` function takes an :class:`~transmem.config.Experiment` and a run folder, and leaves
in it: ``config.yaml`` (the effective config), ``checkpoints/``, ``logs/``, ``model/`` (a zoo
entry) and ``metrics.json``. A run folder that already holds results is never overwritten.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import run_report, zoo
from .choices import MIX_LR, MIX_MEMO_BYTES, MIX_STEPS
from .config import ConfigError, Experiment, TransferConfig, check_patch, load_experiment, read_config_file, validate
from .data import adopt_fitted, build_datasets, frame_size_of, physical_units
from .environment import environment
from .errors import UserError
from .files import (LOCK_NAME, FolderBusy, FolderLock, OutputPathError, atomic_folder, atomic_write, check_output_dir,
                    held_lock, held_locks, lock_folder, lock_holder, lock_path_beside, write_json)
from .options import NAMES as TMU_OPTIONS, tmu_options
from .models import build_config, build_model
from .training import ForecastModule, SamplingSchedule, evaluate, fit, is_launch_rank_zero
from .training.checkpoints import resume_point
from .baselines import BaselineUnavailable, baseline_for_data, default_baselines, list_baselines
from .blend import BlendForecaster, parse_blend as blend_spec
from .choices import EVAL_SPLITS, check
from .transfer import BankCache, MemoryBank, build_tmu
from .transfer.mixture import (MixtureOptions, build_mixture, calibrate_areas, check_area_thresholds, check_baselines,
                               check_count, check_member, check_one_process, fit_clips, member_card, unique_names)


class RunFolderError(OutputPathError):
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
    while not (out.is_dir() and _has_files(out)):
        if time.monotonic() > deadline:
            raise RunFolderError(f"{out}: rank 0 did not create the run folder within {timeout_s:.0f} s")
        time.sleep(0.2)


def _has_files(out: Path) -> bool:
    """Whether ``out`` holds anything but its lock file."""
    try:
        return any(n != LOCK_NAME for n in os.listdir(out))
    except OSError:
        return False


#: run folders this process made (absolute paths): the only ones its cleanup may remove
_MADE: set[str] = set()


def claim_run_dir(out: str | os.PathLike) -> bool:
    """Make (when absent) and lock the run folder: ``RUN/.transmem.lock`` under an exclusive
    ``flock`` for as long as this process runs, so that a second run into it is refused with one
    line (:class:`~transmem.files.FolderBusy`) and never writes or removes anything in it. Returns
    whether this process made the folder."""
    out = Path(out)
    made = False
    try:
        out.mkdir(parents=True)
        made = True
    except FileExistsError:
        pass
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e.strerror or e})") from None
    try:
        lock_folder(out / LOCK_NAME, out)
    except FolderBusy as e:
        raise RunFolderError(str(e)) from None
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e.strerror or e})") from None
    if made:
        _MADE.add(os.path.abspath(out))
    return made


def release_run_dir(out: str | os.PathLike) -> None:
    """Unlock the run folder (its lock file is removed)."""
    lock = held_lock(Path(out) / LOCK_NAME)
    if lock is not None:
        lock.release()


def prepare_run_dir(out: str | os.PathLike, resume: bool = False) -> Path:
    """Create the run folder; refuse one that holds a previous run unless resuming, one that
    another process is writing (its lock, :func:`claim_run_dir`), one that cannot be written,
    and one whose file system has less than ``MIN_FREE_MB`` free.

    Resuming needs the folder of an earlier run (its ``config.yaml``); a run stopped before its
    first checkpoint resumes from step 0. In a distributed launch only global rank 0 checks the
    folder; the other processes wait for it (see docs/reliability.md)."""
    out = Path(out)
    if not is_launch_rank_zero():
        _wait_for_rank_zero(out)
        return out
    check_run_dir(out, resume)
    _check_free_space(out)
    claim_run_dir(out)
    check_run_dir(out, resume)  # again, now that no other process can write into it
    try:
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e.strerror or e})") from None
    return out


#: the parts of a config a resumed run must share with the run in the folder: they decide the
#: shapes in the checkpoint, or what the clips are
RESUME_KEYS = {"data": ("name", "path", "frames", "size", "channels", "resize", "extra"),
               "train": ("t_in",),
               "transfer": (*TMU_OPTIONS, "teacher_inputs")}


def check_run_dir(out: str | os.PathLike, resume: bool = False, exp: Experiment | None = None,
                  init_from=None, zoo_name: str | None = None, zoo_root=None) -> Path:
    """Every check of a run folder that needs nothing created: it can be written (not a file, not
    a dangling link, not on a read-only file system); without ``resume`` it is absent or empty;
    with ``resume`` it holds an earlier run whose ``config.yaml`` agrees with ``exp`` on the model
    (the ``init_from`` entry's for a finetune), the data's frames and ``RESUME_KEYS``; a new
    ``zoo_name`` entry does not exist yet. Nothing is created or changed. In a distributed
    launch only global rank 0 checks (the others start once it has claimed the folder)."""
    out = Path(out)
    if not is_launch_rank_zero():
        return out
    try:
        check_output_dir(out, what="run folder")
    except OutputPathError as e:
        raise RunFolderError(f"{out}: cannot write to the run folder ({e})") from None
    busy = lock_holder(out / LOCK_NAME, out)
    if busy is not None:
        raise RunFolderError(str(busy))
    if out.exists() and _has_files(out) and not resume:
        raise RunFolderError(f"{out}: run folder exists and is not empty; pass --resume to continue "
                             "that run, or choose another --out (nothing was changed)")
    if resume and not (out / "checkpoints" / "last.ckpt").is_file() and not (out / "config.yaml").is_file():
        raise RunFolderError(f"{out}: --resume asked but there is no earlier run here "
                             f"(no {out}/checkpoints/last.ckpt nor {out}/config.yaml)")
    if resume and exp is not None and (out / "config.yaml").is_file():
        _check_same_run(out, exp, init_from, zoo_root)
    if resume and finished_run(out) is None:
        resume_point(out)  # a damaged or refused checkpoint: one line before anything is built
    if zoo_name is not None:
        name = str(zoo_name)
        if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name:
            raise ConfigError(f"--zoo-name {name!r}: give a plain name (no '/', not starting with '.'); "
                              "--zoo-root says where the zoo is")
    if zoo_name and not (resume and finished_run(out) is not None):
        zoo.check_new_entry(Path(zoo_root or zoo.default_root()) / zoo_name)
    return out


def _check_same_run(out: Path, exp: Experiment, init_from, zoo_root=None) -> None:
    try:
        before = read_config_file(out / "config.yaml")
    except ConfigError as e:
        raise RunFolderError(f"cannot --resume: {e}") from None
    now = exp.to_dict()
    if init_from is not None and zoo.parse_auto(init_from) is None:
        card = zoo.read_card(zoo.resolve(init_from, zoo_root))
        now["model"] = {"name": card["model"], **card["config"]}
    elif init_from is not None:
        now.pop("model")  # chosen by the ranking kept in the folder
    diffs = []
    if "model" in now:
        was, new = _full_model(before.get("model") or {}), _full_model(now["model"])
        if was.get("name") != new.get("name"):
            diffs.append(f"model.name ({was.get('name')} there, {new.get('name')} now)")
        else:
            diffs += [f"model.{k} ({was.get(k)!r} there, {v!r} now)" for k, v in new.items()
                      if k in was and was[k] != v]
    for sec, keys in RESUME_KEYS.items():
        was = before.get(sec) or {}
        diffs += [f"{sec}.{k} ({was[k]!r} there, {now[sec][k]!r} now)" for k in keys
                  if k in was and was[k] != now[sec][k]]
    if diffs:
        raise RunFolderError(f"{out}/config.yaml: --resume with another config than the run's: "
                             f"{'; '.join(diffs[:3])}; use the run's config (nothing was changed)")


def _full_model(model: dict) -> dict:
    """A model section with every default filled in (so that a key left out equals its default)."""
    d = {"name": "convlstm", **model}
    name = d.pop("name")
    try:
        return {"name": name, **asdict(build_config(name, d))}
    except (KeyError, ValueError, TypeError):
        return {"name": name, **d}


def finished_run(out: str | os.PathLike) -> dict | None:
    """The metrics of a run that finished in ``out`` (``metrics.json`` and ``model/`` written),
    or None."""
    out = Path(out)
    if not ((out / "metrics.json").is_file() and (out / "model" / zoo.CARD).is_file()):
        return None
    try:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{out / 'metrics.json'}: unreadable ({e}); the run looks finished") from None
    if isinstance(metrics, dict):
        metrics.pop("environment", None)  # the same shape as a fresh run's metrics
    return metrics


def _write_metrics(out: Path, metrics: dict) -> Path:
    """``out/metrics.json``: the metrics and the ``environment`` block (versions, CPU
    capability, threads) they were computed with; ``metrics`` itself is left as it is."""
    return write_json(out / "metrics.json", {**metrics, "environment": environment()})


def _no_leftovers(run):
    """A run that fails with a user error (bad config, data, zoo entry) before its first
    checkpoint leaves no run folder behind when it created it: the corrected command then runs
    without --resume."""
    @functools.wraps(run)
    def wrapper(exp, out, resume=False, *args, **kwargs):
        try:
            return run(exp, out, resume, *args, **kwargs)
        except UserError:
            # only a folder this process made and still holds the lock of: never one that another
            # run is writing (a second run into the same --out is refused, not cleaned up)
            ckpts = Path(out) / "checkpoints"
            mine = not resume and os.path.abspath(out) in _MADE \
                and Path(os.path.abspath(Path(out) / LOCK_NAME)) in held_locks()
            if mine and is_launch_rank_zero() and Path(out).is_dir() and not (
                    ckpts.is_dir() and any(ckpts.glob("*.ckpt"))):
                shutil.rmtree(out, ignore_errors=True)  # while still holding its lock
            raise
        finally:
            _MADE.discard(os.path.abspath(out))
            release_run_dir(out)
    return wrapper


def schedule_for(exp: Experiment) -> SamplingSchedule:
    t = exp.train
    return SamplingSchedule(kind=t.schedule, t_in=t.t_in, frames=exp.data.frames,
                            stop_step=max(int(t.sampling_stop * t.steps), 1),
                            start_step=int(t.sampling_start * t.steps))


def data_frame_size(exp: Experiment, datasets: dict | None) -> tuple[int, int]:
    """``(height, width)`` of the frames the model will see: read from the built ``datasets``
    (with ``resize: none`` a reader keeps its native size, which ``data.size`` does not say), else
    ``data.size`` square."""
    hw = frame_size_of(datasets) if datasets else None
    return hw or (exp.data.size, exp.data.size)


def check_patch_fits(patch, hw: tuple[int, int], exp: Experiment, who: str = "the model's") -> None:
    """A one-line ConfigError when ``patch`` does not divide the frames ``hw`` the data really has
    (or a training crop does not fit them), before anything is created: :func:`config.check_patch`
    on the built data's frame size."""
    check_patch(patch, hw, exp.data.resize, exp.train.crop, who)


def _model_patch(exp: Experiment, init_from=None, zoo_root=None):
    """The patch size of the model a run will train (the ``init_from`` entry's for a finetune)."""
    if init_from:
        cfg = zoo.read_card(zoo.resolve(init_from, zoo_root)).get("config") or {}
        return (cfg.get("backbone_config") or cfg).get("patch_size")
    cfg = dict(exp.model)
    try:
        return getattr(build_config(cfg.pop("name", "convlstm"), cfg), "patch_size", None)
    except (KeyError, ValueError, TypeError):
        return None


def _module(exp: Experiment, model, bank=None, cache=None, hw: tuple[int, int] | None = None) -> ForecastModule:
    t = exp.train
    return ForecastModule(model, schedule_for(exp), lr=t.lr, bank=bank,
                          distill_weight=exp.transfer.distill_weight if bank is not None else 0.0,
                          bank_cache=cache, reverse_prob=t.reverse_time_prob, l1_weight=t.l1_weight,
                          seed=t.seed, augment=t.augment, crop=t.crop,
                          distill_decay=exp.transfer.distill_decay, total_steps=t.steps,
                          distill_span=exp.transfer.distill_span)


def _card(exp: Experiment, metrics: dict, wall_s: float, kind: str, extra=None,
          hw: tuple[int, int] | None = None) -> dict:
    d = exp.data
    return {
        "kind": kind,
        "data": d.to_dict(),
        "frame_size": list(hw or (d.size, d.size)),
        "channels": d.channels,
        "t_in": exp.train.t_in,
        "t_out": d.frames - exp.train.t_in,
        "train": {"steps": exp.train.steps, "batch_size": exp.train.batch_size, "lr": exp.train.lr,
                  "seed": exp.train.seed, "wall_s": round(wall_s, 1)},
        "metrics": {k: metrics[k] for k in ("mse", "mse_pixel", "mae", "ssim", "psnr", "rmse_physical",
                                            "mae_physical", "units") if k in metrics},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def evaluate_forecaster(exp: Experiment, module, datasets) -> dict:
    """Per-frame metrics of any forecaster (a trained module or a baseline) on ``exp``'s eval
    split, with RMSE / MAE (``rmse_physical``, ``mae_physical``, in ``metrics["units"]``) and
    CSI/POD/FAR in physical units where the data declares them."""
    split = datasets.get(exp.eval.split)
    if split is None or len(split) == 0:
        raise ConfigError(f"eval.split '{exp.eval.split}' has no clips to evaluate on")
    units = physical_units(exp.data)
    metrics = evaluate(module, split, exp.eval.batch_size, thresholds=exp.eval.thresholds or None,
                       to_physical=None if units is None else units.to_physical, progress=exp.train.progress)
    if units is not None:  # rmse_physical / mae_physical are in these units
        metrics["units"] = units.name
    return metrics


def _finish(exp, out: Path, module: ForecastModule, datasets, wall: float, kind: str, extra=None,
            zoo_name: str | None = None, zoo_root=None) -> dict:
    metrics = evaluate_forecaster(exp, module, datasets)
    metrics["train_wall_s"] = round(wall, 2)
    metrics["train_steps"] = exp.train.steps
    _write_metrics(out, metrics)
    card = _card(exp, metrics, wall, kind, extra, data_frame_size(exp, datasets))
    zoo.save_entry(module.model, out / "model", card, overwrite=True)
    if zoo_name:
        zoo.save_entry(module.model, Path(zoo_root or zoo.default_root()) / zoo_name, card)
    return metrics


def _check_data(exp: Experiment, train: bool = True):
    """Build the data; refuse, before anything is trained, an empty evaluation split (and an
    empty training split when ``train``). ``exp`` is validated first (it may have been built in
    Python rather than loaded): every range check has its one owner, :func:`config.validate`."""
    validate(exp)
    datasets = build_datasets(exp.data)
    for split, key in ([("train", "train")] if train else []) + [(exp.eval.split, "eval.split")]:
        if datasets.get(split) is None or len(datasets[split]) == 0:
            raise ConfigError(f"{key}: the '{split}' split of {exp.data.name} has no clips "
                              f"(data.{split}_clips, data.split, data.frames or the data's length); nothing was "
                              "trained or written")
    return datasets


RANKING_FILE = "ranking.json"


def _rank_for_auto(exp: Experiment, out, resume: bool, zoo_root, datasets, probe_steps: int) -> zoo.Ranking:
    """The zoo ranked for ``exp`` (``auto``), before the run folder is created (the callers have
    checked it with :func:`check_run_dir`): an empty zoo ends in a one-line
    :class:`~transmem.zoo.ZooError`, and a resumed run reuses the ranking in its folder."""
    out = Path(out)
    if resume and (out / RANKING_FILE).is_file():
        return zoo.Ranking.from_dict(json.loads((out / RANKING_FILE).read_text()))
    paths, where = zoo.candidates(zoo_root)
    if not paths:
        raise zoo.ZooError(f"{where}: no zoo entries to choose from ('auto' ranks the zoo; give "
                           "--zoo-root DIR or set TRANSMEM_ZOO); nothing was trained")
    return zoo.rank(exp, zoo_root=zoo_root, probe_steps=probe_steps, seed=exp.train.seed,
                    progress=exp.train.progress, datasets=datasets)


def _record_ranking(out: Path, ranking: zoo.Ranking) -> None:
    if is_launch_rank_zero():
        write_json(out / RANKING_FILE, ranking.to_dict())


@_no_leftovers
def run_train(exp: Experiment, out, resume=False, init_from=None, zoo_name=None, zoo_root=None,
              datasets=None, kind: str | None = None, probe_steps: int = zoo.PROBE_STEPS) -> dict:
    """Pretrain (a zoo model), train from scratch, or finetune (``init_from`` a zoo entry, or
    ``"auto"``: the best entry for ``exp`` by :func:`transmem.zoo.rank` under ``zoo_root``, with
    ``probe_steps``; the ranking is kept in ``out/ranking.json`` and summed up on the card).
    ``exp`` is not changed: the run works on its own copy."""
    exp = copy.deepcopy(exp)
    check_run_dir(out, resume, exp, init_from, zoo_name, zoo_root)  # before anything is built
    if resume and finished_run(out) is not None:
        return finished_run(out)  # a finished run: nothing to train, no file changed
    ranking = None
    if init_from is not None and zoo.parse_auto(init_from) is not None:
        if zoo.parse_auto(init_from) != 1:
            raise ConfigError(f"--from {init_from}: a finetune starts from one entry ('auto'); auto:K is for --teachers")
        datasets = datasets or _check_data(exp)
        ranking = _rank_for_auto(exp, out, resume, zoo_root, datasets, probe_steps)
        chosen = ranking.top_rows(1, use="finetune")
        init_from = chosen[0]["path"]
    datasets = datasets or _check_data(exp)
    hw = data_frame_size(exp, datasets)
    check_patch_fits(_model_patch(exp, init_from, zoo_root), hw, exp,
                     f"{init_from}: its" if init_from else "the model's")  # before the run folder exists
    out = prepare_run_dir(out, resume)
    extra = {}
    if ranking is not None:
        _record_ranking(out, ranking)
        extra["ranking"] = {"from": ranking.summary(chosen, "finetune", RANKING_FILE)}
    if init_from:
        model, card = zoo.load_entry(init_from, zoo_root, kind="backbone", role="a finetune starts from a backbone entry")
        model.train()
        exp.model = {"name": card["model"], **card["config"]}
        extra["init_from"] = {"entry": str(init_from), "sha256": card["sha256"]}
    else:
        cfg = dict(exp.model)
        # initial weights are a function of the seed
        model = build_model(cfg.pop("name"), cfg, kind="backbone", seed=exp.train.seed)
    if model.in_channels != exp.data.channels:
        raise ConfigError(f"model reads {model.in_channels}-channel frames but data.channels={exp.data.channels}")
    module = _module(exp, model, hw=hw)
    exp.save(out / "config.yaml")
    t0 = time.time()
    fit(module, datasets["train"], datasets.get("val"), exp.train, out, resume=resume)
    kind = kind or ("finetune" if init_from else "pretrain")
    return _finish(exp, out, module, datasets, time.time() - t0, kind, extra, zoo_name, zoo_root)


def build_transfer(exp: Experiment, teachers: list | None = None, zoo_root=None):
    """Load the teachers and build (TMU model, memory bank) for ``exp``. Entry names are looked
    up under ``zoo_root`` (default: :func:`transmem.zoo.default_root`); the card records each
    teacher's folder, so that the model loads again from anywhere."""
    tr = exp.transfer
    refs = teachers if teachers is not None else tr.teachers
    if not refs:
        raise ConfigError("transfer needs at least one teacher (--teachers ZOO_A [ZOO_B ...])")
    refs = [zoo.resolve(r, zoo_root) for r in refs]
    loaded = [zoo.load_entry(r, kind="backbone", role="teachers are backbone entries") for r in refs]
    names = [c.get("name", Path(str(r)).name) for r, (_, c) in zip(refs, loaded)]
    init_state = None
    if tr.init_from:
        init_model, init_card = zoo.load_entry(tr.init_from, zoo_root, kind="backbone",
                                               role="transfer.init_from takes a backbone entry")
        backbone_name, backbone_cfg = init_card["model"], dict(init_card["config"])
        init_state = init_model.state_dict()
    else:
        cfg = dict(exp.model)
        backbone_name = cfg.pop("name")
        backbone_cfg = asdict(build_config(backbone_name, cfg))
    model, bank = build_tmu(backbone_name, backbone_cfg, [m for m, _ in loaded], names, tmu_options(tr),
                            frame_channels=exp.data.channels, teacher_inputs=tr.teacher_inputs,
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


@_no_leftovers
def run_transfer(exp: Experiment, out, resume=False, teachers=None, zoo_name=None, zoo_root=None,
                 datasets=None, probe_steps: int = zoo.PROBE_STEPS) -> dict:
    """Train a TMU target that draws on zoo teachers. ``exp`` is not changed (see run_train).
    Teachers ``["auto:K"]`` (``auto`` = ``auto:1``) are the K best teacher entries for ``exp`` and
    ``transfer.init_from: auto`` the best finetune entry, by :func:`transmem.zoo.rank` under
    ``zoo_root``; the ranking is kept in ``out/ranking.json`` and summed up on the card."""
    if exp.transfer.mode == "mixture":  # not a TMU: the mixture of finetuned members, default options
        return run_mixture(exp, out, resume, teachers, zoo_name, zoo_root, datasets, probe_steps)
    exp = copy.deepcopy(exp)
    check_run_dir(out, resume, exp, None, zoo_name, zoo_root)  # before anything is built
    if resume and finished_run(out) is not None:
        return finished_run(out)  # a finished run: nothing to train, no file changed
    refs = teachers if teachers is not None else exp.transfer.teachers
    k = zoo.parse_auto(refs) if refs else None
    init_auto = exp.transfer.init_from is not None and zoo.parse_auto(exp.transfer.init_from) is not None
    if init_auto and zoo.parse_auto(exp.transfer.init_from) != 1:
        raise ConfigError(f"--init-from {exp.transfer.init_from}: the backbone starts from one entry ('auto')")
    auto, ranking = {}, None
    if k or init_auto:
        datasets = datasets or _check_data(exp)
        ranking = _rank_for_auto(exp, out, resume, zoo_root, datasets, probe_steps)
        if k:
            rows = ranking.top_rows(k, use="teacher")
            teachers = [r["path"] for r in rows]
            auto["teachers"] = ranking.summary(rows, "teacher", RANKING_FILE)
        if init_auto:
            rows = ranking.top_rows(1, use="finetune")
            exp.transfer.init_from = rows[0]["path"]
            auto["init_from"] = ranking.summary(rows, "finetune", RANKING_FILE)
    datasets = datasets or _check_data(exp)
    model, bank, teachers_card = build_transfer(exp, teachers, zoo_root)
    hw = data_frame_size(exp, datasets)
    check_patch_fits(model.patch_size, hw, exp)  # before the run folder
    for t in teachers_card:  # the teachers run on the target's frames too
        cfg = zoo.read_card(t["entry"]).get("config") or {}
        check_patch_fits(cfg.get("patch_size"), hw, exp, f"teacher {t['entry']}: its")
    out = prepare_run_dir(out, resume)
    if ranking is not None:
        _record_ranking(out, ranking)
    for msg in transfer_caveats(exp.transfer):
        warnings.warn(msg, stacklevel=2)
    if teachers is not None:
        exp.transfer.teachers = [str(t) for t in teachers]
    exp.save(out / "config.yaml")
    tr = exp.transfer
    cache = None
    augmented = exp.train.reverse_time_prob > 0 or exp.train.augment or exp.train.crop
    if tr.cache_bank != "none" and tr.teacher_inputs == "ground_truth" and not augmented:
        cache = BankCache(len(datasets["train"]),
                          directory=(out / "bank_cache") if tr.cache_bank == "disk" else None)
    module = _module(exp, model, bank, cache, hw)
    t0 = time.time()
    fit(module, datasets["train"], datasets.get("val"), exp.train, out, resume=resume)
    extra = {"teachers": teachers_card, "transfer": asdict(tr)} | ({"ranking": auto} if auto else {})
    return _finish(exp, out, module, datasets, time.time() - t0, "transfer", extra, zoo_name, zoo_root)


MIXTURE_FILE = "mixture.json"


@_no_leftovers
def run_mixture(exp: Experiment, out, resume=False, teachers=None, zoo_name=None, zoo_root=None,
                datasets=None, probe_steps: int = zoo.PROBE_STEPS, baselines=(), gating: str = "lead",
                member_steps: int | None = None, mix_steps: int = MIX_STEPS, mix_lr: float = MIX_LR,
                mix_on: str = "val", areas: bool = False) -> dict:
    """The mixture of finetuned zoo members (``transfer --mode mixture``). Each member entry
    (``teachers``; ``["auto:K"]``: the K best finetune entries by :func:`transmem.zoo.rank`) is
    finetuned on ``exp``'s data for ``member_steps`` (default ``train.steps``; 0: used as it is)
    into ``out/members/NAME``; then softmax weights per lead time (``gating="pixel"``: also per
    pixel) that combine their forecasts and those of the registered ``baselines`` train for
    ``mix_steps`` at ``mix_lr`` on the ``mix_on`` clips (``val``: clips the members did not train
    on; ``mix_steps`` 0: nothing trains, the plain average), the members frozen
    (``gating="stack"``: the radar recipe's CNN gate); ``areas``: then rain areas calibrated on
    those clips at ``eval.thresholds`` (:func:`~transmem.transfer.mixture.calibrate_areas`). One
    entry (``out/model``, and ``zoo_name``) holds it all; its card lists the members with the sha256 of their weights. ``exp`` is not
    changed. Every member, baseline and option is checked before anything is written."""
    exp = copy.deepcopy(exp)
    exp.transfer.mode = "mixture"
    check_run_dir(out, resume, exp, None, zoo_name, zoo_root)  # before anything is built
    if resume and finished_run(out) is not None:
        return finished_run(out)  # a finished run: nothing to train, no file changed
    opts = MixtureOptions(baselines, gating, member_steps, mix_steps, mix_lr, mix_on, areas).check()
    if opts.areas:
        check_area_thresholds(exp.eval.thresholds)
    opts.member_steps = exp.train.steps if opts.member_steps is None else opts.member_steps
    t = exp.train
    check_one_process(t)
    if exp.transfer.init_from:
        raise ConfigError(f"--init-from {exp.transfer.init_from}: a mixture's members start from their own "
                          "entries (give them with --teachers)")
    refs = teachers if teachers is not None else exp.transfer.teachers
    if not refs:
        raise ConfigError("the mixture needs zoo members: --teachers ZOO_A [ZOO_B ...] or --teachers auto:K")
    k = zoo.parse_auto(refs)
    paths = None if k else [zoo.resolve(r, zoo_root) for r in refs]  # a bad name: one line, nothing written
    check_count(k or len(paths), opts.baselines)
    for p in paths or []:
        check_member(p, zoo.read_card(p), exp.data.channels)
    check_baselines(opts.baselines, t.t_in, exp.data)
    if resume and (Path(out) / MIXTURE_FILE).is_file():
        diffs = opts.differences(json.loads((Path(out) / MIXTURE_FILE).read_text(encoding="utf-8")))
        if diffs:
            raise RunFolderError(f"{Path(out) / MIXTURE_FILE}: --resume with other mixture options than the run's: "
                                 f"{'; '.join(diffs[:3])} (nothing was changed)")
    datasets = datasets or _check_data(exp)
    clips = fit_clips(datasets, opts) if opts.mix_steps or opts.areas else None  # none to fit: the plain average
    ranking, auto = None, {}
    if k:
        ranking = _rank_for_auto(exp, out, resume, zoo_root, datasets, probe_steps)
        rows = ranking.top_rows(k, use="finetune")
        paths = [Path(r["path"]) for r in rows]
        auto["members"] = ranking.summary(rows, "finetune", RANKING_FILE)
    hw = data_frame_size(exp, datasets)
    for p in paths:
        card = zoo.read_card(p)
        check_member(p, card, exp.data.channels)
        check_patch_fits(card["config"].get("patch_size"), hw, exp, f"member {p}: its")  # before the run folder
    names = unique_names([p.name for p in paths])
    out = prepare_run_dir(out, resume)
    if ranking is not None:
        _record_ranking(out, ranking)
    exp.transfer.teachers = [str(p) for p in paths]
    exp.save(out / "config.yaml")
    write_json(out / MIXTURE_FILE, opts.to_dict())
    t0 = time.time()
    members, cards = [], []
    for name, p in zip(names, paths):
        if opts.member_steps == 0:  # already finetuned on this target: used as it is
            model, card = zoo.load_entry(p)
            cards.append(member_card(name, p, card))
        else:
            m_exp = copy.deepcopy(exp)
            m_exp.train.steps, m_exp.transfer = opts.member_steps, TransferConfig()
            run = out / "members" / name
            metrics = run_train(m_exp, run, resume and (run / "config.yaml").is_file(), init_from=p,
                                zoo_root=zoo_root, datasets=datasets, kind="finetune")
            model, card = zoo.load_entry(run / "model")
            cards.append(member_card(name, p, card, {"run": f"members/{name}", "steps": opts.member_steps,
                                                     "from_sha256": card["init_from"]["sha256"],
                                                     "test_mse": metrics.get("mse")}))
        members.append(model)
    model = build_mixture(members, names, baselines=opts.baselines, data=exp.data.to_dict(), t_in=t.t_in,
                          leads=exp.data.frames - t.t_in, channels=exp.data.channels, gating=opts.gating,
                          seed=t.seed)
    mix = copy.deepcopy(exp)  # the weights train on forecasts as at test time: members roll out on their own
    mix.train.steps, mix.train.lr, mix.train.schedule = opts.mix_steps, opts.mix_lr, "none"
    module = _module(mix, model, hw=hw)
    if opts.mix_steps:  # else the zero logits stay: softmax gives every member the same weight
        mix.train.batch_size = min(mix.train.batch_size, len(clips))
        # the fit revisits its clips (random crops aside): each baseline forecast is computed once
        module.model.remember_baselines(0 if mix.train.crop else MIX_MEMO_BYTES)
        fit(module, clips, datasets.get("val"), mix.train, out, resume=resume)
        module.model.remember_baselines(0)
    if opts.areas:
        module.model.config.areas = calibrate_areas(module.model, clips, physical_units(exp.data),
                                                    exp.eval.thresholds, len(members), exp.eval.batch_size)
    extra = {"members": cards, "baselines": [{"name": b.name, "scale": b.runs_on} for b in module.model.baselines],
             "mixture": {**opts.to_dict(), "weights": module.model.weights_per_lead(),
                         **({"areas": module.model.config.areas} if opts.areas else {})}}
    if auto:
        extra["ranking"] = auto
    return _finish(mix, out, module, datasets, time.time() - t0, "mixture", extra, zoo_name, zoo_root)


def load_for_inference(ref) -> tuple[ForecastModule, dict]:
    """A zoo entry wrapped for rollout. A model that needs its teachers at inference (a TMU in
    bank_read mode) gets those listed on its card; any other runs alone."""
    model, card = zoo.load_entry(ref)
    bank = None
    if model.needs_teachers_at_inference:  # a transfer model: its config names its sources
        wanted = len(model.config.source_names)
        if len(card.get("teachers") or []) != wanted:
            raise zoo.ZooError(f"{ref}: its card lists {len(card.get('teachers') or [])} teachers, the model reads "
                               f"{wanted}: the card was changed; refusing to load")
        teachers = [zoo.load_entry(t["entry"], expect_sha256=t["sha256"], kind="backbone",
                                   role="teachers are backbone entries")[0] for t in card["teachers"]]
        bank = MemoryBank(teachers, [t["name"] for t in card["teachers"]], model,
                          model.layers, "own", frame_channels=model.in_channels)
    frames = card.get("t_in", 10) + card.get("t_out", 10)
    sched = SamplingSchedule(kind="none", t_in=card.get("t_in", 10), frames=frames)
    module = ForecastModule(model, sched, bank=bank)
    module.eval()
    return module, card


def load_baseline(name: str, exp: Experiment, physical: bool = True, inflow: str | None = None, **options):
    """The registered reference nowcast ``name`` (:func:`transmem.baselines.list_baselines`) for
    ``exp``'s data: it works in the scale it declares, through the units the data's reader
    declares (mm/h for radar), or -- with ``physical=False`` -- on the [0, 1] values. ``inflow``
    None: what the dataset declares, else the fair default for the kind of data (zero for rain,
    the last frame otherwise). See :func:`transmem.baselines.baseline_for_data`."""
    return baseline_for_data(name, exp.train.t_in, exp.data, physical, inflow, **options)


def blend_with_baseline(forecaster, baseline: str, t_in: int, weight=0.5, data=None) -> BlendForecaster:
    """``weight * forecaster + (1 - weight) * baseline``, the baseline run on the model's own
    values (log-scaled rain for radar: extrapolation of those beat extrapolation in mm/h on our
    radar benchmark, alone and in the blend). ``data``: the dataset's config (or a card's data
    dict), for the kind of data (rain or not), the inflow and the grid spacing the baseline uses."""
    return BlendForecaster(forecaster, baseline_for_data(baseline, t_in, data, physical=False), weight)


def _refuse_earlier_metrics(out: Path, overwrite: bool = False) -> None:
    if (out / "metrics.json").exists() and not overwrite:
        raise RunFolderError(f"{out / 'metrics.json'}: exists; pass --overwrite to replace it, or choose another "
                             "--out (nothing was changed)")


def check_eval_out(out, overwrite: bool = False) -> Path:
    """``evaluate``'s output folder, checked before anything is loaded or written: it can be
    written, and it holds no earlier results -- neither ``metrics.json`` nor report files or
    figures -- unless ``overwrite`` (``--overwrite``) says to replace them."""
    out = Path(out)
    try:
        check_output_dir(out, what="--out folder")
    except OutputPathError as e:
        raise RunFolderError(str(e)) from None
    _refuse_earlier_metrics(out, overwrite)
    if out.is_dir() and not overwrite:
        earlier = sorted(n for n in os.listdir(out) if not n.startswith("."))
        if earlier:
            raise RunFolderError(f"{out}: exists and holds earlier results ({', '.join(earlier[:4])}"
                                 f"{', ...' if len(earlier) > 4 else ''}); pass --overwrite to replace them, "
                                 "or choose another --out (nothing was changed)")
    return out


def claim_output(out) -> "FolderLock":
    """Lock an output folder that is written as a whole (``evaluate``, ``predict``): the lock file
    ``.<name>.lock`` beside it is held under an exclusive ``flock`` until the returned lock is
    released (a context manager), so that a second command into the same ``--out`` is refused
    with one line before anything is read or written. The path is checked first."""
    out = Path(out)
    try:
        check_output_dir(out, what="--out folder")
        return lock_folder(lock_path_beside(out), out)
    except FolderBusy as e:
        raise RunFolderError(str(e)) from None
    except OutputPathError as e:
        raise RunFolderError(str(e)) from None
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write the --out folder ({e.strerror or e})") from None


def check_model_fits(card: dict, exp: Experiment) -> None:
    """A zoo model can be evaluated on ``exp``'s data: it reads frames of the data's channels
    (checked before any clip is rolled out). Any frame size will do: whole frames are padded to
    the patch size and the forecast cropped back (:meth:`ForecastModule.rollout`)."""
    channels = card.get("channels")
    if channels is not None and channels != exp.data.channels:
        raise ConfigError(f"data.channels={exp.data.channels}: the model reads {channels}-channel frames")


def eval_datasets(exp: Experiment, out, overwrite: bool = False) -> dict:
    """Check ``out`` (see :func:`check_eval_out`) and build the data, before anything is written."""
    check_eval_out(out, overwrite)
    return _check_data(exp, train=False)


def run_evaluate(forecaster, exp: Experiment, out, datasets=None, label: str | None = None,
                 overwrite: bool = False) -> dict:
    """Per-frame metrics of a loaded forecaster (a zoo model from :func:`load_for_inference` or a
    baseline from :func:`load_baseline`) on ``exp``'s eval split, written to ``out/metrics.json``."""
    out = Path(out)
    _refuse_earlier_metrics(out, overwrite)
    datasets = datasets or _check_data(exp, train=False)
    forecaster.t_in = exp.train.t_in
    metrics = evaluate_forecaster(exp, forecaster, datasets)
    if label:
        metrics["model"] = label
    out.mkdir(parents=True, exist_ok=True)
    _write_metrics(out, metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# what the commands do beyond one run (the CLI is a face over these): evaluate into a folder,
# compare, rank the zoo, export clips; each flag's value is checked here, once


def parse_blend(spec: str | None, flag: str = "--blend") -> tuple[str, float] | None:
    """``BASELINE[:W]`` (W = 0.5 unless given) as ``(baseline, W)``, or None for no blend: the
    one check of a blend for every face (a weight in [0, 1], a registered baseline)."""
    if not spec:
        return None
    try:
        name, weight = blend_spec(spec)
    except ValueError as e:
        raise ConfigError(str(e), where=flag) from None
    check(flag, name, list_baselines(), ConfigError)
    return name, weight


def parse_baselines(spec: str | None, flag: str = "--baselines") -> str | None:
    """``NAME[,NAME...]`` or ``default``: every name a registered baseline (None: no baselines)."""
    for name in (spec or "default").split(","):
        check(flag, name, (*list_baselines(), "default"), ConfigError)
    return spec


def evaluate_to_folder(exp: Experiment, out, model=None, baseline: str | None = None, blend: str | None = None,
                       overwrite: bool = False) -> dict:
    """``transmem evaluate``: the metrics (``metrics.json``) and the report (plots, forecast GIFs,
    TMU maps) of a zoo ``model`` or a registered ``baseline`` (optionally blended with a
    baseline) on ``exp``'s eval split, in ``out``. ``out`` is locked first (a second evaluate into
    it is refused) and written as a whole: a temporary folder replaces it once complete."""
    if (model is None) == (baseline is None):
        raise ConfigError("evaluate needs one of a model (--model) or a baseline (--baseline)")
    if baseline is not None:
        check("--baseline", baseline, list_baselines(), ConfigError)
    mix = parse_blend(blend)
    if mix and baseline is not None:
        raise ConfigError(f"--blend {blend!r}: blends a model with a baseline; give --model, not --baseline")
    with claim_output(out):
        card = zoo.read_card(zoo.resolve(model)) if model is not None else None
        if card is not None:  # a field normalised as the model was trained on it
            adopt_fitted(exp.data, card.get("data"))
        datasets = eval_datasets(exp, out, overwrite)  # checked before anything is loaded or written
        if baseline is not None:
            forecaster, name, label = load_baseline(baseline, exp), baseline, baseline
        else:
            check_model_fits(card, exp)
            forecaster, card = load_for_inference(model)
            name, label = card.get("name") or Path(str(model)).name, str(model)
        if mix:
            forecaster = blend_with_baseline(forecaster, mix[0], exp.train.t_in, mix[1], exp.data)
            name, label = f"{name}+{mix[0]}", f"{mix[1]:g} * {label} + {1 - mix[1]:g} * {mix[0]}"
        with atomic_folder(out, replace=True, keep_others=True) as tmp:
            metrics = run_evaluate(forecaster, exp, tmp, datasets, label=label, overwrite=overwrite)
            run_report.method_report(
                tmp, f"transmem evaluate: {name} on {exp.data.name} ({exp.eval.split})", {name: metrics},
                {name: forecaster}, datasets[exp.eval.split], forecaster.t_in, examples=exp.eval.examples,
                settings={"model": label, "data": exp.data.to_dict()})
    return metrics


def compare_runs(runs: list, out, config=None, overrides: dict | None = None, baselines: bool = False,
                 overwrite: bool = False, zoo_root=None, say=print) -> dict:
    """``transmem compare``: every run folder (its ``model/``) or zoo entry of ``runs`` -- and with
    ``baselines`` every default baseline -- scored on the same clips of one dataset: ``config``
    (plus ``overrides``), else the first run's ``config.yaml``, else its card's data.
    ``out/metrics.json`` maps method -> metrics; the report holds the side-by-side table, the
    per-lead plots and the example forecasts. Returns the metrics."""
    entries = []
    for ref in runs:
        p = Path(ref)
        entry = p / "model" if (p / "model" / zoo.CARD).is_file() else zoo.resolve(ref, zoo_root)
        label = p.name or str(p)
        while label in [e[0] for e in entries]:
            label += "'"
        entries.append((label, p, entry, zoo.read_card(entry)))
    config = config or next((str(p / "config.yaml") for _, p, _, _ in entries if (p / "config.yaml").is_file()),
                            None)
    if config is not None:
        exp = load_experiment(config, overrides)
    else:  # a zoo entry: the data its card records
        card = entries[0][3]
        exp = load_experiment(None, overrides, base={"data": dict(card.get("data") or {}),
                                                     "train": {"t_in": int(card.get("t_in", 10))}})
    adopt_fitted(exp.data, entries[0][3].get("data"))
    datasets = eval_datasets(exp, out, overwrite)  # checked before anything is loaded or written
    forecasters = {}
    for label, _, entry, card in entries:
        check_model_fits(card, exp)
        forecasters[label] = load_for_inference(entry)[0]
    for name in default_baselines(physical_units(exp.data)) if baselines else ():
        try:
            forecasters[name] = load_baseline(name, exp)
        except BaselineUnavailable as e:
            say(f"baseline {name} left out: {e}")
    metrics = {}
    for name, f in forecasters.items():
        f.t_in = exp.train.t_in
        metrics[name] = evaluate_forecaster(exp, f, datasets)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    run_report.method_report(
        out, f"transmem compare on {exp.data.name} ({exp.eval.split}, {len(datasets[exp.eval.split])} clips)",
        metrics, forecasters, datasets[exp.eval.split], exp.train.t_in, examples=exp.eval.examples,
        settings={"runs": [str(e[2]) for e in entries], "data": exp.data.to_dict()})
    return metrics


def format_compare_table(metrics: dict) -> str:
    """Methods side by side (best MSE first): MSE/frame, MSE/pixel, SSIM, and RMSE in the data's
    units where it declares them."""
    units = next((m["units"] for m in metrics.values() if isinstance(m.get("units"), str)), None)
    head = ("method", "MSE/frame", "MSE/pixel", "SSIM") + ((f"RMSE ({units})", f"MAE ({units})") if units else ())

    def num(x):
        return f"{x:.4g}" if isinstance(x, (int, float)) else "-"
    order = sorted(metrics, key=lambda n: (metrics[n].get("mse") is None, metrics[n].get("mse") or 0.0))
    rows = [head] + [(n, num(metrics[n].get("mse")), num(metrics[n].get("mse_pixel")), num(metrics[n].get("ssim")))
                     + ((num(metrics[n].get("rmse_physical")), num(metrics[n].get("mae_physical"))) if units else ())
                     for n in order]
    return zoo.format_rows(rows)


def rank_zoo(exp: Experiment, zoo_root=None, probe_steps: int = zoo.PROBE_STEPS, json_path=None,
             overwrite: bool = False) -> zoo.Ranking:
    """``transmem zoo rank``: :func:`transmem.zoo.rank` for ``exp``'s target over the entries
    under ``zoo_root``, written to ``json_path`` when given (checked before anything is ranked)."""
    if json_path:
        path = Path(json_path)
        if path.is_dir():
            raise RunFolderError(f"{path}: is a folder; --json needs a file name (nothing was ranked)")
        if path.exists() and not overwrite:
            raise RunFolderError(f"{path}: exists; pass --overwrite to replace it, or choose another "
                                 "--json (nothing was ranked)")
    paths, where = zoo.candidates(zoo_root)
    if not paths:
        raise zoo.ZooError(f"{where}: no zoo entries to rank (give --zoo-root DIR or set TRANSMEM_ZOO)")
    ranking = zoo.rank(exp, zoo_root=zoo_root, probe_steps=probe_steps, seed=exp.train.seed,
                       progress=exp.train.progress)
    if json_path:
        write_json(json_path, ranking.to_dict())
    return ranking


def export_clips(exp: Experiment, split: str, out) -> tuple:
    """The clips of ``exp``'s data split ``split`` as one ``(N, T, C, H, W)`` uint8 ``.npy`` file
    ``out`` (never overwritten); returns its shape."""
    check("--split", split, EVAL_SPLITS, ConfigError)
    if os.path.exists(out):
        raise RunFolderError(f"{out}: exists; not overwriting")
    ds = build_datasets(exp.data)[split]
    arr = np.stack([(ds[i]["frames"].numpy() * 255).round().astype(np.uint8) for i in range(len(ds))])

    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(out, save)
    return arr.shape

#!/usr/bin/env python
"""Where does transfer help? A map over target data size, pretext relatedness and method.

Two target families, each with its own zoo of three entries on one shared backbone (so every
entry can be finetuned and serve as a teacher), see ``benchmarks/configs/transfer_map.yaml``:

* **digits**: 3-digit flying digits; zoo 1-digit and 2-digit flying digits (near), synthetic
  advected rain (far); ConvLSTM.
* **radar**: MeteoSwiss radar, trained on the first ``size`` clips of one event, validated on a
  second event, tested on a third; zoo synthetic advected rain and FMI radar (near), 2-digit flying
  digits (far); the advection backbone (flips, 90-degree rotations and time reversal as in
  ``configs/radar.yaml``).

For every (family, target size), methods with the same number of target steps and 3 seeds:
scratch; finetune from each zoo entry; finetune from ``auto`` (the top of ``zoo.rank`` on that
target: its finetune run already exists with identical settings, so its result is reused, not
rerun); the TMU at its best setting so far (distill, initialised from the near entry, the two
near entries as teachers); and, beyond the paper, a mixture of the finetuned experts (forecasts
averaged with convex weights fit on the validation clips), the same with optical-flow
extrapolation as one more expert, and the TMU on the ranking's top two entries (optional, run last;
it reuses the TMU run above when the ranking picks its teachers and init). Persistence and
extrapolation (for radar also on the log-scaled values) are reference lines. The ranking's quality per cell: does its top entry finetune
best (or within one seed sd of the best), and the Spearman correlation of probe score and test MSE.

    python benchmarks/transfer_map.py --workers 2            # the full preset, resumable
    python benchmarks/transfer_map.py --quick --workers 2    # the protocol at toy scale
    python benchmarks/transfer_map.py --part rank            # only the rankings (needs the zoo)
    python benchmarks/transfer_map.py --aggregate            # JSON, Markdown, one plot per family
    python benchmarks/transfer_map.py --extend --workers 2   # after raising max_doublings: unconverged
                                                             # runs go on from their last checkpoint

Jobs are claimed through files (``benchmarks/claims.py``), so several worker processes share the
list; a finished job (its ``result.json`` / ``ranking.json``) is never redone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/claims.py, transfer_digits.py, also when imported by path
import claims  # noqa: E402
from claims import claim, paired_t  # noqa: E402
from convergence import (EXTENDED, binding, extended_from, extension, record, resumable, set_aside,  # noqa: E402
                         train_to_convergence)
from transfer_digits import wait_for  # noqa: E402

from transmem import api, zoo  # noqa: E402
from transmem.config import load_experiment  # noqa: E402
from transmem.data import DataConfig, build_datasets  # noqa: E402
from transmem.data.registry import inflow_hint, physical_units, pixel_km, register_dataset  # noqa: E402

SHARED = Path(os.environ.get("TRANSMEM_SHARED_DATA", REPO.parent / "shared" / "data"))
AUGMENT = {"augment": ["flip", "rot90"], "reverse_time_prob": 0.5}  # the radar recipe (configs/radar.yaml)
MAX_SPEED = 0.5  # advected rain at 32x32: real echoes move 0.05-0.25 px per 5-minute step here
REFERENCE = ("persistence", "extrapolation")


RAIN_REFERENCE = ("extrapolation:log", "sprog", "sprog:log", "anvil", "steps_mean")


def references(family: str) -> tuple:
    """The reference lines: for radar also the nowcasts a radar user runs (transmem.baselines:
    S-PROG, ANVIL, the STEPS ensemble mean), and extrapolation and S-PROG on the log-scaled
    values (``:log``, the stronger ones there, see benchmarks/results/real_data.md); on digits
    the log scale is the same as the values and the rain nowcasts do not apply."""
    return REFERENCE + (RAIN_REFERENCE if family == "radar" else ())
OPTIONAL = ("tmu:ranked",)  # run after every cell; missing runs of these leave the map complete


# ---------------------------------------------------------------------------------------------
# data: a reader that joins clips of other readers into named splits. It is how the radar target
# says "train on the first N clips of this event, validate on that event, test on a third", and it
# goes through the registry so that zoo.rank builds the very same splits from the Experiment.


def _first_part(cfg: DataConfig) -> dict | None:
    first = next((p for parts in (cfg.extra or {}).get("parts", {}).values() for p in parts), None)
    return None if first is None else {**first, "size": cfg.size, "frames": cfg.frames}


def _parts_units(cfg: DataConfig):
    first = _first_part(cfg)
    return None if first is None else physical_units(first)


def _parts_inflow(cfg: DataConfig):
    first = _first_part(cfg)
    return None if first is None else inflow_hint(first)


def _parts_pixel_km(cfg: DataConfig):
    """The first part's grid spacing at the parts' size (STEPS' perturbations are in km: without
    it a 32x32 MeteoSwiss frame of ~20 km pixels would be taken for 1 km ones)."""
    first = _first_part(cfg)
    return None if first is None else pixel_km(first)


@register_dataset("transfer_map_parts", units=_parts_units, inflow=_parts_inflow, pixel_km=_parts_pixel_km)
def build_parts(cfg: DataConfig) -> dict:
    """``extra.parts = {split: [data config, ...]}``: each config's train split (all its clips)
    joins ``split``; ``extra.take = {split: N}`` keeps the first N clips of a split."""
    from torch.utils.data import ConcatDataset, Subset
    out = {}
    for split, parts in (cfg.extra or {}).get("parts", {}).items():
        ds = [build_datasets(DataConfig.from_dict({"split": [1, 0, 0], **p, "size": cfg.size,
                                                    "frames": cfg.frames, "cache_dir": cfg.cache_dir}))["train"]
              for p in parts]
        if not ds:
            continue
        joined = ds[0] if len(ds) == 1 else ConcatDataset(ds)
        take = (cfg.extra.get("take") or {}).get(split)
        if take is not None:
            if take > len(joined):
                raise ValueError(f"extra.take.{split}={take}: only {len(joined)} clips")
            joined = Subset(joined, list(range(int(take))))
        out[split] = joined
    return out


def radar_event(reader: str, event: str) -> dict:
    folder = {"radar_mch": "radar/mch", "radar_fmi": "radar/fmi/pgm"}[reader]
    return {"name": reader, "path": str(SHARED / folder), "stride": 1, "extra": {"events": [event]}}


# ---------------------------------------------------------------------------------------------
# the families: target, zoo (entry -> (relation, data)), the TMU's teachers and init


def digits_data(num: int) -> dict:
    d = {"name": "flying_digits", "num_digits": num}
    if (SHARED / "mnist").is_dir():
        d["mnist_dir"] = str(SHARED / "mnist")
    return d


def advected_data(p: dict) -> dict:
    return {"name": "advected_rain", "train_clips": p["pretext_clips"], "val_clips": 16, "test_clips": 32,
            "extra": {"max_speed": MAX_SPEED}}


FAMILIES = {
    "digits": {
        "zoo": {"digits1": "near", "digits2": "near", "advected_rain": "far"},
        "tmu": {"teachers": ["digits1", "digits2"], "init_from": "digits2"},
    },
    "radar": {
        "zoo": {"advected_rain": "near", "radar_fmi": "near", "digits2": "far"},
        "tmu": {"teachers": ["advected_rain", "radar_fmi"], "init_from": "advected_rain"},
    },
}
TARGET_TEXT = {
    "digits": "3-digit flying digits (real MNIST digits, data seed 0), train clips = size",
    "radar": "MeteoSwiss radar: train = the first `size` 6->6 clips (stride 1) of event 20150515, "
             "val = event 20160711, test = event 20170131",
}


def pretext_data(family: str, entry: str, p: dict) -> dict:
    if entry.startswith("digits"):
        return {**digits_data(int(entry[-1])), "train_clips": p["pretext_clips"], "val_clips": 32, "test_clips": 64}
    if entry == "advected_rain":
        return advected_data(p)
    if entry == "radar_fmi":  # both FMI events; the card's test score is in-sample (no third event)
        return {"name": "transfer_map_parts", "extra": {"parts": {
            "train": [radar_event("radar_fmi", "20160928"), radar_event("radar_fmi", "20170509")],
            "test": [radar_event("radar_fmi", "20170509")]}}}
    raise KeyError(entry)


def target_data(family: str, fp: dict, size: int) -> dict:
    if family == "digits":
        return {**digits_data(3), "train_clips": size, "val_clips": fp["val_clips"], "test_clips": fp["test_clips"]}
    return {"name": "transfer_map_parts", "extra": {
        "parts": {"train": [radar_event("radar_mch", "20150515")], "val": [radar_event("radar_mch", "20160711")],
                  "test": [radar_event("radar_mch", "20170131")]},
        "take": {"train": size}}}


def methods(family: str, p: dict | None = None) -> dict:
    """method -> (kind, settings); kinds: scratch | finetune | auto | transfer | mixture | ranked.
    A preset's ``methods`` list keeps only those (``finetune:auto`` reuses a finetune run)."""
    zoo_names = list(FAMILIES[family]["zoo"])
    out = {"scratch": ("scratch", {})}
    out.update({f"finetune:{e}": ("finetune", {"init": e}) for e in zoo_names})
    out["finetune:auto"] = ("auto", {})
    out["tmu:distill+ft-init"] = ("transfer", dict(FAMILIES[family]["tmu"]))
    out["mix:finetuned"] = ("mixture", {"experts": zoo_names})
    # beyond the paper, added after the first pass (a rerun of the same command runs only these):
    # the mixture with optical-flow extrapolation (on the [0, 1] values) as one more expert, and
    # the TMU on the two entries the ranking puts first, initialised from its top entry
    out["mix:finetuned+extrapolation"] = ("mixture", {"experts": zoo_names, "baselines": ["extrapolation"]})
    out["tmu:ranked"] = ("ranked", {"k": 2})
    if p and p.get("methods"):
        out = {m: v for m, v in out.items() if m in p["methods"]}
    return out


# ---------------------------------------------------------------------------------------------
# presets, experiments, folders


def load_preset(name: str) -> dict:
    presets = yaml.safe_load((HERE / "configs" / "transfer_map.yaml").read_text())
    if name not in presets:
        sys.exit(f"benchmarks/configs/transfer_map.yaml: unknown preset '{name}'; known: {', '.join(presets)}")
    return presets[name]


def experiment(p: dict, family: str, data: dict, steps: int, seed: int, pretext: bool = False):
    fp = p["families"][family]
    val_every = p["val_every"] if not pretext else max(p["pretext_steps"] // 4, 1)
    batch = fp.get("pretext_batch_size", fp["batch_size"]) if pretext else fp["batch_size"]
    train = {"steps": steps, "batch_size": batch, "lr": fp["lr"], "t_in": fp["t_in"], "seed": seed,
             "sampling_stop": 0.5 if pretext else sampling_stop(p, steps),
             "val_every": val_every, "val_batches": 0, "select_best": True, "ckpt_every": val_every,
             "progress": False, "threads": 1}
    if family == "radar" and not (pretext and data["name"] in ("advected_rain", "flying_digits")):
        train.update(AUGMENT)
    if pretext and data["name"] == "transfer_map_parts":  # no validation event: train to the end
        train.update(val_every=0, select_best=False, ckpt_every=steps)
    return load_experiment(base={
        "data": {"size": fp["size"], "frames": fp["frames"], "seed": 0, **data},
        "model": dict(fp["model"]),
        "train": train,
        "transfer": {"distill_weight": 0.1, "cache_bank": "memory"},
        "eval": {"split": "test", "batch_size": 64, "examples": 1},
    })


def sampling_stop(p: dict, steps: int) -> float:
    """The fraction of ``steps`` over which scheduled sampling hands the model its own predictions:
    ``sampling_stop_steps`` fixed in steps when the preset sets it, so that a run whose cap is
    raised keeps the curriculum of the first (the fraction alone would stretch it with the cap:
    a first cap of 800 kept digits-32 runs on ground truth until step 400 and they overfit, test
    MSE 42-44 against 39.6-40.2 with the 300-step map's 150), else half of them."""
    return min(1.0, p["sampling_stop_steps"] / steps) if p.get("sampling_stop_steps") else 0.5


def target_experiment(p: dict, family: str, size: int, seed: int, steps: int | None = None):
    return experiment(p, family, target_data(family, p["families"][family], size),
                      p["target_steps"] if steps is None else steps, seed)


def safe(s: str) -> str:
    return s.replace(":", "-").replace("+", "-")


def zoo_entry(root: Path, family: str, entry: str) -> Path:
    return root / "zoo" / family / entry


def run_dir(root: Path, family: str, size: int, method: str, seed: int) -> Path:
    return root / family / f"size{size}" / safe(method) / f"seed{seed}"


def rank_dir(root: Path, family: str, size: int) -> Path:
    return root / family / f"size{size}" / "rank"


def commit() -> str:
    return claims.commit(REPO, ["src", "benchmarks/transfer_map.py", "benchmarks/transfer_digits.py",
                                "benchmarks/claims.py", "benchmarks/configs/transfer_map.yaml"])


# ---------------------------------------------------------------------------------------------
# jobs


def jobs(p: dict, parts: set[str]) -> list[tuple]:
    """(job, family, size, method, seed) in an order that keeps two workers busy and completes
    whole cells early: the zoo and the reference lines first, then cell by cell (target sizes from
    scarce to abundant across the families) the ranking, the trained runs of every seed, and last the
    jobs that reuse them (mixtures); the optional methods come after every cell. A job waits for
    the jobs it needs."""
    fams = list(p["families"])
    out = []
    if "train" in parts:
        out += [("pretext", f, None, e, 0) for f in fams for e in FAMILIES[f]["zoo"]]
        out += [("baseline", f, None, b, 0) for f in fams for b in references(f)]
    cells = sorted((n, fams.index(f), f) for f in fams for n in p["families"][f]["sizes"])
    for n, _, f in cells:  # the scarcest target first, whatever its family (the cheapest to train)
        if "rank" in parts:
            out.append(("rank", f, n, None, 0))
        if "train" in parts:
            kinds = {m: k for m, (k, _) in methods(f, p).items()}
            out += [("run", f, n, m, s) for s in p["seeds"] for m, k in kinds.items()
                    if k in ("scratch", "finetune", "transfer")]
            out += [("run", f, n, m, s) for s in p["seeds"] for m, k in kinds.items() if k == "mixture"]
    if "train" in parts:  # optional, last: it trains only where the ranking picks other teachers
        for i in range(max(len(p["families"][f]["sizes"]) for f in fams)):
            out += [("run", f, p["families"][f]["sizes"][i], m, s) for f in fams if i < len(p["families"][f]["sizes"])
                    for s in p["seeds"] for m in OPTIONAL if m in methods(f, p)]
    return out


def job_dir(root: Path, job: str, family: str, size, method, seed: int) -> Path:
    if job == "pretext":
        return root / "pretext" / family / method
    if job == "baseline":
        return root / family / "baselines" / method
    if job == "rank":
        return rank_dir(root, family, size)
    return run_dir(root, family, size, method, seed)


def done_file(job: str) -> str:
    return "ranking.json" if job == "rank" else "result.json"


class Mixture(torch.nn.Module):
    """Convex combination of forecasters' rollouts (the interface ``evaluate`` needs)."""

    def __init__(self, experts: list, weights: list[float]):
        super().__init__()
        self.experts, self.weights = experts, [float(w) for w in weights]
        self.t_in = experts[0].t_in

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @torch.no_grad()
    def rollout(self, frames: torch.Tensor) -> torch.Tensor:
        return sum(w * e.rollout(frames) for w, e in zip(self.weights, self.experts) if w > 0)


def simplex_weights(preds: list[torch.Tensor], truth: torch.Tensor, valid, step: float = 0.05) -> list[float]:
    """The convex weights (a grid of ``step`` on the simplex) with the lowest validation MSE."""
    n, k = len(preds), int(round(1 / step))
    best, best_w = None, None

    def grid(i, left):
        if i == n - 1:
            yield (left,)
            return
        for a in range(left + 1):
            for rest in grid(i + 1, left - a):
                yield (a,) + rest
    for g in grid(0, k):
        w = [x / k for x in g]
        pred = sum(wi * p for wi, p in zip(w, preds)).clamp(0, 1)
        err = (pred - truth) ** 2
        mse = float(err[valid].mean()) if valid is not None else float(err.mean())
        if best is None or mse < best - 1e-12:
            best, best_w = mse, w
    return best_w


def fit_mixture(experts: list, val) -> list[float]:
    t_in = experts[0].t_in
    frames, masks = [], []
    for i in range(len(val)):
        item = val[i]
        frames.append(item["frames"])
        if "mask" in item:
            masks.append(item["mask"])
    x = torch.stack(frames)
    with torch.no_grad():
        preds = [torch.cat([e.rollout(x[a:a + 64]) for a in range(0, len(x), 64)]) for e in experts]
    valid = torch.stack(masks)[:, t_in:] if masks else None
    return simplex_weights(preds, x[:, t_in:], valid)


def execute(job: str, family: str, size, method, seed: int, p: dict, root: Path) -> dict:
    d = job_dir(root, job, family, size, method, seed)
    if job == "pretext":
        exp = experiment(p, family, pretext_data(family, method, p), p["pretext_steps"], seed, pretext=True)
        return api.run_train(exp, d / "run", zoo_name=method, zoo_root=root / "zoo" / family, kind="pretrain")
    if job == "baseline":  # the test clips do not depend on the target size
        exp = target_experiment(p, family, p["families"][family]["sizes"][0], 0)
        t0 = time.time()
        name, _, scale = method.partition(":")
        m = api.evaluate_forecaster(exp, api.load_baseline(name, exp, physical=scale != "log"), build_datasets(exp.data))
        m.update(train_wall_s=0.0, eval_wall_s=round(time.time() - t0, 1), train_steps=0)
        return m
    if job == "rank":
        entries = [zoo_entry(root, family, e) for e in FAMILIES[family]["zoo"]]
        wait_for(entries)
        exp = target_experiment(p, family, size, 0)
        t0 = time.time()
        r = zoo.rank(exp, entries=entries, probe_steps=p["probe_steps"], seed=0, progress=False)
        return {**r.to_dict(), "wall_s": round(time.time() - t0, 1)}
    kind, s = methods(family)[method]
    exp = target_experiment(p, family, size, seed)
    if kind in ("scratch", "finetune"):
        return train_run(p, exp, d / "run", trainer(root, family, method))
    if kind == "transfer":
        teachers = [zoo_entry(root, family, t) for t in s["teachers"]]
        wait_for(teachers + [zoo_entry(root, family, s["init_from"])])
        exp.transfer.init_from = str(zoo_entry(root, family, s["init_from"]))
        return train_run(p, exp, d / "run",
                         lambda e, out, resume: api.run_transfer(e, out, resume=resume, teachers=teachers))
    if kind == "ranked":
        return ranked_tmu(family, size, seed, s["k"], p, root, exp, d)
    # mixture of the finetuned experts of the same seed: weights fit on the validation clips
    dirs, experts = mixture_experts(root, family, size, seed, s, exp)
    data = build_datasets(exp.data)
    t0 = time.time()
    w = fit_mixture(experts, data["val"])
    m = api.evaluate_forecaster(exp, Mixture(experts, w), data)
    runs = [json.loads((x / "result.json").read_text()) for x in dirs]
    m.update(weights=dict(zip(s["experts"] + s.get("baselines", []), w)), fit_wall_s=round(time.time() - t0, 1),
             train_wall_s=round(sum(r["train_wall_s"] for r in runs) + time.time() - t0, 2),
             train_steps=sum(r.get("step_cap", exp.train.steps) for r in runs))
    if all("best_step" in r for r in runs):  # the expert nearest to breaking the convergence rule
        m.update({k: binding(runs)[k] for k in ("best_step", "step_cap", "converged")})
    return m


def mixture_experts(root: Path, family: str, size, seed: int, settings: dict, exp) -> tuple[list[Path], list]:
    """A mixture's experts: the finetune runs of its zoo entries (same size and seed; waits for
    them) as forecasters, then its baselines on the [0, 1] values. Returns (run dirs, experts)."""
    dirs = [run_dir(root, family, size, f"finetune:{e}", seed) for e in settings["experts"]]
    wait_files([x / "result.json" for x in dirs])
    return dirs, expert_forecasters(dirs, settings, exp)


def expert_forecasters(dirs: list[Path], settings: dict, exp) -> list:
    """The finetune runs in ``dirs`` as forecasters, then the mixture's baselines on the [0, 1] values."""
    experts = [api.load_for_inference(x / "run" / "model")[0] for x in dirs]
    return experts + [api.load_baseline(b, exp, physical=False) for b in settings.get("baselines", [])]


def trainer(root: Path, family: str, method: str):
    """``train(exp, out, resume)`` of a scratch or finetune run: from random weights, or from its
    zoo entry (waited for)."""
    kind, s = methods(family)[method]
    if kind == "scratch":
        return lambda e, out, resume: api.run_train(e, out, resume=resume, kind="scratch")
    if kind != "finetune":
        raise ValueError(f"{method}: not a scratch or finetune run")
    entry = zoo_entry(root, family, s["init"])
    wait_for([entry])
    return lambda e, out, resume: api.run_train(e, out, resume=resume, init_from=entry)


def wait_files(files: list[Path], timeout_s: float = 4 * 3600) -> None:
    t0 = time.time()
    while not all(f.is_file() for f in files):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"waited too long for {[str(f) for f in files]}")
        time.sleep(5)


def ranked_tmu(family: str, size: int, seed: int, k: int, p: dict, root: Path, exp, d: Path) -> dict:
    """The TMU on the ranking's top ``k`` entries (in the zoo's order), initialised from its top
    entry. When those are the teachers and init of ``tmu:distill+ft-init``, its run has identical
    settings: its result is reused (``reused_from``), not rerun."""
    rk_file = rank_dir(root, family, size) / "ranking.json"
    wait_files([rk_file])
    ranked = [r["name"] for r in json.loads(rk_file.read_text())["rows"] if r.get("usable")]
    picked = [e for e in FAMILIES[family]["zoo"] if e in ranked[:k]]
    tmu = FAMILIES[family]["tmu"]
    if picked == tmu["teachers"] and ranked[0] == tmu["init_from"]:
        src = run_dir(root, family, size, "tmu:distill+ft-init", seed) / "result.json"
        wait_files([src])
        m = json.loads(src.read_text())
        return {**{k_: v for k_, v in m.items() if k_ not in ("job", "method", "commit", "job_wall_s")},
                "reused_from": "tmu:distill+ft-init", "teachers": picked, "init_from": ranked[0]}
    teachers = [zoo_entry(root, family, t) for t in picked]
    exp.transfer.init_from = str(zoo_entry(root, family, ranked[0]))
    m = train_run(p, exp, d / "run", lambda e, out, resume: api.run_transfer(e, out, resume=resume, teachers=teachers))
    return {**m, "teachers": picked, "init_from": ranked[0]}


def train_run(p: dict, exp, out: Path, train) -> dict:
    """``train(exp, out, resume)`` once at the preset's ``target_steps``; with ``max_doublings`` in
    the preset, to convergence (benchmarks/convergence.py: the cap doubles until it is at least
    1.25 x the best validation step), recording ``best_step``, ``step_cap`` and ``converged``."""
    if "max_doublings" not in p:
        return train(exp, out, False)
    earlier, go_on = extension(out.parent, p["target_steps"])  # set aside by --extend: go on from it
    t0 = time.time() - (earlier["train_wall_s"] if earlier else 0)

    def at_cap(steps: int, resume: bool) -> dict:
        exp.train.steps = steps
        exp.train.sampling_stop = sampling_stop(p, steps)
        return train(exp, out, resume)
    m, cap, history = train_to_convergence(at_cap, out, max_doublings=p["max_doublings"], **go_on)
    return {**m, **record(history, cap), "train_wall_s": round(time.time() - t0, 1), "train_steps": cap,
            **extended_from(out.parent, earlier)}


def extend(p: dict, root: Path) -> int:
    """Set aside the results of runs that stopped unconverged with doublings left under the
    preset's (raised) ``max_doublings``, and drop those of the mixtures of the same cell and seed
    (they read these runs' models), so that the next ``work`` continues them; returns how many
    runs were set aside."""
    n = 0
    for job, family, size, method, seed in jobs(p, {"train"}):
        if job != "run" or methods(family)[method][0] == "mixture":
            continue
        if set_aside(run_dir(root, family, size, method, seed) / "result.json", p["max_doublings"]):
            n += 1
            for m, (kind, _) in methods(family, p).items():
                if kind == "mixture":
                    (run_dir(root, family, size, m, seed) / "result.json").unlink(missing_ok=True)
    return n


def stale_claim(d: Path) -> bool:
    """A claim whose process (on this machine) is gone."""
    try:
        pid = int((d / ".claim").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def work(p: dict, root: Path, parts: set[str]) -> int:
    """Run every unclaimed job; a failed job leaves ``error.txt`` and its claim free (a rerun
    retries it) and the others go on. Returns the number of failures."""
    code, failed = commit(), 0
    for job, family, size, method, seed in jobs(p, parts):
        if job == "rank" and not hasattr(zoo, "rank"):
            print("zoo.rank is not available in this checkout: rankings skipped (run --part rank later)", flush=True)
            parts = parts - {"rank"}
            continue
        d = job_dir(root, job, family, size, method, seed)
        if (d / done_file(job)).is_file():
            continue
        if stale_claim(d):  # its worker was stopped: the job is free again
            (d / ".claim").unlink(missing_ok=True)
        if not claim(d):
            continue
        if (d / "run").exists() and not (d / EXTENDED).is_file() and not resumable(d / "run"):
            # a stopped worker's run, nothing to go on from
            shutil.rmtree(d / "run")
        label = f"{job} {family}" + (f" size {size}" if size is not None else "") + \
            (f" {method}" if method else "") + (f" seed {seed}" if job == "run" else "")
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] start {label}", flush=True)
        try:
            m = execute(job, family, size, method, seed, p, root)
        except Exception as e:
            (d / "error.txt").write_text(repr(e))
            (d / ".claim").unlink(missing_ok=True)
            print(f"  FAILED {label}: {e!r}", flush=True)
            failed += 1
            continue
        m.update({"job": job, "family": family, "size": size, "method": method, "seed": seed, "commit": code,
                  "job_wall_s": round(time.time() - t0, 1)})
        claims.write_run(d / done_file(job), m)
        score = f": mse {m['mse']:.4g}" if "mse" in m else ""
        print(f"[{time.strftime('%H:%M:%S')}] done {label} in {time.time() - t0:.0f} s{score}", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# results


def _read(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.is_file() else None


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))  # no ties in practice
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _stats(vals: list[float]) -> tuple[float, float | None]:
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def collect(p: dict, root: Path) -> dict:
    cells, ranking_cells, missing, missing_optional, commits, zoo_cards = [], [], [], [], set(), {}
    refs = {}
    for family, fp in p["families"].items():
        zoo_cards[family] = {}
        for e, rel in FAMILIES[family]["zoo"].items():
            r = _read(job_dir(root, "pretext", family, None, e, 0) / "result.json")
            if r is None:
                missing.append(f"pretext {family} {e}")
                continue
            commits.add(r["commit"])
            zoo_cards[family][e] = {"relation": rel, "test_mse_own_data": r["mse"], "train_wall_s": r["train_wall_s"],
                                    "steps": r["train_steps"]}
        refs[family] = {}
        for b in references(family):
            r = _read(job_dir(root, "baseline", family, None, b, 0) / "result.json")
            if r is None:
                missing.append(f"baseline {family} {b}")
                continue
            commits.add(r["commit"])
            refs[family][b] = r["mse"]
        for size in fp["sizes"]:
            by_method = {}
            for m, (kind, s) in methods(family, p).items():
                if kind == "auto":
                    continue
                runs = []
                for seed in p["seeds"]:
                    r = _read(run_dir(root, family, size, m, seed) / "result.json")
                    if r is None:
                        (missing_optional if m in OPTIONAL else missing).append(f"{family} size {size} {m} seed {seed}")
                    else:
                        runs.append(r)
                        commits.add(r["commit"])
                if not runs:
                    continue
                mean, std = _stats([r["mse"] for r in runs])
                cell = {"family": family, "size": size, "method": m,
                        "per_seed": [{"seed": r["seed"], "mse": r["mse"], "ssim": r.get("ssim"),
                                      "wall_s": r["train_wall_s"],
                                      **{k: r[k] for k in ("best_step", "step_cap", "converged") if k in r}}
                                     for r in runs],
                        "mse_mean": mean, "mse_std": std, "ssim_mean": float(np.mean([r["ssim"] for r in runs])),
                        "wall_s_mean": float(np.mean([r["train_wall_s"] for r in runs])),
                        "target_steps": p["target_steps"], "seeds_done": len(runs)}
                if all("best_step" in r for r in runs):  # the seed nearest to breaking the rule speaks for the cell
                    worst = binding(runs)
                    cell.update(best_step=worst["best_step"], step_cap=worst["step_cap"],
                                converged=all(r["converged"] for r in runs))
                    cell["target_steps"] = max(r["step_cap"] for r in runs)
                if kind == "ranked":
                    cell["teachers"], cell["init_from"] = runs[0]["teachers"], runs[0]["init_from"]
                    if runs[0].get("reused_from"):
                        cell["note"] = (f"the ranking picked the teachers and init of {runs[0]['reused_from']}: "
                                        "identical settings, so this row reuses its runs (no extra training)")
                if kind == "mixture":
                    cell["weights_per_seed"] = [r["weights"] for r in runs]
                    cell["note"] = ("reuses the finetune runs: its wall time is the experts' training summed "
                                    "plus the weight fit; it needed len(experts) x the target steps")
                by_method[m] = cell
            rk = _read(rank_dir(root, family, size) / "ranking.json")
            if rk is None:
                missing.append(f"rank {family} size {size}")
            rc = ranking_cell(family, size, rk, by_method)
            if rc is not None:
                ranking_cells.append(rc)
                src = by_method.get(f"finetune:{rc['top']}")
                if src is not None:
                    by_method["finetune:auto"] = {
                        **src, "method": "finetune:auto", "picked": rc["top"],
                        "note": f"the ranking's top entry is {rc['top']}: its finetune run has identical "
                                f"settings, so this row reuses finetune:{rc['top']} (no extra training)"}
            for m in methods(family, p):
                if m in by_method:
                    cells.append(by_method[m])
            for b, v in refs[family].items():
                cells.append({"family": family, "size": size, "method": b, "per_seed": [{"seed": None, "mse": v}],
                              "mse_mean": v, "mse_std": None, "wall_s_mean": 0.0, "target_steps": 0,
                              "reference": True})
    return {"cells": cells, "ranking_cells": ranking_cells, "missing": missing, "commits": commits,
            "missing_optional": missing_optional,
            "zoo": zoo_cards, "references": refs}


def ranking_cell(family: str, size: int, rk: dict | None, by_method: dict) -> dict | None:
    if rk is None:
        return None
    rows = [r for r in rk["rows"] if r.get("usable")]
    if not rows:
        return {"family": family, "size": size, "top": None, "hit": False, "reason": "no usable entry"}
    top = rows[0]["name"]
    ft = {e: by_method[f"finetune:{e}"] for e in FAMILIES[family]["zoo"] if f"finetune:{e}" in by_method}
    out = {"family": family, "size": size, "top": top, "rank_wall_s": rk.get("wall_s"),
           "probe_steps": rk.get("probe_steps"),
           "scores": {r["name"]: r["score"] for r in rows},
           "zero_shot_mse": {r["name"]: r.get("zero_shot_mse") for r in rows},
           "test_mse": {e: c["mse_mean"] for e, c in ft.items()}}
    if len(ft) < len(FAMILIES[family]["zoo"]) or top not in ft:
        out["hit"] = None  # the finetune runs are not all done
        return out
    best = min(ft, key=lambda e: ft[e]["mse_mean"])
    sd = ft[best]["mse_std"] or 0.0
    out.update(best_finetune=best, exact=top == best,
               gap=ft[top]["mse_mean"] - ft[best]["mse_mean"], best_sd=sd,
               hit=bool(top == best or ft[top]["mse_mean"] - ft[best]["mse_mean"] <= sd))
    names = [r["name"] for r in rows if r["name"] in ft]
    out["spearman"] = spearman([out["scores"][n] for n in names], [ft[n]["mse_mean"] for n in names])
    zs = {n: out["zero_shot_mse"][n] for n in names if out["zero_shot_mse"].get(n) is not None}
    if zs:  # the same scores for the ranking's zero-shot column (probe_steps=0 would rank by it)
        ztop = min(zs, key=zs.get)
        out["zero_shot"] = {"top": ztop, "hit": bool(ztop == best or ft[ztop]["mse_mean"] - ft[best]["mse_mean"] <= sd),
                            "spearman": spearman([zs[n] for n in zs], [ft[n]["mse_mean"] for n in zs])}
    return out


VERDICT_METHODS = ("tmu:distill+ft-init", "tmu:ranked", "mix:finetuned", "mix:finetuned+extrapolation",
                   "finetune:auto")


def paired_by_seed(cell: dict, bar: dict) -> dict:
    """``cell`` against ``bar`` seed by seed: the seeds where it is lower, and a paired t test (a
    difference with p >= 0.05 is a tie, whatever the sign of the mean)."""
    a = {s["seed"]: s["mse"] for s in cell["per_seed"]}
    b = {s["seed"]: s["mse"] for s in bar["per_seed"]}
    seeds = sorted(set(a) & set(b))
    t, pv = paired_t([a[s] for s in seeds], [b[s] for s in seeds])
    return {"seeds": len(seeds), "seeds_lower": sum(a[s] < b[s] for s in seeds),
            "t": None if math.isnan(t) else t, "p": pv}


def verdict(cells: list[dict], p: dict) -> list[dict]:
    """Per (family, size): the TMU and the mixture against scratch and the best single finetune."""
    out = []
    for family, fp in p["families"].items():
        for size in fp["sizes"]:
            c = {x["method"]: x for x in cells if x["family"] == family and x["size"] == size}
            ft = {m: v for m, v in c.items() if m.startswith("finetune:") and m != "finetune:auto"}
            if "scratch" not in c or not ft:
                continue
            best = min(ft, key=lambda m: ft[m]["mse_mean"])
            row = {"family": family, "size": size, "scratch": c["scratch"]["mse_mean"], "best_finetune": best,
                   "best_finetune_mse": ft[best]["mse_mean"]}
            for m in VERDICT_METHODS:
                if m in c:
                    v = c[m]["mse_mean"]
                    row[m] = {"mse": v, "vs_scratch_pct": 100 * (v / row["scratch"] - 1),
                              "vs_best_finetune_pct": 100 * (v / row["best_finetune_mse"] - 1),
                              "vs_best_finetune_paired": paired_by_seed(c[m], ft[best])}
            out.append(row)
    return out


def aggregate(p: dict, root: Path, out_json: Path, command: str, preset: str) -> dict:
    c = collect(p, root)
    rc = [x for x in c["ranking_cells"] if x.get("hit") is not None]
    sp = [x["spearman"] for x in rc if x.get("spearman") is not None]
    zc = [x for x in rc if "zero_shot" in x]
    zsp = [x["zero_shot"]["spearman"] for x in zc if x["zero_shot"]["spearman"] is not None]
    result = {
        "commit": sorted(c["commits"])[0] if len(c["commits"]) == 1 else sorted(c["commits"]),
        "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per run, "
                   "2 runs in parallel (cores shared with other work)",
        "preset": preset, "settings": {k: v for k, v in p.items() if k != "families"},
        "complete": not c["missing"], "missing": c["missing"], "missing_optional": c["missing_optional"],
        "sizes": {f: fp["sizes"] for f, fp in p["families"].items()},
        "families": {f: {"target": TARGET_TEXT[f], "backbone": fp["model"], "frame_size": fp["size"],
                         "t_in": fp["t_in"], "t_out": fp["frames"] - fp["t_in"], "batch_size": fp["batch_size"],
                         "zoo": c["zoo"].get(f, {}), "tmu": FAMILIES[f]["tmu"], "references": c["references"].get(f, {})}
                     for f, fp in p["families"].items()},
        "methods": list(dict.fromkeys([m for f in p["families"] for m in methods(f, p)]
                                      + [b for f in p["families"] for b in references(f)])),
        "method_notes": {
            "finetune:<entry>": "finetune every weight from the zoo entry",
            "finetune:auto": "finetune from the top of zoo.rank on the cell's target (train split of that "
                             "size, validation clips); reuses the matching finetune:<entry> run",
            "tmu:distill+ft-init": "the TMU at its best setting so far (transfer_digits.md): distill mode, "
                                   "lambda 0.1, backbone initialised from the near entry, the two near entries as teachers",
            "mix:finetuned": "beyond the paper: the finetuned experts' forecasts averaged with convex weights "
                             "(grid 0.05 on the simplex) fit on the validation clips",
            "mix:finetuned+extrapolation": "beyond the paper: the same mixture with optical-flow extrapolation "
                                           "(pysteps, on the [0, 1] values) as one more expert",
            "tmu:ranked": "beyond the paper: the TMU (as tmu:distill+ft-init) on the ranking's top 2 entries, "
                          "initialised from its top entry; reuses tmu:distill+ft-init when those are its settings",
            "persistence/extrapolation": "reference lines: the same test clips at every size; extrapolation is "
                                         "pysteps (dense Lucas-Kanade + semi-Lagrangian) in mm/h for radar, "
                                         "extrapolation:log the same on the log-scaled values",
            "sprog/anvil/steps_mean": "radar reference lines: pysteps' S-PROG, ANVIL and the mean of a 10-member "
                                      "STEPS ensemble as registered in transmem.baselines (docs/baselines.md), "
                                      "in mm/h; sprog:log S-PROG on the log-scaled values",
        },
        "selection": "best validation MSE checkpoint every val_every steps; the test split once per run",
        "mse_units": "MSE per frame: squared error summed over the (valid) pixels of a frame, values in [0, 1] "
                     "(radar: log-scaled rain rate)",
        "cells": c["cells"],
        "ranking": {"hit_rate": (sum(x["hit"] for x in rc) / len(rc)) if rc else None,
                    "exact_rate": (sum(x["exact"] for x in rc) / len(rc)) if rc else None,
                    "spearman": float(np.mean(sp)) if sp else None, "cells_scored": len(rc),
                    "zero_shot": {"hit_rate": (sum(x["zero_shot"]["hit"] for x in zc) / len(zc)) if zc else None,
                                  "spearman": float(np.mean(zsp)) if zsp else None,
                                  "note": "the same quality scores had the ranking used its zero-shot column "
                                          "(probe_steps 0)"},
                    "hit_rule": "top entry is the best finetune source, or its mean test MSE is within one "
                                "seed sd of the best's",
                    "spearman_rule": "rank correlation of probe score and mean finetune test MSE across the "
                                     "family's zoo entries, per cell; mean over cells",
                    "cells": c["ranking_cells"]},
        "verdict": verdict(c["cells"], p),
    }
    claims.write_json(out_json, result, runs=[_read(f) for f in Path(root).rglob(done_file("run"))])
    out_json.with_suffix(".md").write_text(markdown(result))
    for family in p["families"]:
        if any(x["family"] == family and not x.get("reference") for x in result["cells"]):
            plot(result, family, out_json.with_name(f"{out_json.stem}_{family}.png"))
    return result


def plot(result: dict, family: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cells = [x for x in result["cells"] if x["family"] == family]
    learned = [s["mse"] for x in cells if not x.get("reference") for s in x["per_seed"]]
    lo_y, hi_y = min(learned), max(learned)
    pad = 0.1 * (hi_y - lo_y) + 1e-9
    for m in list(methods(family)) + list(references(family)):
        rows = sorted((x for x in cells if x["method"] == m), key=lambda x: x["size"])
        if not rows:
            continue
        if m in references(family):  # a line far above the learned rows is named, not drawn
            v = rows[0]["mse_mean"]
            far = v > hi_y + 3 * (hi_y - lo_y + pad)
            k = list(references(family)).index(m)
            ax.axhline(v if not far else np.nan, ls=("--", ":", "-.")[k % 3], lw=1,
                       color="grey" if m == "persistence" else f"C{k + 2}",
                       label=f"{m} {v:.3g}" + (" (off the axis)" if far else ""))
            if not far:
                lo_y, hi_y = min(lo_y, v), max(hi_y, v)
            continue
        xs = [x["size"] for x in rows]
        mean = np.array([x["mse_mean"] for x in rows])
        ls = ":" if m == "finetune:auto" else "-"
        line, = ax.plot(xs, mean, ls, marker="o", ms=3, label=m)
        lo = np.array([min(s["mse"] for s in x["per_seed"]) for x in rows])
        hi = np.array([max(s["mse"] for s in x["per_seed"]) for x in rows])
        if m != "finetune:auto":
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    pad = 0.1 * (hi_y - lo_y) + 1e-9
    ax.set_ylim(lo_y - pad, hi_y + pad)
    ax.set_xscale("log")
    sizes = result["sizes"][family]
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xticks([], minor=True)
    ax.set(xlabel="target training clips", ylabel="test MSE/frame (band: min-max over seeds)",
           title=f"transfer map, {family}: {result['settings']['target_steps']} target steps per run")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _f(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def steps_text(settings: dict) -> str:
    if "max_doublings" not in settings:
        return f"{settings['target_steps']} target steps"
    stop = settings.get("sampling_stop_steps")
    return (f"trained to convergence (a first cap of {settings['target_steps']} steps, doubled while it is below "
            f"1.25 x the best validation step, at most {settings['max_doublings']} times; each cell's best_step / "
            f"step_cap in the JSON)" + (f", scheduled sampling over the first {stop} steps" if stop else ""))


def markdown(r: dict) -> str:
    lines = [f"# Transfer map ({r['preset']})", "",
             f"Commit `{r['commit']}`; command `{r['command']}`; {r['machine']}.",
             f"Every learned run: {steps_text(r['settings'])}, seeds {r['settings']['seeds']}; "
             f"{r['selection']}. {r['mse_units']}."]
    if not r["complete"]:
        lines += ["", f"**Incomplete**: {len(r['missing'])} jobs missing: " + ", ".join(r["missing"][:20])
                  + (" ..." if len(r["missing"]) > 20 else "")]
    for family, info in r["families"].items():
        sizes = r["sizes"][family]
        nd = 2 if family == "digits" else 3
        zoo_txt = ", ".join(f"{e} ({v['relation']})" for e, v in info["zoo"].items())
        lines += ["", f"## {family}", "", f"Target: {info['target']}. Backbone `{info['backbone']['name']}` "
                  f"{info['backbone']}, {info['frame_size']}x{info['frame_size']}, {info['t_in']} -> {info['t_out']}. "
                  f"Zoo: {zoo_txt}.", "",
                  "| method | " + " | ".join(f"{n} clips" for n in sizes) + " | s/run |",
                  "|---|" + "---:|" * (len(sizes) + 1)]
        for m in list(methods(family)) + list(references(family)):
            row = {x["size"]: x for x in r["cells"] if x["family"] == family and x["method"] == m}
            if not row:
                continue
            vals = []
            for n in sizes:
                x = row.get(n)
                if x is None:
                    vals.append("–")
                    continue
                sd = f" ± {x['mse_std']:.{nd}f}" if x.get("mse_std") is not None else ""
                pick = f" ({x['picked']})" if x.get("picked") else ""
                vals.append(f"{x['mse_mean']:.{nd}f}{sd}{pick}")
            wall = np.mean([x["wall_s_mean"] for x in row.values()])
            lines.append(f"| {m} | " + " | ".join(vals) + f" | {wall:.0f} |")
    rk = r["ranking"]
    lines += ["", "## The ranking's quality", "",
              f"Hit rate {_f(rk['hit_rate'])} (exact {_f(rk['exact_rate'])}) over {rk['cells_scored']} cells; "
              f"mean Spearman {_f(rk['spearman'])}. Hit: {rk['hit_rule']}. Had it ranked by the zero-shot MSE: "
              f"hit rate {_f(rk['zero_shot']['hit_rate'])}, mean Spearman {_f(rk['zero_shot']['spearman'])}.", "",
              "| family | size | top | best finetune | gap (MSE) | best's sd | hit | Spearman | probe scores | "
              "zero-shot top / hit / Spearman | rank s |",
              "|---|---:|---|---|---:|---:|---|---:|---|---|---:|"]
    for x in rk["cells"]:
        scores = ", ".join(f"{k} {v:.3g}" for k, v in x.get("scores", {}).items())
        z = x.get("zero_shot")
        zs = "–" if z is None else f"{z['top']} / {z['hit']} / {_f(z['spearman'])}"
        lines.append(f"| {x['family']} | {x['size']} | {x.get('top')} | {x.get('best_finetune', '–')} | "
                     f"{_f(x.get('gap'), 3)} | {_f(x.get('best_sd'), 3)} | {x.get('hit')} | {_f(x.get('spearman'))} | "
                     f"{scores} | {zs} | {_f(x.get('rank_wall_s'), 0)} |")
    lines += ["", "## Verdict per cell: MSE change against scratch / against the best single finetune (%)", "",
              "| family | size | best finetune | " + " | ".join(VERDICT_METHODS) + " |",
              "|---|---:|---|" + "---:|" * len(VERDICT_METHODS)]
    for v in r["verdict"]:
        g = lambda m: (f"{v[m]['vs_scratch_pct']:+.1f} / {v[m]['vs_best_finetune_pct']:+.1f}"  # noqa: E731
                       if m in v else "–")
        lines.append(f"| {v['family']} | {v['size']} | {v['best_finetune']} | " + " | ".join(g(m) for m in VERDICT_METHODS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", help="a preset of benchmarks/configs/transfer_map.yaml")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--root", help="where runs go (default runs/transfer-map-<preset>)")
    ap.add_argument("--json", help="results file (default benchmarks/results/transfer_map[_<preset>].json)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes to start")
    ap.add_argument("--part", choices=["all", "train", "rank"], default="all",
                    help="train: the zoo, baselines and runs; rank: the rankings (needs the zoo)")
    ap.add_argument("--aggregate", action="store_true", help="only collect finished jobs")
    ap.add_argument("--worker", action="store_true", help="run jobs in this process, do not aggregate")
    ap.add_argument("--extend", action="store_true",
                    help="first set aside unconverged runs with doublings left (after max_doublings was raised)")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    p = load_preset(preset)
    if "radar" in p["families"] and not (SHARED / "radar" / "mch").is_dir():
        sys.exit(f"{SHARED / 'radar' / 'mch'}: radar data not found (set TRANSMEM_SHARED_DATA)")
    root = Path(args.root or REPO / "runs" / f"transfer-map-{preset}")
    out_json = Path(args.json or HERE / "results" / ("transfer_map.json" if preset == "full"
                                                      else f"transfer_map_{preset}.json"))
    command = "python benchmarks/transfer_map.py" + ("" if preset == "full" else f" --preset {preset}") + " --workers 2"
    parts = {"train", "rank"} if args.part == "all" else {args.part}
    if args.extend:
        print(f"--extend: {extend(p, root)} unconverged runs go on", flush=True)
    if args.worker or (args.workers == 1 and not args.aggregate):
        failed = work(p, root, parts)
        if args.worker:
            return 1 if failed else 0
    elif not args.aggregate:
        claims.run_workers([__file__, "--preset", preset, "--root", str(root), "--part", args.part, "--worker"],
                           args.workers)
    r = aggregate(p, root, out_json, command, preset)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

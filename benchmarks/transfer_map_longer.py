#!/usr/bin/env python
"""The transfer map's early stops, trained longer: how much does the 1.25x rule's first stop cost?

Under noisy validation a run can meet the rule at its first cap (best step 450-600 of 800) while
its seeds that ran on kept improving for 10 000+ steps. This check copies the map's scratch and
finetune runs of one cell that stopped at the first cap, resumes each from its last checkpoint
(``convergence.reopen``) to a fixed cap, with the map's curriculum (scheduled sampling over the
first 150 steps), and scores the best validation checkpoint on the test clips; the cell's
mixtures are refit (the map's fit on the validation clips) for each seed with a member that ran
longer. It leaves the map as it is and says what its rows would read with the longer runs in
their place.

    python benchmarks/transfer_map_longer.py --workers 2     # digits, 3000 clips, to 6400 steps

Resumable (a finished run's ``result.json`` is kept); writes
``benchmarks/results/transfer_map_longer.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import claims  # noqa: E402
import transfer_map as tm  # noqa: E402
from convergence import best_step, converged, reopen  # noqa: E402

from transmem import api  # noqa: E402
from transmem.data import build_datasets  # noqa: E402
from transmem.files import write_json  # noqa: E402

#: the code its numbers depend on (the JSON's commit is ``-dirty`` when these differ from HEAD)
CODE = ["src", "benchmarks/transfer_map_longer.py", "benchmarks/transfer_map.py", "benchmarks/transfer_digits.py",
        "benchmarks/claims.py", "benchmarks/convergence.py", "benchmarks/configs/transfer_map.yaml"]


def early_stops(p: dict, root: Path, family: str, size: int) -> list[tuple[str, int]]:
    """(method, seed) of the cell's scratch and finetune runs that stopped at the first cap."""
    out = []
    for method, (kind, _) in tm.methods(family, p).items():
        if kind not in ("scratch", "finetune"):
            continue
        for seed in p["seeds"]:
            f = tm.run_dir(root, family, size, method, seed) / "result.json"
            if f.is_file() and json.loads(f.read_text()).get("step_cap") == p["target_steps"]:
                out.append((method, seed))
    return out


def go_on(args: tuple) -> dict:
    """Copy one run and resume it to ``steps``; its result (kept: a rerun skips it)."""
    p, root, side, family, size, method, seed, steps = args
    job = tm.run_dir(side, family, size, method, seed)
    if (job / "result.json").is_file():
        return json.loads((job / "result.json").read_text())
    src = tm.run_dir(root, family, size, method, seed)
    before = json.loads((src / "result.json").read_text())
    shutil.rmtree(job, ignore_errors=True)
    shutil.copytree(src / "run", job / "run")
    reopen(job / "run")
    t0 = time.time()
    m = tm.trainer(root, family, method)(tm.target_experiment(p, family, size, seed, steps=steps), job / "run", True)
    b = best_step(job / "run")
    r = {"method": method, "seed": seed, "mse": m["mse"], "best_step": b, "step_cap": steps,
         "converged": converged(b, steps), "train_wall_s": round(time.time() - t0, 1),
         "map": {k: before.get(k) for k in ("mse", "best_step", "step_cap", "commit")}, "commit": commit()}
    claims.write_run(job / "result.json", r)
    cap = before.get("step_cap", before.get("train_steps"))  # a preset without the rule records no cap
    print(f"{method} seed {seed}: {before['mse']:.2f} at {cap} steps -> {m['mse']:.2f} at {steps} (best step {b})",
          flush=True)
    return r


def commit() -> str:
    return claims.commit(tm.REPO, CODE)


def refit_mixtures(p: dict, root: Path, side: Path, family: str, size: int, longer: list[dict]) -> list[dict]:
    """Each mixture of the cell with a member that ran longer, refit per such seed by the map's fit
    (convex weights on the validation clips): first on the map's members, which must reproduce
    the map's result, then with the longer runs in their place."""
    swapped = {(r["method"], r["seed"]) for r in longer}
    out = []
    for method, (kind, s) in tm.methods(family, p).items():
        for seed in p["seeds"] if kind == "mixture" else []:
            moved = [e for e in s["experts"] if (f"finetune:{e}", seed) in swapped]
            if not moved:
                continue
            exp = tm.target_experiment(p, family, size, seed)
            data = build_datasets(exp.data)
            stored = json.loads((tm.run_dir(root, family, size, method, seed) / "result.json").read_text())
            fits = {}
            for which in ("map", "longer"):
                dirs = [tm.run_dir(side if which == "longer" and e in moved else root, family, size, f"finetune:{e}",
                                   seed) for e in s["experts"]]
                experts = tm.expert_forecasters(dirs, s, exp)
                w = tm.fit_mixture(experts, data["val"])
                fits[which] = (api.evaluate_forecaster(exp, tm.Mixture(experts, w), data)["mse"], w)
            if not math.isclose(fits["map"][0], stored["mse"], rel_tol=1e-5):
                sys.exit(f"{method} seed {seed}: the refit on the map's members gives {fits['map'][0]:.6f}, the map "
                         f"has {stored['mse']:.6f}: not the map's fit; nothing written")
            names = s["experts"] + s.get("baselines", [])
            out.append({"method": method, "seed": seed, "longer_members": [f"finetune:{e}" for e in moved],
                        "mse": fits["longer"][0], "weights": dict(zip(names, fits["longer"][1])),
                        "map": {"mse": stored["mse"], "weights": stored["weights"], "reproduced": fits["map"][0]},
                        "commit": commit()})
            print(f"{method} seed {seed}: refit with the longer {', '.join(moved)}: {stored['mse']:.2f} -> "
                  f"{fits['longer'][0]:.2f}", flush=True)
    return out


def cells_with(p: dict, root: Path, family: str, size: int, longer: list[dict]) -> dict:
    """The cell's mean test MSE per method, as the map has it and with the longer runs (and the
    mixtures refit on them) in place."""
    swap = {(r["method"], r["seed"]): r["mse"] for r in longer}
    out = {}
    for method in tm.methods(family, p):
        runs = [tm.run_dir(root, family, size, method, s) / "result.json" for s in p["seeds"]]
        if not all(f.is_file() for f in runs):
            continue
        mse = [json.loads(f.read_text())["mse"] for f in runs]
        now = [swap.get((method, s), v) for s, v in zip(p["seeds"], mse)]
        out[method] = {"map": float(np.mean(mse)), "longer": float(np.mean(now)), "per_seed_longer": now}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--family", default="digits")
    ap.add_argument("--size", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=6400, help="the fixed cap the early stops are resumed to")
    ap.add_argument("--root", help="the map's runs (default runs/transfer-map-<preset>)")
    ap.add_argument("--side", help="where the longer runs go (default runs/transfer-map-<preset>-longer)")
    ap.add_argument("--json", help="default benchmarks/results/transfer_map_longer.json")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    p = tm.load_preset(args.preset)
    root = Path(args.root or tm.REPO / "runs" / f"transfer-map-{args.preset}")
    side = Path(args.side or tm.REPO / "runs" / f"transfer-map-{args.preset}-longer")
    picks = early_stops(p, root, args.family, args.size)
    if not picks:
        sys.exit(f"{root}: no {args.family} run at size {args.size} stopped at the first cap ({p['target_steps']})")
    jobs = [(p, root, side, args.family, args.size, m, s, args.steps) for m, s in picks]
    t0 = time.time()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            longer = pool.map(go_on, jobs)
    else:
        longer = [go_on(j) for j in jobs]
    refits = refit_mixtures(p, root, side, args.family, args.size, longer)
    cells = cells_with(p, root, args.family, args.size, longer + refits)
    scratch = cells["scratch"]
    vs = {m: {"map_pct": 100 * (c["map"] / scratch["map"] - 1), "longer_pct": 100 * (c["longer"] / scratch["longer"] - 1)}
          for m, c in cells.items() if m != "scratch"}
    out = {"commit": sorted({r["commit"] for r in longer + refits}), "command": "python benchmarks/transfer_map_longer.py --workers 2",
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per run",
           "family": args.family, "size": args.size, "steps": args.steps, "first_cap": p["target_steps"],
           "runs": longer, "mixtures_refit": refits, "cells": cells, "vs_scratch": vs, "wall_s": round(time.time() - t0, 1)}
    json_path = Path(args.json or HERE / "results" / "transfer_map_longer.json")
    write_json(json_path, out)  # complete or absent
    for m, c in cells.items():
        print(f"{m:30s} map {c['map']:.2f}  longer {c['longer']:.2f}" +
              (f"  vs scratch {vs[m]['map_pct']:+.1f} % -> {vs[m]['longer_pct']:+.1f} %" if m in vs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

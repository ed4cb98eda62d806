#!/usr/bin/env python
"""How much do the leave-one-network-out mixtures lose to their validation-fit weights?

``benchmarks/transfer_radar.py`` fits each mixture's convex weights on the target's validation
clips (the tail of the training window). Where the verdict misses (FMI, MRMS), is that the members,
or weights that do not carry over to the test event? This diagnostic refits the same members'
weights on the test clips themselves: an **oracle**, a bound no forecaster can reach, never a
method. Per target (at its verdict budget) and seed it reports each member's test MSE, the
mixture with validation weights (it must equal ``mix:ft-auto+zoo+baseline`` in
``transfer_radar.json``), the oracle mixture, and the members' plain average (equal weights: does
fitting weights on an hour's validation clips beat not fitting them?).

    python benchmarks/transfer_radar_weights.py          # needs benchmarks/transfer_radar.py's runs

Writes ``benchmarks/results/transfer_radar_weights.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import claims  # noqa: E402
import transfer_map as tm  # noqa: E402
import transfer_radar as tr  # noqa: E402

from transmem.data import build_datasets  # noqa: E402
from transmem.files import write_json  # noqa: E402


#: the code its numbers depend on (the JSON's commit is ``-dirty`` when these differ from HEAD)
CODE = ["src", "benchmarks/transfer_radar_weights.py", "benchmarks/transfer_radar.py", "benchmarks/transfer_map.py",
        "benchmarks/transfer_digits.py", "benchmarks/claims.py", "benchmarks/convergence.py", "benchmarks/configs"]


def cell(p: dict, root: Path, target: str, seed: int) -> dict:
    budget = tr.verdict_budget(p, target)
    exp = tr.cell_experiment(p, root, target, budget, seed)
    data = build_datasets(exp.data)
    names, experts = tr.grid_mixture_members(p, root, target, budget, seed, exp)
    test = lambda f: tr.eval_metrics(exp, f, data, "test")["mse"]  # noqa: E731
    w_val, w_test = tm.fit_mixture(experts, data["val"]), tm.fit_mixture(experts, data["test"])
    stored = json.loads((tr.job_dir(root, "mix", target, budget, tr.MIX, seed) / "result.json").read_text())
    return {"target": target, "budget": budget, "seed": seed,
            "members_test_mse": {n: test(e) for n, e in zip(names, experts)},
            "val_weights": dict(zip(names, w_val)), "val_weights_test_mse": test(tm.Mixture(experts, w_val)),
            "stored_mix_test_mse": stored["mse"],
            "oracle_weights": dict(zip(names, w_test)), "oracle_test_mse": test(tm.Mixture(experts, w_test)),
            # equal weights: what fitting on the validation clips buys over not fitting at all
            "equal_weights_test_mse": test(tm.Mixture(experts, [1 / len(experts)] * len(experts)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tr.diagnostic_options(ap)
    ap.add_argument("--json", default=str(HERE / "results" / "transfer_radar_weights.json"))
    args = ap.parse_args(argv)
    p, root = tr.diagnostic_setup(args)
    t0, cells = time.time(), []
    for target in p["networks"]:
        for seed in p["seeds"]:
            c = cell(p, root, target, seed)
            print(f"{target} seed {seed}: val weights {c['val_weights_test_mse']:.4f} "
                  f"(stored {c['stored_mix_test_mse']:.4f}), oracle {c['oracle_test_mse']:.4f}, "
                  f"equal {c['equal_weights_test_mse']:.4f}, members "
                  + ", ".join(f"{n} {v:.4f}" for n, v in c["members_test_mse"].items()), flush=True)
            cells.append(c)
    command = "python benchmarks/transfer_radar_weights.py" + (f" --networks {args.networks}" if args.networks else "")
    out = {"commit": claims.commit(tr.REPO, CODE), "command": command,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "wall_s": round(time.time() - t0, 1),
           "note": "oracle weights are fit on the test clips: a bound, not a method", "cells": cells}
    write_json(args.json, out)  # complete or absent
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Does the plain average of a mixture's members beat weights fit on validation clips? A test on
the transfer map, whose test clips did not suggest the question.

``benchmarks/transfer_radar_weights.py`` found, on the leave-one-network-out radar test clips,
the members' plain average ahead of the convex weights fit on the validation clips on 3 of 4
networks. A finding on the clips that suggested it proves little. This script states it as a
hypothesis and tests it on data that played no part in it: every mixture cell of the transfer
map (``benchmarks/results/transfer_map.json``: digits and MeteoSwiss radar, 4 training sizes
each, ``mix:finetuned`` and ``mix:finetuned+extrapolation``, 3 seeds).

**Hypothesis (fixed before this ran)**: on the test clips, the members' plain average has an
MSE no higher than the stored mixture's (weights fit on the validation clips by
``transfer_map.fit_mixture``). Per cell: both MSEs (mean over seeds; the stored weights are
rescored and must reproduce the stored MSE) and the seeds where the average is ahead. Over the
cells: how many the average wins, and a paired t test of the per-cell relative differences
(cells share zoo entries and test clips, so that p is optimistic; the per-family counts say
more). A cell is a win or a loss only by its mean; a test with p >= 0.05 over the cells is a tie.

    python benchmarks/transfer_map_average.py      # needs benchmarks/transfer_map.py's runs

Writes ``benchmarks/results/transfer_map_average.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import claims  # noqa: E402
from claims import paired_t  # noqa: E402
import transfer_map as tm  # noqa: E402

from transmem.data import build_datasets  # noqa: E402
from transmem.files import write_json  # noqa: E402
from transmem.metrics import frame_metrics  # noqa: E402
from transmem.training.evaluation import predict_batches  # noqa: E402

#: the code its numbers depend on (the JSON's commit is ``-dirty`` when these differ from HEAD)
CODE = ["src", "benchmarks/transfer_map_average.py", "benchmarks/transfer_map.py", "benchmarks/transfer_digits.py",
        "benchmarks/claims.py", "benchmarks/convergence.py", "benchmarks/configs"]


def forecasts(experts: list, dataset) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Each expert's forecasts of the whole split (unclamped, as the mixture sums them), the true
    future frames and their mask."""
    preds, truth, masks = [[] for _ in experts], [], []
    for i, e in enumerate(experts):
        for frames, valid, pred in predict_batches(e, dataset, 64):
            preds[i].append(pred.float())
            if i == 0:
                t_in = frames.shape[1] - pred.shape[1]
                truth.append(frames[:, t_in:].float())
                if valid is not None:
                    masks.append(valid[:, t_in:])
    return [torch.cat(p) for p in preds], torch.cat(truth), (torch.cat(masks) if masks else None)


def mse(preds: list[torch.Tensor], weights: list[float], truth, mask) -> float:
    """The test MSE of the convex combination, scored as ``training.evaluation.evaluate`` does."""
    mix = sum(w * p for w, p in zip(weights, preds) if w > 0).clamp(0, 1)
    return float(frame_metrics(mix, truth, mask)["mse"])


def cell(p: dict, root: Path, family: str, size: int, method: str) -> dict:
    settings = tm.methods(family)[method][1]
    names = settings["experts"] + settings.get("baselines", [])
    seeds = []
    for seed in p["seeds"]:
        stored = json.loads((tm.run_dir(root, family, size, method, seed) / "result.json").read_text())
        exp = tm.target_experiment(p, family, size, seed)
        _, experts = tm.mixture_experts(root, family, size, seed, settings, exp)
        preds, truth, mask = forecasts(experts, build_datasets(exp.data)["test"])
        fitted = mse(preds, [stored["weights"][n] for n in names], truth, mask)
        if not np.isclose(fitted, stored["mse"], rtol=1e-4):
            raise RuntimeError(f"{family} {size} {method} seed {seed}: the stored weights score {fitted:.6g}, "
                               f"transfer_map.json's run says {stored['mse']:.6g}")
        seeds.append({"seed": seed, "fitted_mse": fitted, "average_mse": mse(preds, [1 / len(names)] * len(names),
                                                                              truth, mask),
                      "fitted_weights": stored["weights"]})
    fit, avg = (float(np.mean([s[k] for s in seeds])) for k in ("fitted_mse", "average_mse"))
    return {"family": family, "size": size, "method": method, "members": names, "fitted_mse": fit,
            "average_mse": avg, "diff_pct": 100 * (avg / fit - 1),
            "seeds_average_ahead": sum(s["average_mse"] < s["fitted_mse"] for s in seeds), "per_seed": seeds}


def summary(cells: list[dict]) -> dict:
    d = [c["diff_pct"] for c in cells]
    t, pv = paired_t(d, [0.0] * len(d))
    return {"cells": len(cells), "average_ahead": sum(x < 0 for x in d), "mean_diff_pct": float(np.mean(d)),
            "t": None if np.isnan(t) else t, "p": pv,
            "hypothesis_holds": bool(all(x <= 0 for x in d)),
            "verdict": "tie" if pv is None or pv >= 0.05 else ("average ahead" if np.mean(d) < 0 else "fitted ahead")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", help="the preset of benchmarks/configs/transfer_map.yaml that ran")
    ap.add_argument("--root", help="transfer_map.py's runs (default runs/transfer-map-<preset>)")
    ap.add_argument("--json", default=str(HERE / "results" / "transfer_map_average.json"))
    args = ap.parse_args(argv)
    p = tm.load_preset(args.preset)
    root = Path(args.root or tm.REPO / "runs" / f"transfer-map-{args.preset}").resolve()
    if not (root / "zoo").is_dir():
        sys.exit(f"{root}: no transfer_map.py runs here (run benchmarks/transfer_map.py first)")
    t0, cells, missing = time.time(), [], []
    for family in p["families"]:
        for size in p["families"][family]["sizes"]:
            for method, (kind, _) in tm.methods(family, p).items():
                if kind != "mixture":
                    continue
                absent = [f"{family} size {size} {method} seed {s}" for s in p["seeds"]
                          if not (tm.run_dir(root, family, size, method, s) / "result.json").is_file()]
                if absent:  # an unfinished map: said, and the cell left out
                    missing += absent
                    continue
                c = cell(p, root, family, size, method)
                cells.append(c)
                print(f"{family} {size} {method}: fitted {c['fitted_mse']:.4f}, average {c['average_mse']:.4f} "
                      f"({c['diff_pct']:+.2f} %, ahead on {c['seeds_average_ahead']} of {len(c['per_seed'])} seeds)",
                      flush=True)
    out = {"commit": claims.commit(tm.REPO, CODE), "command": "python benchmarks/transfer_map_average.py",
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "wall_s": round(time.time() - t0, 1),
           "hypothesis": "the members' plain average has a test MSE no higher than the validation-fit weights' "
                         "(from transfer_radar_weights.json; the map's test clips played no part in it)",
           "overall": summary(cells), "by_family": {f: summary([c for c in cells if c["family"] == f])
                                                    for f in dict.fromkeys(c["family"] for c in cells)},
           "missing": missing, "cells": cells}
    write_json(args.json, out)  # complete or absent
    return 0


if __name__ == "__main__":
    sys.exit(main())

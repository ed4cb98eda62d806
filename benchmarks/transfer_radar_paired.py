#!/usr/bin/env python
"""Is the leave-one-network-out verdict more than noise? Per-tile signs and paired tests.

``benchmarks/transfer_radar.py`` compares mean test MSE over seeds: the best transmem transfer of
each target (at its verdict budget, ~1 hour) against scratch on the same data, the zero-shot
forecast and the best registered baseline. A mean can be won by a few clips. This diagnostic
scores the same forecasters clip by clip (the per-clip MSE of ``transmem.metrics``: squared error
summed over a frame's pixels, averaged over lead times; learned forecasters averaged over their
seeds) and, for each bar, reports

* the tiles where the transfer is ahead (each tile is a separate region of the composite);
* a paired t test over tiles, and one over tile x time blocks (consecutive windows grouped
  ``frames`` at a time, so that two blocks of a tile share few frames; neighbouring windows
  share most of theirs, so a test over single clips would count the same rain many times).

A difference whose tests do not reach p < 0.05 is a tie, whatever the sign of the mean.

    python benchmarks/transfer_radar_paired.py      # needs benchmarks/transfer_radar.py's runs and JSON

Writes ``benchmarks/results/transfer_radar_paired.json``.
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
import transfer_radar as tr  # noqa: E402

from transmem import api  # noqa: E402
from transmem.data import build_datasets  # noqa: E402
from transmem.files import write_json  # noqa: E402
from transmem.training.evaluation import predict_batches  # noqa: E402

#: the code its numbers depend on (the JSON's commit is ``-dirty`` when these differ from HEAD)
CODE = ["src", "benchmarks/transfer_radar_paired.py", "benchmarks/transfer_radar.py", "benchmarks/transfer_map.py",
        "benchmarks/transfer_digits.py", "benchmarks/claims.py",
        "benchmarks/convergence.py", "benchmarks/configs"]
ALPHA = 0.05


def clip_mse(forecaster, dataset) -> np.ndarray:
    """Per item of ``dataset``: squared error summed over a frame's values, averaged over the
    lead times (forecasts clamped to [0, 1], as ``training.evaluation.evaluate`` scores them)."""
    out = []
    for frames, valid, pred in predict_batches(forecaster, dataset, 32):
        t_in = frames.shape[1] - pred.shape[1]
        sq = (pred.float().clamp(0, 1) - frames[:, t_in:].float()) ** 2
        if valid is not None:
            sq = torch.where(valid[:, t_in:].expand_as(sq).to(torch.bool), sq, torch.zeros_like(sq))
        out.append(sq.flatten(2).sum(-1, dtype=torch.float64).mean(1))
    return torch.cat(out).numpy()


def forecasters(p: dict, root: Path, target: str, budget: str, method: str, exp) -> list:
    """The forecaster(s) behind a row of transfer_radar.json: one per seed for learned methods."""
    if method in tr.TRAINED:
        return [api.load_for_inference(tr.job_dir(root, "run", target, budget, method, s) / "run" / "model")[0]
                for s in p["seeds"]]
    if method in (tr.MIXP, tr.MIXA):  # product entries
        job = tr.MIXTURE_JOBS[method]
        return [api.load_for_inference(tr.job_dir(root, job, target, budget, method, s) / "run" / "model")[0]
                for s in p["seeds"]]
    if method == tr.MIX:  # rebuilt from its members and the weights its result stored
        out = []
        for s in p["seeds"]:
            names, experts = tr.grid_mixture_members(p, root, target, budget, s, exp)
            w = json.loads((tr.job_dir(root, "mix", target, budget, method, s) / "result.json").read_text())["weights"]
            out.append(tm.Mixture(experts, [w[n] for n in names]))
        return out
    raise ValueError(f"not a learned method of transfer_radar.py: {method}")


def tests(d: np.ndarray, tile: np.ndarray, block: np.ndarray) -> dict:
    """Paired statistics of per-clip differences ``d`` (transfer minus bar: negative = transfer ahead)."""
    tiles = sorted(set(tile.tolist()))
    per_tile = np.array([d[tile == t].mean() for t in tiles])
    keys = sorted(set(zip(tile.tolist(), block.tolist())))
    per_block = np.array([d[(tile == t) & (block == b)].mean() for t, b in keys])
    (t_tile, p_tile), (t_block, p_block) = (paired_t(x, np.zeros_like(x)) for x in (per_tile, per_block))
    t_tile, t_block = (None if np.isnan(t) else t for t in (t_tile, t_block))  # one tile: no test
    return {"mean_diff": float(d.mean()), "tiles_ahead": int((per_tile < 0).sum()), "tiles": len(tiles),
            "per_tile_diff": [float(x) for x in per_tile],
            "blocks_ahead": int((per_block < 0).sum()), "blocks": len(keys),
            "clips_ahead": int((d < 0).sum()), "clips": int(d.size),
            "t_tiles": t_tile, "p_tiles": p_tile, "t_blocks": t_block, "p_blocks": p_block}


def verdict_word(mean_pct: float, s: dict) -> str:
    if any(x is None or x >= ALPHA for x in (s["p_tiles"], s["p_blocks"])):  # untestable (one tile) counts as a tie
        return "tie"
    return "ahead" if mean_pct < 0 else "behind"


def target_cell(p: dict, root: Path, row: dict) -> dict:
    target, budget = row["target"], row["budget"]
    exp = tr.cell_experiment(p, root, target, budget, 0)
    data = build_datasets(exp.data)
    test = data["test"]
    n_tiles = p["tiles"][target] ** 2
    if len(tr.NETWORKS[target]["test"]) != 1:
        raise ValueError(f"{target}: the tile and block indices assume one test window")
    idx = np.arange(len(test))
    tile, block = idx % n_tiles, (idx // n_tiles) // tr.frames_per_clip(p)

    def mean_over(fs):
        return np.mean([clip_mse(f, test) for f in fs], axis=0)
    best = mean_over(forecasters(p, root, target, budget, row["best_transfer"], exp))
    bars = {"scratch": mean_over(forecasters(p, root, target, budget, tr.SCRATCH, exp)),
            f"zero-shot ({row['zero_shot_entry']})":
                clip_mse(api.load_for_inference(tr.zoo_entry(root, row["zero_shot_entry"]))[0], test),
            f"best baseline ({row['best_baseline']})": clip_mse(tr.load_baseline(p, target, row["best_baseline"], exp), test)}
    stored = {"scratch": row["scratch_mse"], f"zero-shot ({row['zero_shot_entry']})": row["zero_shot_mse"],
              f"best baseline ({row['best_baseline']})": row["best_baseline_mse"]}
    if not np.isclose(best.mean(), row["best_transfer_mse"], rtol=1e-4):
        raise RuntimeError(f"{target}: {row['best_transfer']} scores {best.mean():.6g} clip by clip, "
                           f"transfer_radar.json says {row['best_transfer_mse']:.6g}")
    out = {"target": target, "budget": budget, "best_transfer": row["best_transfer"],
           "best_transfer_mse": float(best.mean()), "test_clips": len(test), "tiles": n_tiles,
           "blocks_per_tile": int(block.max()) + 1, "against": {}}
    for name, bar in bars.items():
        if not np.isclose(bar.mean(), stored[name], rtol=1e-4):
            raise RuntimeError(f"{target}: {name} scores {bar.mean():.6g} clip by clip, "
                               f"transfer_radar.json says {stored[name]:.6g}")
        s = tests(best - bar, tile, block)
        pct = 100 * s["mean_diff"] / bar.mean()
        out["against"][name] = {"bar_mse": float(bar.mean()), "diff_pct": pct, **s, "verdict": verdict_word(pct, s)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tr.diagnostic_options(ap)
    ap.add_argument("--results", help="its JSON (default benchmarks/results/transfer_radar[_<preset>].json)")
    ap.add_argument("--json", default=str(HERE / "results" / "transfer_radar_paired.json"))
    args = ap.parse_args(argv)
    p, root = tr.diagnostic_setup(args)
    res = Path(args.results) if args.results else tr.default_results(args.preset)
    if not res.is_file():
        sys.exit(f"{res}: missing (run benchmarks/transfer_radar.py first)")
    results = json.loads(res.read_text())
    t0, parts = time.time(), {}
    for key in ("verdict", "verdict_post_hoc"):  # the second: the best transfer with the post-hoc methods
        if key not in results:
            continue
        cells = []
        for target, row in results[key]["per_target"].items():
            done = next((c for c in parts.get("verdict", {}).get("cells", []) if c["target"] == target
                         and c["best_transfer"] == row["best_transfer"]), None)
            c = done or target_cell(p, root, {**row, "target": target})
            cells.append(c)
            for name, s in c["against"].items():
                print(f"{key} {target} {c['best_transfer']} vs {name}: {s['diff_pct']:+.2f} %, tiles ahead "
                      f"{s['tiles_ahead']}/{s['tiles']} (p {s['p_tiles']}), blocks ahead {s['blocks_ahead']}/"
                      f"{s['blocks']} (p {s['p_blocks']}): {s['verdict']}", flush=True)
        wins = [c["target"] for c in cells if all(s["verdict"] == "ahead" for s in c["against"].values())]
        parts[key] = {"targets_won_significantly": wins, "cells": cells}
    command = "python benchmarks/transfer_radar_paired.py" + (f" --networks {args.networks}" if args.networks else "")
    out = {"commit": claims.commit(tr.REPO, CODE), "command": command,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "wall_s": round(time.time() - t0, 1), "results_from": os.path.relpath(res.resolve(), tr.REPO),
           "results_commit": json.loads(res.read_text())["commit"], "alpha": ALPHA,
           "rule": "a target is won when its best transfer is ahead of scratch, zero-shot and the best baseline with "
                   "p < alpha in both paired t tests (over tiles and over tile x time blocks); otherwise a tie or a loss",
           **parts["verdict"], **({"post_hoc": parts["verdict_post_hoc"]} if "verdict_post_hoc" in parts else {})}
    write_json(args.json, out)  # complete or absent
    return 0


if __name__ == "__main__":
    sys.exit(main())

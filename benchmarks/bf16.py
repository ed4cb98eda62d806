"""Does bf16 autocast (`train.precision: bf16-mixed`) keep accuracy, and is it faster, at the
demo's scale? Trains the demo's target task (3 flying digits, 32x32, 5 -> 5 frames, the demo's
model: ConvLSTM 2x16 when results/bf16.json was made, the advection backbone 2x16 since) from scratch and as a TMU distilling from one zoo model (digits2, pretrained in fp32),
in fp32 and in bf16-mixed, for each seed, and evaluates on the same test clips in fp32
(bf16-mixed keeps fp32 weights; only training runs under autocast). Sequential runs, so that
their wall times compare.

    python benchmarks/bf16.py                  # seeds 0 1, 600 target steps: about 6 min here
    python benchmarks/bf16.py --seeds 0 --steps 100 --out /tmp/bf16   # smoke test

Writes results/bf16.json (every run and the per-method means) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import claims  # noqa: E402

from transmem import api  # noqa: E402
from transmem.data import build_datasets  # noqa: E402
from transmem.demo import FULL, demo_experiment  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=600, help="target training steps")
    ap.add_argument("--out", default="runs/bench-bf16", help="run folders (must not exist)")
    ap.add_argument("--json", default=str(HERE / "results" / "bf16.json"))
    args = ap.parse_args(argv)
    out = api.prepare_run_dir(args.out)
    s = dict(FULL)
    zoo = out / "zoo"
    api.run_train(demo_experiment(s, 2, s["pre_steps"], s["pre_clips"]), out / "pretrain-digits2",
                  zoo_name="digits2", zoo_root=zoo)
    target = demo_experiment(s, 3, args.steps, s["target_clips"])
    target.train.progress = False
    datasets = build_datasets(target.data)
    runs = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            for method in ("scratch", "tmu:distill"):
                exp = copy.deepcopy(target)
                exp.train.seed, exp.train.precision = seed, precision
                run_dir = out / f"{method.replace(':', '-')}-{precision}-seed{seed}"
                t0 = time.time()
                if method == "scratch":
                    m = api.run_train(exp, run_dir, datasets=datasets, kind="scratch")
                else:
                    m = api.run_transfer(exp, run_dir, teachers=[zoo / "digits2"], datasets=datasets)
                row = {"method": method, "precision": precision, "seed": seed,
                       "wall_s": round(time.time() - t0, 1), "mse": m["mse"], "ssim": m["ssim"],
                       "psnr": m["psnr"]}
                runs.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for method in ("scratch", "tmu:distill"):
        for precision in PRECISIONS:
            rs = [r for r in runs if r["method"] == method and r["precision"] == precision]
            summary[f"{method}/{precision}"] = {k: round(statistics.mean(r[k] for r in rs), 4)
                                                 for k in ("mse", "ssim", "psnr", "wall_s")}
    result = {"runs": runs, "summary": summary, "steps": args.steps, "seeds": args.seeds,
              "settings": {"data": "flying digits (built-in glyphs), 3 digits, 32x32, 5->5 frames",
                           "model": s["model"], "batch": s["batch"], "teacher": "digits2 (fp32, demo zoo)",
                           "threads": torch.get_num_threads(), "torch": torch.__version__}}
    claims.write_json(args.json, result, indent=1)
    print("| method | precision | MSE/frame | SSIM | wall s |\n|---|---|---:|---:|---:|")
    for key, v in summary.items():
        method, precision = key.split("/")
        print(f"| {method} | {precision} | {v['mse']:.2f} | {v['ssim']:.3f} | {v['wall_s']:.0f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

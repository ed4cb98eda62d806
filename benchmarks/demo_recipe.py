"""Which model and loss make the demo's forecasts sharp? Trains the demo's target task (3 flying
digits, 32x32, 5 -> 5 frames, 1000 training clips, batch 16, seed 0) from scratch with each
variant below and scores it on the demo's 200 test clips, next to persistence and extrapolation.

The demo's ConvLSTM trained on MSE reached SSIM 0.38-0.46 (below persistence's 0.49): MSE
rewards a grey blob where the digits may be. This compares backbones (ConvLSTM draws each frame;
the advection backbone moves the last one), losses (MSE, MSE + w * L1), budget and size.

    python benchmarks/demo_recipe.py            # 14 runs, about 5 min on 2 idle cores
    python benchmarks/demo_recipe.py --only convlstm:mse,advection:mse+l1

Resumable: each finished run is kept under --root and not redone. Writes
results/demo_recipe.json (commit, command, machine, settings, one row per variant) and prints a
table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import claims  # noqa: E402

CONVLSTM = dict(name="convlstm", num_layers=2, hidden=16, filter_size=5, patch_size=4)
ADVECTION = dict(CONVLSTM, name="advection")
# name -> (model, L1 weight, target steps)
VARIANTS = {
    "convlstm:mse": (CONVLSTM, 0.0, 300),                     # the demo before
    "convlstm:mse+0.3l1": (CONVLSTM, 0.3, 300),
    "convlstm:mse+l1": (CONVLSTM, 1.0, 300),
    "convlstm:mse+2l1": (CONVLSTM, 2.0, 300),
    "convlstm:mse+10l1": (CONVLSTM, 10.0, 300),
    "convlstm:mse+l1:600steps": (CONVLSTM, 1.0, 600),
    "convlstm:mse+l1:hidden32": (dict(CONVLSTM, hidden=32), 1.0, 300),
    "convlstm:mse+l1:patch2": (dict(CONVLSTM, patch_size=2), 1.0, 300),
    "advection:mse": (ADVECTION, 0.0, 300),
    "advection:mse+l1": (ADVECTION, 1.0, 300),                # the demo now
    "advection:mse+l1:no-source": (dict(ADVECTION, source=False), 1.0, 300),
    "advection:mse+l1:no-source:900steps": (dict(ADVECTION, source=False), 1.0, 900),
    "advection:mse+l1:600steps": (ADVECTION, 1.0, 600),
    # the radar recipe's motion prior (single-scale Lucas-Kanade; the digits move 1-2.5 px/step)
    "advection+lk:mse+l1": (dict(ADVECTION, motion_prior="lucas_kanade", prior_radius=4), 1.0, 300),
}


def commit() -> str:
    return claims.commit(REPO, ["src", "benchmarks/demo_recipe.py", "benchmarks/claims.py"])


def run(name: str, root: Path, datasets, code: str) -> dict:
    from transmem import api
    from transmem.demo import FULL, demo_experiment
    model, l1, steps = VARIANTS[name]
    s = copy.deepcopy(FULL)
    s["model"], s["l1_weight"] = dict(model), l1
    exp = demo_experiment(s, 3, steps, s["target_clips"])
    exp.train.progress = False
    t0 = time.time()
    m = api.run_train(exp, root / name.replace(":", "-").replace("+", "-"), datasets=datasets, kind="scratch")
    return {"mse": m["mse"], "ssim": m["ssim"], "psnr": m["psnr"], "mae": m["mae"],
            "mse_per_frame": m["mse_per_frame"], "ssim_per_frame": m.get("ssim_per_frame"),
            "model": model, "l1_weight": l1, "steps": steps, "wall_s": round(time.time() - t0, 1), "commit": code}


def baselines(datasets) -> dict:
    from transmem import api
    from transmem.baselines import BASELINES, BaselineUnavailable
    from transmem.demo import FULL, demo_experiment
    exp = demo_experiment(FULL, 3, FULL["target_steps"], FULL["target_clips"])
    out = {}
    for name in BASELINES:
        try:
            m = api.evaluate_forecaster(exp, api.load_baseline(name, exp), datasets)
        except BaselineUnavailable as e:
            out[name] = {"note": str(e)}
            continue
        out[name] = {"mse": m["mse"], "ssim": m["ssim"], "psnr": m["psnr"], "mae": m["mae"],
                     "mse_per_frame": m["mse_per_frame"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / "runs" / "bench-demo-recipe"), help="where runs go")
    ap.add_argument("--json", default=str(HERE / "results" / "demo_recipe.json"))
    ap.add_argument("--only", help="comma-separated variants (default: all)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--only: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    import torch

    from transmem.data import build_datasets
    from transmem.demo import FULL, demo_experiment
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    code = commit()
    datasets = build_datasets(demo_experiment(FULL, 3, 1, FULL["target_clips"]).data)
    for name in names:
        done = root / (name.replace(":", "-").replace("+", "-") + ".json")
        if done.is_file():
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        claims.write_run(done, run(name, root / "runs", datasets, code))
    rows = {}
    for name in VARIANTS:
        done = root / (name.replace(":", "-").replace("+", "-") + ".json")
        if done.is_file():
            rows[name] = json.loads(done.read_text())
    result = {"commit": sorted({r["commit"] for r in rows.values()}),
              "command": "python benchmarks/demo_recipe.py",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}",
              "settings": "the demo's target: 3 flying digits (built-in glyphs), 32x32, 5 -> 5 frames, "
                          f"{FULL['target_clips']} training clips, batch {FULL['batch']}, lr 2e-3, from scratch, "
                          f"seed 0, one run per variant; test: the demo's {FULL['test_clips']} test clips",
              "methods": rows, "baselines": baselines(datasets)}
    claims.write_json(args.json, result, runs=rows.values(), indent=1)
    print("| variant | steps | MSE/frame | SSIM | PSNR | s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps']} | {r['mse']:.2f} | {r['ssim']:.3f} | {r['psnr']:.2f} | {r['wall_s']:.0f} |")
    for name, r in result["baselines"].items():
        if "mse" in r:
            print(f"| {name} | | {r['mse']:.2f} | {r['ssim']:.3f} | {r['psnr']:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`transmem demo`: the whole story on built-in data in a few minutes on a laptop CPU.

1. Pretrain two zoo models on flying digits: one on 1-digit clips, one on 2-digit clips.
2. On the target task, 3-digit clips, train from scratch, finetune from each zoo model, and train
   TMU targets that distill from both zoo models (distill mode; bank_read when asked).
3. Evaluate every method on the same 3-digit test clips; write metrics.json, plots, GIFs and a
   report (report.md and a self-contained report.html).
"""
from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch

from . import api
from .baselines import BaselineUnavailable, default_baselines
from .config import Experiment, load_experiment
from .data import build_datasets, physical_units
from .environment import environment
from .files import write_json
from .run_report import demo_report

# Sizes chosen so that the full demo stays under 4 minutes on 2 CPU cores, --quick under 1.
# The model moves what it saw (the advection backbone: a motion field warps the last frame) and
# trains on MSE + L1: a ConvLSTM drawing each frame, or MSE alone, forecasts grey blobs at this
# budget (SSIM 0.38-0.46 against 0.59-0.63 here; README, "The demo").
FULL = dict(size=32, frames=10, t_in=5, pre_clips=2000, target_clips=1000, val_clips=100,
            test_clips=200, pre_steps=500, target_steps=300, batch=16, l1_weight=1.0,
            model=dict(name="advection", num_layers=2, hidden=16, filter_size=5, patch_size=4))
QUICK = dict(size=32, frames=10, t_in=5, pre_clips=64, target_clips=64, val_clips=16,
             test_clips=32, pre_steps=40, target_steps=30, batch=8, l1_weight=1.0,
             model=dict(name="advection", num_layers=2, hidden=8, filter_size=3, patch_size=4))


def demo_experiment(s: dict, num_digits: int, steps: int, clips: int, mnist_dir=None) -> Experiment:
    return load_experiment(base={
        "data": {"name": "flying_digits", "num_digits": num_digits, "size": s["size"],
                 "frames": s["frames"], "train_clips": clips, "val_clips": s["val_clips"],
                 "test_clips": s["test_clips"], "mnist_dir": mnist_dir, "seed": 0},
        "model": dict(s["model"]),
        "train": {"steps": steps, "batch_size": s["batch"], "lr": 2e-3, "t_in": s["t_in"],
                  "sampling_stop": 0.5, "l1_weight": s["l1_weight"], "ckpt_every": max(steps // 2, 1), "progress": True},
        "transfer": {"distill_weight": 0.1, "cache_bank": "memory"},
    })


def run_demo(out, quick: bool = False, mnist_dir: str | None = None, bank_read: bool = True) -> dict:
    t_start = time.time()
    s = QUICK if quick else FULL
    out = api.prepare_run_dir(out)
    zoo_dir = out / "zoo"
    # 1. the zoo
    teachers = []
    for k in (1, 2):
        exp = demo_experiment(s, k, s["pre_steps"], s["pre_clips"], mnist_dir)
        print(f"[demo] pretraining the zoo model digits{k} ({s['pre_steps']} steps)")
        api.run_train(exp, out / "runs" / f"pretrain-digits{k}", zoo_name=f"digits{k}", zoo_root=zoo_dir)
        teachers.append(zoo_dir / f"digits{k}")
    # 2. the target task, 3 digits: one dataset object shared by every method
    target = demo_experiment(s, 3, s["target_steps"], s["target_clips"], mnist_dir)
    datasets = build_datasets(target.data)
    methods: dict[str, dict] = {}
    runs = {}
    baselines: dict = {}

    def record(name, run_dir, metrics):
        methods[name] = metrics
        runs[name] = run_dir

    print("[demo] target: scratch")
    record("scratch", out / "runs" / "scratch",
           api.run_train(copy.deepcopy(target), out / "runs" / "scratch", datasets=datasets, kind="scratch"))
    for t in teachers:
        name = f"finetune:{t.name}"
        print(f"[demo] target: {name}")
        record(name, out / "runs" / name.replace(":", "-"),
               api.run_train(copy.deepcopy(target), out / "runs" / name.replace(":", "-"),
                             init_from=t, datasets=datasets))
    tmu_rows = [("tmu:distill", {})]
    tmu_rows.append(("tmu:distill+finetune-init", {"init_from": str(teachers[-1])}))
    if bank_read:
        # teachers read their own predictions as the target does: no train/test mismatch
        tmu_rows.append(("tmu:bank_read", {"mode": "bank_read", "teacher_inputs": "own", "cache_bank": "none"}))
    for name, change in tmu_rows:
        exp = copy.deepcopy(target)
        for k, v in change.items():
            setattr(exp.transfer, k, v)
        print(f"[demo] target: {name}")
        run_dir = out / "runs" / name.replace(":", "-").replace("+", "-")
        record(name, run_dir, api.run_transfer(exp, run_dir, teachers=teachers, datasets=datasets))
    # the baselines every row is compared with, on the same test clips
    for name in default_baselines(physical_units(target.data)):
        try:
            forecaster = api.load_baseline(name, target)
        except BaselineUnavailable as e:
            print(f"[demo] baseline {name}: {e}")
            methods[name] = {"note": "not installed: pip install 'transmem[nowcast]'"}
            continue
        print(f"[demo] baseline: {name}")
        methods[name] = api.evaluate_forecaster(target, forecaster, datasets)
        baselines[name] = forecaster
    wall = time.time() - t_start
    settings = {
        "data": f"flying digits ({'real MNIST' if mnist_dir else 'built-in glyph digits'}), "
                f"{s['size']}x{s['size']} canvas, {s['t_in']}->{s['frames'] - s['t_in']} frames",
        "zoo": f"digits1, digits2: {s['pre_steps']} steps on {s['pre_clips']} clips each",
        "target": f"3 digits, {s['target_steps']} steps on {s['target_clips']} clips, "
                  f"test {s['test_clips']} clips, batch {s['batch']}, seed 0",
        "model": ", ".join(f"{k}={v}" for k, v in s["model"].items()),
        "loss": f"MSE + {s['l1_weight']} x L1 per frame",
        "tmu": "distill_weight 0.1, bottom layer, gates on; distill rows: teachers read ground truth "
               "(cached bank); bank_read: teachers read what the target reads (own predictions)",
        "baselines": "persistence (the last input frame repeated); extrapolation (pysteps: dense "
                     "Lucas-Kanade motion on the last 3 input frames, semi-Lagrangian advection of the "
                     "last one, on the [0, 1] intensities)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "wall_s": round(wall, 1),
    }
    result = {"methods": methods, "settings": settings, "wall_s": round(wall, 1), "quick": quick,
              "environment": environment()}
    write_json(out / "metrics.json", result)
    forecasters = {m: api.load_for_inference(Path(d) / "model")[0] for m, d in runs.items()} | baselines
    demo_report(out, result, forecasters, datasets["test"], target.train.t_in)
    print(f"[demo] done in {wall:.0f} s: {out / 'report.md'}")
    for name, m in methods.items():
        if "mse" not in m:
            print(f"  {name:32s} {m['note']}")
            continue
        print(f"  {name:32s} MSE/frame {m['mse']:8.2f}  SSIM {m['ssim']:.3f}  PSNR {m['psnr']:.2f}")
    return result

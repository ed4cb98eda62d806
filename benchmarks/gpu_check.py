#!/usr/bin/env python
"""One GPU check, about 5 minutes on one GPU: the tests marked ``cuda``, the speed table (ConvLSTM
and a cached 2-teacher TMU, train step and inference rollout) at 2x32 and 4x64 in fp32 and
bf16-mixed, and a 300-step demo-size training in bf16-mixed vs fp32 (test MSE of both). Writes one
JSON (default benchmarks/results/gpu_check.json). Without a CUDA device it says so and exits 0
without writing anything.

    python benchmarks/gpu_check.py [--json FILE] [--steps 300]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import claims  # noqa: E402
SIZES = {"2x32": dict(layers=2, hidden=32, filter=5, patch=4, size=64, batch=8, frames=20),
         "4x64": dict(layers=4, hidden=64, filter=5, patch=4, size=64, batch=8, frames=20)}


def cuda_tests() -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    tail = r.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": r.returncode, "summary": tail[0], "wall_s": round(time.time() - t0, 1)}


def speed_table(steps: int = 20, warmup: int = 5) -> dict:
    from transmem.bench import BenchSpec, Workload, interleave, median
    out = {}
    for size, kw in SIZES.items():
        for precision in ("32-true", "bf16-mixed"):
            base = BenchSpec(model="convlstm", device="cuda", precision=precision, **kw)
            tmu = BenchSpec(model="tmu", teachers=2, cached_bank=True, device="cuda", precision=precision, **kw)
            wb, wt = Workload(base), Workload(tmu)
            times = interleave({"convlstm/train": wb.train_step, "tmu2_cached/train": wt.train_step,
                                "convlstm/infer": wb.infer_step, "tmu2/infer": wt.infer_step}, warmup, steps)
            med = {k: round(median(v), 3) for k, v in times.items()}
            med["tmu_over_backbone_train"] = round(med["tmu2_cached/train"] / med["convlstm/train"], 3)
            med["tmu_over_backbone_infer"] = round(med["tmu2/infer"] / med["convlstm/infer"], 3)
            out[f"{size}/{precision}"] = med
            print(f"[gpu_check] {size} {precision}: {med}", flush=True)
            del wb, wt
            torch.cuda.empty_cache()
    return {"unit": "ms, median of steps after warm-up", "steps": steps, "warmup": warmup, "rows": out}


def training(steps: int) -> dict:
    from transmem import api
    from transmem.data import build_datasets
    from transmem.demo import FULL, demo_experiment
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        datasets = None
        for precision in ("32-true", "bf16-mixed"):
            exp = demo_experiment(FULL, 2, steps, FULL["target_clips"])
            exp.train.accelerator, exp.train.precision, exp.train.progress = "gpu", precision, False
            datasets = datasets or build_datasets(exp.data)
            t0 = time.time()
            m = api.run_train(exp, Path(tmp) / precision, datasets=datasets, kind="scratch")
            out[precision] = {"mse": round(m["mse"], 4), "ssim": round(m["ssim"], 4),
                              "wall_s": round(time.time() - t0, 1)}
            print(f"[gpu_check] training {precision}: {out[precision]}", flush=True)
    out["mse_bf16_minus_fp32"] = round(out["bf16-mixed"]["mse"] - out["32-true"]["mse"], 4)
    out["setting"] = (f"demo size: flying digits (built-in glyphs, 2 digits), {FULL['size']}x{FULL['size']}, "
                      f"{FULL['t_in']}->{FULL['frames'] - FULL['t_in']} frames, {FULL['model']['name']} "
                      f"{FULL['model']['num_layers']}x{FULL['model']['hidden']}, "
                      f"{steps} steps, batch {FULL['batch']}, seed 0")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_check.json"))
    ap.add_argument("--steps", type=int, default=300, help="training steps per precision")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: skipped: no CUDA device visible to torch {torch.__version__} "
              f"(CUDA build: {torch.version.cuda or 'no'}); nothing written")
        return 0
    sys.path.insert(0, str(REPO / "src"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    t0 = time.time()
    result = {"commit": commit, "command": "python benchmarks/gpu_check.py",
              "machine": f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                         f"{platform.machine()}"}
    result["tests"] = cuda_tests()
    print(f"[gpu_check] tests: {result['tests']}", flush=True)
    result["speed"] = speed_table()
    result["training"] = training(args.steps)
    result["wall_s"] = round(time.time() - t0, 1)
    claims.write_json(args.json, result)
    print(f"[gpu_check] wrote {args.json} in {result['wall_s']} s")
    return 0 if result["tests"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

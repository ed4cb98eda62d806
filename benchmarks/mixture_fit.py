#!/usr/bin/env python
"""How long a mixture's weights take to fit, with and without kept baseline forecasts.

`transmem transfer --mode mixture --baselines ...` fits softmax weights per lead for
``mix_steps`` steps on the validation clips. Every step forecasts its batch with every member;
the pysteps baselines are most of that time, and the fit revisits the same clips. The mixture now
keeps each clip's baseline forecasts by its input frames while it fits
(``MixtureModel.remember_baselines``, bounded by ``api.MIX_MEMO_BYTES``). This script times
``api.run_mixture`` both ways on the same clips, interleaved (A, B, A, B ...), and checks that
the fitted weights and test MSE are identical.

Workload: synthetic advected rain (mm/h, 32 x 32, 3 -> 3 frames, ``--val-clips`` clips to fit
on, 32 test clips), two members (the advection backbone briefly pretrained from two seeds), the
rain baselines that are installed; 100 steps at batch 8 (the product's defaults), with the radar
recipe's augmentation (flips, quarter turns, time reversal: clips repeat less) and without. The
wall time includes the final test evaluation, which the memo does not shorten.

    python benchmarks/mixture_fit.py            # results/mixture_fit.json
    python benchmarks/mixture_fit.py --quick    # a smoke test (results/mixture_fit_quick.json)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import claims  # noqa: E402

import torch  # noqa: E402

from transmem import api, zoo  # noqa: E402
from transmem.baselines import BaselineUnavailable, create_baseline  # noqa: E402
from transmem.config import load_experiment  # noqa: E402
from transmem.data import physical_units  # noqa: E402

BASELINES = ("persistence", "extrapolation", "extrapolation_log", "sprog_log", "steps_mean")
AUGMENT = {"augment": ["flip", "rot90"], "reverse_time_prob": 0.5}


def experiment(val_clips: int, augment: bool, steps: int):
    return load_experiment(base={
        "data": {"name": "advected_rain", "size": 32, "frames": 6, "train_clips": 64, "val_clips": val_clips,
                 "test_clips": 32, "seed": 0},
        "model": {"name": "advection", "num_layers": 1, "hidden": 8, "filter_size": 3, "patch_size": 4},
        "train": {"steps": steps, "batch_size": 8, "t_in": 3, "progress": False, "threads": 1,
                  **(AUGMENT if augment else {})},
        "eval": {"batch_size": 32, "examples": 0},
    })


def installed(exp) -> list[str]:
    out = []
    for name in BASELINES:
        try:
            create_baseline(name, exp.train.t_in, physical_units(exp.data))
            out.append(name)
        except BaselineUnavailable:
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few clips and steps, one round")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each variant")
    ap.add_argument("--val-clips", type=int, default=28, help="clips the weights fit on (the radar benchmark's mch: 28)")
    ap.add_argument("--json", help="results file (default results/mixture_fit[_quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounds, val_clips, mix_steps = (1, 8, 10) if args.quick else (args.rounds, args.val_clips, None)
    out_json = Path(args.json) if args.json else HERE / "results" / f"mixture_fit{'_quick' if args.quick else ''}.json"
    load_before, t_start = os.getloadavg()[0], time.time()
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for s in (0, 1):  # the members: briefly pretrained, two seeds
            e = experiment(val_clips, False, 40 if not args.quick else 4)
            e.train.seed = s
            api.run_train(e, tmp / f"m{s}", zoo_name=f"member{s}", zoo_root=tmp / "zoo", kind="pretrain")
        memo_on = api.MIX_MEMO_BYTES
        for augment in (True, False):
            exp = experiment(val_clips, augment, 10)
            names = installed(exp)
            times, results = {"plain": [], "kept": []}, {}
            for r in range(rounds):
                for variant, memo in (("plain", 0), ("kept", memo_on)):
                    api.MIX_MEMO_BYTES = memo
                    out = tmp / f"mix-{augment}-{variant}-{r}"
                    t0 = time.perf_counter()
                    m = api.run_mixture(exp, out, teachers=["member0", "member1"], zoo_root=tmp / "zoo",
                                        baselines=names, member_steps=0,
                                        **({"mix_steps": mix_steps} if mix_steps else {}))
                    times[variant].append(time.perf_counter() - t0)
                    results[variant] = (zoo.read_card(out / "model")["mixture"]["weights"], m["mse"])
                    print(f"augment {augment} {variant} round {r}: {times[variant][-1]:.1f} s, mse {m['mse']:.5f}",
                          flush=True)
            api.MIX_MEMO_BYTES = memo_on
            med = {k: statistics.median(v) for k, v in times.items()}
            parts["radar_augment" if augment else "no_augment"] = {
                "baselines": names, "augment": AUGMENT if augment else None,
                "wall_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
                "median_s": {k: round(v, 2) for k, v in med.items()},
                "speedup": round(med["plain"] / med["kept"], 2),
                "identical": results["plain"] == results["kept"]}
    result = {"commit": claims.commit(REPO, ["src", "benchmarks/mixture_fit.py"]),
              "command": "python benchmarks/mixture_fit.py" + (" --quick" if args.quick else ""),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
              "workload": {"data": "advected_rain 32x32, 3 -> 3 frames", "val_clips": val_clips,
                           "mix_steps": mix_steps or api.MIX_STEPS, "batch_size": 8, "members": 2, "rounds": rounds},
              "memo_bytes": api.MIX_MEMO_BYTES, "parts": parts,
              "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "wall_s": round(time.time() - t_start, 1)}
    claims.write_json(out_json, result)
    for k, v in parts.items():
        print(f"{k}: plain {v['median_s']['plain']} s, kept {v['median_s']['kept']} s, x{v['speedup']}, "
              f"identical {v['identical']}")
    return 0 if all(v["identical"] for v in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

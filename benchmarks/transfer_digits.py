#!/usr/bin/env python
"""Does transferable memory beat scratch and finetuning? A rerunnable benchmark.

Pretext (zoo) models: 1-digit and 2-digit flying digits built from real MNIST digits, and (the
cross-domain case) MeteoSwiss radar. Target: 3-digit flying digits, 10 -> 10 frames. Every
method gets the same target budget; 3 training seeds; the data (digit pools, clips) is fixed by
data seed 0; model selection on the validation split only; the test split is used once per run.

    python benchmarks/transfer_digits.py --preset cpu --workers 2        # runs, resumable
    python benchmarks/transfer_digits.py --preset cpu --aggregate        # JSON, table, plot

Runs are claimed through files, so several worker processes (``--worker-id``) can share the
list; a finished run (its ``metrics.json``) is never redone.
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
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/claims.py, also when imported from a file path
import claims  # noqa: E402
from claims import claim  # noqa: E402

SHARED = Path(os.environ.get("TRANSMEM_SHARED_DATA", REPO.parent / "shared" / "data"))
RADAR_SPLITS = {"train": ["20150515", "20160711"], "val": ["20170131"], "test": []}

# method -> (kind, settings). kinds: scratch | finetune (init) | transfer (teachers, transfer keys)
CORE = {
    "scratch": ("scratch", {}),
    "finetune:digits1": ("finetune", {"init": "digits1"}),
    "finetune:digits2": ("finetune", {"init": "digits2"}),
    "tmu:distill": ("transfer", {"teachers": ["digits1", "digits2"]}),
    "tmu:distill+finetune-init": ("transfer", {"teachers": ["digits1", "digits2"], "init_from": "digits2"}),
    "tmu:bank_read": ("transfer", {"teachers": ["digits1", "digits2"], "mode": "bank_read"}),
}
ABLATIONS = {
    "ablation:lambda0": ("transfer", {"teachers": ["digits1", "digits2"], "distill_weight": 0.0}),
    "ablation:gates-off": ("transfer", {"teachers": ["digits1", "digits2"], "gates": False}),
    "ablation:one-teacher": ("transfer", {"teachers": ["digits2"]}),
    "ablation:teacher-own": ("transfer", {"teachers": ["digits1", "digits2"], "teacher_inputs": "own",
                                          "cache_bank": "none"}),
}
CROSS = {
    "cross:finetune:radar": ("finetune", {"init": "radar_mch"}),
    "cross:tmu:radar": ("transfer", {"teachers": ["radar_mch"]}),
}
# the search for a TMU that beats finetuning (issue 5's last step). TUNING rows get every seed;
# SCREEN rows were tried on seed 0 only, because their first seed already lost clearly.
_FT = {"teachers": ["digits1", "digits2"], "init_from": "digits2"}
TUNING = {
    "tune:ft-init+lambda0.01": ("transfer", {**_FT, "distill_weight": 0.01}),
    "tune:ft-init+lambda0": ("transfer", {**_FT, "distill_weight": 0.0}),
    "tune:ft-init+input-steps": ("transfer", {**_FT, "distill_span": "input"}),
    "tune:distill+input-steps": ("transfer", {"teachers": ["digits1", "digits2"], "distill_span": "input"}),
    "tune:bank_read+ft-init": ("transfer", {**_FT, "mode": "bank_read"}),
    "tune:bank_read+ft-init+own": ("transfer", {**_FT, "mode": "bank_read", "teacher_inputs": "own",
                                                "cache_bank": "none"}),
}
SCREEN = {
    "tune:ft-init+linear-decay": ("transfer", {**_FT, "distill_decay": "linear"}),
    "tune:ft-init+all-layers": ("transfer", {**_FT, "tmu_layers": "all"}),
    "tune:distill+lambda1": ("transfer", {"teachers": ["digits1", "digits2"], "distill_weight": 1.0}),
}
# the reference lines of every table: no training, so evaluated once (they do not depend on a seed)
BASELINES = {"baseline:persistence": ("baseline", {"name": "persistence"}),
             "baseline:extrapolation": ("baseline", {"name": "extrapolation"})}
ALL_METHODS = {**BASELINES, **CORE, **ABLATIONS, **CROSS, **TUNING, **SCREEN}
PRETEXT = {
    "digits1": {"name": "flying_digits", "num_digits": 1},
    "digits2": {"name": "flying_digits", "num_digits": 2},
    "radar_mch": {"name": "radar_mch", "path": str(SHARED / "radar" / "mch"), "stride": 2,
                  "extra": {"splits": RADAR_SPLITS}},
}


def load_preset(name: str) -> dict:
    presets = yaml.safe_load((HERE / "configs" / "transfer_digits.yaml").read_text())
    if name not in presets:
        sys.exit(f"unknown preset '{name}'; known: {', '.join(presets)}")
    return presets[name]


def experiment(p: dict, data: dict, steps: int, seed: int, eval_split: str = "test"):
    from transmem.config import load_experiment
    clips = p["clips"]
    d = {"size": p["size"], "frames": p["frames"], "seed": 0, "train_clips": clips["train"],
         "val_clips": clips["val"], "test_clips": clips["test"], **data}
    if d["name"] == "flying_digits":
        d["mnist_dir"] = str(SHARED / "mnist")
    return load_experiment(base={
        "data": d,
        "model": dict(p["model"]),
        "train": {"steps": steps, "batch_size": p["batch_size"], "lr": p["lr"], "t_in": p["t_in"],
                  "seed": seed, "val_every": p["val_every"], "val_batches": 0, "select_best": True,
                  "ckpt_every": max(p["val_every"], 1), "progress": False, "threads": 1},
        "transfer": {"distill_weight": 0.1, "cache_bank": "memory"},
        "eval": {"split": eval_split, "batch_size": 64},
    })


def zoo_dir(p: dict, root: Path) -> Path:
    """The preset's own zoo, or (``zoo_preset``) the zoo of another preset's runs beside it."""
    if p.get("zoo_preset"):
        return root.parent / f"bench-transfer-{p['zoo_preset']}" / "zoo"
    return root / "zoo"


def jobs(p: dict, with_cross: bool) -> list[tuple[str, int]]:
    out = [] if p.get("zoo_preset") else \
        [(f"pretext:{n}", 0) for n in PRETEXT if with_cross or not n.startswith("radar")]
    out += [(m, p["seeds"][0]) for m in BASELINES]
    groups = [CORE, TUNING, ABLATIONS] + ([CROSS] if with_cross else [])
    for g in groups:
        for seed in p["seeds"]:
            out += [(m, seed) for m in g]
    out += [(m, p["seeds"][0]) for m in SCREEN]
    return out


def run_dir(root: Path, name: str, seed: int) -> Path:
    safe = name.replace(":", "-").replace("+", "-")
    return root / "runs" / safe / f"seed{seed}"


def wait_for(paths: list[Path], timeout_s: float = 4 * 3600) -> None:
    t0 = time.time()
    while not all((p / "card.json").is_file() for p in paths):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"waited too long for {paths}")
        time.sleep(5)


def commit() -> str:
    return claims.commit(REPO, ["src", "benchmarks/transfer_digits.py", "benchmarks/configs", "benchmarks/claims.py"])


_COMMIT_AT_START: str | None = None  # the code a worker runs is the code it imported at start


def execute(name: str, seed: int, p: dict, root: Path) -> None:
    from transmem import api
    zoo = zoo_dir(p, root)
    d = run_dir(root, name, seed)
    if name.startswith("pretext:"):
        key = name.split(":", 1)[1]
        split = "val" if key.startswith("radar") else "test"
        exp = experiment(p, PRETEXT[key], p["pretext_steps"], seed, eval_split=split)
        if key.startswith("radar"):
            exp.train.val_every = 0  # three events only: no selection, train to the end
        api.run_train(exp, d / "run", zoo_name=key, zoo_root=zoo, kind="pretrain")
    else:
        kind, s = ALL_METHODS[name]
        exp = experiment(p, {"name": "flying_digits", "num_digits": 3}, p["target_steps"], seed)
        if kind == "baseline":  # on the test clips every method is scored on, no run folder
            from transmem.data import build_datasets
            m = api.evaluate_forecaster(exp, api.load_baseline(s["name"], exp), build_datasets(exp.data))
            m.update({"method": name, "seed": seed, "commit": _COMMIT_AT_START or commit(), "train_wall_s": 0.0,
                      "train_steps": 0})
            d.mkdir(parents=True, exist_ok=True)
            claims.write_run(d / "result.json", m)
            return
        if kind == "scratch":
            api.run_train(exp, d / "run", kind="scratch")
        elif kind == "finetune":
            wait_for([zoo / s["init"]])
            api.run_train(exp, d / "run", init_from=zoo / s["init"])
        else:
            teachers = [zoo / t for t in s["teachers"]]
            wait_for(teachers + ([zoo / s["init_from"]] if "init_from" in s else []))
            for k, v in s.items():
                if k == "init_from":
                    exp.transfer.init_from = str(zoo / v)
                elif k != "teachers":
                    setattr(exp.transfer, k, v)
            api.run_transfer(exp, d / "run", teachers=teachers)
    m = json.loads((d / "run" / "metrics.json").read_text())
    m.update({"method": name, "seed": seed, "commit": _COMMIT_AT_START or commit()})
    claims.write_run(d / "result.json", m)  # the environment its metrics.json recorded


def work(p: dict, root: Path, with_cross: bool, only: set | None, seeds: set | None = None) -> None:
    global _COMMIT_AT_START
    _COMMIT_AT_START = commit()
    import transmem.api  # noqa: F401  (import the code now, with the commit just recorded)
    for name, seed in jobs(p, with_cross):
        skipped = (only and name not in only) or (seeds is not None and seed not in seeds)
        zoo_needed = not only or any(m not in BASELINES for m in only)  # baselines train nothing
        if (skipped and not name.startswith("pretext:")) or (name.startswith("pretext:") and not zoo_needed):
            continue
        d = run_dir(root, name, seed)
        if (d / "result.json").is_file() or not claim(d):
            continue
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] start {name} seed {seed}", flush=True)
        try:
            execute(name, seed, p, root)
        except Exception as e:
            (d / "error.txt").write_text(repr(e))
            (d / ".claim").unlink(missing_ok=True)
            print(f"  FAILED {name} seed {seed}: {e!r}", flush=True)
            raise
        print(f"[{time.strftime('%H:%M:%S')}] done {name} seed {seed} in {time.time() - t0:.0f} s", flush=True)


BASELINE = "finetune:digits2"  # the best single-source method: the row a TMU has to beat


def aggregate(p: dict, root: Path, out_json: Path, command: str, report: bool = True) -> dict:
    from transmem.viz import plot_per_frame
    methods: dict = {}
    commits = set()
    every_run = []
    for name in ALL_METHODS:
        runs = []
        for seed in p["seeds"]:
            f = run_dir(root, name, seed) / "result.json"
            if f.is_file():
                runs.append(json.loads(f.read_text()))
        if not runs:
            continue
        every_run += runs
        commits |= {r["commit"] for r in runs}
        mse = np.array([r["mse"] for r in runs])
        methods[name] = {
            "mse_mean": float(mse.mean()), "mse_std": float(mse.std(ddof=1)) if len(runs) > 1 else None,
            "ssim_mean": float(np.mean([r["ssim"] for r in runs])),
            "psnr_mean": float(np.mean([r["psnr"] for r in runs])),
            "mae_mean": float(np.mean([r["mae"] for r in runs])),
            "per_seed": [{"seed": r["seed"], "mse": r["mse"], "ssim": r["ssim"], "psnr": r["psnr"],
                          "mae": r["mae"], "wall_s": r["train_wall_s"]} for r in runs],
            "mse_per_frame": np.mean([r["mse_per_frame"] for r in runs], 0).tolist(),
            "train_steps": runs[0]["train_steps"],
            "wall_s": float(np.mean([r["train_wall_s"] for r in runs])),
            "seeds_done": len(runs),
        }
    # runs with the same training seed share batch order and sampling masks: the per-seed
    # difference to the baseline to beat is a sharper comparison than two means
    base = {r["seed"]: r["mse"] for r in methods.get(BASELINE, {}).get("per_seed", [])}
    for name, v in methods.items():
        diffs = [r["mse"] - base[r["seed"]] for r in v["per_seed"] if r["seed"] in base]
        if diffs and name != BASELINE:
            v["mse_vs_finetune_paired"] = {"mean": float(np.mean(diffs)), "seeds": len(diffs),
                                           "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None}
    import torch
    result = {
        "commit": sorted(commits)[0] if len(commits) == 1 else sorted(commits),
        "command": command,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, 1 thread per run, 2 runs in parallel".replace("  ", " "),
        "preset": p,
        "data": "flying digits from real MNIST test digits (../shared/data/mnist), digit pools "
                "80/10/10 % train/val/test by index, data seed 0; radar: MeteoSwiss (pysteps example "
                "data), events 20150515 + 20160711 train, 20170131 val",
        "selection": "best validation MSE checkpoint (every val_every steps); test split once per run",
        "methods": methods,
    }
    claims.write_json(out_json, result, runs=every_run)
    if methods:
        # the core rows and the tuned variants that have every seed (all rows would be unreadable)
        curves = {m: v["mse_per_frame"] for m, v in methods.items()}
        shown = {m: c for m, c in curves.items()
                 if m in CORE or (m in TUNING and methods[m]["seeds_done"] == len(p["seeds"]))}
        plot_per_frame(out_json.with_suffix(".png"), shown or curves, "MSE per frame (sum over pixels)")
    out_json.with_suffix(".md").write_text(markdown(result))
    if methods and report:
        write_bench_report(p, root, out_json, result)
    return result


def write_bench_report(p: dict, root: Path, out_json: Path, result: dict) -> None:
    """report.md / report.html with plots, GIFs of seed-0 forecasts and TMU transfer maps."""
    from transmem.data import build_datasets
    from transmem.api import load_baseline, load_for_inference
    from transmem.run_report import method_report
    seed = p["seeds"][0]
    dirs = {m: run_dir(root, m, seed) / "run" / "model" for m in result["methods"]}
    forecasters = {m: load_for_inference(d)[0] for m, d in dirs.items() if (d / "card.json").is_file()}
    exp = experiment(p, {"name": "flying_digits", "num_digits": 3}, p["target_steps"], seed)
    test = build_datasets(exp.data)["test"]
    forecasters.update({m: load_baseline(BASELINES[m][1]["name"], exp) for m in BASELINES if m in result["methods"]})
    table = {m: {"mse": v["mse_mean"], "ssim": v["ssim_mean"], "psnr": v["psnr_mean"], "mae": v["mae_mean"],
                 "mse_per_frame": v["mse_per_frame"], "seeds": v["seeds_done"]}
             for m, v in result["methods"].items()}
    method_report(out_json.parent / (out_json.stem + "_report"), "transmem benchmark: transfer to 3-digit flying digits",
                  table, forecasters, test, p["t_in"], examples=1, settings={k: result[k] for k in ("commit", "command", "machine")},
                  notes=["Means over seeds; forecasts and transfer maps are from the seed-0 models."])


GROUP_TITLES = [("Baselines (no training; the same test clips)", BASELINES), ("Core methods", CORE), ("Ablations (TMU distill, random init)", ABLATIONS),
                ("Cross-domain: a radar pretext model", CROSS),
                ("Tuning: the search for a TMU that beats finetuning", {**TUNING, **SCREEN})]


def markdown(r: dict) -> str:
    base = r["methods"].get("scratch", {}).get("mse_mean")
    lines = []
    for title, group in GROUP_TITLES:
        rows = [(m, v) for m, v in r["methods"].items() if m in group]
        if not rows:
            continue
        lines += ["" if lines else None, f"**{title}**", "",
                  f"| method | MSE/frame (mean ± sd) | vs {BASELINE}, paired | SSIM | PSNR | MAE/frame | seeds | s/run |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m, v in rows:
            sd = f" ± {v['mse_std']:.2f}" if v["mse_std"] is not None else ""
            rel = f" ({100 * (v['mse_mean'] / base - 1):+.1f}%)" if base and m != "scratch" else ""
            pd = v.get("mse_vs_finetune_paired")
            paired = "" if pd is None else f"{pd['mean']:+.2f}" + (f" ± {pd['std']:.2f}" if pd["std"] is not None else "")
            lines.append(f"| {m} | {v['mse_mean']:.2f}{sd}{rel} | {paired} | {v['ssim_mean']:.3f} | "
                         f"{v['psnr_mean']:.2f} | {v['mae_mean']:.1f} | {v['seeds_done']} | {v['wall_s']:.0f} |")
    return "\n".join(l for l in lines if l is not None) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--root", help="where runs go (default runs/bench-transfer-<preset>)")
    ap.add_argument("--json", help="results file (default benchmarks/results/transfer_digits[_quick].json)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes to start")
    ap.add_argument("--aggregate", action="store_true", help="only collect finished runs")
    ap.add_argument("--no-cross", action="store_true", help="skip the radar cross-domain case")
    ap.add_argument("--only", help="comma-separated methods to run")
    ap.add_argument("--seeds", help="comma-separated training seeds to run (default: the preset's)")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML/GIF report")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    p = load_preset(preset)
    if not (SHARED / "mnist").is_dir():
        sys.exit(f"real MNIST digits not found at {SHARED / 'mnist'} (set TRANSMEM_SHARED_DATA)")
    with_cross = not args.no_cross and (SHARED / "radar" / "mch").is_dir()
    root = Path(args.root or REPO / "runs" / f"bench-transfer-{preset}")
    out_json = Path(args.json or HERE / "results" / ("transfer_digits.json" if preset == "cpu"
                                                      else f"transfer_digits_{preset}.json"))
    # the command that reproduces the runs (it aggregates at the end); paths and --aggregate aside
    command = f"python benchmarks/transfer_digits.py --preset {preset} --workers 2" + \
        (f" --only {args.only}" if args.only else "")
    if not args.aggregate:
        only = set(args.only.split(",")) if args.only else None
        if args.workers > 1:
            claims.run_workers([__file__, "--preset", preset, "--root", str(root), "--workers", "1",
                                "--json", str(out_json)] + (["--no-cross"] if not with_cross else [])
                               + (["--only", args.only] if args.only else [])
                               + (["--seeds", args.seeds] if args.seeds else []), args.workers, omp_threads=None)
        else:
            seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
            work(p, root, with_cross, only, seeds)
    r = aggregate(p, root, out_json, command, report=not args.no_report)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Forecasts on real data, next to the baselines a forecaster must beat. A rerunnable benchmark.

Radar: leave-one-event-out over the five shared events (FMI 20160928, 20170509; MeteoSwiss
20150515, 20160711, 20170131; pysteps example data, 5-minute composites), 64x64, 6 -> 6 frames.
Each fold trains on the other four events and tests on every clip of the held-out one. Rows:
persistence, extrapolation (pysteps' dense Lucas-Kanade + semi-Lagrangian advection, in mm/h and on
the log-scaled values), ConvLSTM from scratch (the model transmem trained before), the advection
backbone from scratch, finetuned from a zoo model pretrained on synthetic advected rain fields
(``advected_rain``, the project's own motion-rich pretext data), and a TMU on that finetune init.
Video: leave-one-clip-out over the three shared clips (grayscale 64x64, 6 -> 6).

    python benchmarks/real_data.py --quick --workers 2     # about 6 minutes on 2 idle cores
    python benchmarks/real_data.py --workers 2             # the full preset (3 seeds)
    python benchmarks/real_data.py --aggregate             # only collect finished runs

Runs are claimed through files, so worker processes share the list; a finished run (its
``result.json``) is never redone, so a stopped benchmark resumes where it stopped.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/claims.py, also when imported from a file path
import claims  # noqa: E402
from claims import claim  # noqa: E402

SHARED = Path(os.environ.get("TRANSMEM_SHARED_DATA", REPO.parent / "shared" / "data"))
RADAR = {  # event -> (reader, folder)
    "fmi:20160928": ("radar_fmi", "radar/fmi/pgm"),
    "fmi:20170509": ("radar_fmi", "radar/fmi/pgm"),
    "mch:20150515": ("radar_mch", "radar/mch"),
    "mch:20160711": ("radar_mch", "radar/mch"),
    "mch:20170131": ("radar_mch", "radar/mch"),
}
VIDEO = {"carphone": "video/carphone_pristine.mp4", "realshort": "video/realshort.mp4",
         "newtonscradle": "video/newtonscradle.gif"}
THRESHOLDS = [0.5, 1.0, 5.0]  # mm/h

PRESETS = {
    # the same protocol at a small budget: one seed, fewer steps, a smaller model
    "quick": {"size": 64, "frames": 12, "t_in": 6, "seeds": [0], "steps": 150, "pretext_steps": 300,
              "pretext_clips": 1000, "batch_size": 8, "lr": 2e-3, "hidden": 16, "layers": 2},
    # sized to finish in about an hour on 2 idle cores (2 workers, 1 thread each)
    "full": {"size": 64, "frames": 12, "t_in": 6, "seeds": [0, 1, 2], "steps": 400, "pretext_steps": 1500,
             "pretext_clips": 2000, "batch_size": 8, "lr": 2e-3, "hidden": 16, "layers": 2},
}

# method -> (kind, settings). kinds: baseline | scratch | finetune | tmu
LK_PRIOR = {"motion_prior": "lucas_kanade", "prior_radius": 8}
# pretext zoo entries (synthetic advected rain) -> their model settings
PRETEXTS = {"advected_rain": {}, "advected_rain_lk": LK_PRIOR}
RADAR_METHODS = {
    "persistence": ("baseline", {"name": "persistence"}),
    "extrapolation": ("baseline", {"name": "extrapolation"}),              # motion and advection in mm/h
    "extrapolation:log": ("baseline", {"name": "extrapolation", "log": True}),  # on the log-scaled values
    "convlstm:scratch": ("scratch", {"model": "convlstm"}),
    "advection:scratch": ("scratch", {"model": "advection"}),
    "advection:finetune": ("finetune", {"model": "advection"}),
    "advection:tmu": ("tmu", {"model": "advection"}),
    # the finetuned model of the same fold and seed, averaged with extrapolation (weight fixed at 0.5)
    "blend:advection+extrapolation:log": ("blend", {"model": "advection", "of": "advection:finetune",
                                                    "baseline": "extrapolation", "weight": 0.5}),
    # the same finetuning with an L1 term (train.l1_weight 1): the loss that made the demo sharp
    "advection:finetune+l1": ("finetune", {"model": "advection", "train": {"l1_weight": 1.0}}),
    "blend:advection+l1+extrapolation:log": ("blend", {"model": "advection", "of": "advection:finetune+l1",
                                                       "baseline": "extrapolation", "weight": 0.5}),
    # the advection backbone learning a correction to Lucas-Kanade flow between its inputs
    # (model.motion_prior: lucas_kanade), from scratch and from a pretext model trained the same way
    "advection+lk:scratch": ("scratch", {"model": "advection", "config": LK_PRIOR}),
    "advection+lk:finetune": ("finetune", {"model": "advection", "config": LK_PRIOR, "pretext": "advected_rain_lk"}),
    "advection+lk:tmu": ("tmu", {"model": "advection", "config": LK_PRIOR, "pretext": "advected_rain_lk"}),
    "blend:advection+lk+extrapolation:log": ("blend", {"model": "advection", "of": "advection+lk:finetune",
                                                       "baseline": "extrapolation", "weight": 0.5}),
}
VIDEO_METHODS = {"persistence": RADAR_METHODS["persistence"],
                 # the frame edge is not the scene's edge: unknown inflow keeps the last frame
                 "extrapolation": ("baseline", {"name": "extrapolation", "inflow": "last"}),
                 "convlstm:scratch": RADAR_METHODS["convlstm:scratch"],
                 "advection:scratch": RADAR_METHODS["advection:scratch"],
                 "advection+lk:scratch": RADAR_METHODS["advection+lk:scratch"]}
AUGMENT = {"augment": ["flip", "rot90"], "reverse_time_prob": 0.5}  # every learned row


def model_config(p: dict, name: str, extra: dict | None = None) -> dict:
    return {"name": name, "num_layers": p["layers"], "hidden": p["hidden"], "filter_size": 5, "patch_size": 4,
            **(extra or {})}


def experiment(p: dict, data: dict, model: str, seed: int, steps: int, model_extra: dict | None = None):
    from transmem.config import load_experiment
    return load_experiment(base={
        "data": {"size": p["size"], "frames": p["frames"], "stride": 1, **data},
        "model": model_config(p, model, model_extra),
        "train": {"steps": steps, "batch_size": p["batch_size"], "lr": p["lr"], "t_in": p["t_in"], "seed": seed,
                  "val_every": 0, "select_best": False, "ckpt_every": steps, "progress": False, "threads": 1,
                  **AUGMENT},
        "eval": {"split": "test", "batch_size": 32, "thresholds": THRESHOLDS if data["name"].startswith("radar") else [],
                 "examples": 1},
    })


# ---------------------------------------------------------------------------------------------
# data of a fold


def radar_fold(p: dict, test_event: str):
    """(data config of the test event, {"train": other events' clips, "test": the event's clips})."""
    from torch.utils.data import ConcatDataset

    from transmem.data import DataConfig, build_datasets
    train, test, test_cfg = [], None, None
    for reader in ("radar_fmi", "radar_mch"):
        events = [e for e, (r, _) in RADAR.items() if r == reader]
        folder = str(SHARED / RADAR[events[0]][1])
        splits = {"train": [e.split(":")[1] for e in events if e != test_event],
                  "val": [], "test": [e.split(":")[1] for e in events if e == test_event]}
        cfg = {"name": reader, "path": folder, "size": p["size"], "frames": p["frames"], "stride": 1,
               "extra": {"splits": splits}}
        ds = build_datasets(DataConfig.from_dict(cfg))
        if len(ds["train"]):
            train.append(ds["train"])
        if splits["test"]:
            test, test_cfg = ds["test"], cfg
    return test_cfg, {"train": ConcatDataset(train), "test": test}


def video_fold(p: dict, test_clip: str):
    from torch.utils.data import ConcatDataset

    from transmem.data import DataConfig, build_datasets
    train, test, test_cfg = [], None, None
    for clip, rel in VIDEO.items():
        cfg = {"name": "video", "path": str(SHARED / rel), "size": p["size"], "frames": p["frames"], "stride": 1,
               "split": [1, 0, 0] if clip != test_clip else [0, 0, 1]}
        ds = build_datasets(DataConfig.from_dict(cfg))
        if clip == test_clip:
            test, test_cfg = ds["test"], cfg
        else:
            train.append(ds["train"])
    return test_cfg, {"train": ConcatDataset(train), "test": test}


# ---------------------------------------------------------------------------------------------
# jobs


def jobs(p: dict, with_video: bool) -> list[tuple[str, str, str, int]]:
    """(family, fold, method, seed); the pretext zoo models first."""
    out = [("pretext", name, "advection:pretext", 0) for name in PRETEXTS]
    for fold in RADAR:
        for m, (kind, _) in RADAR_METHODS.items():
            out += [("radar", fold, m, s) for s in ([0] if kind == "baseline" else p["seeds"])]
    if with_video:
        for fold in VIDEO:
            for m, (kind, _) in VIDEO_METHODS.items():
                out += [("video", fold, m, s) for s in ([0] if kind == "baseline" else p["seeds"])]
    return out


def run_dir(root: Path, family: str, fold: str, method: str, seed: int) -> Path:
    safe = lambda s: s.replace(":", "-").replace("+", "-")  # noqa: E731
    return root / family / safe(fold) / safe(method) / f"seed{seed}"


def commit() -> str:
    return claims.commit(REPO, ["src", "benchmarks/real_data.py", "benchmarks/claims.py"])


def pretext_entry(root: Path, name: str = "advected_rain") -> Path:
    return root / "zoo" / name


def execute(family: str, fold: str, method: str, seed: int, p: dict, root: Path) -> dict:
    from transmem import api
    d = run_dir(root, family, fold, method, seed)
    if family == "pretext":
        # real echoes at 64x64 move 0.1-0.5 px per 5-minute step: the pretext clips move up to 1
        exp = experiment(p, {"name": "advected_rain", "train_clips": p["pretext_clips"], "val_clips": 8,
                             "test_clips": 64, "extra": {"max_speed": 1.0}}, "advection", seed,
                         p["pretext_steps"], PRETEXTS[fold])
        exp.train.augment, exp.train.reverse_time_prob = [], 0.0  # the generator varies enough
        return api.run_train(exp, d / "run", zoo_name=fold, zoo_root=root / "zoo", kind="pretrain")
    table = RADAR_METHODS if family == "radar" else VIDEO_METHODS
    kind, s = table[method]
    test_cfg, datasets = radar_fold(p, fold) if family == "radar" else video_fold(p, fold)
    exp = experiment(p, test_cfg, s.get("model", "convlstm"), seed, p["steps"], s.get("config"))
    for key, value in s.get("train", {}).items():
        setattr(exp.train, key, value)
    if kind == "baseline":
        forecaster = api.load_baseline(s["name"], exp, physical=not s.get("log"), inflow=s.get("inflow", "zero"))
        t0 = time.time()
        m = api.evaluate_forecaster(exp, forecaster, datasets)
        m["train_wall_s"], m["eval_wall_s"] = 0.0, round(time.time() - t0, 1)
        return m
    if kind == "scratch":
        return api.run_train(exp, d / "run", datasets=datasets, kind="scratch")
    if kind == "blend":
        done = run_dir(root, family, fold, s["of"], seed)
        while not (done / "result.json").is_file():  # another worker is training it
            time.sleep(5)
        model, _ = api.load_for_inference(done / "run" / "model")
        forecaster = api.blend_with_baseline(model, s["baseline"], exp.train.t_in, s["weight"], exp.data)
        t0 = time.time()
        m = api.evaluate_forecaster(exp, forecaster, datasets)
        m["train_wall_s"], m["eval_wall_s"] = 0.0, round(time.time() - t0, 1)
        return m
    entry = pretext_entry(root, s.get("pretext", "advected_rain"))
    while not (entry / "card.json").is_file():  # another worker is pretraining it
        time.sleep(5)
    if kind == "finetune":
        return api.run_train(exp, d / "run", init_from=entry, datasets=datasets)
    exp.transfer.init_from = str(entry)  # the best TMU variant of the digits benchmark
    exp.transfer.cache_bank = "none"       # augmented clips: the teachers must see them
    return api.run_transfer(exp, d / "run", teachers=[entry], datasets=datasets)


def work(p: dict, root: Path, with_video: bool, only: set | None) -> None:
    code = commit()
    for family, fold, method, seed in jobs(p, with_video):
        # a pretext entry is needed by the finetune and TMU rows that start from it
        needs = {m for m, (k, s) in RADAR_METHODS.items() if k in ("finetune", "tmu")
                 and s.get("pretext", "advected_rain") == fold}
        if only and (method not in only if family != "pretext" else not only & needs):
            continue
        d = run_dir(root, family, fold, method, seed)
        if (d / "result.json").is_file() or not claim(d):
            continue
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] start {family} {fold} {method} seed {seed}", flush=True)
        try:
            m = execute(family, fold, method, seed, p, root)
        except Exception as e:
            (d / "error.txt").write_text(repr(e))
            (d / ".claim").unlink(missing_ok=True)
            print(f"  FAILED {family} {fold} {method} seed {seed}: {e!r}", flush=True)
            raise
        m.update({"family": family, "fold": fold, "method": method, "seed": seed, "commit": code})
        claims.write_run(d / "result.json", m)
        print(f"[{time.strftime('%H:%M:%S')}] done {family} {fold} {method} seed {seed} in "
              f"{time.time() - t0:.0f} s: mse {m['mse']:.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# results


def _csi(m: dict, thr: float) -> tuple[float | None, list]:
    c = m.get("csi", {}).get(str(thr))
    return (c["mean"], c["per_frame"]) if c else (None, [])


def family_result(p: dict, root: Path, family: str, folds, table: dict) -> dict:
    methods = {}
    for name, (kind, _) in table.items():
        seeds = [0] if kind == "baseline" else p["seeds"]
        runs = {}
        for fold in folds:
            for s in seeds:
                f = run_dir(root, family, fold, name, s) / "result.json"
                if f.is_file():
                    runs[(fold, s)] = json.loads(f.read_text())
        if not runs:
            continue
        done_folds = sorted({f for f, _ in runs})
        per_fold = {f: float(np.mean([r["mse"] for (ff, _), r in runs.items() if ff == f])) for f in done_folds}
        # per seed: the mean over the folds that seed finished (complete seeds only are comparable)
        per_seed = []
        for s in seeds:
            vals = [runs[(f, s)]["mse"] for f in folds if (f, s) in runs]
            per_seed.append({"seed": s, "mse": float(np.mean(vals)) if vals else None, "folds": len(vals)})
        complete = [x["mse"] for x in per_seed if x["folds"] == len(folds)]
        v = {
            "mse_mean": float(np.mean([r["mse"] for r in runs.values()])),
            "mse_std": float(np.std(complete, ddof=1)) if len(complete) > 1 else None,
            "ssim_mean": float(np.mean([r["ssim"] for r in runs.values()])),
            "per_fold": per_fold, "per_seed": per_seed,
            "mse_per_lead": np.mean([r["mse_per_frame"] for r in runs.values()], 0).tolist(),
            "runs": len(runs), "folds_done": len(done_folds),
            "train_wall_s": float(np.mean([r.get("train_wall_s", 0.0) for r in runs.values()])),
        }
        if family == "radar":
            for thr in THRESHOLDS:
                vals = [_csi(r, thr) for r in runs.values()]
                key = f"{thr:g}".replace(".", "_")
                means = [m for m, _ in vals if m is not None]
                v[f"csi_{key}_mean"] = float(np.mean(means)) if means else None
                v[f"csi_{key}_per_lead"] = np.nanmean(
                    [[np.nan if x is None else x for x in pf] for _, pf in vals], 0).tolist()
                for score in ("pod", "far"):
                    sm = [r[score][str(thr)]["mean"] for r in runs.values() if r.get(score, {}).get(str(thr))]
                    sm = [x for x in sm if x is not None]
                    v[f"{score}_{key}_mean"] = float(np.mean(sm)) if sm else None
        methods[name] = v
    pers = methods.get("persistence", {}).get("per_fold", {})
    for name, v in methods.items():
        v["beats_persistence_folds"] = sum(1 for f, x in v["per_fold"].items() if f in pers and x < pers[f])
    return methods


def aggregate(p: dict, root: Path, out_json: Path, command: str, with_video: bool) -> dict:
    import torch
    radar = family_result(p, root, "radar", list(RADAR), RADAR_METHODS)
    result = {
        "commit": None, "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   "1 thread per run, 2 runs in parallel",
        "preset": p,
        "regime": (f"radar: leave-one-event-out over {len(RADAR)} events (FMI x2, MeteoSwiss x3, 40 frames "
                   f"of 5 min each), {p['size']}x{p['size']}, {p['t_in']} -> {p['frames'] - p['t_in']} "
                   f"frames, train on the other 4 events ({p['steps']} steps, batch {p['batch_size']}, "
                   f"flips/rotations/time reversal), test on every clip of the held-out event; seeds "
                   f"{p['seeds']}; MSE/frame = squared error of the log-scaled rain values "
                   "x = log10(1+R)/log10(101) summed over the valid pixels of a frame; CSI/POD/FAR on "
                   "rain rate at 0.5, 1, 5 mm/h. OPERA (15 min) and MRMS (2 min) are not used: their "
                   "time steps differ from 5 min and their readers are not part of this benchmark"),
        "methods": radar,
    }
    if with_video:
        result["video"] = {"methods": family_result(p, root, "video", list(VIDEO), VIDEO_METHODS),
                           "regime": "leave-one-clip-out over the 3 shared clips, grayscale, same model sizes"}
    runs = [json.loads(f.read_text()) for f in root.rglob("result.json")]
    commits = {r["commit"] for r in runs}
    result["commit"] = sorted(commits)[0] if len(commits) == 1 else sorted(commits)
    claims.write_json(out_json, result, runs=runs)
    out_json.with_suffix(".md").write_text(markdown(result))
    plot(result, out_json.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    methods = result["methods"]
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = matplotlib.colormaps["tab20"]  # one colour per row (the default cycle repeats after 10)
    for i, (name, v) in enumerate(methods.items()):
        style = "--" if name.startswith(("persistence", "extrapolation")) else "-"
        lead = np.arange(1, len(v["mse_per_lead"]) + 1) * 5
        kw = dict(marker="o", ms=3, label=name, color=colours(i % 20))
        ax1.plot(lead, v["mse_per_lead"], style, **kw)
        if v.get("csi_1_per_lead"):
            ax2.plot(lead, v["csi_1_per_lead"], style, **kw)
    ax1.set(xlabel="lead time (min)", ylabel="MSE/frame (log-scaled rain)", title="radar: MSE per lead time")
    ax2.set(xlabel="lead time (min)", ylabel="CSI at 1 mm/h", title="radar: CSI >= 1 mm/h per lead time")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    methods = result["methods"]
    folds = list(RADAR)
    lines = [f"# Real data: radar (leave one event out) and video\n", f"Commit `{result['commit']}`; "
             f"command `{result['command']}`; {result['machine']}.\n", result["regime"] + ".\n",
             "| method | MSE/frame (mean ± sd over seeds) | " + " | ".join(folds)
             + " | beats persistence (folds) | CSI 0.5 | CSI 1 | CSI 5 | POD 1 | FAR 1 | runs |",
             "|---|---:|" + "---:|" * len(folds) + "---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in methods.items():
        sd = f" ± {v['mse_std']:.3f}" if v.get("mse_std") is not None else ""
        lines.append(f"| {name} | {v['mse_mean']:.3f}{sd} | " + " | ".join(_f(v["per_fold"].get(f)) for f in folds)
                     + f" | {v['beats_persistence_folds']}/{len(v['per_fold'])} | {_f(v.get('csi_0_5_mean'))} | "
                       f"{_f(v.get('csi_1_mean'))} | {_f(v.get('csi_5_mean'))} | {_f(v.get('pod_1_mean'))} | "
                       f"{_f(v.get('far_1_mean'))} | {v['runs']} |")
    lines += ["", "MSE per lead time (5, 10, ... 30 min):", "",
              "| method | " + " | ".join(f"+{5 * (i + 1)} min" for i in range(6)) + " |",
              "|---|" + "---:|" * 6]
    for name, v in methods.items():
        lines.append(f"| {name} | " + " | ".join(_f(x) for x in v["mse_per_lead"]) + " |")
    if "video" in result:
        vm = result["video"]["methods"]
        lines += ["", "## Video (leave one clip out)", "", result["video"]["regime"] + ".", "",
                  "| method | MSE/frame | SSIM | " + " | ".join(VIDEO) + " |", "|---|---:|---:|" + "---:|" * len(VIDEO)]
        for name, v in vm.items():
            lines.append(f"| {name} | {v['mse_mean']:.2f} | {v['ssim_mean']:.3f} | "
                         + " | ".join(_f(v["per_fold"].get(f), 2) for f in VIDEO) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick preset (one seed, small budget)")
    ap.add_argument("--root", help="where runs go (default runs/bench-real-<preset>)")
    ap.add_argument("--json", help="results file (default benchmarks/results/real_data[_quick].json)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--aggregate", action="store_true", help="only collect finished runs")
    ap.add_argument("--no-video", action="store_true", help="radar only")
    ap.add_argument("--only", help="comma-separated methods to run")
    ap.add_argument("--worker", action="store_true", help="run jobs in this process, do not aggregate")
    args = ap.parse_args(argv)
    if not (SHARED / "radar").is_dir():
        sys.exit(f"real radar data not found at {SHARED / 'radar'} (set TRANSMEM_SHARED_DATA)")
    preset = "quick" if args.quick else "full"
    p = PRESETS[preset]
    with_video = not args.no_video and (SHARED / "video").is_dir()
    root = Path(args.root or REPO / "runs" / f"bench-real-{preset}")
    out_json = Path(args.json or HERE / "results" / ("real_data.json" if preset == "full" else "real_data_quick.json"))
    command = "python benchmarks/real_data.py" + (" --quick" if args.quick else "") + " --workers 2"
    only = set(args.only.split(",")) if args.only else None
    if args.worker or (args.workers == 1 and not args.aggregate):
        work(p, root, with_video, only)
        if args.worker:
            return 0
    elif not args.aggregate:
        claims.run_workers([__file__, "--root", str(root), "--worker"] + (["--quick"] if args.quick else [])
                           + (["--no-video"] if not with_video else []) + (["--only", args.only] if args.only else []),
                           args.workers)
    r = aggregate(p, root, out_json, command, with_video)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

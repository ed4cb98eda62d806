"""Nowcasts at the radar's own resolution, an hour ahead, against every registered reference nowcast.

    python benchmarks/nowcast.py                 # everything, resumable (each unit is its own JSON file)
    python benchmarks/nowcast.py --quick         # smoke run: a 256x256 window, 6 leads, 1 seed (minutes)
    python benchmarks/nowcast.py --parts baselines --methods sprog,anvil   # one part, some methods
    python benchmarks/nowcast.py --parts aggregate                         # write the JSON from what is done

Protocol (fixed before any result was seen):
- the five shared 5-minute events (MeteoSwiss 20150515, 20160711, 20170131; FMI 20160928, 20170509),
  read at their native 1 km grids (640x710 and 1226x760; no area-averaging), log-scaled rain
  x = log10(1 + R) / log10(101), no-data masked out of every score;
- 6 input frames, 12 leads (60 min); forecast windows start every 11 frames (3 per 40-frame
  event: 0-17, 11-28, 22-39, which cover it);
- scores per event, summed over its windows and leads: MSE per valid pixel of the log values,
  CSI at 1 and 5 mm/h (contingency counts pooled), FSS at 1 mm/h on 5, 15 and 31 km windows, and
  the MSE per lead;
- the learned rows are never trained on the event they are scored on: ``recipe:*`` rows come from
  a model pretrained on synthetic advected rain only (configs/radar_native_pretext.yaml: 128x128
  crops at a 1 km-like scale), i.e. zero-shot on every event; 3 seeds;
- the baselines are the registry's defaults for rain (transmem.baselines.default_baselines),
  each configured once as pysteps' gallery does (docs/baselines.md), kmperpixel 1, timestep 5.

The JSON (benchmarks/results/nowcast.json, or nowcast_quick.json) has the keys the README table is
made from: commit, command, machine, resolution_km, leads, events, recommended, methods{name:
{mse_mean, mse_std, csi_1_mean, csi_5_mean, fss, per_event, per_lead_mse, per_seed}}, and
paired{method: {vs, wins, t, p}} (paired t-test of per-event MSE against the best baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "radar"
EVENTS = {"mch:20150515": "mch/20150515", "mch:20160711": "mch/20160711", "mch:20170131": "mch/20170131",
          "fmi:20160928": "fmi/pgm/20160928", "fmi:20170509": "fmi/pgm/20170509"}
T_IN, LEADS, STRIDE = 6, 12, 11
THRESHOLDS = (1.0, 5.0)            # mm/h
FSS_SCALES = (5, 15, 31)           # pixels = km at 1 km
FSS_THRESHOLD = 1.0
SEEDS = (0, 1, 2)
RECOMMENDED = "recipe:selected"    # the variant the other four events pick (see recipe_variants)
PRETEXT_CONFIG = REPO / "configs" / "radar_native_pretext.yaml"
QUICK = {"window": 256, "leads": 6, "seeds": (0,), "pretext_steps": 40, "windows_per_event": 1}


# ----------------------------------------------------------------------------------------- data
def read_event(event: str, quick: bool):
    """(values float32 (T, 1, H, W) in [0, 1], valid bool (T, 1, H, W)) at the native grid."""
    from transmem.data.radar import read_radar_folder
    values, valid = read_radar_folder(SHARED / EVENTS[event], size=None, resize="none")
    values, valid = values.astype(np.float32), valid.astype(bool)
    if quick:  # the window of the field with the most rain in its first frame
        w = QUICK["window"]
        h0, w0 = values.shape[-2:]
        best = max(((i, j) for i in range(0, h0 - w + 1, w // 2) for j in range(0, w0 - w + 1, w // 2)),
                   key=lambda ij: float(values[0, 0, ij[0]:ij[0] + w, ij[1]:ij[1] + w].sum()))
        values = values[..., best[0]:best[0] + w, best[1]:best[1] + w]
        valid = valid[..., best[0]:best[0] + w, best[1]:best[1] + w]
    return np.nan_to_num(values), valid


def windows(n_frames: int, leads: int, quick: bool) -> list[int]:
    starts = list(range(0, n_frames - (T_IN + leads) + 1, STRIDE))
    return starts[:QUICK["windows_per_event"]] if quick else starts


# --------------------------------------------------------------------------------------- scores
def box_fraction(binary: torch.Tensor, valid: torch.Tensor, scale: int) -> torch.Tensor:
    """Fraction of valid pixels above the threshold in a scale x scale window (FSS' neighbourhood),
    by running sums (transmem's box_mean: O(H W) whatever the window)."""
    from transmem.models.advection import box_mean
    r = scale // 2
    num = box_mean(binary.float()[None, None], r)
    den = box_mean(valid.float()[None, None], r)
    return (num / den.clamp_min(1e-6))[0, 0]


def score_window(pred: np.ndarray, obs: np.ndarray, valid: np.ndarray) -> dict:
    """Sums over one window's leads (pred, obs, valid: (leads, H, W)); per lead where it matters."""
    from transmem.data.radar import unit_to_rain
    p, o, v = torch.from_numpy(pred), torch.from_numpy(obs), torch.from_numpy(valid)
    out = {"se": [], "n": [], "cont": {str(t): [0, 0, 0] for t in THRESHOLDS},
           "fss": {str(s): [0.0, 0.0] for s in FSS_SCALES}}
    rp, ro = torch.from_numpy(unit_to_rain(pred)), torch.from_numpy(unit_to_rain(obs))
    for k in range(p.shape[0]):
        m = v[k]
        out["se"].append(float(((p[k] - o[k])[m].double() ** 2).sum()))
        out["n"].append(int(m.sum()))
        for t in THRESHOLDS:
            f, ob = (rp[k] >= t) & m, (ro[k] >= t) & m
            c = out["cont"][str(t)]
            c[0] += int((f & ob).sum()); c[1] += int((~f & ob).sum()); c[2] += int((f & ~ob).sum())
        f, ob = (rp[k] >= FSS_THRESHOLD) & m, (ro[k] >= FSS_THRESHOLD) & m
        for s in FSS_SCALES:
            pf, po = box_fraction(f, m, s)[m], box_fraction(ob, m, s)[m]
            acc = out["fss"][str(s)]
            acc[0] += float(((pf - po) ** 2).sum()); acc[1] += float((pf ** 2).sum() + (po ** 2).sum())
    return out


def merge(scores: list[dict]) -> dict:
    out = {"se": np.sum([s["se"] for s in scores], 0).tolist(), "n": np.sum([s["n"] for s in scores], 0).tolist(),
           "cont": {t: np.sum([s["cont"][t] for s in scores], 0).tolist() for t in scores[0]["cont"]},
           "fss": {k: np.sum([s["fss"][k] for s in scores], 0).tolist() for k in scores[0]["fss"]}}
    return out


def summary(acc: dict) -> dict:
    csi = {t: (h / (h + m + f) if h + m + f else None) for t, (h, m, f) in acc["cont"].items()}
    return {"mse": sum(acc["se"]) / max(1, sum(acc["n"])),
            "per_lead_mse": [s / max(1, n) for s, n in zip(acc["se"], acc["n"])],
            "csi_1": csi[str(THRESHOLDS[0])], "csi_5": csi[str(THRESHOLDS[1])],
            "fss": {k: (1 - a / b if b else None) for k, (a, b) in acc["fss"].items()}}


# ------------------------------------------------------------------------------------ forecasters
def rain_units():
    from transmem.data import DataConfig
    from transmem.data.radar import rain_units as units
    return units(DataConfig(name="radar_mch"))


def baseline(name: str):
    from transmem.baselines import create_baseline
    return create_baseline(name, T_IN, rain_units(), kmperpixel=1.0, timestep=5.0)


def pretext_dir(work: Path, seed: int) -> Path:
    return work / "pretext" / f"seed{seed}"


def train_pretext(work: Path, seed: int, quick: bool) -> Path:
    """The zero-shot model of this seed: pretrained on synthetic advected rain only."""
    from transmem import api
    from transmem.config import load_experiment
    d = pretext_dir(work, seed)
    if (d / "model" / "card.json").is_file():
        return d / "model"
    overrides = {"train.seed": str(seed), "train.progress": "false"}
    if quick:
        overrides.update({"train.steps": str(QUICK["pretext_steps"]), "data.train_clips": "64"})
    exp = load_experiment(str(PRETEXT_CONFIG), overrides)
    api.run_train(exp, d, kind="scratch")
    return d / "model"


#: the learned variants, all made from one rollout of the model per window: alone, its equal mean
#: with a cached classical nowcast, and that mean probability-matched to the last input frame
#: (transmem.blend.match_distribution). ``recipe:selected`` is, for each event, the variant with
#: the lowest mean MSE on the *other* four events (nested leave-one-event-out: no event picks
#: its own recipe).
VARIANTS = {"recipe:model": (None, False), "recipe:blend": ("extrapolation_log", False),
            "recipe:blend+pm": ("extrapolation_log", True), "recipe:sprog_blend": ("sprog_log", False),
            "recipe:sprog_blend+pm": ("sprog_log", True)}
CACHED = ("extrapolation_log", "sprog_log")  # baselines whose forecasts the variants reuse
RECIPES = (*VARIANTS, "recipe:selected")


def forecast_path(work: Path, method: str, event: str, start: int) -> Path:
    return work / "forecasts" / method / event.replace(":", "-") / f"w{start:02d}.npy"


def recipe_variants(model_pred: np.ndarray, last: np.ndarray, cached: dict) -> dict:
    """{variant: forecast (leads, H, W)} from the model's forecast, the last input frame and the
    cached classical forecasts of the same window."""
    from transmem.blend import match_distribution
    out = {}
    for name, (other, pm) in VARIANTS.items():
        f = model_pred if other is None else 0.5 * model_pred + 0.5 * cached[other].astype(np.float32)
        if pm:
            ref = torch.from_numpy(last)
            f = np.stack([match_distribution(torch.from_numpy(np.ascontiguousarray(x)), ref).numpy() for x in f])
        out[name] = f
    return out


def unit_path(work: Path, method: str, event: str, seed: int) -> Path:
    return work / "units" / method.replace(":", "-").replace("+", "_") / event.replace(":", "-") / f"seed{seed}.json"


def run_unit(work: Path, method: str, event: str, seed: int, quick: bool, cache: dict) -> None:
    """One baseline on one event (method a baseline name), or every recipe variant of one seed on
    one event (method ``recipe``): scores per window, written as ``units/<method>/<event>/seedN.json``."""
    from transmem import api
    from transmem.files import write_json
    names = list(VARIANTS) if method == "recipe" else [method]
    paths = {m: unit_path(work, m, event, seed) for m in names}
    if all(p.is_file() for p in paths.values()) or not claims.claim(paths[names[0]].parent / f"seed{seed}"):
        return
    leads = QUICK["leads"] if quick else LEADS
    if event not in cache:
        cache.clear()
        cache[event] = read_event(event, quick)
    values, valid = cache[event]
    if method == "recipe":
        forecaster, _ = api.load_for_inference(pretext_dir(work, seed) / "model")
    else:
        forecaster = baseline(method)
    forecaster.t_in = T_IN
    scores, t0 = {m: [] for m in names}, time.time()
    for s in windows(values.shape[0], leads, quick):
        clip = torch.from_numpy(values[s:s + T_IN + leads])[None]
        with torch.inference_mode():
            pred = forecaster.rollout(clip)[0, :, 0].float().clamp(0, 1).numpy()
        obs, ok = values[s + T_IN:s + T_IN + leads, 0], valid[s + T_IN:s + T_IN + leads, 0]
        if method == "recipe":
            cached = {b: np.load(forecast_path(work, b, event, s)) for b in CACHED}
            preds = recipe_variants(pred, values[s + T_IN - 1, 0], cached)
        else:
            preds = {method: pred}
            if method in CACHED:
                fp = forecast_path(work, method, event, s)
                fp.parent.mkdir(parents=True, exist_ok=True)
                np.save(fp, pred.astype(np.float16))
        for m, p in preds.items():
            scores[m].append(score_window(p, obs, ok))
    wall = round(time.time() - t0, 1)
    for m in names:
        result = {**merge(scores[m]), "windows": len(scores[m]), "wall_s": wall, "shape": list(values.shape[-2:])}
        write_json(paths[m], result)
        print(f"[nowcast] {m} {event} seed {seed}: mse {summary(result)['mse']:.5f} ({wall} s)", flush=True)


# -------------------------------------------------------------------------------------- aggregate
def paired_t(a: list[float], b: list[float]) -> tuple[float, float | None]:
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return float("nan"), None
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))
    try:
        from scipy import stats
        return t, float(stats.t.sf(abs(t), len(d) - 1) * 2)
    except ImportError:
        return t, None


def selection(work: Path, events: list[str], seeds) -> dict | None:
    """{event: the variant with the lowest mean MSE over the other events and every seed}, or None
    while a variant's units are missing."""
    if not all(unit_path(work, v, e, s).is_file() for v in VARIANTS for e in events for s in seeds):
        return None
    mse = {(v, e): np.mean([summary(json.loads(unit_path(work, v, e, s).read_text()))["mse"] for s in seeds])
           for v in VARIANTS for e in events}
    return {e: min(VARIANTS, key=lambda v: np.mean([mse[v, o] for o in events if o != e])) for e in events}


def aggregate(work: Path, methods: list[str], events: list[str], seeds, quick: bool, command: str) -> dict:
    out = {}
    chosen = selection(work, events, seeds)
    for m in methods:
        ss = seeds if m.startswith("recipe:") else (0,)
        per_seed, per_event, fss_acc, leads_acc = {}, {}, [], []
        if m == "recipe:selected":
            if chosen is None:
                continue
            path = lambda e, s: unit_path(work, chosen[e], e, s)  # noqa: E731
        else:
            path = lambda e, s, m=m: unit_path(work, m, e, s)  # noqa: E731
        if not all(path(e, s).is_file() for e in events for s in ss):
            continue
        for s in ss:
            units = {e: json.loads(path(e, s).read_text()) for e in events}
            sums = {e: summary(u) for e, u in units.items()}
            per_seed[str(s)] = {"mse": float(np.mean([v["mse"] for v in sums.values()])),
                                "csi_1": float(np.mean([v["csi_1"] or 0 for v in sums.values()])),
                                "csi_5": float(np.mean([v["csi_5"] or 0 for v in sums.values()]))}
            for e, v in sums.items():
                per_event.setdefault(e, []).append(v)
            pooled = summary(merge(list(units.values())))
            fss_acc.append(pooled["fss"])
            leads_acc.append(pooled["per_lead_mse"])
        mses = [v["mse"] for v in per_seed.values()]
        out[m] = {"mse_mean": float(np.mean(mses)), "mse_std": float(np.std(mses)),
                  "csi_1_mean": float(np.mean([v["csi_1"] for v in per_seed.values()])),
                  "csi_5_mean": float(np.mean([v["csi_5"] for v in per_seed.values()])),
                  "fss": {k: float(np.mean([f[k] for f in fss_acc])) for k in fss_acc[0]},
                  "per_event": {e: {k: float(np.mean([v[k] or 0 for v in vs])) for k in ("mse", "csi_1", "csi_5")}
                                for e, vs in per_event.items()},
                  "per_lead_mse": np.mean(leads_acc, 0).tolist(), "per_seed": per_seed}
    baselines = [m for m in out if not m.startswith("recipe:")]
    paired = {}
    if baselines:
        best = min(baselines, key=lambda m: out[m]["mse_mean"])
        for m in out:
            if m == best:
                continue
            a = [out[m]["per_event"][e]["mse"] for e in events]
            b = [out[best]["per_event"][e]["mse"] for e in events]
            t, p = paired_t(a, b)
            paired[m] = {"vs": best, "wins": int(sum(x < y for x, y in zip(a, b))), "of": len(events),
                         "mean_diff": float(np.mean(np.subtract(a, b))), "t": t, "p": p}
            for score in ("csi_1", "csi_5"):  # against the baseline best in that score
                top = max(baselines, key=lambda b_: out[b_][f"{score}_mean"])
                if m != top:
                    paired[m][f"{score}_vs"] = top
                    paired[m][f"{score}_wins"] = int(sum(out[m]["per_event"][e][score] > out[top]["per_event"][e][score]
                                                         for e in events))
    return {"commit": claims.commit(REPO, ["src", "benchmarks/nowcast.py", "configs/radar_native_pretext.yaml"]),
            "command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "resolution_km": 1.0, "leads": QUICK["leads"] if quick else LEADS, "lead_minutes": 5,
            "t_in": T_IN, "events": events, "seeds": list(seeds), "recommended": RECOMMENDED,
            "quick": quick, "methods": out, "paired": paired, "selected": chosen,
            "scores": "mse: per valid pixel of log10(1+R)/log10(101); csi at 1 and 5 mm/h; fss at 1 mm/h, "
                      "windows in km"}


def markdown(result: dict) -> str:
    """The README's tables: every row with its scores, then per-event MSE with wins and the paired test."""
    methods, events = result["methods"], result["events"]
    rows = sorted(methods.items(), key=lambda kv: kv[1]["mse_mean"])
    best = min((m for m in methods if not m.startswith("recipe:")), key=lambda m: methods[m]["mse_mean"])
    scales = list(rows[0][1]["fss"])
    lines = ["| method | MSE ×1e3 (± seeds) | CSI 1 mm/h | CSI 5 mm/h | " + " | ".join(f"FSS {s} km" for s in scales)
             + " | MSE +5 / +30 / +60 min ×1e3 |",
             "|---|---:|---:|---:|" + "---:|" * len(scales) + "---:|"]
    for m, r in rows:
        name = f"**{m}**" if m == result["recommended"] else m
        lead = r["per_lead_mse"]
        picks = [lead[0], lead[min(5, len(lead) - 1)], lead[-1]]
        lines.append(f"| {name} | {1e3 * r['mse_mean']:.3f} ± {1e3 * r['mse_std']:.3f} | {r['csi_1_mean']:.3f} | "
                     f"{r['csi_5_mean']:.3f} | " + " | ".join(f"{r['fss'][s]:.3f}" for s in scales)
                     + " | " + " / ".join(f"{1e3 * x:.2f}" for x in picks) + " |")
    lines += ["", f"Per event (MSE ×1e3; CSI at 1 / 5 mm/h), against the best baseline by mean MSE, `{best}`:", "",
              "| event | " + " | ".join(m for m, _ in rows if m.startswith("recipe:") or m == best) + " |",
              "|---|" + "---:|" * sum(1 for m, _ in rows if m.startswith("recipe:") or m == best)]
    for e in events:
        cells = []
        for m, r in rows:
            if m.startswith("recipe:") or m == best:
                v = r["per_event"][e]
                cells.append(f"{1e3 * v['mse']:.3f} ({v['csi_1']:.3f} / {v['csi_5']:.3f})")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "Paired across the events (per-event MSE against the best baseline; t-test, two-sided):", "",
              "| method | events won (MSE) | mean difference ×1e3 | t | p | events won, CSI 1 mm/h | events won, CSI 5 mm/h |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m, pr in sorted(result["paired"].items(), key=lambda kv: kv[1]["mean_diff"]):
        p = "–" if pr["p"] is None else f"{pr['p']:.3f}"
        csi = [f"{pr[k + '_wins']} (vs {pr[k + '_vs']})" if k + "_wins" in pr else "–" for k in ("csi_1", "csi_5")]
        lines.append(f"| {m} | {pr['wins']} of {pr['of']} | {1e3 * pr['mean_diff']:+.3f} | {pr['t']:.2f} | {p} | "
                     + " | ".join(csi) + " |")
    if result.get("selected"):
        lines += ["", "recipe:selected picked, per event, from the other events: "
                  + ", ".join(f"{e}: {v}" for e, v in result["selected"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="baselines,pretext,recipes,aggregate")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the rows")
    ap.add_argument("--work", default=None, help="where the units go (default runs/nowcast[_quick])")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--units-commit", default=None,
                    help="aggregate: the commit the units were computed at, when it is not this one (recorded)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transmem.baselines import default_baselines
    quick = args.quick
    work = Path(args.work or REPO / "runs" / ("nowcast_quick" if quick else "nowcast"))
    events = [e for e in EVENTS if (SHARED / EVENTS[e]).is_dir()]
    if not events:
        print(f"no shared radar events under {SHARED}", file=sys.stderr)
        return 2
    seeds = QUICK["seeds"] if quick else SEEDS
    all_methods = [*default_baselines(rain_units()), *RECIPES]  # (the recipes need the CACHED baselines)
    methods = args.methods.split(",") if args.methods else all_methods
    parts = args.parts.split(",")
    cache: dict = {}
    if "baselines" in parts:
        for e in events:
            for m in methods:
                if not m.startswith("recipe:"):
                    run_unit(work, m, e, 0, quick, cache)
    if "pretext" in parts:
        for s in seeds:
            train_pretext(work, s, quick)
    if "recipes" in parts:
        for e in events:
            ready = all(unit_path(work, b, e, 0).is_file() for b in CACHED)
            for s in seeds:
                if not ready or not (pretext_dir(work, s) / "model" / "card.json").is_file():
                    print(f"[nowcast] recipe {e} seed {s}: waits for the cached baselines or the model", flush=True)
                    continue
                run_unit(work, "recipe", e, s, quick, cache)
    if "aggregate" in parts:
        command = "python benchmarks/nowcast.py" + (" --quick" if quick else "")
        result = aggregate(work, all_methods, events, seeds, quick, command)
        if args.units_commit:
            result["commit"] = [f"{args.units_commit} (units: models, baselines, recipes)", f"{result['commit']} (aggregate)"]
        out = REPO / "benchmarks" / "results" / ("nowcast_quick.json" if quick else "nowcast.json")
        claims.write_json(out, result)
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
        for m, r in sorted(result["methods"].items(), key=lambda kv: kv[1]["mse_mean"]):
            print(f"{m:20s} mse {r['mse_mean']:.5f}±{r['mse_std']:.5f} csi1 {r['csi_1_mean']:.3f} "
                  f"csi5 {r['csi_5_mean']:.3f} fss {r['fss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

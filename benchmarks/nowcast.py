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
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402
from claims import paired_t  # noqa: E402
from transmem.models.mixture import StackGate, banded as banded_areas  # noqa: E402
from transmem.transfer.mixture import count_areas, pick_areas as pick_best_areas  # noqa: E402

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
QUICK = {"window": 256, "leads": 6, "seeds": (0,), "pretext_steps": 40, "windows_per_event": 1, "stack_steps": 20}


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
#: (transmem.blend.match_distribution). ``recipe:selected`` is, for each event, the learned
#: variant (these and ``recipe:stack*``) picked on the *other* four events (see selection).
VARIANTS = {"recipe:model": (None, False), "recipe:blend": ("extrapolation_log", False),
            "recipe:blend+pm": ("extrapolation_log", True), "recipe:sprog_blend": ("sprog_log", False),
            "recipe:sprog_blend+pm": ("sprog_log", True)}
CACHED = ("extrapolation_log", "sprog_log")  # baselines whose forecasts the variants reuse


def forecast_path(work: Path, method: str, event: str, start: int) -> Path:
    return work / "forecasts" / method / event.replace(":", "-") / f"w{start:02d}.npy"


def recipe_variants(model_pred: np.ndarray, last: np.ndarray, cached: dict) -> dict:
    """{variant: forecast (leads, H, W)} from the model's forecast, the last input frame and the
    cached classical forecasts of the same window."""
    out = {}
    for name, (other, pm) in VARIANTS.items():
        f = model_pred if other is None else 0.5 * model_pred + 0.5 * cached[other].astype(np.float32)
        out[name] = probability_matched(f, last) if pm else f
    return out


def probability_matched(forecast: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Each lead's values replaced, rank for rank, by the last input frame's (S-PROG's way of
    keeping the observed intensity distribution; transmem.blend.match_distribution)."""
    from transmem.blend import match_distribution
    ref = torch.from_numpy(np.asarray(last, dtype=np.float32))
    return np.stack([match_distribution(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), ref).numpy()
                     for x in forecast])


_MODELS: dict = {}


def model_forecast(work: Path, event: str, seed: int, start: int, values: np.ndarray, leads: int) -> np.ndarray:
    """The zero-shot model's forecast (leads, H, W) of one window, float16, cached on disk (the
    learned combination trains on the other events' forecasts)."""
    from transmem import api
    path = forecast_path(work, f"model-seed{seed}", event, start)
    if path.is_file():
        return np.load(path)
    if seed not in _MODELS:
        _MODELS.clear()
        _MODELS[seed] = api.load_for_inference(pretext_dir(work, seed) / "model")[0]
    forecaster = _MODELS[seed]
    forecaster.t_in = T_IN
    clip = torch.from_numpy(values[start:start + T_IN + leads])[None]
    with torch.inference_mode():
        pred = forecaster.rollout(clip)[0, :, 0].float().clamp(0, 1).numpy().astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pred)
    return pred


def unit_path(work: Path, method: str, event: str, seed: int) -> Path:
    return work / "units" / method.replace(":", "-").replace("+", "_") / event.replace(":", "-") / f"seed{seed}.json"


def run_unit(work: Path, method: str, event: str, seed: int, quick: bool, cache: dict) -> None:
    """One baseline on one event (method a baseline name), or every recipe variant of one seed on
    one event (method ``recipe``): scores per window, written as ``units/<method>/<event>/seedN.json``."""
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
    forecaster = None if method == "recipe" else baseline(method)
    if forecaster is not None:
        forecaster.t_in = T_IN
    scores, t0 = {m: [] for m in names}, time.time()
    for s in windows(values.shape[0], leads, quick):
        if method == "recipe":
            pred = model_forecast(work, event, seed, s, values, leads).astype(np.float32)
        else:
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


# ----------------------------------------------------------------------- learned combination (stack)
#: ``recipe:stack*``: a small CNN that learns, per pixel and lead, how to weigh the model's,
#: sprog_log's and extrapolation_log's forecasts (softmax weights) plus a bounded correction. It
#: is trained, for each event, on the *other* events' windows (leave one event out), with the
#: model of the same seed, and starts as recipe:sprog_blend (the equal mean of the model and
#: sprog_log). ``+csi`` adds a soft CSI at 1 and 5 mm/h to the loss, so that the combination is
#: not pushed towards smoothness alone. Settings fixed before the first run, never per event.
STACK_MEMBERS = ("model", "sprog_log", "extrapolation_log")
#: ``+pm``: the same forecast probability-matched to the last input frame, as the other variants.
STACK_FITS = {"recipe:stack": 0.0, "recipe:stack+csi": 1e-2}  # name -> weight of the soft-CSI loss
STACK_VARIANTS = [v for name in STACK_FITS for v in (name, name + "+pm")]
STACK = {"steps": 300, "batch": 12, "crop": 128, "lr": 3e-3, "tau": 0.02, "wet_crops": 0.8, "width": 16}
#: ``+areas``: a combination's values kept inside rain areas (>= 1, >= 5 mm/h) drawn by
#: calibrated thresholds: per threshold, the field (area_fields: sprog_log, or its mean with the
#: model) and the level it is drawn at (a fixed grid) whose areas had the best mean CSI on the
#: *other* four events. A smooth forecast's area above 5 mm/h shrinks; drawing it at a lower level
#: restores it, and the values outside the areas' edges stay the combination's. Added after the
#: stack's first results on these events (it lost CSI at 5 mm/h); the grid was fixed before its
#: first run. {row: the combination whose values it keeps}
AREA_VARIANTS = {"recipe:stack+areas": "recipe:stack", "recipe:stack+csi+areas": "recipe:stack+csi"}
AREA_LEVELS = {1.0: (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4), 5.0: (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)}
LEARNED = (*VARIANTS, *STACK_VARIANTS, *AREA_VARIANTS)
RECIPES = (*LEARNED, "recipe:selected")


class Combiner(StackGate):
    """The product's stack gate (``transfer --mode mixture --gating stack``) over STACK_MEMBERS, in
    this benchmark's layout: members (N, M, H, W), the last observed frame (N, 1, H, W) and the
    lead as a fraction of the horizon (N,) -> the forecast (N, 1, H, W) in [0, 1]. It starts as
    the equal mean of the model and sprog_log, with nearly no weight on the rest."""

    def __init__(self):
        super().__init__(len(STACK_MEMBERS), 1, STACK["width"], start=[0.0, 0.0] + [-4.0] * (len(STACK_MEMBERS) - 2))

    def forward(self, members, last, lead):
        return super().forward(members[:, :, None], last, lead)


def banded(value: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """The forecast ``value`` (N, 1, H, W) kept inside the rain areas ``reach`` (N, K, H, W, bool:
    the rain reaches THRESHOLDS[k]), by the product's :func:`transmem.models.mixture.banded`."""
    return banded_areas(value, reach[:, :, None], _levels())


def _levels() -> list[float]:
    """THRESHOLDS (mm/h) on the forecasts' log scale."""
    from transmem.data.radar import rain_to_unit
    return [float(rain_to_unit(t)) for t in THRESHOLDS]


def soft_csi_loss(pred, obs, valid, tau: float):
    """Sum over the thresholds of 1 - CSI, with the forecast's exceedance softened by a sigmoid of
    width ``tau`` (log units) so that its gradient reaches the combination."""
    loss = pred.new_zeros(())
    for u in _levels():
        p, o = torch.sigmoid((pred - u) / tau) * valid, (obs >= u).float() * valid
        hits = (p * o).sum()
        loss = loss + 1 - hits / (p.sum() + o.sum() - hits + 1e-6)
    return loss


def stack_inputs(work: Path, event: str, seed: int, quick: bool, cache: dict) -> list[dict]:
    """Per window: members (leads, M, H, W) float16, last (H, W), obs and valid (leads, H, W)."""
    leads = QUICK["leads"] if quick else LEADS
    if event not in cache:
        cache.clear()
        cache[event] = read_event(event, quick)
    values, valid = cache[event]
    out = []
    for s in windows(values.shape[0], leads, quick):
        members = [model_forecast(work, event, seed, s, values, leads)]
        members += [np.load(forecast_path(work, b, event, s)) for b in STACK_MEMBERS[1:]]
        out.append({"members": np.stack(members, 1), "last": values[s + T_IN - 1, 0].astype(np.float16),
                    "obs": values[s + T_IN:s + T_IN + leads, 0].astype(np.float16),
                    "valid": valid[s + T_IN:s + T_IN + leads, 0]})
    return out


def train_on_crops(net: torch.nn.Module, loss_fn, train: list[dict], seed: int, steps: int) -> torch.nn.Module:
    """Adam on random crops of the training windows' leads; most crops centred on observed rain
    (a dry crop teaches nothing about where rain goes). ``loss_fn(net_out, obs, valid)``."""
    g = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=STACK["lr"])
    c, wet_u = STACK["crop"], _levels()[0]
    for _ in range(steps):
        batch = []
        for _ in range(STACK["batch"]):
            w = train[g.integers(len(train))]
            lead = int(g.integers(w["obs"].shape[0]))
            H, W = w["obs"].shape[-2:]
            wet = np.flatnonzero(w["obs"][lead] >= wet_u) if g.random() < STACK["wet_crops"] else []
            if len(wet):
                i, j = divmod(int(wet[g.integers(len(wet))]), W)
                top, left = min(max(i - c // 2, 0), H - c), min(max(j - c // 2, 0), W - c)
            else:
                top, left = int(g.integers(H - c + 1)), int(g.integers(W - c + 1))
            sl = (slice(top, top + c), slice(left, left + c))
            batch.append((w["members"][lead][(slice(None), *sl)], w["last"][sl], w["obs"][lead][sl],
                          w["valid"][lead][sl], (lead + 1) / w["obs"].shape[0]))
        members, last, obs, valid = (torch.from_numpy(np.stack([b[k] for b in batch])).float() for k in range(4))
        last, obs, valid, lead = last[:, None], obs[:, None], valid[:, None], torch.tensor([b[4] for b in batch])
        loss = loss_fn(net(members, last, lead), obs, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def fit_combiner(train: list[dict], csi_weight: float, seed: int, steps: int) -> Combiner:
    """The combination: MSE, plus ``csi_weight`` times the soft CSI."""
    def loss(pred, obs, valid):
        mse = ((pred - obs) ** 2 * valid).sum() / valid.sum().clamp_min(1)
        return mse + csi_weight * soft_csi_loss(pred, obs, valid, STACK["tau"]) if csi_weight else mse
    torch.manual_seed(seed)
    return train_on_crops(Combiner(), loss, train, seed, steps)


def on_window(net: torch.nn.Module, w: dict) -> torch.Tensor:
    """A learned row's net on every lead of one whole window: (leads, channels, H, W)."""
    leads = w["obs"].shape[0]
    with torch.inference_mode():
        return net(torch.from_numpy(w["members"]).float(),
                   torch.from_numpy(w["last"]).float()[None, None].expand(leads, 1, -1, -1),
                   torch.arange(1, leads + 1) / leads)


def run_stack(work: Path, event: str, seed: int, events: list[str], quick: bool, cache: dict) -> None:
    """Every recipe:stack variant of one seed, trained on the other events and scored on ``event``
    (the combiner's weights are kept beside the units, so that a later variant reuses them)."""
    from transmem.files import write_json
    train = test = None
    for name, csi_weight in STACK_FITS.items():
        paths = {m: unit_path(work, m, event, seed) for m in (name, name + "+pm")}
        if all(p.is_file() for p in paths.values()) or not claims.claim(paths[name].parent / f"seed{seed}"):
            continue
        if test is None:
            train = [w for o in events if o != event for w in stack_inputs(work, o, seed, quick, cache)]
            test = stack_inputs(work, event, seed, quick, cache)
        t0, weights = time.time(), paths[name].with_suffix(".pt")
        if weights.is_file():
            net = Combiner()
            net.load_state_dict(torch.load(weights, weights_only=True))
            net.eval()
        else:
            net = fit_combiner(train, csi_weight, seed, QUICK["stack_steps"] if quick else STACK["steps"])
            torch.save(net.state_dict(), weights)
        scores = {m: [] for m in paths}
        for w in test:
            pred = on_window(net, w)[:, 0].numpy()
            obs = w["obs"].astype(np.float32)
            scores[name].append(score_window(pred, obs, w["valid"]))
            scores[name + "+pm"].append(score_window(probability_matched(pred, w["last"]), obs, w["valid"]))
        for m, path in paths.items():
            result = {**merge(scores[m]), "windows": len(scores[m]), "wall_s": round(time.time() - t0, 1),
                      "trained_on": [o for o in events if o != event],
                      "settings": {**STACK, "csi_weight": csi_weight, "quick": quick}}
            write_json(path, result)
            r = summary(result)
            print(f"[nowcast] {m} {event} seed {seed}: mse {r['mse']:.5f} csi1 {r['csi_1']:.3f} "
                  f"csi5 {r['csi_5']:.3f} ({result['wall_s']} s)", flush=True)


def area_fields(work: Path, event: str, seed: int, start: int, values: np.ndarray, leads: int) -> dict:
    """The fields rain areas may be drawn from, (leads, H, W) each: sprog_log, and its equal mean
    with the model of this seed (recipe:sprog_blend)."""
    sprog = np.load(forecast_path(work, "sprog_log", event, start)).astype(np.float32)
    model = model_forecast(work, event, seed, start, values, leads).astype(np.float32)
    return {"sprog_log": sprog, "sprog_blend": 0.5 * model + 0.5 * sprog}


def area_counts(work: Path, event: str, seed: int, quick: bool, cache: dict) -> dict:
    """{"source|threshold|level": [hits, misses, false alarms]} of every candidate area on one
    event (all windows and leads), cached beside the units."""
    from transmem.data.radar import rain_to_unit
    from transmem.files import write_json
    path = unit_path(work, "areas", event, seed)
    if path.is_file():
        return json.loads(path.read_text())
    leads = QUICK["leads"] if quick else LEADS
    if event not in cache:
        cache.clear()
        cache[event] = read_event(event, quick)
    values, valid = cache[event]
    out: dict = {}
    for s in windows(values.shape[0], leads, quick):
        obs, ok = values[s + T_IN:s + T_IN + leads, 0], valid[s + T_IN:s + T_IN + leads, 0]
        count_areas(area_fields(work, event, seed, s, values, leads), obs, ok, AREA_LEVELS, rain_to_unit, out)
    write_json(path, out)
    return out


def pick_areas(counts: dict, others: list[str]) -> dict:
    """{threshold: (source, level)} with the best mean CSI over the ``others`` events."""
    return pick_best_areas([counts[o] for o in others])


def run_areas(work: Path, event: str, seed: int, events: list[str], quick: bool, cache: dict) -> None:
    """The recipe:*+areas rows of one seed: the combinations of recipe:stack (trained on the other
    events) kept inside the rain areas picked on the other events (AREA_LEVELS)."""
    from transmem.data.radar import rain_to_unit
    from transmem.files import write_json
    paths = {m: unit_path(work, m, event, seed) for m in AREA_VARIANTS}
    weights = {m: unit_path(work, v, event, seed).with_suffix(".pt") for m, v in AREA_VARIANTS.items()}
    if all(p.is_file() for p in paths.values()):
        return
    if not all(w.is_file() for w in weights.values()):
        print(f"[nowcast] areas {event} seed {seed}: waits for the recipe:stack weights", flush=True)
        return
    first = next(iter(paths.values()))
    if not claims.claim(first.parent / f"seed{seed}"):
        return
    t0 = time.time()
    counts = {e: area_counts(work, e, seed, quick, cache) for e in events}
    picks = pick_areas(counts, [o for o in events if o != event])
    combiners = {}
    for m, w in weights.items():
        combiners[m] = Combiner()
        combiners[m].load_state_dict(torch.load(w, weights_only=True))
        combiners[m].eval()
    leads = QUICK["leads"] if quick else LEADS
    test = stack_inputs(work, event, seed, quick, cache)  # (reads the event into the cache)
    values = cache[event][0]
    scores = {m: [] for m in paths}
    for w, s in zip(test, windows(values.shape[0], leads, quick)):
        fields = area_fields(work, event, seed, s, values, leads)
        reach = torch.from_numpy(np.stack([fields[src] >= rain_to_unit(level) for src, level in picks.values()], 1))
        obs = w["obs"].astype(np.float32)
        for m, net in combiners.items():
            scores[m].append(score_window(banded(on_window(net, w), reach)[:, 0].numpy(), obs, w["valid"]))
    for m, path in paths.items():
        result = {**merge(scores[m]), "windows": len(scores[m]), "wall_s": round(time.time() - t0, 1),
                  "trained_on": [o for o in events if o != event],
                  "areas": {str(t): {"source": src, "level_mm_h": level} for t, (src, level) in picks.items()},
                  "settings": {**STACK, "quick": quick}}
        write_json(path, result)
        r = summary(result)
        print(f"[nowcast] {m} {event} seed {seed}: mse {r['mse']:.5f} csi1 {r['csi_1']:.3f} "
              f"csi5 {r['csi_5']:.3f} areas {result['areas']} ({result['wall_s']} s)", flush=True)


# -------------------------------------------------------------------------------------- aggregate
def selection(work: Path, events: list[str], seeds, baselines: list[str]) -> dict | None:
    """{event: the learned variant picked on the other events}, or None while a unit is missing.

    The issue's bar is to beat the best baseline in MSE *and* in CSI at 1 and 5 mm/h, so a variant's
    margin on a set of events is its worst relative lead over the baseline best in each score
    (lower MSE, higher CSI), and each event gets the variant with the largest margin on the other
    four (nested leave-one-event-out: no event picks its own recipe)."""
    learned = list(LEARNED)
    if not all(unit_path(work, v, e, s).is_file() for v in learned for e in events for s in seeds) or \
            not all(unit_path(work, b, e, 0).is_file() for b in baselines for e in events):
        return None
    def scores(m, e, ss):  # noqa: E306
        sums = [summary(json.loads(unit_path(work, m, e, s).read_text())) for s in ss]
        return np.array([np.mean([x[k] or 0 for x in sums]) for k in ("mse", "csi_1", "csi_5")])
    table = {(m, e): scores(m, e, seeds if m in learned else (0,)) for m in [*learned, *baselines] for e in events}

    def margin(v, others):
        mean = {m: np.mean([table[m, o] for o in others], 0) for m in [*learned, *baselines]}
        best_mse = min(mean[b][0] for b in baselines)
        best_csi = [max(mean[b][k] for b in baselines) for k in (1, 2)]
        return min((best_mse - mean[v][0]) / best_mse, *((mean[v][k] - c) / c for k, c in zip((1, 2), best_csi)))
    return {e: max(learned, key=lambda v: margin(v, [o for o in events if o != e])) for e in events}


def aggregate(work: Path, methods: list[str], events: list[str], seeds, quick: bool, command: str) -> dict:
    out = {}
    chosen = selection(work, events, seeds, [m for m in methods if not m.startswith("recipe:")])
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
                    a = [out[m]["per_event"][e][score] for e in events]
                    b = [out[top]["per_event"][e][score] for e in events]
                    t, p = paired_t(a, b)
                    paired[m].update({f"{score}_vs": top, f"{score}_wins": int(sum(x > y for x, y in zip(a, b))),
                                      f"{score}_mean_diff": float(np.mean(np.subtract(a, b))), f"{score}_t": t,
                                      f"{score}_p": p})
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
              "| method | events won (MSE) | mean difference ×1e3 | t | p | CSI 1 mm/h: events won, difference, p "
              "| CSI 5 mm/h: events won, difference, p |",
              "|---|---:|---:|---:|---:|---:|---:|"]

    def pval(p):
        return "–" if p is None else f"{p:.3f}"
    for m, pr in sorted(result["paired"].items(), key=lambda kv: kv[1]["mean_diff"]):
        p = pval(pr["p"])
        csi = [f"{pr[k + '_wins']} (vs {pr[k + '_vs']}), {pr[k + '_mean_diff']:+.4f}, p {pval(pr[k + '_p'])}"
               if k + "_wins" in pr else "–" for k in ("csi_1", "csi_5")]
        lines.append(f"| {m} | {pr['wins']} of {pr['of']} | {1e3 * pr['mean_diff']:+.3f} | {pr['t']:.2f} | {p} | "
                     + " | ".join(csi) + " |")
    if result.get("selected"):
        lines += ["", "recipe:selected picked, per event, from the other events: "
                  + ", ".join(f"{e}: {v}" for e, v in result["selected"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="baselines,pretext,recipes,stack,areas,aggregate")
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
    if "stack" in parts:
        for s in seeds:
            for e in events:
                run_stack(work, e, s, events, quick, cache)
    if "areas" in parts:
        for s in seeds:
            for e in events:
                run_areas(work, e, s, events, quick, cache)
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

#!/usr/bin/env python
"""Speed and memory of the backbones and the TMU on this machine: a resumable benchmark.

    python benchmarks/speed.py                     # every part not yet in results/speed.json
    python benchmarks/speed.py --parts table/2x32 teachers     # only these parts
    python benchmarks/speed.py --list              # the parts and whether they are done
    python benchmarks/speed.py --redo size         # measure a part again
    python benchmarks/speed.py --plot              # PNG curves and the Markdown table from the JSON
    python benchmarks/speed.py --quick             # tiny sizes, few steps: a smoke test
                                                   #   (results/speed_quick.json)

Workload (unless a part says otherwise): batch 8, 10 -> 10 frames of 64x64x1, patch 4, 5x5
filters, random weights and frames, a scheduled-sampling mask half way through its decay.
Variants that are compared are timed in one process, interleaved (one step of each per round),
so that load from other jobs hits them alike; numbers are medians over the timed rounds.
Peak memory is measured per variant in a fresh subprocess. Each part is saved as soon as it is
done, with the load average before and after it, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import claims  # noqa: E402

import torch  # noqa: E402

from transmem.bench import (BenchSpec, Workload, interleave, lightning_overhead,  # noqa: E402
                            load_average, measure_peak, median, peak_from_times, peak_probes)

# budgets: (warm-up rounds, timed rounds). 4x64 steps take seconds each on 2 cores.
# The 2x32 table takes 30 rounds: its TMU/backbone ratio sits near the 1.10 target, and two
# runs of 10 rounds gave 1.075 and 1.109.
FULL = {"table": (3, 30), "table_big": (2, 10), "curve": (1, 6), "settings": (1, 5), "light": (2, 10)}
QUICK = {"table": (1, 2), "table_big": (1, 2), "curve": (1, 2), "settings": (1, 2), "light": (1, 2)}
SIZES_FULL = {"2x32": dict(layers=2, hidden=32), "4x64": dict(layers=4, hidden=64)}
SIZES_QUICK = {"2x32": dict(layers=1, hidden=8, size=32, batch=2, frames=6),
               "4x64": dict(layers=2, hidden=8, size=32, batch=2, frames=6)}


class Ctx:
    def __init__(self, quick: bool, threads: int):
        self.quick = quick
        self.threads = threads
        self.budget = QUICK if quick else FULL
        self.sizes = SIZES_QUICK if quick else SIZES_FULL
        self.curve_base = SIZES_QUICK["2x32"] if quick else SIZES_FULL["2x32"]


# ---------------------------------------------------------------------------------------------
# measuring


def group(variants: dict[str, tuple[dict, str]], warmup: int, steps: int,
          tweak: dict | None = None, probe: bool = False, quick: bool = False) -> dict:
    """Time ``variants`` {name: (BenchSpec kwargs, kind)} interleaved; kind is train | infer |
    bank (the teachers' pass of an uncached TMU step) | teachers (N full teacher rollouts).
    Variants with equal specs share one workload. FLOPs are counted once per variant, untimed."""
    work: dict[str, Workload] = {}
    tasks, owner = {}, {}
    for name, (kw, kind) in variants.items():
        key = json.dumps(kw, sort_keys=True)
        if key not in work:
            work[key] = Workload(BenchSpec(**kw))
        w = work[key]
        if tweak and name in tweak:
            tweak[name](w)
        fn = {"train": w.train_step, "infer": w.infer_step, "bank": w.bank_step,
              "teachers": w.teacher_infer_step}[kind]
        if tweak and name in tweak and getattr(w, "wrap", None):
            fn = w.wrap(fn)
        tasks[name], owner[name] = fn, (w, kind)
    probes = peak_probes(quick) if probe else {}
    load0, t0 = load_average(), time.time()
    times = interleave({**tasks, **{k: fn for k, (fn, _) in probes.items()}}, warmup, steps)
    peak = peak_from_times(probes, times) if probes else None
    for k in probes:
        times.pop(k)
    out = {"variants": {}, "warmup": warmup, "steps": steps, "load_avg_before": load0,
           "load_avg_after": load_average(), "wall_s": round(time.time() - t0, 1),
           "threads": torch.get_num_threads()}
    if peak:
        out["peak"] = peak
    for name, ms in times.items():
        w, kind = owner[name]
        med = median(ms)
        rec = {"ms": round(med, 2), "ms_all": [round(x, 1) for x in ms], "kind": kind,
               "spec": variants[name][0], "params": w.params,
               "seq_per_s": round(w.spec.batch / (med / 1e3), 3)}
        if kind in ("train", "infer", "bank") and not (tweak and name in tweak):
            gflop = w.count_flops(kind) / 1e9
            rec["gflop"] = round(gflop, 3)
            rec["gflops"] = round(gflop / (med / 1e3), 2)
        out["variants"][name] = rec
    return out


def memory(kw: dict, kind: str, steps: int) -> dict:
    """Peak memory of one variant in a fresh Python process."""
    code = ("import json, sys, torch; from transmem.bench import BenchSpec, memory_probe; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"print(json.dumps(memory_probe(BenchSpec(**{kw!r}), {kind!r}, {steps})))")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"memory probe failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tmu(kw: dict, n: int = 2, cached: bool = False) -> dict:
    return {**kw, "model": "tmu", "teachers": n, "cached_bank": cached}


# ---------------------------------------------------------------------------------------------
# parts


def part_peak(ctx: Ctx) -> dict:
    probes = [measure_peak(quick=ctx.quick) for _ in range(1 if ctx.quick else 3)]
    return {"probes": probes, "peak_gflops": max(p["peak_gflops"] for p in probes),
            "load_avg": load_average(), "threads": torch.get_num_threads()}


def table_variants(kw: dict, which: str) -> dict:
    v = {}
    if which in ("all", "train"):
        v.update({"convlstm/train": (kw, "train"),
                  "tmu2_cached/train": (tmu(kw, 2, True), "train"),
                  "tmu2_uncached/train": (tmu(kw, 2, False), "train")})
    if which in ("all", "infer"):
        v.update({"convlstm/infer": (kw, "infer"),
                  "tmu2/infer": (tmu(kw, 2, True), "infer"),
                  "bank2/teacher_pass": (tmu(kw, 2, False), "bank"),
                  "teachers2/full_infer": (tmu(kw, 2, False), "teachers"),
                  "predrnn/infer": ({**kw, "model": "predrnn"}, "infer")})
    if which in ("all", "predrnn"):
        v["predrnn/train"] = ({**kw, "model": "predrnn"}, "train")
        if which == "predrnn":  # a reference shared with the other groups
            v["convlstm/train"] = (kw, "train")
    return v


def part_table(ctx: Ctx, size: str, which: str) -> dict:
    kw = dict(ctx.sizes[size])
    warm, steps = ctx.budget["table" if size == "2x32" else "table_big"]
    return group(table_variants(kw, which), warm, steps, probe=which != "infer", quick=ctx.quick)


def part_memory(ctx: Ctx, size: str) -> dict:
    kw = dict(ctx.sizes[size])
    steps = 2 if ctx.quick else 3
    out = {"steps": steps, "load_avg": load_average()}
    variants = {"convlstm/train": (kw, "train"),
                "tmu2_cached/train": (tmu(kw, 2, True), "train"),
                "tmu2_uncached/train": (tmu(kw, 2, False), "train"),
                "predrnn/train": ({**kw, "model": "predrnn"}, "train"),
                "convlstm/infer": (kw, "infer"),
                "tmu2/infer": (tmu(kw, 2, True), "infer")}
    if ctx.quick:  # each probe is a fresh interpreter: keep the smoke test short
        variants = {k: v for k, v in variants.items() if "/train" in k and "predrnn" not in k}
    for name, (k, kind) in variants.items():
        out[name] = memory(k, kind, steps)
    return out


def part_teachers(ctx: Ctx) -> dict:
    kw = dict(ctx.curve_base)
    v = {"convlstm/train": (kw, "train")}
    for n in range(1, 5):
        v[f"tmu{n}_cached/train"] = (tmu(kw, n, True), "train")
        v[f"tmu{n}_uncached/train"] = (tmu(kw, n, False), "train")
    return group(v, *ctx.budget["curve"])


def part_size(ctx: Ctx) -> dict:
    kw = dict(ctx.curve_base)
    sizes = (16, 32, 64) if ctx.quick else (32, 64, 128)
    v = {}
    for s in sizes:
        k = {**kw, "size": s}
        v[f"convlstm/train/{s}"] = (k, "train")
        v[f"convlstm/infer/{s}"] = (k, "infer")
        v[f"tmu2_cached/train/{s}"] = (tmu(k, 2, True), "train")
    return group(v, *ctx.budget["curve"])


def part_length(ctx: Ctx) -> dict:
    kw = dict(ctx.curve_base)
    lengths = (4, 6, 10) if ctx.quick else (10, 20, 40)
    v = {}
    for T in lengths:
        k = {**kw, "frames": T}
        v[f"convlstm/train/{T}"] = (k, "train")
        v[f"convlstm/infer/{T}"] = (k, "infer")
        v[f"tmu2_cached/train/{T}"] = (tmu(k, 2, True), "train")
    return group(v, *ctx.budget["curve"])


def _autocast_bf16(w):
    def wrap(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        return run
    w.wrap = wrap


def _channels_last(w):
    w.model.to(memory_format=torch.channels_last)
    w.frames = w.frames.contiguous()


def _fused_adam(w):
    w.opt = torch.optim.Adam([p for p in w.model.parameters() if p.requires_grad], lr=w.spec.lr, fused=True)


def part_formats(ctx: Ctx) -> dict:
    """fp32 eager vs channels-last weights vs bf16 autocast vs fused Adam (one process)."""
    kw = dict(ctx.curve_base)
    warm, steps = ctx.budget["settings"]
    v = {"fp32/train": (kw, "train"), "channels_last/train": ({**kw, "seed": 1}, "train"),
         "fused_adam/train": ({**kw, "seed": 2}, "train")}
    tweak = {"channels_last/train": _channels_last, "fused_adam/train": _fused_adam}
    res = group(v, warm, steps, tweak)
    # bf16 autocast apart (on CPUs without native bf16 it is far slower): against fp32 again
    v2 = {"fp32/train": (kw, "train"), "bf16_autocast/train": ({**kw, "seed": 3}, "train"),
          "fp32/infer": (kw, "infer"), "bf16_autocast/infer": ({**kw, "seed": 3}, "infer")}
    res["bf16"] = group(v2, 1, 3, {"bf16_autocast/train": _autocast_bf16,
                                   "bf16_autocast/infer": _autocast_bf16})
    return res


THREAD_SNIPPET = """
import json, statistics, sys, time, torch
from transmem.bench import BenchSpec, Workload, interleave, median
torch.set_num_threads({threads})
w = Workload(BenchSpec(**{kw!r}))
t = interleave({{"train": w.train_step, "infer": w.infer_step}}, {warm}, {steps})
print(json.dumps({{"train_ms": median(t["train"]), "infer_ms": median(t["infer"])}}))
"""


def part_threads(ctx: Ctx) -> dict:
    """Threads x OpenMP wait policy: fresh processes (the policy is read at start), each
    setting run twice in alternation (A B C D A B C D)."""
    kw = dict(ctx.curve_base)
    warm, steps = ctx.budget["settings"]
    settings = {"1 thread": (1, None), "2 threads": (2, None),
                "1 thread, passive": (1, "PASSIVE"), "2 threads, passive": (2, "PASSIVE")}
    if ctx.quick:
        settings = {k: v for k, v in settings.items() if "passive" in k}
    out: dict = {"load_avg_before": load_average()}
    for rep in range(1 if ctx.quick else 2):
        for name, (thr, policy) in settings.items():
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
            env.pop("OMP_WAIT_POLICY", None)
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            code = THREAD_SNIPPET.format(threads=thr, kw=kw, warm=warm, steps=steps)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            out.setdefault(name, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    out["load_avg_after"] = load_average()
    for name in settings:
        runs = out[name]
        out[name] = {"train_ms": round(median([r["train_ms"] for r in runs]), 1),
                     "infer_ms": round(median([r["infer_ms"] for r in runs]), 1), "runs": runs}
    return out


def part_lightning(ctx: Ctx, size: str, model: str) -> dict:
    kw = dict(ctx.sizes[size])
    spec = BenchSpec(**(tmu(kw, 2, True) if model == "tmu_cached" else kw))
    warm, steps = ctx.budget["light"]
    if not ctx.quick and size == "2x32":
        steps = 20
    load0 = load_average()
    res = lightning_overhead(Workload(spec), steps, warm)
    return {**res, "load_avg_before": load0, "load_avg_after": load_average(), "spec": vars(spec)}


def part_lightning_fixed(ctx: Ctx) -> dict:
    """What Lightning + ForecastModule add per step, measured where it is not hidden by compute:
    a tiny model (many steps, alternating blocks). The relative overhead of a config is then
    fixed_ms / its bare step."""
    tiny = dict(layers=1, hidden=8, size=16, batch=2, frames=6)
    out = {}
    for name, spec in (("convlstm", BenchSpec(**tiny)), ("tmu_cached", BenchSpec(**tmu(tiny, 2, True)))):
        load0 = load_average()
        r = lightning_overhead(Workload(spec), 10 if ctx.quick else 60, 5)
        out[name] = {**r, "load_avg_before": load0, "load_avg_after": load_average(), "spec": vars(spec)}
    return out


BASE_REV = "e76fa11"  # the last commit before the issue-6 speed work on models/ and transfer/
PREV_REV = "8fe0247"  # the last commit before the fused LSTM nodes and the matmul 1x1 convolutions


def _base_package(rev: str) -> Path:
    """The package as it was at ``rev``, importable as ``transmem_base`` (with today's bench.py,
    so both sides are timed by the same harness)."""
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="transmem_base_"))
    names = _git("ls-tree", "-r", "--name-only", rev, "src/transmem").splitlines()
    if not names:
        raise RuntimeError(f"git revision {rev} has no src/transmem")
    for name in names:
        if not name.endswith(".py"):
            continue
        dest = root / "transmem_base" / Path(name).relative_to("src/transmem")
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, capture_output=True).stdout
        dest.write_bytes(blob)
    (root / "transmem_base" / "bench.py").write_text((REPO / "src/transmem/bench.py").read_text())
    return root


def part_before_after(ctx: Ctx, rev: str = BASE_REV) -> dict:
    """This code vs the code at ``rev``, interleaved in one process (2x32 workload)."""
    import importlib
    root = _base_package(rev)
    sys.path.insert(0, str(root))
    try:
        old = importlib.import_module("transmem_base.bench")
        kw = dict(ctx.curve_base)
        tasks = {}
        for tag, mod in (("before", old), ("after", sys.modules["transmem.bench"])):
            ws = {"convlstm": mod.Workload(mod.BenchSpec(**kw)),
                  "predrnn": mod.Workload(mod.BenchSpec(**{**kw, "model": "predrnn"})),
                  "tmu2_cached": mod.Workload(mod.BenchSpec(**tmu(kw, 2, True))),
                  "tmu2_uncached": mod.Workload(mod.BenchSpec(**tmu(kw, 2, False)))}
            for name, w in ws.items():
                tasks[f"{name}/train/{tag}"] = w.train_step
            tasks[f"convlstm/infer/{tag}"] = ws["convlstm"].infer_step
            tasks[f"tmu2/infer/{tag}"] = ws["tmu2_cached"].infer_step
            tasks[f"bank2/teacher_pass/{tag}"] = ws["tmu2_uncached"].bank_step
        warm, steps = ctx.budget["curve"]
        res = group_fns(tasks, warm, steps)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == "transmem_base"]:
            del sys.modules[name]  # another revision may be imported under the same name
    res["base_rev"] = rev
    res["after_over_before"] = {
        k.rsplit("/", 1)[0]: round(v["ms"] / res["variants"][k.rsplit("/", 1)[0] + "/before"]["ms"], 3)
        for k, v in res["variants"].items() if k.endswith("/after")}
    return res


def part_compile(ctx: Ctx) -> dict:
    """torch.compile of the backbone (compile time reported apart from the step time)."""
    kw = dict(ctx.curve_base)
    w, wc = Workload(BenchSpec(**kw)), Workload(BenchSpec(**kw))
    wc.model = torch.compile(wc.model)
    wc.opt = torch.optim.Adam(wc.model.parameters(), lr=wc.spec.lr)
    t0 = time.time()
    wc.train_step()
    first = time.time() - t0
    warm, steps = ctx.budget["settings"]
    res = group_fns({"eager/train": w.train_step, "compiled/train": wc.train_step}, warm, steps)
    res["compile_first_step_s"] = round(first, 1)
    return res


def group_fns(fns: dict, warm: int, steps: int) -> dict:
    load0 = load_average()
    t = interleave(fns, warm, steps)
    return {"variants": {k: {"ms": round(median(v), 2), "ms_all": [round(x, 1) for x in v]}
                         for k, v in t.items()},
            "load_avg_before": load0, "load_avg_after": load_average(), "warmup": warm, "steps": steps}


def native_model(hidden: int | None = None):
    """The native-resolution recipe's backbone (configs/radar_native_pretext.yaml; ``hidden``: another
    width), random weights with random heads (so the warp and source terms do real work)."""
    import yaml
    from transmem.models import create_model
    cfg = dict(yaml.safe_load((REPO / "configs" / "radar_native_pretext.yaml").read_text())["model"])
    name = cfg.pop("name")
    if hidden is not None:
        cfg["hidden"] = hidden
    m = create_model(name, **cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m


def part_native_crop(ctx: Ctx) -> dict:
    """A training step of the native recipe on its 128x128 crops (batch 8, 6 -> 6 frames), fp32 and
    bf16 autocast, interleaved with the conv peak probes in fp32 and in bf16; GFLOP/s of the step
    against the fp32 peak (``of_peak``) and against the peak of its own precision (``of_own_peak``).
    Also the 2x64 width, where the convolutions dominate the step more."""
    import yaml
    from torch.utils.flop_counter import FlopCounterMode
    size, batch, frames = (64, 2, 6) if ctx.quick else (128, 8, 12)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, frames, 1, size, size, generator=g)
    fns, flops = {}, {}
    recipe = yaml.safe_load((REPO / "configs" / "radar_native_pretext.yaml").read_text())["model"]
    for width in dict.fromkeys((int(recipe["hidden"]), 64)):
        m = native_model(hidden=width)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt, bf16=False):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = ((m(x, t_in=6)[:, 5:].float() - x[:, 6:]) ** 2).mean()
            loss.backward()
            opt.step()
        with FlopCounterMode(display=False) as fc:
            step()
        flops[f"2x{width}"] = int(fc.get_total_flops())
        fns[f"2x{width}/fp32"] = step
        fns[f"2x{width}/bf16"] = lambda step=step: step(bf16=True)
    probes = {"fp32": peak_probes(ctx.quick), "bf16": peak_probes(ctx.quick, torch.bfloat16)}
    warm, steps = (1, 2) if ctx.quick else (2, 8)
    load0 = load_average()
    times = interleave({**fns, **{f"{dt}:{k}": fn for dt, p in probes.items() for k, (fn, _) in p.items()}},
                       warm, steps)
    peaks = {dt: peak_from_times(p, {k: times.pop(f"{dt}:{k}") for k in p}) for dt, p in probes.items()}
    out = {"crop": size, "batch": batch, "frames": frames, "peak": peaks["fp32"], "peak_bf16": peaks["bf16"],
           "load_avg_before": load0, "load_avg_after": load_average(), "variants": {}}
    for name, ms in times.items():
        med = median(ms)
        gflop = flops[name.split("/")[0]] / 1e9
        rate = gflop / (med / 1e3)
        out["variants"][name] = {"ms": round(med, 1), "gflop": round(gflop, 2), "gflops": round(rate, 1),
                                 # against the fp32 conv peak, and against the peak of the step's own precision
                                 "of_peak": round(rate / peaks["fp32"]["peak_gflops"], 3),
                                 "of_own_peak": round(rate / peaks[name.split("/")[1]]["peak_gflops"], 3)}
    return out


def part_native_fullfield(ctx: Ctx) -> dict:
    """Whole-field inference of the native recipe (6 inputs, 12 leads): a MeteoSwiss-size field
    (640x710) and the OPERA composite (2200x1900), untiled and in 512-pixel tiles; wall time and
    the peak resident memory of a fresh process for each (VmHWM, reset just before the forecast:
    a child's ru_maxrss would start at its parent's peak)."""
    shapes = {"mch_640x710": (640, 710), "opera_2200x1900": (2200, 1900)}
    if ctx.quick:
        shapes = {"small_96x130": (96, 130)}
    out = {"leads": 12, "t_in": 6, "load_avg_before": load_average()}
    for name, (h, w) in shapes.items():
        for tile in (None, 512):
            code = ("import json, resource, time, torch, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
                    "from speed import native_model; from transmem.fullfield import FullFieldForecaster; "
                    "from transmem.training import ForecastModule, SamplingSchedule; "
                    "torch.set_num_threads(%d); m = native_model().eval(); "
                    "mod = ForecastModule(m, SamplingSchedule(kind='none', t_in=6, frames=18)).eval(); "
                    "f = FullFieldForecaster(mod, 4, tile=%r, overlap=64); "
                    "x = torch.rand(1, 18, 1, %d, %d); "
                    "hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); "
                    "open('/proc/self/clear_refs', 'w').write('5'); rss0 = hwm(); "
                    "t = time.perf_counter(); y = f.rollout(x); dt = time.perf_counter() - t; "
                    "print(json.dumps({'s': round(dt, 2), 'shape': list(y.shape), "
                    "'peak_rss_mb': round(hwm() / 1024), 'before_mb': round(rss0 / 1024)}))") % (str(REPO / "src"), str(HERE), torch.get_num_threads(),
                                                             tile, h, w)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            out[f"{name}/{'untiled' if tile is None else f'tile{tile}'}"] = json.loads(r.stdout.strip().splitlines()[-1])
    out["load_avg_after"] = load_average()
    return out


PARTS = {
    "peak": part_peak,
    "table/2x32": lambda c: part_table(c, "2x32", "all"),
    "table/4x64/train": lambda c: part_table(c, "4x64", "train"),
    "table/4x64/infer": lambda c: part_table(c, "4x64", "infer"),
    "table/4x64/predrnn": lambda c: part_table(c, "4x64", "predrnn"),
    "memory/2x32": lambda c: part_memory(c, "2x32"),
    "memory/4x64": lambda c: part_memory(c, "4x64"),
    "teachers": part_teachers,
    "size": part_size,
    "length": part_length,
    "lightning/2x32/convlstm": lambda c: part_lightning(c, "2x32", "convlstm"),
    "lightning/2x32/tmu_cached": lambda c: part_lightning(c, "2x32", "tmu_cached"),
    "lightning/4x64/convlstm": lambda c: part_lightning(c, "4x64", "convlstm"),
    "lightning/fixed": part_lightning_fixed,
    "settings/threads": part_threads,
    "settings/formats": part_formats,
    "before_after": part_before_after,
    "before_after/prev": lambda c: part_before_after(c, PREV_REV),
    "native/crop": part_native_crop,
    "native/fullfield": part_native_fullfield,
}
OPTIONAL = {"settings/compile": part_compile}  # slow to compile: only when asked for


# ---------------------------------------------------------------------------------------------
# summary: targets, growth, plots


def _ms(data, part, name):
    try:
        return data["parts"][part]["variants"][name]["ms"]
    except KeyError:
        return None


def summarize(data: dict) -> dict:
    s: dict = {}
    peak = data["parts"].get("peak", {}).get("peak_gflops")
    for size in ("2x32", "4x64"):
        if size == "2x32":
            tp = ip = pp = "table/2x32"
        else:
            tp, ip, pp = "table/4x64/train", "table/4x64/infer", "table/4x64/predrnn"
        b = _ms(data, tp, "convlstm/train")
        c = _ms(data, tp, "tmu2_cached/train")
        u = _ms(data, tp, "tmu2_uncached/train")
        bi, ti = _ms(data, ip, "convlstm/infer"), _ms(data, ip, "tmu2/infer")
        teach, bank = _ms(data, ip, "teachers2/full_infer"), _ms(data, ip, "bank2/teacher_pass")
        t: dict = {}
        if b and c:
            t["tmu_cached_over_backbone"] = round(c / b, 3)
            rounds = [data["parts"][tp]["variants"][k].get("ms_all") for k in ("tmu2_cached/train", "convlstm/train")]
            if all(rounds):  # the same ratio round by round (steps of a round ran back to back)
                t["tmu_cached_over_backbone_paired"] = round(median([x / y for x, y in zip(*rounds)]), 3)
        if b and u and teach:
            t["tmu_uncached_ms"] = u
            t["uncached_budget_ms"] = round(b + teach + 0.1 * b, 1)
            t["uncached_over_budget"] = round(u / (b + teach + 0.1 * b), 3)
        if b and u and bank:
            t["uncached_over_backbone_plus_bank"] = round(u / (b + bank), 3)
        if bi and ti:
            t["tmu_infer_over_backbone"] = round(ti / bi, 3)
        v = data["parts"].get(tp, {}).get("variants", {}).get("convlstm/train", {})
        gpeak = data["parts"].get(tp, {}).get("peak", {}).get("peak_gflops") or peak
        if gpeak and v.get("gflops"):
            t["backbone_gflops"] = v["gflops"]
            t["peak_gflops"] = gpeak
            t["backbone_fraction_of_peak"] = round(v["gflops"] / gpeak, 3)
        mem = data["parts"].get(f"memory/{size}")
        if mem:
            for tag in ("cached", "uncached"):
                for key in ("run_mb", "step_peak_mb"):
                    a, b = mem.get(f"tmu2_{tag}/train", {}).get(key), mem["convlstm/train"].get(key)
                    if a and b:
                        t[f"tmu_{tag}_{key}_over_backbone"] = round(a / b, 3)
            t["tmu_cached_peak_rss_over_backbone"] = round(
                mem["tmu2_cached/train"]["peak_rss_mb"] / mem["convlstm/train"]["peak_rss_mb"], 3)
            t["tmu_uncached_peak_rss_over_backbone"] = round(
                mem["tmu2_uncached/train"]["peak_rss_mb"] / mem["convlstm/train"]["peak_rss_mb"], 3)
        s[size] = t
    lf = data["parts"].get("lightning/fixed")
    if lf:
        fixed = max(lf["convlstm"]["fixed_ms"], lf["tmu_cached"]["fixed_ms"])
        s["lightning"] = {"fixed_ms_per_step": fixed}
        for size, part in (("2x32", "table/2x32"), ("4x64", "table/4x64/train")):
            b = _ms(data, part, "convlstm/train")
            if b:
                s["lightning"][f"implied_overhead_pct_{size}"] = round(100 * fixed / b, 2)
        for key in ("lightning/2x32/convlstm", "lightning/2x32/tmu_cached", "lightning/4x64/convlstm"):
            if key in data["parts"]:
                s["lightning"][f"measured_pct_{key.split('/', 1)[1]}"] = data["parts"][key]["overhead_pct"]
    tp = data["parts"].get("teachers")
    if tp:
        b = tp["variants"]["convlstm/train"]["ms"]
        cached = [tp["variants"][f"tmu{n}_cached/train"]["ms"] for n in range(1, 5)]
        unc = [tp["variants"][f"tmu{n}_uncached/train"]["ms"] for n in range(1, 5)]
        s["teachers"] = {
            "backbone_ms": b, "cached_ms": cached, "uncached_ms": unc,
            "cached_per_extra_teacher_pct": round(100 * (cached[-1] - cached[0]) / 3 / b, 2),
            "uncached_per_extra_teacher_pct": round(100 * (unc[-1] - unc[0]) / 3 / b, 2),
        }
    for part, key in (("size", "size"), ("length", "frames")):
        p = data["parts"].get(part)
        if not p:
            continue
        xs = sorted({int(k.rsplit("/", 1)[1]) for k in p["variants"]})
        g = {}
        for what in ("convlstm/train", "convlstm/infer", "tmu2_cached/train"):
            ys = [p["variants"][f"{what}/{x}"]["ms"] for x in xs]
            # growth exponent between the smallest and the largest setting: cost ~ x^k
            import math
            k = math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])
            g[what] = {"x": xs, "ms": ys, "exponent": round(k, 2)}
        s[part] = g
    return s


def plot(data: dict, suffix: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = []
    tp = data["parts"].get("teachers")
    if tp:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        n = [1, 2, 3, 4]
        b = tp["variants"]["convlstm/train"]["ms"]
        for tag, style in (("cached", "o-"), ("uncached", "s--")):
            ax.plot(n, [tp["variants"][f"tmu{i}_{tag}/train"]["ms"] / b for i in n], style,
                    label=f"TMU, {tag} bank")
        ax.axhline(1.0, color="gray", lw=1, label="bare ConvLSTM")
        ax.set_xlabel("teachers")
        ax.set_ylabel("train step / backbone step")
        ax.set_xticks(n)
        ax.set_title(f"cost vs teachers ({_cfg(tp)})", fontsize=9)
        ax.legend(fontsize=8)
        out.append(_save(fig, f"speed_teachers{suffix}.png"))
    for part, xlabel, logx in (("size", "frame size (pixels per side)", True),
                               ("length", "frames per clip (T_in + T_out)", False)):
        p = data["parts"].get(part)
        if not p:
            continue
        xs = sorted({int(k.rsplit("/", 1)[1]) for k in p["variants"]})
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for what, style in (("convlstm/train", "o-"), ("tmu2_cached/train", "s--"), ("convlstm/infer", "^:")):
            ax.plot(xs, [p["variants"][f"{what}/{x}"]["ms"] for x in xs], style, label=what)
        if logx:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"cost vs {part} ({_cfg(p)})", fontsize=9)
        ax.legend(fontsize=8)
        out.append(_save(fig, f"speed_{part}{suffix}.png"))
    return out


def _cfg(p) -> str:
    spec = next(iter(p["variants"].values()))["spec"]
    return f"{spec.get('layers', 2)}x{spec.get('hidden', 32)}, batch {spec.get('batch', 8)}"


def _save(fig, name) -> Path:
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def markdown(data: dict) -> str:
    rows = ["| config | variant | train step ms | inference ms | seq/s (train) | GFLOP/s (train) | params |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for size in ("2x32", "4x64"):
        parts = ["table/2x32"] if size == "2x32" else ["table/4x64/train", "table/4x64/infer", "table/4x64/predrnn"]
        v: dict = {}
        for p in parts:  # (the predrnn group's convlstm/train is only its reference)
            v.update({k: x for k, x in data["parts"].get(p, {}).get("variants", {}).items()
                      if k not in v})
        if not v:
            continue
        for name, infer in (("convlstm", "convlstm"), ("predrnn", "predrnn"),
                            ("tmu2_cached", "tmu2"), ("tmu2_uncached", "tmu2")):
            tr, inf = v.get(f"{name}/train", {}), v.get(f"{infer}/infer", {})
            rows.append(f"| {size} | {name} | {tr.get('ms', '-')} | {inf.get('ms', '-')} | "
                        f"{tr.get('seq_per_s', '-')} | {tr.get('gflops', '-')} | {tr.get('params', '-')} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", help="parts to run (default: every part not yet done)")
    ap.add_argument("--redo", nargs="*", default=[], help="parts to measure again")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="results file (default results/speed.json, or speed_quick.json)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNGs and summary")
    args = ap.parse_args(argv)
    if args.quick and not args.threads:
        args.threads = 1  # a smoke test: one thread is the robust choice on a shared CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Ctx(args.quick, args.threads)
    path = Path(args.json) if args.json else RESULTS / ("speed_quick.json" if args.quick else "speed.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    data.setdefault("parts", {})
    known = {**PARTS, **OPTIONAL}
    if args.list:
        for name in known:
            done = data["parts"].get(name)
            print(f"{name:28s} {'done ' + done.get('_at', '') if done else '-'}")
        return 0
    todo = []
    if not args.plot:
        wanted = args.parts if args.parts else list(PARTS)
        bad = [p for p in wanted + args.redo if p not in known]
        if bad:
            ap.error(f"unknown parts {bad}; known: {list(known)}")
        todo = [p for p in wanted if p not in data["parts"] or p in args.redo]
        todo += [p for p in args.redo if p not in todo]
    data["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "quick": args.quick,
                       "commit": _git("rev-parse", "--short", "HEAD"),
                       "dirty_files": _git("status", "--porcelain", "--", "src").count("\n") + 1
                       if _git("status", "--porcelain", "--", "src") else 0}
    for name in todo:
        print(f"[speed] {name} ... (load {load_average()})", flush=True)
        t0 = time.time()
        res = known[name](ctx)
        res["_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        res["_wall_s"] = round(time.time() - t0, 1)
        res["_threads"] = torch.get_num_threads()
        res["_commit"] = data["machine"]["commit"]
        res["_omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        data["parts"][name] = res
        data["summary"] = summarize(data)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        print(f"[speed] {name} done in {res['_wall_s']} s", flush=True)
    data["summary"] = summarize(data)
    claims.write_json(path, data, indent=1)
    pngs = plot(data, "_quick" if args.quick else "")
    print(markdown(data))
    print(json.dumps(data["summary"], indent=1))
    for p in pngs:
        print(f"wrote {p}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`transmem bench`: time training steps and inference rollouts of a backbone or a TMU model.

Random weights and random frames ``(B, T, 1, S, S)``; no data is read. What is timed:

* **training step**: forward, backward and an Adam step, plus the teacher passes the method needs.
  For the TMU without ``--cached-bank`` that is the memory bank's forward (N frozen ConvLSTM
  teachers of the target's size, under ``no_grad``); with ``--cached-bank`` the bank is read from
  a :class:`~transmem.transfer.BankCache` filled before timing;
* **inference rollout**: ``T_in = T/2`` input frames, the rest forecast, under
  ``torch.inference_mode``; a distill-mode TMU runs without teachers.

Steps of the timed variants are interleaved (one of each per round) so that load from other jobs
hits them alike; the numbers are medians over ``--steps`` rounds after ``--warmup`` rounds.
FLOPs are counted once, outside the timed loop, with ``torch.utils.flop_counter.FlopCounterMode``;
achieved GFLOP/s are compared with a fp32 matmul / conv2d peak measured in the same run.
The same training step through ``ForecastModule`` + ``lightning.Trainer`` is timed in blocks
alternating with the bare loop to report Lightning's overhead.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from .choices import check
from .models import build_model, list_models, model_kind
from .options import TMUOptions
from .training import ForecastModule, SamplingSchedule, forecast_loss, quiet_lightning
from .transfer import BankCache, build_mixture, build_tmu

REQUIRED_KEYS = ("train_ms", "infer_ms", "seq_per_s", "peak_rss_mb", "params", "gflops", "peak_gflops")


@dataclass
class BenchSpec:
    """One benchmark configuration (the CLI's flags, plus a few knobs for scripts)."""
    model: str = "convlstm"        # a registered backbone, tmu or mixture
    backbone: str = "convlstm"     # TMU target backbone
    layers: int = 2
    hidden: int = 32
    filter: int = 5
    patch: int = 4
    size: int = 64
    batch: int = 8
    frames: int = 20               # T = T_in + T_out, T_in = T // 2
    teachers: int = 2
    cached_bank: bool = False
    tmu_mode: str = "distill"      # distill | bank_read
    tmu_layers: str = "bottom"
    distill_weight: float = 0.1
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"            # "cuda" on a GPU
    precision: str = "32-true"     # "32-true" | "bf16-mixed" (autocast)

    #: the fields ``transmem bench`` sets from its flags of the same names (the rest: scripts)
    FLAGS = ("model", "backbone", "layers", "hidden", "filter", "patch", "size", "batch", "frames",
             "teachers", "cached_bank")

    @classmethod
    def from_args(cls, args) -> "BenchSpec":
        return cls(**{k: getattr(args, k) for k in cls.FLAGS})

    @property
    def t_in(self) -> int:
        return max(1, self.frames // 2)


# ---------------------------------------------------------------------------------------------
# the workload


def _backbone_config(spec: BenchSpec) -> dict:
    return dict(num_layers=spec.layers, hidden=spec.hidden, filter_size=spec.filter,
                patch_size=spec.patch, in_channels=1)


class Workload:
    """A model, its optimizer, teachers/bank/cache if any, and one fixed batch of random frames.

    ``train_step``, ``infer_step``, ``bank_step`` (the teachers' pass of an uncached TMU step)
    and ``teacher_infer_step`` (N full teacher rollouts) are the things that can be timed."""

    def __init__(self, spec: BenchSpec):
        if spec.frames < 3:
            raise ValueError("bench needs at least 3 frames")
        if spec.size % spec.patch:
            raise ValueError(f"--size {spec.size} is not divisible by --patch {spec.patch}")
        self.spec = spec
        torch.manual_seed(spec.seed)
        g = torch.Generator().manual_seed(spec.seed)
        b, T = spec.batch, spec.frames
        if spec.precision not in ("32-true", "bf16-mixed"):
            raise ValueError(f"bench precision must be 32-true or bf16-mixed, got '{spec.precision}'")
        self.device = torch.device(spec.device)
        self.autocast = spec.precision == "bf16-mixed"
        self.frames = torch.rand(b, T, 1, spec.size, spec.size, generator=g).to(self.device)
        # a scheduled-sampling mask half way through the decay: random 0/1 in the forecast part
        self.schedule = SamplingSchedule(kind="linear", t_in=spec.t_in, frames=T, stop_step=2)
        self.mask = self.schedule.mask(1, b, generator=g).to(self.device)
        self.index = torch.arange(b)
        self.bank = self.cache = None
        self.teachers: list = []
        cfg = _backbone_config(spec)
        check("--model", spec.model, list_models())
        if spec.model == "mixture":  # --teachers frozen convlstm members, weights per lead
            members = [build_model("convlstm", cfg) for _ in range(spec.teachers)]
            self.model = build_mixture(members, [f"member{i}" for i in range(spec.teachers)], t_in=spec.t_in,
                                       leads=T - spec.t_in)
        elif model_kind(spec.model) == "transfer":  # a TMU target on ``backbone`` with N teachers
            self.teachers = [build_model("convlstm", cfg).to(self.device) for _ in range(spec.teachers)]
            names = [f"teacher{i}" for i in range(spec.teachers)]
            self.model, self.bank = build_tmu(spec.backbone, cfg, self.teachers, names,
                                              TMUOptions(tmu_layers=spec.tmu_layers, mode=spec.tmu_mode))
            if spec.cached_bank:
                self.cache = BankCache(b)
                self.cache.put(self.index, self.bank(self.frames, self.mask, spec.t_in))
        else:
            self.model = build_model(spec.model, cfg)
        self.model.to(self.device).train()
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=spec.lr)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def is_tmu(self) -> bool:
        return self.model.model_kind == "transfer"

    def get_bank(self):
        if self.bank is None:
            return None
        if self.cache is not None:
            return [{l: s.to(self.device) for l, s in src.items()} for src in self.cache.get(self.index)]
        return self.bank(self.frames, self.mask, self.spec.t_in)

    def loss(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return forecast_loss(self.model, self.frames, self.mask, bank=self.get_bank(),
                                 distill_weight=self.spec.distill_weight if self.is_tmu else 0.0)[0]

    def _wait(self) -> None:
        """On a GPU, wait for the queued kernels, so that a timed call includes them."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()
        self._wait()

    def infer_step(self) -> None:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.autocast):
            if self.model.needs_teachers_at_inference:
                self.model(self.frames, t_in=self.spec.t_in, bank=self.bank.rollout(self.frames, self.spec.t_in))
            else:
                self.model(self.frames, t_in=self.spec.t_in)
        self._wait()

    def bank_step(self) -> None:
        """The teachers' part of an uncached TMU training step (the memory bank's forward)."""
        self.bank(self.frames, self.mask, self.spec.t_in)
        self._wait()

    def teacher_infer_step(self) -> None:
        """N full teacher inference rollouts (what a bank that runs whole teachers would cost)."""
        with torch.inference_mode():
            for t in self.teachers:
                t(self.frames, t_in=self.spec.t_in)
        self._wait()

    def count_flops(self, which: str) -> int:
        fn = {"train": self._flop_train, "infer": self.infer_step, "bank": self.bank_step}[which]
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    def _flop_train(self) -> None:  # forward + backward (the Adam update is elementwise, not counted)
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# timing helpers


def interleave(tasks: dict[str, Callable[[], None]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Run each task once per round, ``warmup`` rounds untimed then ``steps`` timed rounds;
    returns milliseconds per task and round. Interleaving exposes every variant to the same load."""
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for r in range(warmup + steps):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs) -> float | None:
    return float(statistics.median(xs)) if xs else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process. On Linux from VmHWM: ``ru_maxrss`` survives
    ``exec``, so a probe started from a big parent process would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_probes(quick: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, tuple[Callable[[], None], int]]:
    """{name: (call, FLOPs)}: a large matmul and two large 5x5 conv2d forwards (under inference
    mode) in ``dtype``, the machine's achievable GEMM/conv rate in that precision (a bf16 step
    is measured against the bf16 peak: on CPUs with AVX512-BF16 it is well above fp32's). Time
    them interleaved with the steps they are compared with, so that both see the same load."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

    def inference(fn):
        def run():
            with torch.inference_mode():
                fn()
        return run

    probes = {"peak/matmul": (inference(lambda: torch.mm(a, b)), 2 * n ** 3)}
    shapes = [(4, 64, 16, 128)] if quick else [(8, 128, 32, 256), (32, 64, 16, 256)]
    for i, (cb, ch, s, co) in enumerate(shapes):
        x = torch.randn(cb, ch, s, s, dtype=dtype)
        w = torch.randn(co, ch, 5, 5, dtype=dtype)
        probes[f"peak/conv2d_{i}"] = (inference(lambda x=x, w=w: F.conv2d(x, w, padding=2)),
                                      2 * cb * s * s * co * ch * 25)
    return probes


def peak_from_times(probes: dict, times: dict[str, list[float]]) -> dict:
    """GFLOP/s of each probe (median and best call); ``peak_gflops`` is the best median."""
    out = {}
    for name, (_, flops) in probes.items():
        ms = times[name]
        key = name.split("/", 1)[1]
        out[f"{key}_gflops"] = round(flops / (median(ms) / 1e3) / 1e9, 1)
        out[f"{key}_gflops_best"] = round(flops / (min(ms) / 1e3) / 1e9, 1)
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    out["peak_gflops_best"] = max(v for k, v in out.items() if k.endswith("_best"))
    return out


def measure_peak(quick: bool = False, reps: int = 5) -> dict:
    """The probes of :func:`peak_probes` on their own: one warm-up and ``reps`` timed calls each."""
    probes = peak_probes(quick)
    times = interleave({k: fn for k, (fn, _) in probes.items()}, 1, reps)
    return peak_from_times(probes, times)


def memory_probe(spec: BenchSpec, kind: str = "train", steps: int = 3) -> dict:
    """Peak memory of ``steps`` calls of ``kind`` (train | infer | bank) on a fresh workload.
    Run it in a fresh process: the peak resident set size only ever grows, so earlier work in
    the same process would hide a smaller peak. ``step_peak_mb`` = peak RSS - RSS before the
    first call (model, optimizer, frames and any bank cache already built); ``run_mb`` = peak RSS
    - RSS before the workload was built (what the run adds to an interpreter with torch loaded:
    weights, optimizer state, frames, cache, activations; less sensitive to allocator state)."""
    start = rss_mb()
    w = Workload(spec)
    base = rss_mb()
    fn = {"train": w.train_step, "infer": w.infer_step, "bank": w.bank_step}[kind]
    for _ in range(steps):
        fn()
    peak = peak_rss_mb()
    cache_mb = 0.0
    if w.cache is not None:
        cache_mb = sum(s.numel() * s.element_size() for item in w.cache._mem.values()
                       for src in item for s in src.values()) / 2 ** 20
    return {"kind": kind, "peak_rss_mb": round(peak, 1), "base_rss_mb": round(base, 1),
            "step_peak_mb": round(peak - base, 1), "run_mb": round(peak - start, 1),
            "start_rss_mb": round(start, 1), "cache_mb": round(cache_mb, 1),
            "params": w.params, "steps": steps}


# ---------------------------------------------------------------------------------------------
# Lightning overhead


def lightning_overhead(w: Workload, steps: int, warmup: int, blocks: int = 1) -> dict:
    """The training step through ``ForecastModule`` + ``lightning.Trainer.fit`` (no logger,
    checkpoints or progress bar; a loader repeating ``w``'s batch) against the bare step, one of
    each in turn: after every Lightning batch, a callback runs and times one bare step on a twin
    workload (same spec, same weights). A Lightning step is the time from one batch start to the
    next minus that bare step, so it includes Lightning's loop, hooks, logging and loader.
    ``fixed_ms`` = median Lightning step - median bare step. ``blocks`` fits are run in a row."""
    quiet_lightning()
    twin = Workload(w.spec)
    batch = {"frames": w.frames, "index": w.index}
    per = max(1, math.ceil(steps / blocks))
    light: list[float] = []
    bare: list[float] = []
    for _ in range(blocks):
        class Repeat(Dataset):
            def __len__(self):
                return warmup + per + 1

            def __getitem__(self, i):
                return batch

        module = ForecastModule(w.model, w.schedule, lr=w.spec.lr, bank=w.bank,
                                distill_weight=w.spec.distill_weight if w.is_tmu else 0.0,
                                bank_cache=w.cache)
        starts: list[float] = []
        bare_block: list[float] = []

        class Clock(L.Callback):
            def on_train_batch_start(self, *a, **k):
                starts.append(time.perf_counter())

            def on_train_batch_end(self, *a, **k):
                t0 = time.perf_counter()
                twin.train_step()
                bare_block.append(time.perf_counter() - t0)

        loader = torch.utils.data.DataLoader(Repeat(), batch_size=None, shuffle=False)
        trainer = L.Trainer(max_steps=warmup + per + 1, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[Clock()])
        trainer.fit(module, loader)
        w.model.train()
        periods = [(b2 - b1 - c) * 1e3 for b1, b2, c in zip(starts[:-1], starts[1:], bare_block)]
        light += periods[warmup:]
        bare += [c * 1e3 for c in bare_block[:-1]][warmup:]
    b, l = median(bare), median(light)
    return {"bare_ms": round(b, 2), "lightning_ms": round(l, 2), "fixed_ms": round(l - b, 2),
            "overhead_pct": round(100 * (l / b - 1), 2), "steps": len(light), "blocks": blocks,
            "lightning_ms_all": [round(x, 1) for x in light], "bare_ms_all": [round(x, 1) for x in bare]}


# ---------------------------------------------------------------------------------------------
# the command


def benchmark(spec: BenchSpec, mode: str = "both", steps: int = 10, warmup: int = 3,
              threads: int = 0, lightning: bool = True, peak: bool = True) -> dict:
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if threads:
        torch.set_num_threads(threads)
    load_before = load_average()
    start_rss = rss_mb()
    w = Workload(spec)
    base_rss = rss_mb()
    tasks = {}
    if mode in ("train", "both"):
        tasks["train"] = w.train_step
    if mode in ("infer", "both"):
        tasks["infer"] = w.infer_step
    times = interleave(tasks, warmup, steps)
    peak_rss = peak_rss_mb()  # before the probes: their big tensors are not the model's
    probes = peak_probes() if peak else {}
    if probes:  # the peak probes, interleaved with a few more steps so that both see one load
        extra = interleave({**tasks, **{k: fn for k, (fn, _) in probes.items()}}, 1, 5)
    train_ms, infer_ms = median(times.get("train")), median(times.get("infer"))
    res: dict = {
        "train_ms": None if train_ms is None else round(train_ms, 3),
        "infer_ms": None if infer_ms is None else round(infer_ms, 3),
        "seq_per_s": round(spec.batch / ((train_ms if train_ms is not None else infer_ms) / 1e3), 3),
        "peak_rss_mb": round(peak_rss, 1),
        "params": w.params,
    }
    flops = {}
    if train_ms is not None:
        flops["train"] = w.count_flops("train")
    if infer_ms is not None:
        flops["infer"] = w.count_flops("infer")
    gf = {k: flops[k] / ((train_ms if k == "train" else infer_ms) / 1e3) / 1e9 for k in flops}
    res["gflops"] = round(gf["train"] if "train" in gf else gf["infer"], 2)
    res["peak_gflops"] = None
    res.update({
        "infer_seq_per_s": None if infer_ms is None else round(spec.batch / (infer_ms / 1e3), 3),
        "train_gflop_per_step": None if "train" not in flops else round(flops["train"] / 1e9, 3),
        "infer_gflop_per_step": None if "infer" not in flops else round(flops["infer"] / 1e9, 3),
        "infer_gflops": None if "infer" not in gf else round(gf["infer"], 2),
        "base_rss_mb": round(base_rss, 1),
        "step_peak_mb": round(peak_rss - base_rss, 1),
        "run_mb": round(peak_rss - start_rss, 1),
        "train_ms_all": [round(x, 2) for x in times.get("train", [])],
        "infer_ms_all": [round(x, 2) for x in times.get("infer", [])],
    })
    if lightning and train_ms is not None:
        res["lightning"] = lightning_overhead(w, steps, warmup)
    if probes:
        p = peak_from_times(probes, extra)
        res["peak_gflops"] = p["peak_gflops"]
        res["peak_probe"] = p
        # like for like: the step's rate over the rounds run together with the probes
        key = "train" if "train" in extra else "infer"
        rate = flops[key] / (median(extra[key]) / 1e3) / 1e9
        res["efficiency"] = round(rate / p["peak_gflops"], 3)
        res["efficiency_note"] = (f"{key} step GFLOP/s over the best probe's GFLOP/s, both medians "
                                  "of rounds run interleaved")
    res.update({
        "config": asdict(spec), "mode": mode, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_before": load_before, "load_avg_after": load_average(),
    })
    return res


def load_warning(res: dict) -> str | None:
    load, cpus = res.get("load_avg_before"), res.get("cpus") or 1
    if load and load[0] > 0.5:
        return (f"note: load average {load[0]} on {cpus} CPUs before the run: other jobs share the "
                "CPU, compare variants side by side (speed.py interleaves them); with "
                "2 threads on a busy CPU set OMP_WAIT_POLICY=PASSIVE or use --threads 1")
    return None


def format_table(res: dict) -> str:
    c = res["config"]
    name = c["model"] if model_kind(c["model"]) != "transfer" else (
        f"{c['model']}[{c['backbone']}] {c['teachers']} teachers {'cached' if c['cached_bank'] else 'uncached'}")
    rows = [
        ("model", f"{name}  {c['layers']}x{c['hidden']} k{c['filter']} p{c['patch']}"),
        ("batch x frames x size", f"{c['batch']} x {c['frames']} x {c['size']}^2"),
        ("params", f"{res['params']:,}"),
        ("train step (median)", _ms(res["train_ms"])),
        ("inference rollout (median)", _ms(res["infer_ms"])),
        ("sequences/s", f"{res['seq_per_s']:.2f}"),
        ("achieved GFLOP/s", f"{res['gflops']:.1f}"),
        ("peak GFLOP/s (measured)", "-" if res["peak_gflops"] is None else
         f"{res['peak_gflops']:.1f}  (step at {100 * res['efficiency']:.0f}% of it, side by side)"),
        ("peak RSS", f"{res['peak_rss_mb']:.0f} MB (step: +{res['step_peak_mb']:.0f} MB)"),
    ]
    if "lightning" in res:
        lo = res["lightning"]
        rows.append(("Lightning vs bare step", f"{lo['lightning_ms']:.1f} vs {lo['bare_ms']:.1f} ms "
                                                f"({lo['overhead_pct']:+.1f}%)"))
    rows.append(("threads / load avg", f"{res['threads']} / {res['load_avg_before']} -> {res['load_avg_after']}"))
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    note = load_warning(res)
    return text + ("\n" + note if note else "")


def _ms(x):
    return "-" if x is None else f"{x:.1f} ms"


def run_bench(spec: BenchSpec, mode: str = "both", steps: int = 10, warmup: int = 3, threads: int = 0,
              json_path=None, lightning: bool = True, peak: bool = True) -> dict:
    """:func:`benchmark`, its table printed and (``json_path``) its JSON written."""
    res = benchmark(spec, mode=mode, steps=steps, warmup=warmup, threads=threads, lightning=lightning, peak=peak)
    print(format_table(res))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")
    return res

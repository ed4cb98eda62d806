#!/usr/bin/env python
"""How far the speed targets move from one run to the next: runs ``benchmarks/speed.py``
several times, each in a fresh process, and reports every target per run with min / median /
max and in how many runs it was met.

    python benchmarks/speed_spread.py                  # 3 runs of: peak, table/2x32, table/4x64/train
    python benchmarks/speed_spread.py --runs 5         # 5 runs (finished runs are kept)
    python benchmarks/speed_spread.py --parts peak table/2x32 --dir benchmarks/results/spread_2x32

Why: on a virtual machine absolute step times drift by 5-10 % between runs, so one run cannot
tell whether a ratio near its limit is met. Each run is ``results/speed_spread/run<i>.json``
(a killed series resumes at the first missing run); the summary is
``results/speed_spread.json``. About 5 minutes per run with the default parts, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import claims  # noqa: E402

# summary key of speed.py -> (comparison, limit): the targets of docs/performance.md
TARGETS = {
    "tmu_cached_over_backbone": ("<=", 1.10),
    "tmu_cached_over_backbone_paired": ("<=", 1.10),
    "backbone_fraction_of_peak": (">=", 0.80),
    "tmu_infer_over_backbone": ("<=", 1.10),
    "uncached_over_budget": ("<=", 1.00),
}
DEFAULT_PARTS = ["peak", "table/2x32", "table/4x64/train"]


def met(value: float, target: tuple[str, float]) -> bool:
    op, limit = target
    return value <= limit if op == "<=" else value >= limit


def spread(runs: list[dict]) -> dict:
    """{size: {key: {values, min, median, max, met, limit}}} over the runs that have the key."""
    out: dict = {}
    sizes = sorted({s for r in runs for s in r["summary"] if s in ("2x32", "4x64")})
    for size in sizes:
        for key, target in TARGETS.items():
            vals = [r["summary"][size][key] for r in runs
                    if r["summary"].get(size, {}).get(key) is not None]
            if not vals:
                continue
            out.setdefault(size, {})[key] = {
                "values": vals, "min": min(vals), "median": statistics.median(vals), "max": max(vals),
                "met": f"{sum(met(v, target) for v in vals)}/{len(vals)}",
                "limit": f"{target[0]} {target[1]}"}
    return out


def markdown(result: dict) -> str:
    rows = ["| size | target | limit | min | median | max | met in |", "|---|---|---|---:|---:|---:|---|"]
    for size, keys in result["spread"].items():
        for key, s in keys.items():
            rows.append(f"| {size} | {key} | {s['limit']} | {s['min']} | {s['median']} | {s['max']} | {s['met']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", nargs="*", default=DEFAULT_PARTS, help="speed.py parts of each run")
    ap.add_argument("--threads", type=int, default=0, help="passed to speed.py (0: torch's default)")
    ap.add_argument("--dir", default=str(RESULTS / "speed_spread"), help="folder of the per-run JSONs")
    ap.add_argument("--out", help="summary JSON (default: <dir>.json)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    run_dir = Path(args.dir)
    out = Path(args.out) if args.out else run_dir.with_suffix(".json")
    run_dir.mkdir(parents=True, exist_ok=True)
    runs, haves = [], []
    for i in range(1, args.runs + 1):
        path = run_dir / f"run{i}.json"
        have = json.loads(path.read_text()) if path.exists() else {"parts": {}}
        missing = [p for p in args.parts if p not in have["parts"]]
        if missing:  # a fresh process per run: nothing carries over from the previous one
            print(f"[spread] run {i}/{args.runs}: {' '.join(missing)}", flush=True)
            cmd = [sys.executable, str(HERE / "speed.py"), "--json", str(path), "--parts", *missing]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
            if code:  # speed.py has printed why (e.g. an unknown part) on stderr
                print(f"speed_spread: speed.py failed on run {i} (exit code {code}); "
                      f"finished runs are kept in {run_dir}", file=sys.stderr)
                return 1
            have = json.loads(path.read_text())
        haves.append(have)
        runs.append({"file": str(path.relative_to(HERE) if path.is_relative_to(HERE) else path),
                     "commit": have.get("machine", {}).get("commit"),
                     "threads": have.get("machine", {}).get("threads"),
                     "at": [have["parts"][p].get("_at") for p in args.parts],
                     # 1-minute load average before each part (2 = our own two threads)
                     "load_before": [(have["parts"][p].get("load_avg_before")
                                      or have["parts"][p].get("load_avg") or [None])[0]
                                     for p in args.parts],
                     "summary": have.get("summary", {})})
    result = {"parts": args.parts, "runs": runs, "spread": spread(runs)}
    claims.write_json(out, result, runs=haves, indent=1)  # the environment speed.py's runs recorded
    print(markdown(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make reproduce`: rerun the demo and compare it with the README's table.

The README's demo table is made from ``results/demo_readme.json`` (``--table`` prints it). A
rerun reproduces it when every metric of every row lies within the tolerance measured by
``benchmarks/reproducibility.py`` (``results/reproducibility.json``): the largest relative
difference between demo runs on 1 and 2 threads, on AVX2 and AVX-512 kernels, and with the locked
and the newest versions in pyproject.toml's ranges.

    python benchmarks/reproduce.py --out runs/reproduce            # runs the demo (~3 min), compares
    python benchmarks/reproduce.py --metrics runs/demo/metrics.json  # compares an earlier demo run
    python benchmarks/reproduce.py --table                         # the README's table (Markdown)
    python benchmarks/reproduce.py --set-readme runs/demo/metrics.json  # new README numbers

Exit status: 0 when every row is within the tolerance; 1 when not (the rows outside are printed);
2 on a user error (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README_JSON = HERE / "results" / "demo_readme.json"
MEASURED_JSON = HERE / "results" / "reproducibility.json"

METRICS = ("mse", "mae", "ssim", "psnr")
HIGHER_IS_BETTER = {"mse": False, "mae": False, "ssim": True, "psnr": True}
DIGITS = {"mse": 2, "mae": 1, "ssim": 3, "psnr": 2}
BASELINES = ("persistence", "extrapolation")
LABELS = {
    "tmu:bank_read": "tmu:bank_read (teachers read their own predictions)",
    "persistence": "persistence (last input frame repeated)",
    "extrapolation": "extrapolation (pysteps Lucas–Kanade + advection)",
}


class UserError(Exception):
    pass


def scores(methods: dict) -> dict:
    """{method: {metric: value}} of a demo's ``methods`` (rows without scores, such as a baseline
    that is not installed, are left out)."""
    return {m: {k: float(v[k]) for k in METRICS if k in v} for m, v in methods.items() if "mse" in v}


def relative_differences(ref: dict, new: dict) -> dict:
    """{method: {metric: |new - ref| / |ref|}} over the methods and metrics of ``ref`` (two
    ``scores``); a method or metric that ``new`` lacks is None."""
    out = {}
    for m, r in ref.items():
        n = new.get(m)
        out[m] = {k: (None if n is None or k not in n else
                      (abs(n[k] - r[k]) / abs(r[k]) if r[k] else (0.0 if n[k] == r[k] else math.inf)))
                  for k in r}
    return out


def largest(diffs: dict, rows=None) -> float:
    """The largest relative difference in ``diffs`` (over ``rows`` when given); inf when a value
    is missing."""
    vals = [v for m, d in diffs.items() if rows is None or m in rows for v in d.values()]
    return max((math.inf if v is None else v for v in vals), default=0.0)


def outside(ref: dict, new: dict, tolerance: float) -> list[str]:
    """One line per row of ``ref`` that ``new`` does not reproduce within ``tolerance`` (relative):
    a missing row, or every metric that moved further."""
    lines = []
    for m, d in relative_differences(ref, new).items():
        if any(v is None for v in d.values()):
            lines.append(f"{m}: missing from the rerun")
            continue
        bad = [f"{k} {new[m][k]:.{DIGITS.get(k, 3)}f} vs {ref[m][k]:.{DIGITS.get(k, 3)}f} "
               f"({100 * v:.2f} %)" for k, v in d.items() if v > tolerance]
        if bad:
            lines.append(f"{m}: " + ", ".join(bad))
    return lines


def table(readme: dict) -> str:
    """The README's demo table (Markdown) from ``demo_readme.json``'s methods; the best learned
    row of each column in bold."""
    methods = readme["methods"]
    learned = [m for m in methods if m not in BASELINES]
    best = {k: (max if HIGHER_IS_BETTER[k] else min)(learned, key=lambda m: methods[m][k]) for k in METRICS}
    lines = ["| method | MSE/frame | MAE/frame | SSIM | PSNR |", "|---|---:|---:|---:|---:|"]
    for m, v in methods.items():
        cells = []
        for k in METRICS:
            s = f"{v[k]:.{DIGITS[k]}f}"
            cells.append(f"**{s}**" if best[k] == m else s)
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """The demo table as it stands in the README (the lines from its header to the first
    non-table line)."""
    lines = text.splitlines()
    head = "| method | MSE/frame | MAE/frame | SSIM | PSNR |"
    start = lines.index(head)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable {what} ({e})") from None


def tolerance() -> float:
    return float(read_json(MEASURED_JSON, "the measured tolerance; python benchmarks/reproducibility.py")["tolerance"])


def run_demo(out: Path, python: str = sys.executable, env: dict | None = None) -> dict:
    """Run ``transmem demo --out out`` with ``python`` (this source tree's code) and return its
    metrics.json."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = subprocess.run([python, "-m", "transmem.cli", "demo", "--out", str(out)], env=env).returncode
    if code:
        raise UserError(f"transmem demo --out {out}: exited with {code}")
    return read_json(Path(out) / "metrics.json", "the demo's results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="run the demo into this new folder, then compare")
    g.add_argument("--metrics", help="compare an earlier demo's metrics.json")
    g.add_argument("--table", action="store_true", help="print the README's table from demo_readme.json")
    g.add_argument("--set-readme", metavar="METRICS_JSON",
                   help="write demo_readme.json from this demo's metrics.json and print its table")
    p.add_argument("--commit", default=None, help="with --set-readme: the commit the demo ran at")
    args = p.parse_args(argv)
    try:
        if args.table:
            print(table(read_json(README_JSON, "the README's numbers")))
            return 0
        if args.set_readme:
            demo = read_json(Path(args.set_readme), "the demo's results")
            readme = {"commit": args.commit, "command": "transmem demo --out DIR",
                      "wall_s": demo.get("wall_s"), "environment": demo.get("environment"),
                      "methods": scores(demo.get("methods", {}))}
            README_JSON.write_text(json.dumps(readme, indent=2) + "\n", encoding="utf-8")
            print(table(readme))
            return 0
        tol = tolerance()
        ref = read_json(README_JSON, "the README's numbers")
        if args.metrics:
            demo = read_json(Path(args.metrics), "the demo's results")
        else:
            if Path(args.out).exists():
                raise UserError(f"{args.out}: exists; choose a new --out (nothing was changed)")
            demo = run_demo(Path(args.out))
        new = scores(demo.get("methods", {}))
        bad = outside(ref["methods"], new, tol)
        diffs = relative_differences(ref["methods"], new)
        print(f"against the README's table (commit {ref.get('commit')}), tolerance {100 * tol:.2f} % "
              f"(measured: {MEASURED_JSON.relative_to(REPO)}):")
        for m, d in diffs.items():
            worst = largest({m: d})
            print(f"  {m:28s} largest relative difference {100 * worst:6.2f} %"
                  f"{'  OUTSIDE' if worst > tol else ''}")
        if bad:
            print(f"{len(bad)} row(s) outside the tolerance:")
            for line in bad:
                print("  " + line)
            return 1
        print("every row reproduces within the tolerance")
        return 0
    except UserError as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""How far the demo's numbers move with the thread count, the CPU's kernels and the package
versions: the tolerance `make reproduce` (benchmarks/reproduce.py) checks the README's table with.

Runs ``transmem demo`` once per variant (one at a time) into ROOT/<variant>, compares every run
with the reference (the locked versions, 2 threads, the machine's own kernels) row by row, and
writes results/reproducibility.json: each run's environment block, the relative difference of
every metric of every row, and the tolerance: the largest relative difference measured, rounded
up to the next 0.5 %.

    python benchmarks/reproducibility.py --root runs/repro                       # 3 demos, ~10 min
    python benchmarks/reproducibility.py --root runs/repro --newest-python /tmp/newest/bin/python \
        --older-python /tmp/older/bin/python

Variants: the lock on 2 threads (the reference) and on 1 thread (OMP_NUM_THREADS); the lock
with torch, oneDNN and MKL held to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS: another CPU, on this one); with ``--newest-python``, a venv that holds
the newest versions in pyproject.toml's ranges (``make install VENV=/tmp/newest LOCK=``); with
``--older-python``, a venv holding older versions in those ranges (the lock, then ``pip install``
of older lightning, torchmetrics, numpy, pillow, opencv: the run's environment block names them).
``--python`` is the lock's interpreter (default: this one). A finished run (its metrics.json) is
kept and not redone; ``--extra LABEL=DIR`` adds an earlier demo run to the comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import claims  # noqa: E402
import reproduce  # noqa: E402
from transmem.environment import differences  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# idle OpenMP threads sleep instead of spinning: on a loaded machine a 2-thread demo then takes
# minutes, not an hour; it changes no number (the same runs agree to the last digit either way)
TWO = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
REFERENCE = "lock, 2 threads"
# label -> (folder, environment variables, the interpreter: None for --python, else the option naming it)
VARIANTS = {
    REFERENCE: ("lock-2threads", TWO, None),
    "lock, 1 thread": ("lock-1thread", {"OMP_NUM_THREADS": "1"}, None),
    "lock, AVX2 kernels, 2 threads": ("lock-avx2", {**TWO, **AVX2}, None),
    "newest in range, 2 threads": ("newest-2threads", TWO, "newest_python"),
    "older versions in range, 2 threads": ("older-2threads", TWO, "older_python"),
}
STEP = 0.005  # the tolerance is the largest measured difference rounded up to a multiple of this


def tolerance_from(largest: float) -> float:
    """The largest measured relative difference, rounded up to the next multiple of STEP (and
    at least STEP: runs that agreed to the last digit on one machine still differ on another)."""
    return max(STEP, math.ceil(round(largest / STEP, 9)) * STEP)


def compare(ref: dict, new: dict) -> dict:
    """One comparison of two demo results (metrics.json): what differs in their environment, the
    relative difference of every metric of every row, and the largest (all rows; learned rows)."""
    diffs = reproduce.relative_differences(reproduce.scores(ref["methods"]), reproduce.scores(new["methods"]))
    learned = [m for m in diffs if m not in reproduce.BASELINES]
    return {
        "environment_differs": {k: list(v) for k, v in differences(ref.get("environment") or {},
                                                                  new.get("environment") or {}).items()},
        "largest": reproduce.largest(diffs),
        "largest_learned": reproduce.largest(diffs, learned),
        "rows": {m: {k: (None if v is None else round(v, 6)) for k, v in d.items()} for m, d in diffs.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the demo runs go to ROOT/<variant>")
    p.add_argument("--python", default=sys.executable, help="the lock's interpreter")
    p.add_argument("--newest-python", default=None, help="an interpreter with the newest versions in range")
    p.add_argument("--older-python", default=None,
                   help="an interpreter with other (older) versions in range; its runs' environment says which")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                   help="an earlier demo run (DIR/metrics.json) to compare as well")
    p.add_argument("--variants", default=None,
                   help="comma-separated folders of the variants to run or keep (default: all); "
                        f"{', '.join(v[0] for v in VARIANTS.values())}")
    p.add_argument("--readme-before", default=str(reproduce.README_JSON),
                   help="the README's numbers the reference is compared with (default: demo_readme.json)")
    p.add_argument("--note", default=None, help="a sentence the JSON keeps (how the runs were made)")
    p.add_argument("--json", default=str(HERE / "results" / "reproducibility.json"))
    args = p.parse_args(argv)
    root = Path(args.root)
    readme_before = json.loads(Path(args.readme_before).read_text(encoding="utf-8"))
    wanted = set(args.variants.split(",")) if args.variants else {v[0] for v in VARIANTS.values()}
    if not {VARIANTS[REFERENCE][0]} <= wanted <= {v[0] for v in VARIANTS.values()}:
        raise SystemExit(f"--variants: give {VARIANTS[REFERENCE][0]} and any of "
                         f"{', '.join(v[0] for v in VARIANTS.values())}")
    results = {}
    for label, (folder, env, option) in VARIANTS.items():
        if folder not in wanted:
            continue
        python = getattr(args, option) if option else args.python
        if not python:
            print(f"[reproducibility] {label}: skipped (no --{option.replace('_', '-')})")
            continue
        out = root / folder
        if (out / "metrics.json").is_file():
            print(f"[reproducibility] {label}: kept {out}")
            results[label] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            continue
        if out.exists():  # an interrupted run: the demo does not resume
            raise SystemExit(f"{out}: holds an unfinished demo; remove it and rerun")
        print(f"[reproducibility] {label}: transmem demo --out {out}")
        results[label] = reproduce.run_demo(out, python, env)
    for spec in args.extra:
        label, _, d = spec.partition("=")
        results[label] = json.loads((Path(d) / "metrics.json").read_text(encoding="utf-8"))
    ref = results[REFERENCE]
    comparisons = {label: compare(ref, r) for label, r in results.items() if label != REFERENCE}
    measured = max((c["largest"] for c in comparisons.values()), default=0.0)
    result = {
        "commit": claims.commit(REPO, ["src", "benchmarks/reproducibility.py", "benchmarks/reproduce.py",
                                       "requirements.lock"]),
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO)), *sys.argv[1:]]),
        "reference": REFERENCE,
        "note": args.note,
        "runs": {label: {"environment": r.get("environment"), "wall_s": r.get("wall_s"),
                         "methods": reproduce.scores(r["methods"])} for label, r in results.items()},
        "against_reference": comparisons,
        "largest_measured": measured,
        "tolerance": tolerance_from(measured),
        "tolerance_rule": f"the largest relative difference measured above (any metric, any row), "
                          f"rounded up to a multiple of {STEP}",
        # the README's table these runs were compared with before it was regenerated
        "reference_against_readme_before": {
            "readme_commit": readme_before.get("commit"),
            **compare({"methods": readme_before["methods"], "environment": readme_before.get("environment")}, ref),
        },
    }
    claims.write_json(args.json, result)
    print(f"wrote {args.json}: largest relative difference {100 * measured:.2f} %, tolerance "
          f"{100 * result['tolerance']:.1f} %")
    for label, c in comparisons.items():
        print(f"  {label:40s} largest {100 * c['largest']:6.2f} %  learned rows {100 * c['largest_learned']:6.2f} %"
              f"  differs in: {', '.join(c['environment_differs']) or 'nothing recorded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

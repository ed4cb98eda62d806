"""Shared by the benchmarks: runs are claimed through files, so that several worker processes can
share one list of runs and a finished run is never redone; the commit a run's code comes from;
the writers of their result JSONs, which record the environment (transmem.environment:
versions, CPU capability, threads) the numbers were computed with; and the paired t test their
verdicts quote."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this tree's transmem


def claim(d: Path) -> bool:
    """Create ``d/.claim`` if nobody has: True for the process that did."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(d / ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()} {time.time()}".encode())
    os.close(fd)
    return True


def commit(repo: Path, paths: list[str]) -> str:
    """HEAD's sha, with ``-dirty`` when ``paths`` (the library and the benchmark's own files)
    differ from it or hold files git does not track: the JSON then says its code was not HEAD's."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo, text=True).strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=repo).returncode != 0
        untracked = subprocess.check_output(["git", "ls-files", "--others", "--exclude-standard", "--", *paths],
                                            cwd=repo, text=True).strip()
        return sha + ("-dirty" if changed or untracked else "")
    except Exception:
        return "unknown"


def run_workers(argv: list[str], n: int, omp_threads: int | None = 1) -> list[int]:
    """Run ``n`` worker processes ``python *argv`` side by side (with ``OMP_NUM_THREADS`` set
    when ``omp_threads`` is given), wait for all of them, and say on stderr if any failed."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else {}))
    procs = [subprocess.Popen([sys.executable, *argv], env=env) for _ in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers exited with {codes}", file=sys.stderr)
    return codes


def _environment() -> dict:
    from transmem.environment import environment
    return environment()


def write_run(path, row: dict) -> Path:
    """One run's result JSON (``row`` and this process's ``environment`` block), written
    atomically: a worker records the threads and versions it ran with."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**row, "environment": row.get("environment") or _environment()}))
    os.replace(tmp, path)
    return path


def write_json(path, result: dict, runs=(), indent: int = 2) -> Path:
    """A benchmark's result JSON with an ``environment`` block: the one its ``runs`` (per-run
    results from :func:`write_run` or metrics.json) recorded when they agree, a list of the
    distinct ones when they do not, and this process's when they recorded none."""
    envs = []
    for r in runs:
        e = r.get("environment") if isinstance(r, dict) else None
        if e and e not in envs:
            envs.append(e)
    env = envs[0] if len(envs) == 1 else (envs or _environment())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**result, "environment": env}, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def paired_t(a, b) -> tuple[float, float | None]:
    """Paired t statistic of ``a - b`` and its two-sided p value (None without scipy); nan and None
    for fewer than two pairs or no spread."""
    import numpy as np
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return float("nan"), None
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))
    try:
        from scipy import stats
        return t, float(stats.t.sf(abs(t), len(d) - 1) * 2)
    except ImportError:
        return t, None

"""What a result was computed with: the versions, the CPU's kernels and the thread count that
every ``metrics.json`` and benchmark result JSON records (the ``environment`` block).

Learned numbers move with these (README, "Reproducing the numbers"): the same code gives other
digits under a newer numpy or lightning, another CPU capability (AVX2 against AVX-512 kernels) or
another thread count. Standard library and torch only, so that any layer may call it.
"""
from __future__ import annotations

import os
import platform

import torch

# name in the block -> the distributions that provide it (the first installed one is reported)
PACKAGES = {
    "torch": ("torch",),
    "lightning": ("lightning",),
    "torchmetrics": ("torchmetrics",),
    "numpy": ("numpy",),
    "pillow": ("pillow",),
    "pysteps": ("pysteps",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
}


def package_version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` that is installed, else None."""
    from importlib import metadata  # only when a result is written

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_capability() -> str | None:
    """The CPU kernels torch dispatches to ("AVX2", "AVX512", "DEFAULT", ...), None if unknown."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build: not worth failing a result for
        return None


def environment() -> dict:
    """The ``environment`` block: package versions (None when absent), Python, the CPU
    capability as torch reports it, platform, machine, CPU count and torch's thread count."""
    return {
        **{key: package_version(*dists) for key, dists in PACKAGES.items()},
        "python": platform.python_version(),
        "cpu_capability": cpu_capability(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def differences(a: dict, b: dict) -> dict:
    """The keys whose values differ between two environment blocks: {key: (a's, b's)}."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

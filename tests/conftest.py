"""Shared fixtures. Real data lives beside the checkout (../shared/data) and is optional."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real test data (``$TRANSMEM_SHARED_DATA`` or ``<repo>/../shared/data``).

    Tests that use it are skipped when the folder is absent: the project must not need it.
    """
    path = Path(os.environ.get("TRANSMEM_SHARED_DATA", _DEFAULT_SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set TRANSMEM_SHARED_DATA to point at it)")
    return path


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("transfer_map")``: a script of ``benchmarks/`` imported as a module (the
    benchmarks are scripts, not a package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load

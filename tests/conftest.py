"""Shared fixtures. Real data lives beside the checkout (../shared/data) and is optional."""
from __future__ import annotations

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

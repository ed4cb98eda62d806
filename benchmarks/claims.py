"""Shared by the resumable benchmarks: runs are claimed through files, so that several worker
processes can share one list of runs and a finished run is never redone."""
from __future__ import annotations

import os
import time
from pathlib import Path


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

"""One error type for every bad input, so the CLI can print one clean line and exit non-zero."""
from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data. ``str(err)`` is a single line: ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # force one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)

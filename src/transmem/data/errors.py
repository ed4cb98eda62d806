"""One error type for every bad input data, a :class:`~transmem.errors.UserError`: the CLI prints
one clean line and exits non-zero."""
from __future__ import annotations

import os

from ..errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. ``str(err)`` is a single line: ``<path>: <problem>``; ``where`` is the path
    (or, without one, the key the problem names)."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # force one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem, where=self.path)

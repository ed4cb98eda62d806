"""One base class for every error that is the user's to fix (a config key, a data file, a zoo
entry, an output folder). The command line catches this one class and prints its one-line
message (exit status 2); a library user can catch it to tell bad input from a bug. Torch-free and
import-free: the lowest layer, so that every module can subclass it."""
from __future__ import annotations

import os


class UserError(Exception):
    """A problem with what the user gave. ``where``: the file, config key or flag the message
    names (given by the raiser, or read from the message's ``WHERE: problem`` form); None when
    it names neither."""

    def __init__(self, *args, where: str | os.PathLike | None = None):
        super().__init__(*args)
        self._where = None if where is None else os.fspath(where)

    @property
    def where(self) -> str | None:
        if self._where is not None:
            return self._where
        head, sep, _ = (str(self.args[0]) if self.args else "").partition(": ")
        words = head.split()
        if not sep or not words or (len(words) > 1 and not words[0].startswith("--")):
            return None  # a sentence, not "WHERE: problem" ("--flag 'value': ..." names the flag)
        return words[0].split("=", 1)[0]  # "train.steps=0: ..." names train.steps


class ChoiceError(UserError, ValueError):
    """A setting outside its fixed set of values (:func:`transmem.choices.check`)."""


class Diverged(UserError, FloatingPointError):
    """Training or a probe produced NaN/Inf (a learning rate too high, or bad data)."""


class WrongKind(UserError, ValueError):
    """A model of another kind than the one needed (a transfer model where a backbone goes)."""

"""SIGTERM and SIGINT as a scheduler (Slurm, Kubernetes, systemd) or a terminal sends them.

One owner for what a signal does to a transmem command (see ``docs/reliability.md``):

- **start-up** (:func:`install_startup`, while the CLI's imports run): nothing has been created
  yet, so the handler writes one line and ends the process at once with ``128 + signum`` (130 for
  SIGINT, 143 for SIGTERM); a traceback from the middle of an import is never shown.
- **running** (:func:`install`): the handler raises :class:`Interrupted`, which the CLI turns into
  one line and the same status after the ``finally`` blocks and atomic writes have cleaned up.
- **training** (:func:`deferred`): the first signal is only recorded; the training loop ends the
  step it is in, writes a checkpoint when the steps since the last one would otherwise be lost,
  and then raises :class:`Interrupted` (:func:`raise_if_pending`). A second signal raises at once.

Standard library only: every layer may use it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

_state = {"defer": 0, "pending": None}


class Interrupted(BaseException):
    """SIGINT or SIGTERM. Not a KeyboardInterrupt nor a SystemExit, so that no library on the way
    swallows it (Lightning turns a KeyboardInterrupt into ``exit(1)`` and its own SIGTERM handling
    into a ``SystemExit`` without a code, i.e. status 0): it reaches the CLI, which ends with one
    line and status ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"interrupted ({signal.Signals(self.signum).name})"


def message(signum: int) -> str:
    return (f"transmem: interrupted ({signal.Signals(signum).name}); nothing half-written is left, "
            "and a training run continues with --resume")


def _ours(handler) -> bool:
    return handler in (_on_signal, _on_startup_signal)


def _replaceable(sig, handler) -> bool:
    """Only a default disposition is replaced: an ignored SIGINT (``nohup``, ``&``) stays ignored,
    and an embedding program's own handler stays."""
    return handler is _DEFAULTS[sig] or _ours(handler)


def _set(handler) -> dict:
    old = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for sig in SIGNALS:
        try:
            cur = signal.getsignal(sig)
            if _replaceable(sig, cur):
                old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    return old


def _on_startup_signal(signum, frame):
    try:
        sys.stderr.write(message(signum) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + int(signum))


def _on_signal(signum, frame):
    if _state["defer"] > 0 and _state["pending"] is None:
        _state["pending"] = int(signum)  # the training loop stops at the end of its step
        return
    raise Interrupted(signum)


def install_startup() -> dict:
    """Handlers for the start-up of the CLI process (imports): one line, exit ``128 + signum``.
    Returns the handlers replaced (for :func:`restore`)."""
    return _set(_on_startup_signal)


def install() -> dict:
    """Handlers that raise :class:`Interrupted`; returns the handlers replaced."""
    _state["pending"] = None
    return _set(_on_signal)


def restore(old: dict) -> None:
    for sig, handler in old.items():
        try:
            signal.signal(sig, handler if not _ours(handler) else _DEFAULTS[sig])
        except (ValueError, OSError, TypeError):
            pass


def active() -> bool:
    """Whether :func:`install`'s handlers are in place (a CLI command is running)."""
    try:
        return any(signal.getsignal(s) is _on_signal for s in SIGNALS)
    except (ValueError, OSError):
        return False


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: the first SIGINT/SIGTERM is recorded (:func:`pending`) instead of raised."""
    if _state["defer"] == 0:
        _state["pending"] = None  # (a stale one, of an earlier fit in this process)
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def pending() -> int | None:
    """The signal recorded inside :func:`deferred`, or None."""
    return _state["pending"]


def note(signum: int) -> None:
    """Record a signal that someone else caught (Lightning's SIGTERM flag)."""
    if _state["pending"] is None:
        _state["pending"] = int(signum)


def raise_if_pending() -> None:
    if _state["pending"] is not None:
        raise Interrupted(_state["pending"])

"""Progress output: bars on a terminal, a few plain lines otherwise.

On a terminal the Trainer keeps Lightning's own progress bar and :func:`~.evaluation.evaluate`
a tqdm bar. When the stream is not a terminal (``transmem demo > log``, a batch job) a bar would
write thousands of carriage-return refreshes into the file; there :class:`LineProgress` and
:func:`progress_lines` write about one plain line per 10 % of the work instead (and one at least
every minute), e.g. ``train step 120/300 loss 0.0123 val/mse 0.0456 12.3 s``. Neither touches
anything the training computes.
"""
from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

LINES = 10       # about one line per 10 % of the steps / batches
EVERY_S = 60.0   # and one at least this often


def is_terminal(stream) -> bool:
    """Whether ``stream`` renders progress bars: a TTY, or a Jupyter kernel's output stream."""
    if type(stream).__module__.split(".")[0] == "ipykernel":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _interval(total, lines: int) -> int | None:
    return max(1, math.ceil(total / lines)) if total and total > 0 and total != float("inf") else None


class LineProgress(ProgressBar):
    """Training progress as plain lines (for output that is not a terminal): a line every
    ``ceil(max_steps / lines)`` optimizer steps and at least every ``every_s`` seconds, with the
    metrics logged with ``prog_bar=True`` (``train/`` dropped from their names). A step's line is
    written when the next step starts (or training ends), so that it shows a validation run at
    that step. Writes to ``stream`` (default: ``sys.stdout`` at the time of writing, where
    Lightning's bar writes); only global rank 0 writes."""

    def __init__(self, stream=None, lines: int = LINES, every_s: float = EVERY_S):
        super().__init__()
        self._stream = stream
        self.lines, self.every_s = int(lines), float(every_s)
        self._enabled = True
        self._t0 = self._last_t = 0.0
        self._last_step = -1

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        if self._enabled:
            kwargs.setdefault("file", self.stream)
            print(*args, **kwargs)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last_t = time.monotonic()
        self._last_step = trainer.global_step  # nothing to report before the first step (of a resume)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._report(trainer, final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer, final=True)

    def _report(self, trainer, final: bool) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_step:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        every = _interval(total, self.lines)
        now = time.monotonic()
        if final or (every and step % every == 0) or now - self._last_t >= self.every_s:
            self._last_step, self._last_t = step, now
            parts = [f"train step {step}" + (f"/{total}" if total else "")]
            for name, value in trainer.progress_bar_metrics.items():
                try:
                    parts.append(f"{name.removeprefix('train/')} {float(value):.4g}")
                except (TypeError, ValueError):
                    continue
            parts.append(f"{now - self._t0:.1f} s")
            print(" ".join(parts), file=self.stream, flush=True)


def progress_lines(iterable, total: int | None, desc: str, stream=None, lines: int = LINES,
                   every_s: float = EVERY_S, unit: str = "batch"):
    """Yield from ``iterable``, writing ``"{desc} {unit} {n}/{total} {seconds} s"`` after about every
    ``1/lines`` of ``total`` items, at least every ``every_s`` seconds, and after the last item
    (to ``stream``, default ``sys.stderr``, where tqdm writes)."""
    every = _interval(total, lines)
    t0 = last = time.monotonic()
    n = shown = 0

    def line(now):
        out = stream if stream is not None else sys.stderr
        print(f"{desc} {unit} {n}" + (f"/{total}" if total else "") + f" {now - t0:.1f} s", file=out, flush=True)

    for item in iterable:
        yield item
        n += 1
        now = time.monotonic()
        if (every and n % every == 0) or n == total or now - last >= every_s:
            line(now)
            shown, last = n, now
    if n != shown:
        line(time.monotonic())


def train_progress(enabled: bool, stream=None) -> tuple[bool, list]:
    """``(enable_progress_bar, extra callbacks)`` for the Trainer: nothing when progress is off,
    Lightning's own bar when ``stream`` (default ``sys.stdout``) is a terminal, else
    :class:`LineProgress`."""
    if not enabled:
        return False, []
    if is_terminal(stream if stream is not None else sys.stdout):
        return True, []
    return True, [LineProgress(stream)]


def eval_progress(iterable, total: int, desc: str, stream=None, unit: str = "batch"):
    """``iterable`` with a tqdm bar when ``stream`` (default ``sys.stderr``) is a terminal, else
    with :func:`progress_lines` (``unit``: what one item is, e.g. ``batch`` or ``entry``)."""
    if is_terminal(stream if stream is not None else sys.stderr):
        return tqdm(iterable, total=total, desc=desc, leave=False, unit=unit,
                    **({} if stream is None else {"file": stream}))
    return progress_lines(iterable, total, desc, stream, unit=unit)


class BlockProgress:
    """Progress of work done in blocks (generating data): silent when the whole job is expected
    to take less than ``after_s`` (judged after the first block) unless ``force``; then a tqdm bar
    on a terminal, else about one plain line per 10 % (``"{desc} {unit} {n}/{total} {s} s"``).
    ``force=False``: never."""

    def __init__(self, total: int, desc: str, unit: str = "clip", after_s: float = 2.0,
                 force: bool | None = None, stream=None):
        self.total, self.desc, self.unit, self.after_s = total, desc, unit, after_s
        self.force, self.stream = force, stream
        self._t0 = time.monotonic()
        self._bar = None
        self._every = None  # plain lines: one per this many items
        self._done = self._blocks = 0

    def update(self, done: int, blocks_total: int) -> None:
        """``done`` items are finished after this block; ``blocks_total`` blocks in all."""
        self._blocks += 1
        before, self._done = self._done, done
        if self._bar is None and self._every is None:
            if self._blocks > 1 or blocks_total <= 1 or self.force is False:
                return
            if not (self.force or (time.monotonic() - self._t0) * blocks_total > self.after_s):
                return
            stream = self.stream if self.stream is not None else sys.stderr
            if is_terminal(stream):
                self._bar = tqdm(total=self.total, initial=done, unit=self.unit, desc=self.desc,
                                 **({} if self.stream is None else {"file": self.stream}))
                return
            self._every = _interval(self.total, LINES) or 1
        if self._bar is not None:
            self._bar.update(done - before)
        elif done // self._every > before // self._every or done == self.total:
            out = self.stream if self.stream is not None else sys.stderr
            print(f"{self.desc} {self.unit} {done}/{self.total} {time.monotonic() - self._t0:.1f} s",
                  file=out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

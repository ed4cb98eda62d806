"""Pictures of predictions and results: animated GIFs, frame grids, per-frame metric plots and
transfer-weight maps.

Frame sequences are ``(T, C, H, W)`` arrays or tensors (``C`` = 1 or 3; ``(T, H, W)`` is read as
``C = 1``) with values in [0, 1]; values outside are clipped and NaN is drawn black. GIFs and grids
are drawn with Pillow (nearest-neighbour upscaling, so every pixel of a small frame stays a sharp
block); plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).

Every file is written atomically (:func:`transmem.files.atomic_write`), so a reader never sees a
half-written file. Each function
returns the :class:`pathlib.Path` it wrote.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

__all__ = ["save_gif", "save_grid", "plot_per_frame", "plot_transfer_maps", "to_uint8_frames"]

_BG = (255, 255, 255)
_BLANK = (225, 225, 225)
_TEXT = (0, 0, 0)
_MARGIN = 4  # pixels around and between panels
_GAP = 2  # pixels between grid cells
_COL_GAP = 10  # pixels between GIF panels


# ----------------------------------------------------------------------------- helpers
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_uint8_frames(x: Any, scale: int = 1) -> np.ndarray:
    """``(T, C, H, W)`` (or ``(T, H, W)``) in [0, 1] -> ``(T, H*scale, W*scale, 3)`` uint8 RGB."""
    a = _as_numpy(x).astype(np.float32, copy=False)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"expected a (T, C, H, W) sequence with C in (1, 3), got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    u8 = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    u8 = np.transpose(u8, (0, 2, 3, 1))  # (T, H, W, C)
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    if scale > 1:
        u8 = np.repeat(np.repeat(u8, scale, axis=1), scale, axis=2)
    return np.ascontiguousarray(u8)


@functools.lru_cache(maxsize=4)
def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans shipped inside matplotlib (Unicode labels such as 'λ'), else Pillow's default."""
    try:
        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(ttf), size=size)
    except Exception:  # noqa: BLE001 - any font problem falls back to the built-in font
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without the sized default font
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _line_height(font: Any) -> int:
    return _text_size(font, "Ag|t=0")[1] + 2


def _check_rows(rows: Sequence[Any], labels: Sequence[str]) -> None:
    if len(rows) == 0:
        raise ValueError("need at least one row")
    if len(labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")


# ----------------------------------------------------------------------------- GIF
def save_gif(
    path: str | os.PathLike[str],
    rows: Sequence[Any],
    labels: Sequence[str],
    fps: float = 4,
    scale: int = 4,
    pad: str = "blank",
) -> Path:
    """Animated GIF: GIF frame ``t`` shows ``rows[i][t]`` side by side, each under its label.

    ``rows`` are ``(T_i, C, H_i, W_i)`` sequences (e.g. input, ground truth, one prediction per
    method); the GIF has ``max(T_i)`` frames. Where a row has ended, its panel is a grey blank
    (``pad="blank"``) or keeps its last frame (``pad="hold"``). A frame counter ``t = k/T`` under
    the panels also keeps consecutive GIF frames distinct (GIF writers merge identical ones).
    Frames are upscaled ``scale`` times with nearest neighbour. Loops forever at ``fps``.
    """
    _check_rows(rows, labels)
    if pad not in ("blank", "hold"):
        raise ValueError(f"pad must be 'blank' or 'hold', got {pad!r}")
    seqs = [to_uint8_frames(r, scale=max(1, int(scale))) for r in rows]
    t_max = max(s.shape[0] for s in seqs)
    font = _font()
    lh = _line_height(font)
    col_w = [max(s.shape[2], _text_size(font, lab)[0]) for s, lab in zip(seqs, labels)]
    panel_h = max(s.shape[1] for s in seqs)
    width = 2 * _MARGIN + sum(col_w) + _COL_GAP * (len(col_w) - 1)
    height = _MARGIN + lh + _MARGIN + panel_h + _MARGIN + lh + _MARGIN

    frames: list[Image.Image] = []
    for t in range(t_max):
        img = Image.new("RGB", (width, height), _BG)
        draw = ImageDraw.Draw(img)
        x = _MARGIN
        for s, lab, cw in zip(seqs, labels, col_w):
            tw = _text_size(font, lab)[0]
            draw.text((x + (cw - tw) // 2, _MARGIN), lab, fill=_TEXT, font=font)
            ph, pw = s.shape[1], s.shape[2]
            px, py = x + (cw - pw) // 2, 2 * _MARGIN + lh
            if t < s.shape[0] or (pad == "hold" and s.shape[0] > 0):
                img.paste(Image.fromarray(s[min(t, s.shape[0] - 1)]), (px, py))
            else:
                draw.rectangle((px, py, px + pw - 1, py + ph - 1), fill=_BLANK)
            x += cw + _COL_GAP
        draw.text((_MARGIN, 3 * _MARGIN + lh + panel_h), f"t = {t + 1}/{t_max}", fill=_TEXT, font=font)
        frames.append(img)

    duration = max(20, int(round(1000.0 / float(fps))))

    def write(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=duration, loop=0, disposal=1)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- grid
def save_grid(
    path: str | os.PathLike[str],
    rows: Sequence[Any],
    labels: Sequence[str],
    scale: int = 2,
    col_labels: Sequence[str] | None = None,
    label_width: int | None = None,
) -> Path:
    """PNG grid: one row per sequence/method (label on the left), one column per time step.

    Rows of different lengths leave blank cells on the right. ``col_labels`` titles the columns
    (default ``1..T``). Layout, with ``cw, ch`` the largest upscaled frame and ``T`` the longest
    row: width = ``label_width + GAP + T*(cw + GAP)``, height = ``header + GAP + R*(ch + GAP)``,
    ``GAP = 2``; ``label_width`` defaults to the widest label plus margins.
    """
    _check_rows(rows, labels)
    seqs = [to_uint8_frames(r, scale=max(1, int(scale))) for r in rows]
    t_max = max(s.shape[0] for s in seqs)
    if col_labels is None:
        col_labels = [str(i + 1) for i in range(t_max)]
    font = _font()
    lh = _line_height(font)
    cw = max(s.shape[2] for s in seqs)
    ch = max(s.shape[1] for s in seqs)
    if label_width is None:
        label_width = max(_text_size(font, lab)[0] for lab in labels) + 2 * _MARGIN
    header = lh + 2 * _GAP
    width = label_width + _GAP + t_max * (cw + _GAP)
    height = header + _GAP + len(seqs) * (ch + _GAP)

    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    for j in range(t_max):
        if j < len(col_labels):
            tw = _text_size(font, col_labels[j])[0]
            x0 = label_width + _GAP + j * (cw + _GAP)
            draw.text((x0 + (cw - tw) // 2, _GAP), col_labels[j], fill=_TEXT, font=font)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        y0 = header + _GAP + i * (ch + _GAP)
        if label_width > 0:
            draw.text((_MARGIN, y0 + max(0, (ch - lh) // 2)), lab, fill=_TEXT, font=font)
        for j in range(t_max):
            x0 = label_width + _GAP + j * (cw + _GAP)
            if j < s.shape[0]:
                img.paste(Image.fromarray(s[j]), (x0, y0))
            else:
                draw.rectangle((x0, y0, x0 + cw - 1, y0 + ch - 1), fill=_BLANK)

    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------- plots
def _new_figure(figsize: tuple[float, float], layout: str | None = None) -> Any:
    fig = Figure(figsize=figsize, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def plot_per_frame(
    path: str | os.PathLike[str],
    curves: Mapping[str, Sequence[float | None]],
    metric_name: str,
    ylabel: str | None = None,
) -> Path:
    """PNG line plot of a per-frame metric: one line per method, x = lead time 1..T_out.

    ``None`` values (undefined scores) leave gaps in the line.
    """
    if not curves:
        raise ValueError("need at least one curve")
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    t_max = 1
    for name, vals in curves.items():
        y = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        t_max = max(t_max, len(y))
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=str(name))
    ax.set_xlabel("lead time (frames ahead)")
    ax.set_ylabel(ylabel if ylabel is not None else metric_name)
    ax.set_title(f"{metric_name} per lead time")
    if t_max <= 20:
        ax.set_xticks(np.arange(1, t_max + 1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_transfer_maps(
    path: str | os.PathLike[str],
    maps: Any,
    source_names: Sequence[str],
    title: str,
    steps: Sequence[int] | None = None,
    max_cols: int = 6,
    cmap: str = "viridis",
) -> Path:
    """Heatmaps of transfer weights: a row per source, a column per selected time step.

    ``maps`` is ``(N_sources, T, h, w)`` (``(N, T)`` is read as 1x1 maps). ``steps`` are 0-based
    indices of the steps to show; by default up to ``max_cols`` evenly spaced steps including the
    first and the last. All panels share one colour scale, shown by one colorbar; columns are
    titled with 1-based lead times.
    """
    m = _as_numpy(maps).astype(np.float64, copy=False)
    if m.ndim == 2:
        m = m[:, :, None, None]
    if m.ndim != 4:
        raise ValueError(f"maps must be (N_sources, T, h, w), got shape {m.shape}")
    n, t = m.shape[:2]
    if len(source_names) != n:
        raise ValueError(f"{n} sources but {len(source_names)} names")
    if steps is None:
        k = max(1, min(int(max_cols), t))
        steps = sorted(set(np.linspace(0, t - 1, k).round().astype(int).tolist()))
    steps = [int(s) for s in steps]
    if any(s < 0 or s >= t for s in steps):
        raise ValueError(f"steps must lie in [0, {t - 1}], got {steps}")
    finite = m[np.isfinite(m)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-6

    cols = len(steps)
    fig = _new_figure((1.5 * cols + 1.2, 1.5 * n + 0.7), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    im = None
    for i in range(n):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            im = ax.imshow(m[i, s], vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t = {s + 1}", fontsize="small")
            if j == 0:
                ax.set_ylabel(str(source_names[i]), fontsize="small")
    fig.suptitle(title)
    fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.8, label="weight")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))

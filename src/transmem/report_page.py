"""Result reports: a Markdown file and a self-contained HTML file (images embedded as data URIs).

The metric table takes, per method, a dict such as the one :meth:`transmem.metrics.FrameMetrics.compute`
returns. Known columns, in this order, when at least one method has them:

=================  ==============================================  ==========
key                column                                           best
=================  ==============================================  ==========
``mse``            MSE/frame (squared error summed over a frame)   lowest
``mse_pixel``      MSE/pixel                                       lowest
``mae``            MAE/frame (summed over a frame)                 lowest
``mae_pixel``      MAE/pixel                                       lowest
``ssim``           SSIM                                            highest
``psnr``           PSNR (dB)                                       highest
``rmse_physical``  RMSE in the data's units (``units``: mm/h, K)   lowest
``mae_physical``   MAE in the data's units                         lowest
``csi[th].mean``   CSI >= th, one column per threshold             highest
=================  ==============================================  ==========

Any other scalar number in a method's dict (e.g. ``"steps"``, ``"wall_s"``) becomes an extra column
after these, with no best marked; lists, dicts and ``count`` are left out. The best value of each
known column is bold (all tied values are). Missing or ``None`` values show as an en dash.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_text

__all__ = ["write_report", "summarize_transfer", "build_table"]

# key -> (header, higher_is_better)
_KNOWN: list[tuple[str, str, bool]] = [
    ("mse", "MSE/frame", False),
    ("mse_pixel", "MSE/pixel", False),
    ("mae", "MAE/frame", False),
    ("mae_pixel", "MAE/pixel", False),
    ("ssim", "SSIM", True),
    ("psnr", "PSNR (dB)", True),
    ("rmse_physical", "RMSE ({units})", False),
    ("mae_physical", "MAE ({units})", False),
]
_SKIP = {"count"}
_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".svg": "image/svg+xml", ".webp": "image/webp"}
_DASH = "\u2013"


def _num(v: Any) -> float | None:
    """A finite real number (Python, numpy or one-element tensor) as float, else None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    if hasattr(v, "numel") and callable(v.numel) and v.numel() == 1:  # torch tensor
        return _num(v.item())
    if isinstance(v, np.ndarray) and v.size == 1:
        return _num(v.item())
    return None


_KNOWN_KEYS = {k for k, _, _ in _KNOWN}


def _fmt(v: float | None, key: str) -> str:
    if v is None:
        return _DASH
    if key == "ssim" or key.startswith("csi@"):
        return f"{v:.4f}"
    if key == "psnr":
        return f"{v:.2f}"
    if key not in _KNOWN_KEYS and v.is_integer():
        return f"{int(v)}"
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.4g}"


def build_table(table: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Headers, formatted cells and bold flags of the metric table (first column: method)."""
    methods = list(table)
    cols: list[tuple[str, str, bool | None]] = []  # (key, header, higher_is_better or None)
    values: dict[str, list[float | None]] = {}

    present = {k for m in methods for k in table[m]}
    units = next((table[m]["units"] for m in methods if isinstance(table[m].get("units"), str)), "data units")
    for key, header, hib in _KNOWN:
        if key in present:
            cols.append((key, header.format(units=units), hib))
            values[key] = [_num(table[m].get(key)) for m in methods]
    thresholds: list[str] = []
    for m in methods:
        csi = table[m].get("csi")
        if isinstance(csi, Mapping):
            for th in csi:
                if th not in thresholds:
                    thresholds.append(th)
    for th in thresholds:
        key = f"csi@{th}"
        cols.append((key, f"CSI \u2265 {th}", True))
        vals: list[float | None] = []
        for m in methods:
            entry = table[m].get("csi", {}).get(th) if isinstance(table[m].get("csi"), Mapping) else None
            vals.append(_num(entry.get("mean")) if isinstance(entry, Mapping) else _num(entry))
        values[key] = vals
    known_keys = {k for k, _, _ in _KNOWN} | {"csi", "pod", "far", "hss", "contingency"} | _SKIP
    for m in methods:
        for key, v in table[m].items():
            if key in known_keys or key in values or _num(v) is None:
                continue
            cols.append((key, key, None))
            values[key] = [_num(table[mm].get(key)) for mm in methods]

    headers = ["Method"] + [h for _, h, _ in cols]
    cells: list[list[str]] = []
    bold: list[list[bool]] = []
    best: dict[str, float | None] = {}
    for key, _, hib in cols:
        finite = [v for v in values[key] if v is not None]
        best[key] = None if hib is None or not finite else (max(finite) if hib else min(finite))
    for i, m in enumerate(methods):
        row = [str(m)]
        brow = [False]
        for key, _, _ in cols:
            v = values[key][i]
            b = best[key]
            row.append(_fmt(v, key))
            brow.append(v is not None and b is not None and math.isclose(v, b, rel_tol=1e-12, abs_tol=0.0))
        cells.append(row)
        bold.append(brow)
    return headers, cells, bold


def _notes_list(notes: Sequence[str] | str) -> list[str]:
    if isinstance(notes, str):
        return [notes] if notes.strip() else []
    return [str(n) for n in notes if str(n).strip()]


def _setting_str(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md(title: str, headers: list[str], cells: list[list[str]], bold: list[list[bool]],
        images: Sequence[tuple[str, str]], notes: list[str], settings: Mapping[str, Any] | None) -> str:
    out = [f"# {title}", ""]
    if notes:
        out += [f"- {n}" for n in notes] + [""]
    out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    for row, brow in zip(cells, bold):
        out.append("| " + " | ".join(f"**{_md_cell(c)}**" if b else _md_cell(c) for c, b in zip(row, brow)) + " |")
    out.append("")
    out.append("MSE/frame and MAE/frame: error summed over the pixels of one frame, averaged over "
               "sequences and lead times; /pixel: per-pixel mean. Best value per column in bold.")
    out.append("")
    for caption, rel in images:
        out += [f"## {caption}", "", f"![{caption}]({Path(rel).as_posix()})", ""]
    if settings:
        out += ["## Settings", ""]
        out += [f"- `{k}`: {_md_cell(_setting_str(v))}" for k, v in settings.items()]
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 10px}
th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.5em 0}
figcaption{font-weight:600;margin-bottom:.4em}
img{max-width:100%}
img.px{image-rendering:pixelated}
.small{color:#666;font-size:90%}
"""


def _html(title: str, headers: list[str], cells: list[list[str]], bold: list[list[bool]],
          images: Sequence[tuple[str, str]], out_dir: Path, notes: list[str],
          settings: Mapping[str, Any] | None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
    for row, brow in zip(cells, bold):
        tds = []
        for j, (c, b) in enumerate(zip(row, brow)):
            txt = f"<b>{e(c)}</b>" if b else e(c)
            tds.append(f"<td>{txt}</td>" if j == 0 else f'<td class="num">{txt}</td>')
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table>")
    parts.append('<p class="small">MSE/frame and MAE/frame: error summed over the pixels of one frame, '
                 "averaged over sequences and lead times; /pixel: per-pixel mean. Best value per column "
                 "in bold.</p>")
    for caption, rel in images:
        p = out_dir / rel
        parts.append(f"<figure><figcaption>{e(caption)}</figcaption>")
        if p.is_file():
            mime = _MIME.get(p.suffix.lower(), "application/octet-stream")
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            cls = ' class="px"' if p.suffix.lower() == ".gif" else ""  # frames: keep pixels sharp
            parts.append(f'<img{cls} alt="{e(caption)}" src="data:{mime};base64,{data}">')
        else:
            warnings.warn(f"report image not found: {p}", stacklevel=3)
            parts.append(f'<p class="small">(image missing: {e(str(rel))})</p>')
        parts.append("</figure>")
    if settings:
        parts.append("<h2>Settings</h2><table><tbody>")
        for k, v in settings.items():
            parts.append(f"<tr><th>{e(str(k))}</th><td><code>{e(_setting_str(v))}</code></td></tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: str | os.PathLike[str],
    title: str,
    table: Mapping[str, Mapping[str, Any]],
    images: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] | str = "",
    settings: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/report.md`` and a self-contained ``out_dir/report.html``.

    ``table`` maps each method to its metrics dict (see the module docstring for the columns).
    ``images`` are ``(caption, path relative to out_dir)``: linked from the Markdown, embedded as
    base64 data URIs in the HTML (a missing file gives a warning and a placeholder). ``notes`` (a
    string or a list) become a bullet list; ``settings`` a key/value list. Returns both paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headers, cells, bold = build_table(table)
    notes_l = _notes_list(notes)
    md = _md(title, headers, cells, bold, images, notes_l, settings)
    page = _html(title, headers, cells, bold, images, out, notes_l, settings)
    md_path = write_text(out / "report.md", md)
    html_path = write_text(out / "report.html", page)
    return md_path, html_path


def _ranges(idx: Sequence[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8' (inputs sorted, 1-based already)."""
    out: list[str] = []
    start = prev = None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def summarize_transfer(
    weights: Any,
    source_names: Sequence[str],
    step_label: str = "lead times",
    first_step: int = 1,
) -> str:
    """One line on which source dominates the transfer weights ``(N_sources, T)``.

    The dominant source has the largest mean weight over steps; "strongest at" lists the steps
    (numbered from ``first_step``) where it has the largest weight of all sources; other sources
    that lead at some steps are named too. Extra trailing axes (e.g. ``(N, T, h, w)`` maps) are
    averaged out. If the T axis covers every recurrent step of a clip rather than the forecast
    only, pass e.g. ``step_label="steps"``.
    """
    w = np.asarray(weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    if w.ndim > 2:
        w = w.reshape(w.shape[0], w.shape[1], -1).mean(-1)
    n, t = w.shape
    if len(source_names) != n:
        raise ValueError(f"{n} sources but {len(source_names)} names")
    if n == 0 or t == 0:
        return "no transfer weights"
    means = np.nanmean(w, axis=1)
    top = int(np.nanargmax(means))
    lead = np.nanargmax(np.where(np.isnan(w), -np.inf, w), axis=0)  # (T,)
    name = source_names[top]
    if n == 1:
        return f"single source '{name}' (mean weight {means[0]:.2f})"
    mine = [i + first_step for i in range(t) if lead[i] == top]
    line = f"source '{name}' dominates (mean weight {means[top]:.2f})"
    if mine:
        line += f", strongest at {step_label} {_ranges(mine)}"
    else:
        line += f", though it never has the largest weight at any single one of the {step_label}"
    others = []
    for j in range(n):
        if j == top:
            continue
        steps = [i + first_step for i in range(t) if lead[i] == j]
        if steps:
            others.append(f"'{source_names[j]}' leads at {_ranges(steps)}")
    if others:
        line += "; " + "; ".join(others)
    return line

"""`transmem predict`: forecast the frames that follow a file or folder of frames.

Reads the input with the same readers as training (video, GIF, frame folder, .npy/.npz, radar),
resizes it to the model's frame size, takes the last T_in frames and writes the T_out predicted
frames as PNGs, an ``.npy`` and a GIF (input | prediction). Radar models also get the forecast in
mm/h. With ``--baselines`` the persistence and extrapolation forecasts of the same input are written
beside it. Everything is written to a temporary folder first, so a failure leaves nothing partial.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from matplotlib import colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .api import RunFolderError, blend_with_baseline, claim_output, load_for_inference
from .baselines import BASELINES, BaselineUnavailable, baseline_for_data, default_baselines
from .data import DataConfig, DataError, physical_units
from .data.clips import parse_time, split_at_gaps
from .data.gridded import write_forecast_netcdf
from .data.inputs import read_by_extension
from .data.registry import read_input
from .data.radar import FMI, MCH, find_events, parse_fmi_time, parse_mch_time, radar_kind
from .files import atomic_folder, remove_stale_temps
from .fullfield import FullFieldForecaster
from .zoo import ZooError
from .viz import save_gif


def last_run_after_gaps(input_path, frames: np.ndarray, t_in: int) -> np.ndarray:
    """A timed input (a radar folder) with a gap in time is split there as the datasets split it
    (a step over 1.5 x the median step): the forecast starts from the last gap-free run, and a
    line says so; when that run is shorter than T_in the input is refused."""
    p = Path(input_path)
    kind = radar_kind(p) if p.is_dir() else None
    if kind is None:
        return frames
    events = find_events(p, FMI if kind == "fmi" else MCH)
    if len(events) != 1:
        return frames
    (items,) = events.values()
    if len(items) != frames.shape[0]:
        return frames
    times = [(t - datetime(1970, 1, 1)).total_seconds() for t, _ in items]
    runs = split_at_gaps(times)
    if len(runs) == 1:
        return frames
    a, b = runs[-1]
    gap_min = (times[a] - times[a - 1]) / 60
    when = f"{items[a - 1][0]:%Y-%m-%d %H:%M} to {items[a][0]:%H:%M}"
    if b - a < t_in:
        raise DataError(p, f"has a {gap_min:.0f}-minute gap in time ({when}); only {b - a} frame(s) follow it, "
                           f"fewer than the model's T_in={t_in}: give frames without a gap")
    print(f"{p}: {len(runs) - 1} gap(s) in time, the last {gap_min:.0f} minutes ({when}); forecasting from "
          f"the {b - a} frames after it")
    return frames[a:b]


def run_predict(model_ref, input_path, out_dir, baselines: bool | str | list[str] = False, fmt: str | None = None,
                blend: tuple[str, float] | None = None, native: bool = False, leads: int | None = None,
                tile: int | None = None) -> Path:
    """``baselines``: also write reference nowcasts of the same input (``baseline_<name>.npy``,
    and as rows of the GIF), for scale: True or ``"default"`` gives the data's default ones
    (:func:`transmem.baselines.default_baselines`), a list or a comma-separated string names them;
    one whose extra is not installed is left out, with a line saying so. ``fmt``: ``npy`` (``prediction.npy``),
    ``netcdf`` (CF ``forecast.nc``) or ``both``; default netcdf when the input has coordinates
    (a gridded model's input), else npy. ``forecast.png`` / ``forecast.gif`` are always written.
    ``blend``: ``(baseline, w)``: the forecast is ``w * model + (1 - w) * baseline`` (see
    :func:`transmem.api.blend_with_baseline`). ``native``: read the input at its own grid (no
    resize to the model's training size; every backbone is fully convolutional, and the frames are
    padded to the patch size), so the forecast lies on the input's grid. ``leads``: how many frames
    to forecast (default the card's ``t_out``). ``tile``: forecast in overlapping tiles of at most
    this many pixels a side, blended without seams (:class:`transmem.fullfield.FullFieldForecaster`),
    for fields whose activations would not fit in memory."""
    if leads is not None and not 1 <= int(leads) <= 1000:
        raise DataError(None, f"--leads must be between 1 and 1000, got {leads}")
    if fmt not in (None, "npy", "netcdf", "both"):
        raise DataError(None, f"--format must be npy, netcdf or both, got {fmt!r}")
    out = Path(out_dir)
    with claim_output(out):  # a second predict into the same --out is refused before anything is read
        return _predict(model_ref, input_path, out, baselines, fmt, blend, native, leads, tile)


def _predict(model_ref, input_path, out: Path, baselines: bool, fmt: str | None, blend, native: bool = False,
             leads: int | None = None, tile: int | None = None) -> Path:
    if out.exists() and (not out.is_dir() or any(n for n in out.iterdir() if not n.name.startswith("."))):
        raise RunFolderError(f"{out}: output folder exists and is not empty; choose another --out")
    remove_stale_temps(out)  # the hidden temporary folder of a killed earlier predict
    module, card = load_for_inference(model_ref)
    missing = [k for k in ("t_in", "t_out", "frame_size") if k not in card]
    if missing:
        raise ZooError(f"{model_ref}: its card lacks {', '.join(missing)}, which predict needs")
    t_in, t_out = int(card["t_in"]), int(leads or card["t_out"])
    size = int(card["frame_size"][0])
    channels = int(card.get("channels", 1))
    data = card.get("data", {})
    if native:
        data = {**data, "resize": "none"}
    if tile:  # overlapping tiles (a quarter of a tile, at most 64 pixels), aligned to the patch size
        patch = module.patch_size  # every model declares it (the mixture: its members' lcm)
        if tile < 4 * patch or tile % patch:
            raise DataError(None, f"--tile {tile}: must be a multiple of the model's patch size {patch}, at least {4 * patch}")
        module = FullFieldForecaster(module, patch, tile=int(tile), overlap=max(patch, min(64, tile // 4) // patch * patch))
    frames, mask, grid = read_forecast_input(input_path, data, channels, size, last=t_in)
    times = input_times(input_path, data, len(frames)) if grid is None or not grid.times else None
    if grid is not None and times:  # coordinates without times (a radar composite): the times of its file names
        grid.times, times = list(times), None
    frames = last_run_after_gaps(input_path, frames, t_in)
    times = times[len(times) - len(frames):] if times else None
    mask = mask[len(mask) - len(frames):]
    fmt = fmt or ("netcdf" if grid is not None else "npy")
    if frames.shape[0] < t_in:
        raise DataError(input_path, f"has {frames.shape[0]} frames; the model needs at least T_in={t_in}")
    units = physical_units(data) if data.get("name") else None
    past = torch.from_numpy(np.ascontiguousarray(frames[-t_in:]))[None]
    clip = torch.cat([past, past.new_zeros(1, t_out, *past.shape[2:])], 1)
    if blend:
        module = blend_with_baseline(module, blend[0], t_in, blend[1], data)
        print(f"forecast = {blend[1]:g} * model + {1 - blend[1]:g} * {blend[0]}")
    with torch.inference_mode():
        pred = module.rollout(clip)[0].clamp(0, 1).numpy()  # (T_out, C, H, W)
    others = {}
    for name in baseline_names(baselines, units):
        try:
            b = baseline_for_data(name, t_in, data)
        except BaselineUnavailable as e:
            print(f"baseline {name} left out: {e}")
            continue
        others[name] = b.rollout(clip)[0].numpy()
    with atomic_folder(out) as tmp:
        written = write_pictures_and_netcdf(tmp, fmt, past[0].numpy(), mask[-t_in:], pred, units, grid,
                                            others, t_in, times)
        if fmt == "netcdf":
            print(f"wrote the forecast to {out / 'forecast.nc'} ({', '.join(written)})")
            return out
        np.save(tmp / "prediction.npy", pred.astype(np.float32))
        if units is not None:
            np.save(tmp / f"prediction_{units.name.replace('/', '')}.npy",
                    np.asarray(units.to_physical(pred), dtype=np.float32))
        for k, f in enumerate(pred, 1):
            img = (f.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(tmp / f"frame_{k:02d}.png")
        for name, f in others.items():
            np.save(tmp / f"baseline_{name}.npy", f.astype(np.float32))
        save_gif(tmp / "prediction.gif", [past[0].numpy(), pred, *others.values()],
                 ["input", "prediction", *others])
    print(f"wrote {t_out} predicted frames to {out} (frames, prediction.npy, prediction.gif)")
    return out


# --------------------------------------------------------------------------------------------
# gridded inputs, CF-netCDF and the forecast figure (issue 19)
# --------------------------------------------------------------------------------------------
RAIN_LEVELS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100)


def baseline_names(baselines, units) -> list[str]:
    """The reference nowcasts ``--baselines`` asks for (see :func:`run_predict`)."""
    if not baselines:
        return []
    if baselines is True or baselines == "default":
        return default_baselines(units)
    names = baselines.split(",") if isinstance(baselines, str) else list(baselines)
    wrong = [n for n in names if n not in BASELINES]
    if wrong:
        raise DataError(None, f"--baselines: unknown {', '.join(wrong)}; choose from {', '.join(BASELINES)}")
    return names


def read_forecast_input(input_path, data: dict, channels: int, size: int, last: int | None = None):
    """``(frames (T, C, S, S) in [0, 1], mask (T, 1, S, S), Grid or None)``: the input read as the
    model's data was read (``data``, its card's data config; ``size`` its frame size), by the
    data's reader where it declares how (``register_dataset(read_input=)``: a gridded model's
    variable, crop and fitted normalisation, an HDF5 model's file conventions, a plugin's own
    format), else by the input's extension. ``last``: only the last frames are needed (a ``.npy``
    input is memory-mapped and only they are read, a video keeps only them while it is decoded)."""
    resize = data.get("resize") or "resize"
    cfg = DataConfig.from_dict({**data, "path": os.fspath(input_path), "size": size, "channels": channels,
                                "resize": resize})
    got = read_input(input_path, cfg, last)
    return got if got is not None else read_by_extension(input_path, cfg, last)


def input_times(input_path, data: dict, n: int) -> list | None:
    """The times of the ``n`` frames of a folder input, from their file names -- FMI and
    MeteoSwiss radar names, or the model's ``extra.time_regex`` / ``time_format`` -- as
    ``datetime64`` in frame order; None when the names carry no date for every frame."""
    p = Path(input_path)
    if not p.is_dir():
        return None
    extra = data.get("extra") or {}
    regex, fmt = extra.get("time_regex"), extra.get("time_format")
    if regex and not fmt:
        return None  # numbers, not dates
    stamps = []
    for name in os.listdir(p):
        if name.startswith(".") or not (p / name).is_file():
            continue
        if regex:
            try:
                s = parse_time(name, regex, fmt)
            except re.error:
                return None
            t = None if s is None else datetime(1970, 1, 1) + timedelta(seconds=s)
        else:
            t = parse_fmi_time(name) or parse_mch_time(name)
        if t is not None:
            stamps.append(t)
    stamps = sorted(set(stamps))
    if len(stamps) != n:
        return None
    return [np.datetime64(t, "s") for t in stamps]


def lead_labels(grid, t_in: int, t_out: int) -> tuple[list[str], list[str]]:
    """Labels of the last observed frames and of the leads: times and minutes when the input
    has times, else steps."""
    times = list(grid.times[-t_in:]) if grid is not None and grid.times else []
    if len(times) == t_in and t_in >= 2 and all(isinstance(t, np.datetime64) for t in times):
        ts = np.asarray(times, dtype="datetime64[s]")
        step = int(np.median(np.diff(ts).astype(np.int64)))
        obs = [str(t).replace("T", " ")[:16] for t in ts]
        mins = [k * step / 60 for k in range(1, t_out + 1)]
        return obs, [f"+{m / 60:g} h" if m >= 120 and m % 60 == 0 else f"+{m:g} min" for m in mins]
    return [f"t{k - t_in + 1}" if k < t_in - 1 else "t0 (last)" for k in range(t_in)], \
        [f"+{k} step{'s' if k > 1 else ''}" for k in range(1, t_out + 1)]


def _norm(rain: bool, values: list[np.ndarray], unit_range: bool):
    if rain:
        cmap = colormaps["viridis"].with_extremes(under="white", bad="0.75")
        return cmap, colors.BoundaryNorm(RAIN_LEVELS, cmap.N, extend="max")
    cmap = colormaps["gray" if unit_range else "viridis"].with_extremes(bad="0.75")
    v = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in values]) if values else np.zeros(1)
    if unit_range:  # the data's own range (a dim 16-bit stack is not shown black on 0..1)
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        return cmap, colors.Normalize(lo, hi if hi > lo else lo + 1e-6)
    lo, hi = (np.percentile(v, [1, 99]) if v.size else (0, 1))
    return cmap, colors.Normalize(float(lo), float(hi) if hi > lo else float(lo) + 1)


def save_forecast_figure(png, gif, observed: np.ndarray, obs_mask: np.ndarray, forecast: np.ndarray,
                         obs_labels: list[str], leads: list[str], units: str | None, rain: bool,
                         max_obs: int = 4, max_leads: int = 8) -> None:
    """``png``: the last observed frames (top row) and the forecast (bottom row), each panel
    titled with its time or lead, one colour scale (rain: mm/h levels, no data in grey);
    ``gif``: the same frames one after the other, each at a viewable size with its label."""
    obs = np.where(obs_mask, observed, np.nan)
    if rain:  # where the last frame had no data the forecast means nothing: grey too
        forecast = np.where(obs_mask[-1], forecast, np.nan)
    cmap, norm = _norm(rain, [obs, forecast], units is None)
    label = units or "value (0-1)"
    n_obs = min(max_obs, len(obs))
    pick = np.unique(np.linspace(0, len(forecast) - 1, min(max_leads, len(forecast))).round().astype(int))
    ncol = max(n_obs, len(pick))
    fig = Figure(figsize=(2.3 * ncol + 1.2, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, ncol, squeeze=False)
    im = None
    for ax in axes.ravel():
        ax.set_axis_off()
    for j in range(n_obs):
        k = len(obs) - n_obs + j
        im = axes[0, j].imshow(obs[k], cmap=cmap, norm=norm, interpolation="nearest")
        axes[0, j].set_title(f"observed {obs_labels[k]}", fontsize=8)
    for j, k in enumerate(pick):
        im = axes[1, j].imshow(forecast[k], cmap=cmap, norm=norm, interpolation="nearest")
        axes[1, j].set_title(f"forecast {leads[k]}", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.84, top=0.9, bottom=0.03, wspace=0.08, hspace=0.25)
    cax = fig.add_axes([0.86, 0.1, 0.018, 0.72])
    fig.colorbar(im, cax=cax, label=label)
    if rain:
        fig.text(0.99, 0.96, "grey: no data;  white: < 0.1 mm/h", ha="right", va="top", fontsize=8)
    fig.savefig(png)
    frames = []
    seq = [(o, f"observed {t}") for o, t in zip(obs[-max(n_obs, 1):], obs_labels[-max(n_obs, 1):])]
    seq += [(f, f"forecast {t}") for f, t in zip(forecast, leads)]
    for a, title in seq:
        fg = Figure(figsize=(4.4, 3.8), dpi=90)
        canvas = FigureCanvasAgg(fg)
        ax = fg.subplots()
        ax.set_axis_off()
        m = ax.imshow(a, cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=11, color="black" if title.startswith("observed") else "darkred")
        fg.colorbar(m, ax=ax, label=label, shrink=0.85)
        canvas.draw()
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=600, loop=0)


def write_pictures_and_netcdf(tmp: Path, fmt: str, past: np.ndarray, past_mask: np.ndarray, pred: np.ndarray,
                              units, grid, others: dict, t_in: int, times=None) -> list[str]:
    """The forecast figure and GIF (always) and ``forecast.nc`` (``fmt`` netcdf/both), in physical
    units when the model's data declares them; returns the names written. ``times``: the input
    frames' times (from their file names) when ``grid`` has none, so leads are labelled in minutes."""
    to_phys = (lambda a: np.asarray(units.to_physical(a), dtype=np.float32)) if units is not None else (lambda a: a)
    obs, fc = to_phys(past[:, 0]), to_phys(pred[:, 0])
    obs_labels, leads = lead_labels(grid if grid is not None else SimpleNamespace(times=list(times or [])),
                                    t_in, len(pred))
    rain = units is not None and units.name == "mm/h"
    save_forecast_figure(tmp / "forecast.png", tmp / "forecast.gif", obs, past_mask[:, 0], fc, obs_labels, leads,
                         units.name if units is not None else None, rain)
    names = ["forecast.png", "forecast.gif"]
    if fmt in ("netcdf", "both"):
        write_forecast_netcdf(tmp / "forecast.nc", obs, fc, grid, units.name if units is not None else "1",
                              obs_mask=past_mask[:, 0], extra_forecasts={k: to_phys(v[:, 0]) for k, v in others.items()},
                              attrs={"source": "transmem predict"})
        names.append("forecast.nc")
    return names

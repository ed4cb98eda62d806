"""Any registered reference nowcast as a parameter-free forecaster with a model's interface.

:class:`BaselineForecaster` has the ``rollout`` / ``t_in`` / ``device`` interface that
:func:`transmem.training.evaluate`, the blend and ``predict`` use, so a baseline is scored,
blended and written exactly like a model. It owns the plumbing every method shares: clips
``(B, T, C, H, W)`` in [0, 1] to numpy, the data's units and pysteps' dB scale, no-data (non-finite
input is taken as 0 in model units), the inflow rule where a method returns NaN, and the way back.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data import inflow_hint, physical_units, pixel_km
from .registry import (DBR_THRESHOLD_MMH, DBR_ZERO, INFLOWS, BaselineSpec, BaselineUnavailable, Context, finite,
                       from_dbr, get_method, list_baselines, missing_dependency, to_dbr)


def check_clip(frames: Tensor, t_in: int) -> tuple[int, int]:
    if frames.ndim != 5:
        raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
    t = frames.shape[1]
    t_in = int(t_in)
    if not 1 <= t_in < t:
        raise ValueError(f"need 1 <= t_in < T, got t_in={t_in} with T={t}")
    return t_in, t - t_in


def default_inflow(rain: bool) -> str:
    """Rain: nothing known comes in (0 mm/h, as pysteps' nowcasts assume). Any other field
    (video, temperature): the frame edge is not the edge of the scene, so where nothing is known
    the last frame stays (persistence) -- zeros there would be black or the bottom of the range."""
    return "zero" if rain else "last"


def effective_scale(spec: BaselineSpec, scale: str | None, has_units: bool, rain: bool) -> str:
    """The scale a nowcast really runs on: the one it declares (or ``scale="values"`` forced),
    the [0, 1] values where the data declares no units, and dBR only for rain."""
    scale = scale or spec.scale
    if scale != "values" and not has_units:
        return "values"  # no units declared: the values are the field
    return "physical" if scale == "dbr" and not rain else scale


def run_nowcast(spec: BaselineSpec, frames: Tensor, t_in: int, ctx: Context, to_physical=None,
                from_physical=None, scale: str | None = None) -> Tensor:
    """``spec``'s nowcast of frames ``t_in .. T-1`` from frames ``0 .. t_in-1`` of every clip
    (float32 in [0, 1], on ``frames``' device); frames at ``t_in`` and later are never read.
    ``scale``: ``values`` runs the method on the [0, 1] values whatever scale it declares."""
    t_in, t_out = check_clip(frames, t_in)
    if (to_physical is None) != (from_physical is None):
        raise ValueError("give both to_physical and from_physical, or neither")
    if ctx.inflow not in INFLOWS:
        raise ValueError(f"inflow must be one of {', '.join(INFLOWS)}, got {ctx.inflow!r}")
    scale = effective_scale(spec, scale, to_physical is not None, ctx.rain)
    past = finite(frames[:, :t_in].detach().to("cpu", torch.float64).numpy())  # (B, k, C, H, W)
    if scale != "values":
        past = finite(to_physical(past))
    if scale == "dbr":
        past = to_dbr(past)
    zero = DBR_ZERO if scale == "dbr" else 0.0  # "nothing comes in": no rain (0 mm/h is 0 on the log scale too)
    ctx.scale = scale
    if ctx.rain:
        ctx.threshold = {"values": float(from_physical(np.array([DBR_THRESHOLD_MMH]))[0]) if from_physical else 0.0,
                         "physical": DBR_THRESHOLD_MMH, "dbr": 10.0 * np.log10(DBR_THRESHOLD_MMH)}[scale]
    out = np.empty((past.shape[0], t_out, *past.shape[2:]), dtype=np.float64)
    for i in range(past.shape[0]):
        moved = np.asarray(spec.forecast(past[i], t_out, ctx), dtype=np.float64)
        if moved.shape != out.shape[1:]:
            raise RuntimeError(f"baseline {spec.name} returned shape {moved.shape}, expected {out.shape[1:]}")
        unknown = ~np.isfinite(moved)
        if unknown.any():
            fill = zero if ctx.inflow == "zero" else np.broadcast_to(past[i, -1], moved.shape)
            moved = np.where(unknown, fill, moved)
        out[i] = moved
    if scale == "dbr":
        out = from_dbr(out)
    if scale != "values":
        out = np.asarray(from_physical(out), dtype=np.float64)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return torch.from_numpy(np.clip(out, 0.0, 1.0).astype(np.float32)).to(frames.device)


def persistence(frames: Tensor, t_in: int) -> Tensor:
    """``(B, T - t_in, C, H, W)``: the last input frame ``frames[:, t_in - 1]`` repeated, exactly
    (same dtype and device, a fresh tensor)."""
    t_in, t_out = check_clip(frames, t_in)
    return frames[:, t_in - 1:t_in].repeat(1, t_out, 1, 1, 1)


class BaselineForecaster(torch.nn.Module):
    """A parameter-free forecaster: ``rollout(frames)`` -> ``(B, T - t_in, C, H, W)``.

    ``name``: a registered reference nowcast (:func:`transmem.baselines.list_baselines`).
    ``t_in`` (settable): how many leading frames of a clip are the input. ``to_physical`` /
    ``from_physical``: the data's units (the method works in the scale it declares; without
    them, on the [0, 1] values). ``rain``: the data is precipitation (thresholds, dB scale, the
    default inflow). ``inflow``: see :func:`default_inflow`. ``options``: the method's keyword
    overrides (e.g. ``n_ens_members`` for ``steps_mean``). ``scale="values"``: run on the [0, 1]
    values (for rain: transmem's log scale) whatever scale the method declares.

    Raises ValueError for an unknown name or too few input frames, and
    :class:`BaselineUnavailable` (one line) when the method's optional dependency is missing.
    """

    def __init__(self, name: str, t_in: int, to_physical=None, from_physical=None, inflow: str | None = None,
                 rain: bool = False, scale: str | None = None, kmperpixel: float = 1.0, timestep: float = 5.0,
                 seed: int = 0, **options):
        super().__init__()
        spec = get_method(name)
        inflow = default_inflow(rain) if inflow is None else inflow
        if inflow not in INFLOWS:
            raise ValueError(f"inflow must be one of {', '.join(INFLOWS)}, got {inflow!r}")
        if int(t_in) < 1:
            raise ValueError(f"t_in must be >= 1, got {t_in}")
        if int(t_in) < spec.inputs:
            raise ValueError(f"baseline {name} needs {spec.inputs} input frames; t_in is {t_in}")
        if (to_physical is None) != (from_physical is None):
            raise ValueError("give both to_physical and from_physical, or neither")
        if scale not in (None, "values"):
            raise ValueError(f"scale can only be forced to 'values', got {scale!r}")
        reason = missing_dependency(spec)
        if reason is not None:
            raise BaselineUnavailable(reason)
        self.spec, self.name, self.t_in = spec, name, int(t_in)
        self.to_physical, self.from_physical = to_physical, from_physical
        self.inflow, self.rain, self.scale = inflow, bool(rain), scale
        self.kmperpixel, self.timestep, self.seed, self.options = float(kmperpixel), float(timestep), int(seed), options

    @property
    def runs_on(self) -> str:
        """The scale its nowcast runs on (``values``, ``physical`` or ``dbr``; see :func:`effective_scale`)."""
        return effective_scale(self.spec, self.scale, self.to_physical is not None, self.rain)

    @property
    def device(self) -> torch.device:
        """Always the CPU: there are no parameters, and pysteps runs on numpy."""
        return torch.device("cpu")

    @torch.no_grad()
    def rollout(self, frames: Tensor) -> Tensor:
        """Forecast frames ``t_in .. T-1`` of ``frames`` ``(B, T, C, H, W)`` from the first ``t_in``."""
        if self.name == "persistence":
            return persistence(frames, self.t_in)
        ctx = Context(rain=self.rain, inflow=self.inflow, kmperpixel=self.kmperpixel, timestep=self.timestep,
                      seed=self.seed, options=dict(self.options))
        return run_nowcast(self.spec, frames, self.t_in, ctx, self.to_physical, self.from_physical, self.scale)

    forward = rollout

    def extra_repr(self) -> str:
        units = ", physical units" if self.to_physical is not None else ""
        return f"name={self.name!r}, t_in={self.t_in}, inflow={self.inflow!r}{units}"


def default_baselines(units=None) -> list[str]:
    """The reference nowcasts shown by default for data in ``units`` (every row of ``evaluate``'s
    comparisons, ``zoo rank``, ``predict --baselines``, the demo): the precipitation methods only
    where the data is rain."""
    return list_baselines(rain=bool(getattr(units, "precipitation", False)), defaults_only=True)


def create_baseline(name: str, t_in: int, units=None, inflow: str | None = None, physical: bool = True,
                    **kwargs) -> BaselineForecaster:
    """The reference nowcast ``name`` with ``t_in`` input frames for data in ``units`` (the data's
    physical units, e.g. ``data.physical_units(cfg)``: anything with ``to_physical`` /
    ``from_physical``, and ``precipitation`` for rain), or None for plain [0, 1] values.
    ``physical=False`` runs the method on the [0, 1] values even where units are declared (for
    rain: transmem's log scale). ``inflow`` None: the fair default for the kind of data."""
    rain = bool(getattr(units, "precipitation", False))
    maps = (units.to_physical, units.from_physical) if units is not None else (None, None)
    return BaselineForecaster(name, t_in, *maps, inflow=inflow, rain=rain, scale=None if physical else "values",
                              **kwargs)


def baseline_for_data(name: str, t_in: int, data, physical: bool = True, inflow: str | None = None,
                      **options) -> BaselineForecaster:
    """The reference nowcast ``name`` for a dataset (its config, a card's data dict, or None for
    plain [0, 1] values of unknown kind): in the
    units its reader declares (or, with ``physical=False``, on the [0, 1] values), with the inflow
    it declares (else the default for its kind) and, where the reader knows it, its grid spacing
    (STEPS' perturbations are physical: 1 km is assumed otherwise)."""
    known = bool(data.get("name")) if isinstance(data, dict) else data is not None
    units = physical_units(data) if known else None
    km = pixel_km(data) if known else None
    if km is not None:
        options.setdefault("kmperpixel", km)
    return create_baseline(name, t_in, units, inflow or (inflow_hint(data) if known else None), physical=physical,
                           **options)

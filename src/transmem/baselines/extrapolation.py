"""Extrapolation (Lagrangian persistence): the last frame moved along the optical flow.

1. **Motion**: pysteps' dense Lucas--Kanade (``pysteps.motion.get_method("LK")``, its default
   settings, overridable with ``lk_kwargs``) on the last ``motion_frames`` (3) input frames, as in
   pysteps' extrapolation example; multi-channel frames: on the channel mean. One input frame, or
   nothing trackable (constant frames), gives zero motion, i.e. persistence.
2. **Advection**: pysteps' semi-Lagrangian scheme (order ``interp_order`` = 1, bilinear) moves
   the last input frame along that field, every channel separately. Each lead interpolates the
   original frame at the accumulated displacement, so the smoothing does not build up.

Two registered scales: ``extrapolation`` works in the data's units (mm/h for rain; pysteps'
Lucas--Kanade rescales each image to 8 bits itself), ``extrapolation_log`` on the [0, 1] values
(log-scaled rain for radar, which scored better on our radar benchmark).

Inflow (departure points outside the domain): ``zero`` (rain) gives 0 in the working units, with
pixels within one pixel of the edge blending towards it bilinearly; ``last`` gives the last input
frame's value at that pixel (persistence where nothing is known): the fair choice for any field
that is not rain, whose frame edge is not the scene's edge.
"""
from __future__ import annotations

import numpy as np
import torch

from .forecaster import run_nowcast
from .registry import (BaselineUnavailable, Context, get_method, missing_dependency, motion_field, pysteps_call,
                       quiet_pysteps, register_baseline)


def extrapolation_nowcast(past: np.ndarray, n_leads: int, ctx: Context) -> np.ndarray:
    """``past`` ``(k, C, H, W)`` -> ``(n_leads, C, H, W)``, finite."""
    opts = ctx.options
    k = max(1, min(int(opts.get("motion_frames", 3)), past.shape[0]))
    window = past[-k:]
    velocity = motion_field(window.mean(axis=1), k, **(opts.get("lk_kwargs") or {}))
    last = window[-1]
    if not velocity.any():  # nothing to move: skip the interpolation
        return np.repeat(last[None], n_leads, axis=0)
    advect = quiet_pysteps().extrapolation.get_method("semilagrangian")
    order = int(opts.get("interp_order", 1))
    out = np.empty((n_leads, *last.shape))
    for ch in range(last.shape[0]):
        if ctx.inflow == "zero":
            moved = pysteps_call(advect, last[ch], velocity, n_leads, outval=0.0, interp_order=order)
        else:  # unknown departure points -> the last frame's value there
            moved = pysteps_call(advect, last[ch], velocity, n_leads, outval=np.nan, interp_order=order)
            moved = np.where(np.isfinite(moved), moved, last[ch][None])
        out[:, ch] = np.nan_to_num(moved, nan=0.0, posinf=0.0, neginf=0.0)
    return out


register_baseline("extrapolation", scale="physical", needs=("pysteps", "cv2"))(extrapolation_nowcast)
register_baseline("extrapolation_log", scale="values", rain_only=True, needs=("pysteps", "cv2"))(extrapolation_nowcast)


def extrapolation_available() -> str | None:
    """None when the extrapolation baseline can run, else why not (one line)."""
    return missing_dependency(get_method("extrapolation"))


def extrapolate(frames: torch.Tensor, t_in: int, to_physical=None, from_physical=None, *, motion_frames: int = 3,
                lk_kwargs: dict | None = None, interp_order: int = 1, inflow: str = "zero") -> torch.Tensor:
    """Extrapolation nowcast ``(B, T - t_in, C, H, W)`` (float32 in [0, 1], on ``frames``' device) of
    frames ``t_in .. T-1`` from the first ``t_in`` (see the module doc). With ``to_physical`` /
    ``from_physical`` (numpy in and out, elementwise) both steps run on the physical field and the
    result is mapped back. Non-finite input is taken as 0 in model units. Raises
    :class:`BaselineUnavailable` when pysteps or OpenCV is missing."""
    reason = extrapolation_available()
    if reason is not None:
        raise BaselineUnavailable(reason)
    ctx = Context(inflow=inflow,
                  options={"motion_frames": motion_frames, "lk_kwargs": lk_kwargs, "interp_order": interp_order})
    return run_nowcast(get_method("extrapolation"), frames, t_in, ctx, to_physical, from_physical)

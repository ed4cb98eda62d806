"""LINDA (Pulkkinen et al. 2021), pysteps' Lagrangian integro-difference nowcast built for
convective rain: rain cells found as features, each with its own localised ARI(1) evolution and
growth/decay kernel.

Deterministic LINDA (no perturbations), as pysteps' LINDA gallery example runs it for the
deterministic comparison: the rain rate in mm/h, Lucas--Kanade motion on the last 3 frames in
dBR, the example's feature settings (``max_num_features=15``, blob detection, which needs
scikit-image: not in the ``nowcast`` extra, so without it ``linda`` says it is unavailable). It is an order of
magnitude slower than S-PROG, so it is registered but not in the default lists: ask for it by name.
"""
from __future__ import annotations

import numpy as np

from .registry import (Context, motion_field, nowcast_or_advect, pysteps_call, quiet_pysteps, register_baseline,
                       to_dbr)
from .sprog import has_rain


@register_baseline("linda", scale="physical", inputs=3, rain_only=True, default=False,
                   needs=("pysteps", "cv2", "skimage"))
def linda_nowcast(past: np.ndarray, n_leads: int, ctx: Context) -> np.ndarray:
    """Deterministic LINDA, channel by channel."""
    nowcast = quiet_pysteps().nowcasts.get_method("linda")
    opts = {"max_num_features": 15, "add_perturbations": False, "kmperpixel": ctx.kmperpixel,
            "timestep": ctx.timestep, **ctx.options}
    out = np.empty((n_leads, *past.shape[1:]))
    for ch in range(past.shape[1]):
        field = past[-3:, ch]
        if not has_rain(field[-1], ctx.threshold):
            out[:, ch] = field[-1]
            continue
        velocity = motion_field(to_dbr(past[:, ch]), 3)
        out[:, ch] = nowcast_or_advect(lambda: pysteps_call(nowcast, field, velocity, n_leads, **opts),
                                       field[-1], velocity, n_leads)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), out)

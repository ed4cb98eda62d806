"""ANVIL (Pulkkinen et al. 2020), pysteps' autoregressive nowcast with growth and decay: a
cascade of the field's time differences, each level an ARI(2, 1) process with parameters fitted
in a moving window, advected along the optical flow.

Configured as pysteps' ANVIL gallery example (chosen once): the input is the rain rate in mm/h
(the last 4 frames: AR order 2 needs order + 2), the motion is Lucas--Kanade on the last 3 frames
in dBR, the AR window radius is 25 pixels. ``anvil_log`` runs it on transmem's log scale (by
name only: ANVIL models differences of the rain rate, and on the log scale it scored below
``anvil`` on the quick native-resolution check, so it is not in the default lists).
"""
from __future__ import annotations

import numpy as np

from .registry import (Context, motion_field, nowcast_or_advect, pysteps_call, quiet_pysteps, register_baseline,
                       to_dbr)
from .sprog import cascade_levels, has_rain

AR_ORDER = 2


def anvil_nowcast(past: np.ndarray, n_leads: int, ctx: Context) -> np.ndarray:
    """ANVIL, channel by channel; NaN where rain would come from outside the domain."""
    nowcast = quiet_pysteps().nowcasts.get_method("anvil")
    opts = {"ar_order": AR_ORDER, "ar_window_radius": 25, "n_cascade_levels": 6, **ctx.options}
    opts["n_cascade_levels"] = cascade_levels(past.shape[-2:], opts["n_cascade_levels"])
    out = np.empty((n_leads, *past.shape[1:]))
    for ch in range(past.shape[1]):
        field = past[-(opts["ar_order"] + 2):, ch]
        if not has_rain(field[-1], ctx.threshold):
            out[:, ch] = field[-1]
            continue
        velocity = motion_field(to_dbr(past[:, ch]) if ctx.rain and ctx.scale == "physical" else past[:, ch], 3)
        out[:, ch] = nowcast_or_advect(lambda: pysteps_call(nowcast, field, velocity, n_leads, **opts),
                                       field[-1], velocity, n_leads)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), out)


register_baseline("anvil", scale="physical", inputs=AR_ORDER + 2, rain_only=True, needs=("pysteps", "cv2"))(anvil_nowcast)
register_baseline("anvil_log", scale="values", inputs=AR_ORDER + 2, rain_only=True, default=False,
                  needs=("pysteps", "cv2"))(anvil_nowcast)

"""S-PROG (Seed 2003), pysteps' deterministic cascade nowcast: each scale of the field decays by
its own AR(2) process while it is advected, so small, short-lived features fade first.

Configured as pysteps' gallery does (chosen once, never by looking at test events): the rain rate
in dBR (threshold 0.1 mm/h, −15 dB below), Lucas--Kanade motion on the last 3 dBR frames,
6 cascade levels, AR order 2, probability matching by CDF, rain threshold −10 dBR. ``sprog_log``
runs the same on transmem's log scale, log10(1 + R) mapped to [0, 1] (threshold: 0.1 mm/h there),
which scored best of the classical nowcasts on our 64×64 radar benchmark. Fields smaller than
2^7 pixels a side get fewer levels (pysteps' cascade needs about a factor 2 of size per level).
"""
from __future__ import annotations

import numpy as np

from .registry import Context, cascade_call, motion_field, nowcast_or_advect, quiet_pysteps, register_baseline

AR_ORDER = 2


def cascade_levels(shape, wanted: int) -> int:
    return max(1, min(int(wanted), int(np.log2(min(shape))) - 1))


def has_rain(field: np.ndarray, threshold: float) -> bool:
    """Enough rain for a cascade nowcast: at least two pixels at or above ``threshold``. With one,
    pysteps' wet-area percentile mask indexes past the field's end (an IndexError on 32x32 OPERA
    tiles with a single wet pixel); without rain there is nothing to decompose. Otherwise the
    last frame is kept (persistence)."""
    return int(np.count_nonzero(field >= threshold)) >= 2


def sprog_nowcast(past: np.ndarray, n_leads: int, ctx: Context) -> np.ndarray:
    """S-PROG, channel by channel; NaN where rain would come from outside the domain."""
    nowcast = quiet_pysteps().nowcasts.get_method("sprog")
    opts = {"n_cascade_levels": 6, "ar_order": AR_ORDER, "probmatching_method": "cdf", **ctx.options}
    opts["n_cascade_levels"] = cascade_levels(past.shape[-2:], opts["n_cascade_levels"])
    out = np.empty((n_leads, *past.shape[1:]))
    for ch in range(past.shape[1]):
        if not has_rain(past[-1, ch], ctx.threshold):
            out[:, ch] = past[-1, ch]
            continue
        velocity = motion_field(past[:, ch], 3)
        out[:, ch] = nowcast_or_advect(lambda: cascade_call(nowcast, past[:, ch], velocity, n_leads,
                                                            precip_thr=ctx.threshold, **opts),
                                       past[-1, ch], velocity, n_leads)
    return out


register_baseline("sprog", scale="dbr", inputs=AR_ORDER + 1, rain_only=True, needs=("pysteps", "cv2"))(sprog_nowcast)
register_baseline("sprog_log", scale="values", inputs=AR_ORDER + 1, rain_only=True,
                  needs=("pysteps", "cv2"))(sprog_nowcast)

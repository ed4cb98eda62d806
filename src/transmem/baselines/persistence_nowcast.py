"""Persistence: the last input frame, repeated for every lead time -- the floor every nowcast must beat."""
from __future__ import annotations

import numpy as np

from .registry import Context, register_baseline


@register_baseline("persistence")
def persistence_nowcast(past: np.ndarray, n_leads: int, ctx: Context) -> np.ndarray:
    """The last input frame, repeated."""
    return np.repeat(past[-1:], n_leads, axis=0)

"""Reference forecasts every nowcaster is compared against: persistence and extrapolation.

* ``persistence``: the last input frame, repeated for every lead time.
* ``extrapolation``: Lagrangian persistence -- a motion field is estimated on the last input
  frames with pysteps' dense Lucas--Kanade optical flow and the last input frame is advected
  along it with pysteps' semi-Lagrangian scheme (see :func:`extrapolate`).

Both work on clips ``(B, T, C, H, W)`` with values in [0, 1] and forecast frames
``t_in .. T-1`` from frames ``0 .. t_in-1`` (frames at ``t_in`` and later are never read).
:class:`BaselineForecaster` wraps them as a parameter-free ``torch.nn.Module`` with the
``rollout`` / ``t_in`` / ``device`` interface that :func:`transmem.training.evaluate` and
:func:`transmem.training.predict_batches` use, so a baseline is scored exactly like a model.

pysteps (and OpenCV, which its Lucas--Kanade uses) is optional: ``pip install
'transmem[nowcast]'``. It is imported lazily, only when extrapolation is used, with its import
banner ("Pysteps configuration file found at: ...") swallowed.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["BASELINES", "BaselineUnavailable", "BaselineForecaster", "create_baseline", "extrapolate",
           "extrapolation_available", "persistence"]

BASELINES = ("persistence", "extrapolation")
INFLOWS = ("zero", "last")  # what enters the frame where extrapolation has no departure point
INSTALL_HINT = "pip install 'transmem[nowcast]'"

ArrayMap = Callable[[np.ndarray], np.ndarray]


class BaselineUnavailable(RuntimeError):
    """A baseline whose optional dependency is missing (the message is one line)."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _import_pysteps():
    """``(lucas_kanade, semilagrangian)`` from pysteps, importing it quietly."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pysteps  # noqa: F401  (parent first: a hidden ``pysteps`` hides the submodules too)
        import pysteps.extrapolation
        import pysteps.motion
        return pysteps.motion.get_method("LK"), pysteps.extrapolation.get_method("semilagrangian")


def extrapolation_available() -> str | None:
    """None when the extrapolation baseline can run, else why not (one line)."""
    try:
        _import_pysteps()
        import cv2  # noqa: F401  (pysteps imports it optionally; its Lucas-Kanade needs it)
    except Exception as e:  # ImportError, or pysteps failing on a bad pystepsrc
        return f"extrapolation needs pysteps and opencv: {INSTALL_HINT} ({_one_line(e)})"
    return None


def _check(frames: Tensor, t_in: int) -> tuple[int, int]:
    if frames.ndim != 5:
        raise ValueError(f"frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
    t = frames.shape[1]
    t_in = int(t_in)
    if not 1 <= t_in < t:
        raise ValueError(f"need 1 <= t_in < T, got t_in={t_in} with T={t}")
    return t_in, t - t_in


def persistence(frames: Tensor, t_in: int) -> Tensor:
    """``(B, T - t_in, C, H, W)``: the last input frame ``frames[:, t_in - 1]`` repeated, exactly
    (same dtype and device, a fresh tensor)."""
    t_in, t_out = _check(frames, t_in)
    return frames[:, t_in - 1:t_in].repeat(1, t_out, 1, 1, 1)


def extrapolate(frames: Tensor, t_in: int, to_physical: ArrayMap | None = None,
                from_physical: ArrayMap | None = None, *, motion_frames: int = 3,
                lk_kwargs: dict | None = None, interp_order: int = 1, inflow: str = "zero") -> Tensor:
    """Extrapolation nowcast ``(B, T - t_in, C, H, W)`` (float32 in [0, 1], on ``frames``' device).

    Per clip:

    1. **Motion**: pysteps' dense Lucas--Kanade (``pysteps.motion.get_method("LK")``, its default
       settings, overridable with ``lk_kwargs``) on the last ``min(motion_frames, t_in)`` input
       frames -- by default the last 3, ``frames[:, t_in-3:t_in]``, as in pysteps' extrapolation
       example; the sparse vectors of the consecutive pairs are pooled. Multi-channel frames:
       the motion is estimated on the channel mean. ``t_in == 1``, or no trackable features
       (e.g. all-zero or constant frames), gives zero motion, i.e. persistence.
    2. **Advection**: pysteps' semi-Lagrangian scheme
       (``pysteps.extrapolation.get_method("semilagrangian")``, order ``interp_order`` = 1:
       bilinear) moves the last input frame ``frames[:, t_in - 1]`` along that field for
       ``T - t_in`` steps of one frame interval each, every channel separately. Each lead time
       interpolates the original frame at the accumulated displacement, so the smoothing of the
       bilinear interpolation does not build up with lead time.

    Units: with ``to_physical`` / ``from_physical`` (numpy in, numpy out, elementwise; e.g. the
    radar transform [0, 1] <-> rain rate in mm/h, :func:`transmem.data.radar.unit_to_rain` /
    ``rain_to_unit``, or a dataset's ``Units``) both steps run on the physical field -- rain rate
    in mm/h -- and the result is mapped back; pysteps' Lucas--Kanade rescales each image to
    8 bits itself, so it works on any precipitation-like field. Without them, both steps run on
    the [0, 1] model values directly. (pysteps' own gallery example estimates and advects in
    dBR, i.e. on a log rain scale -- which is what transmem's [0, 1] radar values already are.)

    No data: non-finite input values are taken as 0 in model units. Pixels whose departure
    point lies outside the domain (rain advected in from outside) are unknown; pysteps would
    return NaN there (its default ``outval``), here they are 0 in the working units (physical
    when given: 0 mm/h, no rain) -- not the last frame's value -- and pixels within one pixel
    of the domain edge blend towards 0 bilinearly. ``inflow="last"`` fills them with the last
    input frame's value at that pixel instead (persistence where nothing is known): the right
    choice for video, where the frame edge is not the edge of the scene.

    pysteps must be installed (:class:`BaselineUnavailable` otherwise); its warnings and prints
    are silenced. Runs on the CPU in float64, one clip at a time.
    """
    t_in, t_out = _check(frames, t_in)
    if inflow not in INFLOWS:
        raise ValueError(f"inflow must be one of {', '.join(INFLOWS)}, got {inflow!r}")
    if (to_physical is None) != (from_physical is None):
        raise ValueError("give both to_physical and from_physical, or neither")
    reason = extrapolation_available()
    if reason is not None:
        raise BaselineUnavailable(reason)
    lucas_kanade, advect = _import_pysteps()
    k = max(1, min(int(motion_frames), t_in))
    b, _, c, h, w = frames.shape
    past = frames[:, t_in - k:t_in].detach().to("cpu", torch.float64).numpy()  # (B, k, C, H, W)
    past = np.nan_to_num(past, nan=0.0, posinf=0.0, neginf=0.0)
    if to_physical is not None:
        past = np.asarray(to_physical(past), dtype=np.float64)
        past = np.nan_to_num(past, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.empty((b, t_out, c, h, w), dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # (pysteps prints only when verbose)
        warnings.simplefilter("ignore")
        for i in range(b):
            if k >= 2:
                velocity = lucas_kanade(past[i].mean(axis=1), verbose=False, **(lk_kwargs or {}))
                velocity = np.nan_to_num(np.asarray(velocity, dtype=np.float64), nan=0.0,
                                         posinf=0.0, neginf=0.0)
            else:
                velocity = np.zeros((2, h, w))
            for ch in range(c):
                last = past[i, -1, ch]
                if not velocity.any():  # nothing to move: skip the interpolation
                    out[i, :, ch] = last
                    continue
                if inflow == "zero":
                    moved = advect(last, velocity, t_out, outval=0.0, interp_order=interp_order)
                else:  # unknown departure points -> the last frame's value there
                    moved = advect(last, velocity, t_out, outval=np.nan, interp_order=interp_order)
                    moved = np.where(np.isfinite(moved), moved, last[None])
                out[i, :, ch] = np.nan_to_num(moved, nan=0.0, posinf=0.0, neginf=0.0)
    if from_physical is not None:
        out = np.asarray(from_physical(out), dtype=np.float64)
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    result = torch.from_numpy(np.clip(out, 0.0, 1.0).astype(np.float32))
    return result.to(frames.device)


class BaselineForecaster(torch.nn.Module):
    """A parameter-free forecaster: ``rollout(frames)`` -> ``(B, T - t_in, C, H, W)``.

    ``name``: one of :data:`BASELINES`. ``t_in`` (settable): how many leading frames of a clip
    are the input. ``to_physical`` / ``from_physical``: see :func:`extrapolate` (persistence
    ignores them). Has the interface :func:`transmem.training.evaluate` needs (``eval()``,
    ``device``, ``t_in``, ``rollout``).

    Raises ValueError for an unknown name and :class:`BaselineUnavailable` (one line) at
    construction when the name is ``extrapolation`` and pysteps or OpenCV is missing.
    """

    def __init__(self, name: str, t_in: int, to_physical: ArrayMap | None = None,
                 from_physical: ArrayMap | None = None, inflow: str = "zero"):
        super().__init__()
        if inflow not in INFLOWS:
            raise ValueError(f"inflow must be one of {', '.join(INFLOWS)}, got {inflow!r}")
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
        if int(t_in) < 1:
            raise ValueError(f"t_in must be >= 1, got {t_in}")
        if (to_physical is None) != (from_physical is None):
            raise ValueError("give both to_physical and from_physical, or neither")
        if name == "extrapolation":
            reason = extrapolation_available()
            if reason is not None:
                raise BaselineUnavailable(reason)
        self.name = name
        self.t_in = int(t_in)
        self.to_physical = to_physical
        self.from_physical = from_physical
        self.inflow = inflow

    @property
    def device(self) -> torch.device:
        """Always the CPU: there are no parameters, and pysteps runs on numpy."""
        return torch.device("cpu")

    @torch.no_grad()
    def rollout(self, frames: Tensor) -> Tensor:
        """Forecast frames ``t_in .. T-1`` of ``frames`` ``(B, T, C, H, W)`` from the first ``t_in``."""
        if self.name == "persistence":
            return persistence(frames, self.t_in)
        return extrapolate(frames, self.t_in, self.to_physical, self.from_physical, inflow=self.inflow)

    forward = rollout

    def extra_repr(self) -> str:
        units = ", physical units" if self.to_physical is not None else ""
        return f"name={self.name!r}, t_in={self.t_in}{units}"


def create_baseline(name: str, t_in: int, units=None, inflow: str = "zero") -> BaselineForecaster:
    """:class:`BaselineForecaster` ``name`` (one of :data:`BASELINES`) with ``t_in`` input frames,
    working in ``units`` (the data's physical units, e.g. ``data.physical_units(cfg)``: anything
    with ``to_physical`` / ``from_physical``) or, with None, on the [0, 1] values."""
    return BaselineForecaster(name, t_in, None if units is None else units.to_physical,
                              None if units is None else units.from_physical, inflow)

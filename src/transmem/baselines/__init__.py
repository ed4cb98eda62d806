"""Reference nowcasts every forecaster is compared against, as a registry (pysteps' style).

``list_baselines()`` names them, ``get_method(name)`` gives one, ``create_baseline(name, t_in,
units)`` wraps it as a parameter-free forecaster with a model's interface. Registered here:

* ``persistence``: the last input frame, repeated;
* ``extrapolation`` / ``extrapolation_log``: the last frame advected along pysteps' Lucas--Kanade flow;
* ``sprog`` / ``sprog_log``: S-PROG (rain only);
* ``anvil`` / ``anvil_log``: ANVIL (rain only);
* ``steps_mean``: the mean of a 10-member STEPS ensemble (rain only);
* ``linda``: deterministic LINDA (rain only; slow, so asked for by name).

Adding one is one file in this folder (or a package with a ``transmem.baselines`` entry point)
that decorates a function with :func:`register_baseline`; every face (``evaluate --baseline``,
``predict --baselines``, ``zoo rank``, the demo, the benchmarks) finds it from the registry.
pysteps and OpenCV are optional (``pip install 'transmem[nowcast]'``) and imported lazily.
"""
from .forecaster import (BaselineForecaster, baseline_for_data, check_clip, create_baseline, default_baselines, default_inflow,
                         persistence, run_nowcast)
from .registry import (INFLOWS, SCALES, BaselineSpec, BaselineUnavailable, Context, get_method, list_baselines,
                       load_all, register_baseline)

load_all()

from .extrapolation import extrapolate, extrapolation_available  # noqa: E402  (after the table is full)

#: every registered name, at import time (``list_baselines()`` also sees later registrations)
BASELINES = tuple(list_baselines())

__all__ = ["BASELINES", "INFLOWS", "SCALES", "BaselineForecaster", "baseline_for_data", "BaselineSpec", "BaselineUnavailable", "Context",
           "check_clip", "create_baseline", "default_baselines", "default_inflow", "extrapolate", "extrapolation_available", "get_method",
           "list_baselines", "load_all", "persistence", "register_baseline", "run_nowcast"]

"""Training: the Lightning module, sampling schedules and the fit / evaluate drivers.

Modules by job: :mod:`.module` (the LightningModule and its loss), :mod:`.schedules` (scheduled
sampling), :mod:`.samplers` (data loaders, clip order, process rank), :mod:`.checkpoints`
(atomic writes, safe loads, RNG state, resume lookup), :mod:`transmem.progress` (bars or plain lines),
:mod:`.fitting` (:func:`fit`) and :mod:`.evaluation` (:func:`evaluate`, :func:`predict_batches`).
"""
from .checkpoints import CheckpointError
from .evaluation import evaluate, predict_batches
from .fitting import fit, quiet_lightning
from .module import ForecastModule, forecast_loss, masked_mse
from .samplers import dist_info, is_launch_rank_zero, make_loader
from .schedules import SamplingSchedule, reverse_time

__all__ = ["ForecastModule", "forecast_loss", "masked_mse", "SamplingSchedule", "reverse_time", "evaluate", "fit",
           "make_loader", "predict_batches", "CheckpointError", "is_launch_rank_zero", "quiet_lightning",
           "dist_info"]

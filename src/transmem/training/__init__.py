"""Training: the Lightning module, sampling schedules and the fit / evaluate drivers."""
from .module import ForecastModule, masked_mse
from .schedules import SamplingSchedule, reverse_time
from .loop import evaluate, fit, make_loader, predict_batches

__all__ = ["ForecastModule", "masked_mse", "SamplingSchedule", "reverse_time", "evaluate", "fit",
           "make_loader", "predict_batches"]

"""Forecasts and metrics on a dataset, in inference mode."""
from __future__ import annotations

import torch

from ..metrics import FrameMetrics
from .module import ForecastModule
from ..progress import eval_progress
from .samplers import make_loader


@torch.inference_mode()
def predict_batches(module: ForecastModule, dataset, batch_size: int = 32, limit: int | None = None):
    """Yield (frames, valid, forecast) over ``dataset`` in inference mode."""
    module.eval()
    loader = make_loader(dataset, batch_size, False)
    seen = 0
    for batch in loader:
        frames = batch["frames"].to(module.device)
        valid = batch.get("mask")
        yield frames, valid, module.rollout(frames)
        seen += frames.shape[0]
        if limit is not None and seen >= limit:
            break


def evaluate(module: ForecastModule, dataset, batch_size: int = 32, thresholds=None, to_physical=None,
             progress: bool = False) -> dict:
    """Streaming per-frame metrics of the forecasts on ``dataset`` (see :mod:`transmem.metrics`).
    ``progress``: a tqdm bar when standard error is a terminal, else a plain line per ~10 % of the
    batches (:func:`~.progress.progress_lines`)."""
    t_in = module.t_in
    first = dataset[0]["frames"]
    metric = FrameMetrics(first.shape[0] - t_in, thresholds=thresholds or None, to_physical=to_physical)
    it = predict_batches(module, dataset, batch_size)
    if progress:
        it = eval_progress(it, (len(dataset) + batch_size - 1) // batch_size, "evaluate")
    for frames, valid, pred in it:
        metric.update(pred.float().clamp(0, 1), frames[:, t_in:].float(),
                      None if valid is None else valid[:, t_in:].to(frames.device))
    return metric.compute()

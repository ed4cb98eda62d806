"""One builder for a TMU target and its memory bank, used by the API (training, evaluation) and
the benchmarks, so that the two are always assembled the same way."""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..models import create_model
from ..models.tmu import resolve_layers
from .bank import MemoryBank


def build_tmu(backbone: str, backbone_config: dict, teachers: list, names: list[str], *,
              frame_channels: int = 1, tmu_layers="bottom", mode: str = "distill", gates: bool = True,
              weighting: str = "none", distiller_kernel: int = 1, gate_kernel: int = 1,
              teacher_inputs: str = "ground_truth", seed: int | None = None,
              backbone_state: dict | None = None):
    """``(TMU model, MemoryBank)`` for a ``backbone`` target drawing on frozen ``teachers``.

    The bank decides what each teacher can offer (adapters, channel counts); the TMU is built to
    match. ``seed``: the TMU's initial weights are drawn right after seeding with it, so that they
    are a function of the seed alone. ``backbone_state``: weights that initialise the target's
    backbone (finetune init)."""
    probe = create_model(backbone, backbone_config)
    layers = resolve_layers(tmu_layers, probe.num_layers)
    bank = MemoryBank(teachers, names, probe, layers, teacher_inputs, frame_channels=frame_channels)
    if seed is not None:
        torch.manual_seed(seed)
    model = create_model("tmu", backbone=backbone, backbone_config=asdict(probe.config),
                         source_names=list(names), source_channels=bank.source_channels(),
                         tmu_layers=layers, mode=mode, gates=gates, weighting=weighting,
                         distiller_kernel=distiller_kernel, gate_kernel=gate_kernel)
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model, bank

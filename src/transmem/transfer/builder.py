"""One builder for a TMU target and its memory bank, used by the API (training, evaluation) and
the benchmarks, so that the two are always assembled the same way."""
from __future__ import annotations

from dataclasses import asdict

from ..models import build_model
from ..models.tmu import resolve_layers
from ..options import TMUOptions, tmu_options
from .bank import MemoryBank


def build_tmu(backbone: str, backbone_config: dict, teachers: list, names: list[str],
              options: TMUOptions | dict | None = None, *, frame_channels: int = 1,
              teacher_inputs: str = "ground_truth", seed: int | None = None,
              backbone_state: dict | None = None):
    """``(TMU model, MemoryBank)`` for a ``backbone`` target drawing on frozen ``teachers``.

    ``options``: the TMU's options (:class:`~transmem.options.TMUOptions`, or anything holding
    them, such as the config's ``transfer`` section; None: the defaults). The bank decides what
    each teacher can offer (adapters, channel counts); the TMU is built to match. ``seed``: the
    TMU's initial weights are drawn right after seeding with it, so that they are a function of
    the seed alone. ``backbone_state``: weights that initialise the target's backbone (finetune
    init)."""
    opts = asdict(tmu_options(options))
    probe = build_model(backbone, backbone_config, kind="backbone")
    layers = resolve_layers(opts.pop("tmu_layers"), probe.num_layers)
    bank = MemoryBank(teachers, names, probe, layers, teacher_inputs, frame_channels=frame_channels)
    config = dict(backbone=backbone, backbone_config=asdict(probe.config), source_names=list(names),
                  source_channels=bank.source_channels(), tmu_layers=layers, **opts)
    model = build_model("tmu", config, seed=seed)
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model, bank

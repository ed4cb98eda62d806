"""Settings with a fixed set of values: each tuple is named once (transmem.choices, or the TMU's
options in transmem.options) and every owner checks against it with one message."""
import pytest
import torch


def test_every_owner_of_a_choice_accepts_its_tuple_and_refuses_with_one_message():
    """Each choice list is named once (transmem.choices, or the TMU's options); every owner -- the
    config and the library objects -- accepts each value of that tuple and refuses any other with
    the one message of ``choices.problem`` naming the key, as a UserError."""
    from transmem import choices
    from transmem.config import ConfigError, load_experiment
    from transmem.errors import UserError
    from transmem.models import create_model
    from transmem.training import ForecastModule, SamplingSchedule
    from transmem.transfer import MemoryBank

    small = dict(num_layers=1, hidden=4, filter_size=3, patch_size=4)
    sched = SamplingSchedule(t_in=2, frames=4)
    owners = {  # key: (tuple, build with value v)
        "schedule": (choices.SCHEDULE_KINDS, lambda v: SamplingSchedule(kind=v, t_in=2, frames=4)),
        "distill_decay": (choices.DISTILL_DECAYS, lambda v: ForecastModule(create_model("convlstm", **small), sched,
                                                                           distill_decay=v, total_steps=10)),
        "distill_span": (choices.DISTILL_SPANS, lambda v: ForecastModule(create_model("convlstm", **small), sched,
                                                                         distill_span=v)),
        "mode": (choices.TMU_MODES, lambda v: create_model("tmu", backbone_config=small, source_names=["a"],
                                                           source_channels=[4], mode=v)),
        "weighting": (choices.TMU_WEIGHTINGS, lambda v: create_model("tmu", backbone_config=small, source_names=["a"],
                                                                     source_channels=[4], weighting=v)),
        "distiller_norm": (choices.NORMS, lambda v: create_model("tmu", backbone_config=small, source_names=["a"],
                                                                  source_channels=[4], distiller_norm=v)),
        "teacher_inputs": (choices.TEACHER_INPUTS, lambda v: MemoryBank(
            [create_model("convlstm", **small)], ["a"], create_model("convlstm", **small), [0], v)),
        "norm": (choices.NORMS, lambda v: create_model("convlstm", **small, norm=v)),
    }
    for key, (values, build) in owners.items():
        for v in values:
            build(v)  # every value of the tuple is accepted
        with pytest.raises(UserError) as e:
            build("bogus")
        assert str(e.value) == choices.problem(key, "bogus", values), key
    # transfer.mode also takes the mixture, a transfer mode that builds no TMU
    config_keys = {**choices.CONFIG_CHOICES, "transfer.mode": choices.TRANSFER_MODES,
                   "transfer.weighting": choices.TMU_WEIGHTINGS, "transfer.distiller_norm": choices.NORMS}
    for key, values in config_keys.items():
        with pytest.raises(ConfigError) as e:
            load_experiment(None, {key: "bogus"})
        assert str(e.value) == choices.problem(key, "bogus", values) and e.value.where == key


def test_the_tmu_options_are_declared_once_and_reach_config_cli_builder_and_model(capsys):
    """TMUOptions is the one declaration: the model's config and the config's transfer section
    hold its fields, the transfer command has a flag for each (the same as --transfer.KEY, checked
    by the config), and a value set in the config reaches the built TMU (distiller_norm)."""
    import dataclasses

    from transmem.cli import build_parser, main
    from transmem.config import TransferConfig, load_experiment
    from transmem.models import create_model
    from transmem.models.tmu import TMUConfig
    from transmem.options import NAMES, TMUOptions, tmu_options
    from transmem.transfer import build_tmu

    assert set(NAMES) <= {f.name for f in dataclasses.fields(TMUConfig)}
    assert set(NAMES) <= {f.name for f in dataclasses.fields(TransferConfig)}
    assert issubclass(TMUConfig, TMUOptions) and issubclass(TransferConfig, TMUOptions)
    transfer = build_parser()._subparsers._group_actions[0].choices["transfer"]
    dests = {a.dest for a in transfer._actions}
    assert {f"transfer.{n}" for n in NAMES} <= dests

    exp = load_experiment(None, {"transfer.distiller_norm": "group", "transfer.tmu_layers": "top",
                                 "model.num_layers": "2", "model.hidden": "8"})
    teacher = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    model, _ = build_tmu("convlstm", {"num_layers": 2, "hidden": 8, "patch_size": 4}, [teacher], ["t"],
                         tmu_options(exp.transfer))
    assert model.layers == [1]  # "top": the last layer
    assert isinstance(model.transfer["1"].distill[1], torch.nn.GroupNorm)

    assert main(["transfer", "--out", "never-made", "--teachers", "x", "--distiller-norm", "batch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "transmem: error: transfer.distiller_norm: expected one of none, group, got 'batch'"
    assert main(["transfer", "--out", "never-made", "--teachers", "x", "--gate-kernel", "2"]) == 2
    assert "transfer.gate_kernel=2: must be an odd integer" in capsys.readouterr().err


def test_blend_and_baseline_flags_are_checked_once_in_api():
    """`--blend` and `--baselines` have one check each (api), which evaluate and predict share."""
    from transmem import api
    from transmem.baselines import list_baselines
    from transmem.config import ConfigError
    assert api.parse_blend(None) is None
    assert api.parse_blend("extrapolation:0.3") == ("extrapolation", 0.3)
    assert api.parse_blend("persistence") == ("persistence", 0.5)
    with pytest.raises(ConfigError) as e:
        api.parse_blend("nowcast:0.3")
    assert str(e.value) == f"--blend: expected one of {', '.join(list_baselines())}, got 'nowcast'"
    with pytest.raises(ConfigError, match="--blend 'persistence:2': the weight"):
        api.parse_blend("persistence:2")
    assert api.parse_baselines("persistence,default") == "persistence,default"
    with pytest.raises(ConfigError, match="--baselines: expected one of .*got 'nope'"):
        api.parse_baselines("persistence,nope")

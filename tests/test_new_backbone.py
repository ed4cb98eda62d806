"""Adding a backbone is one file plus a decorator: a throwaway backbone, registered here and
nowhere else, goes through pretraining, a TMU transfer from its own zoo entry, the benchmark and
the CLI's model listing without any edit to the package."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from transmem import api, zoo
from transmem.bench import BenchSpec, Workload
from transmem.cli import main
from transmem.config import load_experiment
from transmem.models import list_models, register_model
from transmem.models.base import BackboneConfig, PredictiveRNN
from transmem.models import registry

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast


@dataclass
class ToyConfig(BackboneConfig):
    pass


class ToyGRU(PredictiveRNN):
    """A GRU-like memory per layer: m' = z * m + (1 - z) * tanh(cand), from one conv of [x, m]."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        c = config
        self.cells = nn.ModuleList(
            nn.Conv2d(self.layer_input_channels(l) + c.hidden, 2 * c.hidden, 3, padding=1)
            for l in range(c.num_layers))
        self.head = nn.Conv2d(c.hidden, self.frame_channels, 1)

    def init_state(self, batch, height, width, ref):
        return [ref.new_zeros(batch, self.config.hidden, height, width) for _ in self.cells]

    def step(self, x, state, t, hook=None):
        new, inp = [], x
        for l, conv in enumerate(self.cells):
            z, cand = conv(torch.cat([inp, state[l]], 1)).chunk(2, 1)
            z = torch.sigmoid(z)
            m = z * state[l] + (1 - z) * torch.tanh(cand)
            if hook is not None:
                m = hook(l, t, m, inp, state[l])
            new.append(m)
            inp = m
        return self.head(inp), new, list(new)


@pytest.fixture(scope="module")
def toy():
    """Registered for this module's tests only (so that other tests' model lists stay the same)."""
    register_model("toy_gru")(ToyGRU)
    yield "toy_gru"
    registry._MODELS.pop("toy_gru")


def _experiment(name):
    return load_experiment(base={
        "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 16, "val_clips": 4,
                 "test_clips": 4, "num_digits": 1},
        "model": {"name": name, "num_layers": 2, "hidden": 4, "patch_size": 2},
        "train": {"steps": 3, "batch_size": 4, "t_in": 3, "progress": False, "ckpt_every": 3},
        "eval": {"batch_size": 4}})


def test_throwaway_backbone_pretrain_transfer_bench_and_cli(toy, tmp_path, capsys):
    assert toy in list_models(kind="backbone") and toy not in list_models(kind="transfer")
    exp = _experiment(toy)
    pre = api.run_train(exp, tmp_path / "pre", zoo_name="toy1", zoo_root=tmp_path / "zoo")
    assert pre["mse"] > 0
    teacher, card = zoo.load_entry(tmp_path / "zoo" / "toy1")
    assert card["model"] == toy and isinstance(teacher, ToyGRU)

    tr = api.run_transfer(exp, tmp_path / "tmu", teachers=[tmp_path / "zoo" / "toy1"])
    assert tr["mse"] > 0
    target, tcard = zoo.load_entry(tmp_path / "tmu" / "model")
    assert tcard["model"] == "tmu" and isinstance(target.backbone, ToyGRU)

    for spec in (BenchSpec(model=toy, layers=2, hidden=4, filter=3, patch=2, size=16, batch=2, frames=6),
                 BenchSpec(model="tmu", backbone=toy, layers=2, hidden=4, filter=3, patch=2, size=16,
                           batch=2, frames=6, teachers=2)):
        w = Workload(spec)
        before = [p.detach().clone() for p in w.model.parameters()]
        w.train_step()
        assert any(not torch.equal(a, b) for a, b in zip(before, w.model.parameters()))
        w.infer_step()

    assert main(["models"]) == 0
    assert toy in capsys.readouterr().out.split()
    assert main(["models", "--kind", "transfer"]) == 0
    assert capsys.readouterr().out.split() == ["tmu"]
    assert main(["models", "--kind", "mixture"]) == 0
    assert capsys.readouterr().out.split() == ["mixture"]
    assert main(["bench", "--model", "nope"]) == 2  # refused by the registry's list, which names the toy
    err = capsys.readouterr().err
    assert "--model: expected one of" in err and toy in err and "nope" in err

"""The mixture of finetuned zoo members (``transfer --mode mixture``, issue 26): the combination
trains, only its weights get a gradient, a saved entry forecasts exactly as before, and the entry
runs through the CLI like any model."""
import json

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from transmem import api, zoo
from transmem.cli import main
from transmem.config import load_experiment
from transmem.data import build_datasets
from transmem.training import ForecastModule, SamplingSchedule, forecast_loss
from transmem.transfer import MixtureError, build_mixture

from backbones import trained_convlstm  # a briefly trained zoo entry

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 8,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 2, "hidden": 4, "filter_size": 3, "patch_size": 2},
    "train": {"steps": 2, "batch_size": 4, "t_in": 3, "progress": False, "ckpt_every": 2},
    "eval": {"batch_size": 8, "examples": 1},
}
ARCH = {k: v for k, v in TINY["model"].items() if k != "name"}
T_IN, LEADS = 3, 3


def _train(clips, steps=30, seed=0, **arch):
    return trained_convlstm({**ARCH, **arch}, clips, steps, seed)


@pytest.fixture(scope="module")
def exp():
    return load_experiment(base=TINY)


@pytest.fixture(scope="module")
def datasets(exp):
    return build_datasets(exp.data)


@pytest.fixture(scope="module")
def batch(datasets):
    train = datasets["train"]
    return default_collate([train[i] for i in range(8)])["frames"]


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory, datasets):
    """Two entries: one trained on the target's own clips, one on uniform noise."""
    root = tmp_path_factory.mktemp("zoo")
    train = datasets["train"]

    def target_clips(step):
        return default_collate([train[(step * 8 + i) % len(train)] for i in range(8)])["frames"]

    def noise_clips(step):
        return torch.rand(8, 6, 1, 16, 16, generator=torch.Generator().manual_seed(step))

    zoo.save_entry(_train(target_clips), root / "digits")
    zoo.save_entry(_train(noise_clips, patch_size=4), root / "noise")  # another patch size: padded to the lcm
    return root


def _mixture(zoo_root, baselines=(), gating="lead"):
    members = [zoo.load_entry(zoo_root / n)[0] for n in ("digits", "noise")]
    return build_mixture(members, ["digits", "noise"], baselines=baselines, data=TINY["data"], t_in=T_IN,
                         leads=LEADS, gating=gating, seed=0)


def _loss(model, frames):
    mask = SamplingSchedule(kind="none", t_in=T_IN, frames=6).mask(0, frames.shape[0])
    return forecast_loss(model, frames, mask)[0]


def _lead_mse(pred, truth):
    return ((pred - truth) ** 2).mean(dim=(0, 2, 3, 4))


def test_the_combination_trains_its_loss_falls_and_weight_moves_to_the_better_member(zoo_root, batch):
    model = _mixture(zoo_root).train()
    before_logits = model.logits.detach().clone()
    with torch.no_grad():
        _, fc = model.member_forecasts(batch)
        per_member = torch.stack([_lead_mse(fc[:, :, n], batch[:, T_IN:]) for n in range(fc.shape[2])], 1)
        before = float(_loss(model, batch))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(40):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(_loss(model, batch))
    assert after < before
    assert not torch.equal(model.logits.detach(), before_logits)
    w = model.lead_weights(LEADS)  # (leads, members)
    better = per_member.argmin(1)  # at each lead, the member with the lower MSE
    assert (per_member[:, 0] != per_member[:, 1]).all()
    for lead in range(LEADS):
        assert w[lead, better[lead]] > 0.5, (lead, w, per_member)


@pytest.mark.parametrize("gating", ["lead", "pixel", "stack"])
def test_the_gradient_reaches_the_weights_and_not_the_frozen_members(zoo_root, batch, gating):
    model = _mixture(zoo_root, baselines=["persistence"], gating=gating).train()
    members_before = {k: v.clone() for k, v in model.members.state_dict().items()}
    assert all(not m.training for m in model.members)  # frozen members stay in eval mode
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gate = {"lead": set(), "pixel": {"gate.weight", "gate.bias"},
            "stack": {f"gate.{m}.{w}" for m in ("body.0", "body.2", "body.4", "head") for w in ("weight", "bias")}}
    assert trainable == {"logits"} | gate[gating]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = _loss(model, batch)
    opt.zero_grad()
    loss.backward()
    assert model.logits.grad is not None and model.logits.grad.abs().sum() > 0
    assert torch.isfinite(model.logits.grad).all()
    if gating == "pixel":
        assert model.gate.weight.grad.abs().sum() > 0
    if gating == "stack":  # its head starts at zero: the gradient reaches it, and through it (later) the body
        assert model.gate.head.weight.grad.abs().sum() > 0 and model.gate.head.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.members.parameters())
    opt.step()
    assert all(torch.equal(v, members_before[k]) for k, v in model.members.state_dict().items())


@pytest.mark.parametrize("gating", ["lead", "pixel", "stack"])
def test_a_saved_and_reloaded_mixture_forecasts_exactly_as_before(zoo_root, batch, tmp_path, gating):
    model = _mixture(zoo_root, baselines=["persistence"], gating=gating)
    with torch.no_grad():  # weights away from uniform, so that a load that lost them shows
        model.logits.copy_(torch.randn(model.logits.shape, generator=torch.Generator().manual_seed(1)))
        for w in (model.gate.parameters() if model.gate is not None else ()):
            w.normal_(0, 0.3)
    if gating == "stack":  # calibrated areas are part of the entry too
        model.config.areas = [{"threshold": 0.3, "value": 0.3, "source": "mean:digits+persistence", "level": 0.2,
                               "level_value": 0.2}]
    card = {"t_in": T_IN, "t_out": LEADS, "frame_size": [16, 16], "channels": 1, "data": TINY["data"]}
    zoo.save_entry(model, tmp_path / "mix", card)
    loaded, saved_card = zoo.load_entry(tmp_path / "mix")
    assert saved_card["model"] == "mixture" and saved_card["config"]["patch_size"] == 4
    sched = SamplingSchedule(kind="none", t_in=T_IN, frames=6)
    with torch.inference_mode():
        a = ForecastModule(model.eval(), sched).rollout(batch)
        b = ForecastModule(loaded, sched).rollout(batch)
        c = api.load_for_inference(tmp_path / "mix")[0].rollout(batch)
    assert a.shape == (8, LEADS, 1, 16, 16)
    assert torch.equal(a, b) and torch.equal(a, c)
    # the members' weights are inside the entry: changing one changes the forecast
    with torch.no_grad():
        next(loaded.members[0].parameters()).add_(0.5)
        assert not torch.equal(ForecastModule(loaded, sched).rollout(batch), a)


def test_a_mixture_with_baselines_saves_for_data_of_any_seed_and_size(zoo_root, tmp_path):
    """The baselines' data goes into the model config, whose numbers the card check bounds: a big
    data.seed or clip count must not make the entry unloadable."""
    members = [zoo.load_entry(zoo_root / "digits")[0]]
    data = {**TINY["data"], "seed": 2**40, "train_clips": 5_000_000}
    model = build_mixture(members, ["digits"], baselines=["persistence"], data=data, t_in=T_IN, leads=LEADS)
    zoo.save_entry(model, tmp_path / "mix")
    loaded, _ = zoo.load_entry(tmp_path / "mix")
    assert loaded.config.baseline_data["name"] == "flying_digits" and "seed" not in loaded.config.baseline_data
    # a data config that joins other configs (a benchmark's reader of named parts) nests deeper than
    # a model's own config: its entry still loads (transfer_radar's product mixtures)
    nested = {**TINY["data"], "extra": {"parts": {"train": [{"name": "flying_digits", "extra": {"source": {
        "extra": {"crop": [0, 0, 8, 8]}}}}]}}}
    model = build_mixture(members, ["digits"], baselines=["persistence"], data=nested, t_in=T_IN, leads=LEADS)
    zoo.save_entry(model, tmp_path / "nested")
    loaded, _ = zoo.load_entry(tmp_path / "nested")
    assert loaded.config.baseline_data["extra"]["parts"]["train"][0]["extra"]["source"]["extra"]["crop"] == [0, 0, 8, 8]


def test_a_mixture_refuses_a_transfer_model_as_member(zoo_root):
    from transmem.transfer.mixture import check_member
    card = zoo.read_card(zoo_root / "digits")
    check_member(zoo_root / "digits", card, 1)
    with pytest.raises(MixtureError, match="not a backbone"):
        check_member("a_tmu", {**card, "model": "tmu"}, 1)
    with pytest.raises(MixtureError, match="3-channel"):
        check_member("rgb", {**card, "config": {**card["config"], "in_channels": 3}}, 1)


def test_run_mixture_finetunes_the_members_and_saves_one_entry_naming_them(exp, zoo_root, tmp_path):
    out = tmp_path / "run"
    m = api.run_mixture(exp, out, teachers=["digits", "noise"], zoo_root=zoo_root, zoo_name="mix_api",
                        baselines=["persistence"], member_steps=2, mix_steps=4, mix_lr=0.2)
    assert m["mse"] > 0
    card = zoo.read_card(zoo_root / "mix_api")
    assert card["model"] == "mixture" and card["kind"] == "mixture"
    assert [c["name"] for c in card["members"]] == ["digits", "noise"]
    for c in card["members"]:  # the finetuned member's weights, and the entry it started from
        assert c["sha256"] == zoo.sha256_file(out / "members" / c["name"] / "model" / zoo.WEIGHTS)
        assert c["finetuned"]["from_sha256"] == zoo.read_card(zoo_root / c["name"])["sha256"]
        assert c["sha256"] != c["finetuned"]["from_sha256"]
    assert card["baselines"] == [{"name": "persistence", "scale": "values"}]
    assert set(card["mixture"]["weights"]) == {"digits", "noise", "persistence"}
    assert any(abs(w - 1 / 3) > 1e-3 for ws in card["mixture"]["weights"].values() for w in ws)  # trained
    assert card["mixture"]["member_steps"] == 2 and card["train"]["steps"] == 4
    assert card["mixture"]["mix_on"] == "val"  # clips the members did not train on
    assert json.loads((out / "mixture.json").read_text())["baselines"] == ["persistence"]
    assert (out / "metrics.json").is_file() and (out / "model" / zoo.CARD).is_file()
    # the config's transfer.mode routes run_transfer to the mixture too; a finished run is not redone
    exp2 = load_experiment(base={**TINY, "transfer": {"mode": "mixture"}})
    assert api.run_transfer(exp2, out, resume=True, teachers=["digits", "noise"], zoo_root=zoo_root) == m


def test_mix_steps_0_saves_the_members_plain_average_without_training(exp, zoo_root, tmp_path, batch):
    """``--mix-steps 0``: nothing trains (no checkpoint, no validation clips needed); the entry
    forecasts the mean of its members' forecasts."""
    no_val = load_experiment(base={**TINY, "data": {**TINY["data"], "val_clips": 0}})
    out = tmp_path / "avg"
    api.run_mixture(no_val, out, teachers=["digits", "noise"], zoo_root=zoo_root, member_steps=0, mix_steps=0)
    card = zoo.read_card(out / "model")
    assert card["mixture"]["mix_steps"] == 0 and not (out / "checkpoints").exists()
    assert all(w == pytest.approx(0.5) for ws in card["mixture"]["weights"].values() for w in ws)
    mixture = api.load_for_inference(out / "model")[0]
    members = [ForecastModule(zoo.load_entry(zoo_root / n)[0], SamplingSchedule(kind="none", t_in=T_IN, frames=6))
               for n in ("digits", "noise")]
    with torch.no_grad():
        mean = (members[0].rollout(batch) + members[1].rollout(batch)) / 2
        torch.testing.assert_close(mixture.rollout(batch), mean, rtol=1e-5, atol=1e-6)


def test_kept_baseline_forecasts_are_the_plain_code_s_computed_once_per_clip_within_the_bound(zoo_root, batch,
                                                                                             monkeypatch):
    """While a mixture's weights fit, each clip's baseline forecasts are computed once (by its
    input frames) and served again exactly; never more than the bound is kept; the gradient still
    reaches the weights."""
    model = _mixture(zoo_root, baselines=["persistence"]).train()
    base = model.baselines[0]
    plain = model.baseline_forecasts(batch, T_IN)
    calls, rollout = [], base.rollout
    monkeypatch.setattr(base, "rollout", lambda x: calls.append(len(x)) or rollout(x))
    model.remember_baselines(1 << 20)
    assert torch.equal(model.baseline_forecasts(batch[:5], T_IN), plain[:5])
    assert torch.equal(model.baseline_forecasts(batch, T_IN), plain) and calls == [5, 3]
    future = batch.clone()
    future[:, T_IN:] = 0  # the baselines read only the input frames: the same clip to them
    assert torch.equal(model.baseline_forecasts(future, T_IN), plain) and calls == [5, 3]
    turned = batch.reshape(*batch.shape[:3], 8, 32)  # the same bytes in frames of another shape: other clips
    assert model.baseline_forecasts(turned, T_IN).shape[-2:] == (8, 32) and calls == [5, 3, 8]
    calls.pop()
    loss = _loss(model, batch)
    loss.backward()
    assert model.logits.grad.abs().sum() > 0
    model.remember_baselines(2 * plain[0].nbytes)  # room for two clips' forecasts
    calls.clear()
    model.baseline_forecasts(batch, T_IN)
    model.baseline_forecasts(batch, T_IN)
    assert calls == [8, 6] and model._memo_used == 2 * plain[0].nbytes
    model.remember_baselines(0)
    assert not model._memo and torch.equal(model.baseline_forecasts(batch, T_IN), plain) and calls == [8, 6, 8]


def test_run_mixture_fits_the_same_weights_with_and_without_kept_baseline_forecasts(exp, zoo_root, tmp_path,
                                                                                   monkeypatch):
    from transmem.baselines import forecaster
    clips, persistence = [], forecaster.persistence
    monkeypatch.setattr(forecaster, "persistence", lambda x, t_in: clips.append(len(x)) or persistence(x, t_in))
    weights, computed = [], []
    for memo in (0, 1 << 20):
        monkeypatch.setattr(api, "MIX_MEMO_BYTES", memo)
        out = tmp_path / f"memo{memo}"
        clips.clear()
        api.run_mixture(exp, out, teachers=["digits", "noise"], zoo_root=zoo_root, baselines=["persistence"],
                        member_steps=0, mix_steps=6, mix_lr=0.2)
        weights.append(zoo.read_card(out / "model")["mixture"]["weights"])
        computed.append(sum(clips))
    assert weights[0] == weights[1] and any(abs(w - 1 / 3) > 1e-3 for ws in weights[0].values() for w in ws)
    assert computed[1] < computed[0], computed  # the fit's 8 validation clips, once each instead of once a step


def _write_cfg(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return cfg


def test_transfer_help_lists_the_mixture_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["transfer", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "mixture" in text and "--member-steps" in text and "--gating" in text


def test_cli_mixture_by_auto_then_zoo_list_show_evaluate_and_predict(zoo_root, tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    assert main(["transfer", "--mode", "mixture", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--teachers", "auto:2", "--zoo-root", str(zoo_root), "--zoo-name", "mix_cli", "--probe-steps", "0",
                 "--member-steps", "1", "--mix-steps", "2", "--gating", "pixel", "--mix-on", "train"]) == 0
    card = zoo.read_card(zoo_root / "mix_cli")
    assert card["ranking"]["members"]["use"] == "finetune" and card["mixture"]["mix_on"] == "train"
    assert sorted(c["name"] for c in card["members"]) == ["digits", "noise"]
    capsys.readouterr()
    assert main(["zoo", "list", "--root", str(zoo_root)]) == 0
    assert "mixture(" in capsys.readouterr().out
    assert main(["zoo", "show", "mix_cli", "--root", str(zoo_root)]) == 0
    assert json.loads(capsys.readouterr().out)["members"][0]["sha256"] == card["members"][0]["sha256"]
    assert main(["evaluate", "--model", str(zoo_root / "mix_cli"), "--config", str(cfg),
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["mse"] > 0
    assert (tmp_path / "ev" / "report.md").is_file()
    np.save(tmp_path / "in.npy", np.random.default_rng(1).random((6, 16, 16)).astype(np.float32))
    assert main(["predict", "--model", str(zoo_root / "mix_cli"), "--input", str(tmp_path / "in.npy"),
                 "--out", str(tmp_path / "pred")]) == 0
    pred = np.load(tmp_path / "pred" / "prediction.npy")
    assert pred.shape == (LEADS, 1, 16, 16) and np.isfinite(pred).all()


@pytest.mark.parametrize("args, named", [
    (["--teachers", "digits", "no_such_entry"], "no_such_entry"),
    (["--teachers", "digits", "noise", "--baselines", "persistence,bogus"], "bogus"),
    (["--teachers", "digits"], "at least two members"),
    (["--teachers", "digits", "noise", "--mix-steps", "-1"], "--mix-steps"),
    (["--teachers", "digits", "noise", "--mix-steps", "0", "--gating", "pixel"], "--gating pixel"),
    (["--teachers", "digits", "noise", "--data.val_clips", "0"], "--mix-on val"),
])
def test_a_bad_member_or_option_is_one_line_before_anything_is_written(zoo_root, tmp_path, capsys, args, named):
    cfg = _write_cfg(tmp_path)
    out = tmp_path / "run"
    before = sorted(p.name for p in zoo_root.iterdir())
    rc = main(["transfer", "--mode", "mixture", "--config", str(cfg), "--out", str(out), "--zoo-root", str(zoo_root),
               "--zoo-name", "never", "--member-steps", "1", "--mix-steps", "1", *args])  # the last value counts
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("transmem: error:") and named in err, err
    assert not out.exists()
    assert sorted(p.name for p in zoo_root.iterdir()) == before


def test_a_mixture_option_without_the_mixture_mode_is_refused(zoo_root, tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    rc = main(["transfer", "--config", str(cfg), "--out", str(tmp_path / "run"), "--teachers", "digits",
               "--zoo-root", str(zoo_root), "--gating", "pixel"])
    assert rc == 2 and "--gating" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bench_times_a_mixture_and_its_step_trains_only_the_weights():
    from transmem.bench import BenchSpec, Workload
    w = Workload(BenchSpec(model="mixture", layers=2, hidden=4, filter=3, patch=2, size=16, batch=2, frames=6,
                           teachers=2))
    members = [p.detach().clone() for p in w.model.members.parameters()]
    logits = w.model.logits.detach().clone()
    w.train_step()
    w.infer_step()
    assert not torch.equal(w.model.logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(members, w.model.members.parameters()))


def test_each_baseline_member_runs_in_the_scale_its_name_declares(zoo_root, batch):
    """On rain, ``extrapolation`` (mm/h) and ``extrapolation_log`` (the log values) are two
    members, not one twice; an entry made before (``baseline_scale: values``) keeps running both
    on the [0, 1] values, as it was trained."""
    from dataclasses import asdict

    from transmem.baselines import BaselineUnavailable
    from transmem.models import create_model
    members = [zoo.load_entry(zoo_root / "digits")[0]]
    rain = {"name": "advected_rain", "size": 16, "frames": 6}
    try:
        model = build_mixture(members, ["digits"], baselines=["extrapolation", "extrapolation_log"], data=rain,
                              t_in=T_IN, leads=LEADS)
    except BaselineUnavailable as e:
        pytest.skip(str(e))
    assert model.config.baseline_scale == "own"
    assert [b.runs_on for b in model.baselines] == ["physical", "values"]  # what the card records
    fc = model.member_forecasts(batch)[1]  # (B, leads, members, C, H, W)
    assert not torch.allclose(fc[:, :, 1], fc[:, :, 2])
    old = {**asdict(model.config), "baseline_scale": "values"}
    before = create_model("mixture", **old)
    before.load_state_dict(model.state_dict())
    fc_old = before.member_forecasts(batch)[1]
    assert torch.equal(fc_old[:, :, 1], fc_old[:, :, 2]) and torch.equal(fc_old[:, :, 2], fc[:, :, 2])
    old.pop("baseline_scale")  # a card written before the field existed
    assert create_model("mixture", **old).config.baseline_scale == "values"


def test_the_stack_gate_starts_from_its_start_logits_and_reads_the_last_frame_and_lead():
    """StackGate (the native radar recipe's combination): with its head at zero the forecast is the
    softmax of the start logits over the members; once the body feeds the head, the last frame
    and the lead change the weights."""
    from transmem.models.mixture import StackGate
    g = torch.Generator().manual_seed(0)
    members = torch.rand(2, 3, 1, 12, 12, generator=g)
    last, lead = torch.rand(2, 1, 12, 12, generator=g), torch.tensor([0.25, 1.0])
    gate = StackGate(3, start=[0.0, 0.0, -4.0])
    w = torch.softmax(torch.tensor([0.0, 0.0, -4.0]), 0)
    want = (w.view(1, 3, 1, 1, 1) * members).sum(1)
    assert torch.allclose(gate(members, last, lead), want, atol=1e-6)
    # per-lead logits from the mixture add to the gate's own
    extra = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    w2 = torch.softmax(torch.tensor([0.0, 0.0, -4.0]) + extra, 1)
    assert torch.allclose(gate(members, last, lead, extra), (w2.view(2, 3, 1, 1, 1) * members).sum(1), atol=1e-6)
    with torch.no_grad():
        gate.head.weight.normal_(0, 0.5, generator=g)
    a = gate(members, last, lead)
    assert not torch.allclose(a, gate(members, last.flip(-1), lead))
    assert not torch.allclose(a, gate(members, last, lead.flip(0)))
    assert a.min() >= 0 and a.max() <= 1


def test_banded_keeps_values_inside_the_drawn_areas_and_leaves_the_rest():
    from transmem.models.mixture import banded
    value = torch.tensor([[[[0.05, 0.15, 0.35, 0.9]]]])  # (N=1, C=1, H=1, W=4)
    reach = torch.tensor([[[[[True, False, True, True]]], [[[False, False, True, False]]]]])  # (1, K=2, 1, 1, 4)
    out = banded(value, reach, [0.1, 0.3])
    eps = 1e-4
    # pixel 0 reaches 0.1 only: lifted to just above 0.1; pixel 1 reaches none: held below 0.1;
    # pixel 2 reaches 0.3 (its value kept); pixel 3 reaches 0.1, not 0.3: held just below 0.3
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.1 + eps, 0.1 - eps, 0.35, 0.3 - eps]))
    # reaching the higher level implies the lower one
    only_high = torch.tensor([[[[[False]]], [[[True]]]]])
    assert float(banded(torch.tensor([[[[0.0]]]]), only_high, [0.1, 0.3])) == pytest.approx(0.3 + eps)


def test_calibrated_areas_pick_the_field_and_level_with_the_best_csi():
    """count_areas / pick_areas (the areas of `--areas`, and benchmarks/nowcast.py's): a field that
    draws the observed area exactly at 0.8 x the threshold wins over one that is noise."""
    from transmem.transfer.mixture import count_areas, pick_areas
    rng = np.random.default_rng(0)
    obs = rng.random((4, 32, 32)).astype(np.float32)
    good = obs * 0.8  # exceeds 0.8 t exactly where obs exceeds t
    noise = rng.random((4, 32, 32)).astype(np.float32)
    valid = np.ones_like(obs, dtype=bool)
    levels = {0.5: [0.25, 0.4, 0.5, 0.6], 0.8: [0.4, 0.64, 0.8]}
    counts = count_areas({"good": good, "noise": noise}, obs, valid, levels, lambda x: x)
    assert counts["good|0.5|0.4"][1:] == [0, 0] and counts["good|0.5|0.4"][0] == int((obs >= 0.5).sum())
    assert pick_areas([counts]) == {0.5: ("good", 0.4), 0.8: ("good", 0.64)}
    # no-data is left out of every count
    valid[:, :16] = False
    counts = count_areas({"good": good}, obs, valid, {0.5: [0.4]}, lambda x: x)
    assert sum(counts["good|0.5|0.4"]) == int(((obs >= 0.5) & valid).sum())


def test_run_mixture_with_the_stack_gate_and_areas_saves_an_entry_that_forecasts_inside_them(zoo_root, tmp_path):
    """``transfer --mode mixture --gating stack --areas``: the radar recipe's form as a product. The
    areas are calibrated on the weights' clips at eval.thresholds, saved on the card and in the
    model's config, and the loaded entry forecasts as the trained one, inside those areas."""
    from transmem.models.mixture import area_source
    exp = load_experiment(base={**TINY, "eval": {**TINY["eval"], "thresholds": [0.2, 0.5]}})
    out = tmp_path / "run"
    m = api.run_mixture(exp, out, teachers=["digits"], zoo_root=zoo_root, zoo_name="mix_stack",
                        baselines=["persistence"], gating="stack", member_steps=0, mix_steps=3, mix_lr=0.01,
                        areas=True)
    assert m["mse"] > 0
    card = zoo.read_card(zoo_root / "mix_stack")
    areas = card["mixture"]["areas"]
    assert [a["threshold"] for a in areas] == [0.2, 0.5]
    assert all(a["source"] in ("digits", "persistence", "mean:digits+persistence") for a in areas)
    assert all(0.5 * a["threshold"] - 1e-9 <= a["level"] <= 1.4 * a["threshold"] + 1e-9 for a in areas)
    assert card["config"]["areas"] == areas and card["config"]["gating"] == "stack"
    model, _ = zoo.load_entry(zoo_root / "mix_stack")
    frames = default_collate([build_datasets(exp.data)["test"][i] for i in range(4)])["frames"]
    sched = SamplingSchedule(kind="none", t_in=T_IN, frames=6)
    with torch.inference_mode():
        pred = ForecastModule(model, sched).rollout(frames)
        again = api.load_for_inference(zoo_root / "mix_stack")[0].rollout(frames)
        fc = model.member_forecasts(frames)[1]
    assert torch.equal(pred, again)
    for a in areas:  # inside each drawn area the forecast is above the threshold, outside below
        inside = area_source(fc, model.names, a["source"]) >= a["level_value"]
        assert (pred[inside] > a["value"]).all() and (pred[~inside] < a["value"]).all()
    # --areas without thresholds: one line, before anything is trained
    with pytest.raises(MixtureError, match="eval.thresholds"):
        api.run_mixture(load_experiment(base=TINY), tmp_path / "run2", teachers=["digits"], zoo_root=zoo_root,
                        baselines=["persistence"], gating="stack", member_steps=0, areas=True)
    assert not (tmp_path / "run2").exists()


def test_member_forecasts_pad_frames_no_patch_size_divides(zoo_root, batch):
    """Frames of 14x13 (neither member's patch, 2 or 4, divides them) are padded to 16x16 by
    edge replication for the members and cropped back; the baselines read them as they are."""
    model = _mixture(zoo_root, baselines=("persistence",)).eval()
    frames = batch[..., :14, :13]
    head, fc = model.member_forecasts(frames)
    assert fc.shape[-2:] == (14, 13) and head.shape[-2:] == (14, 13)
    padded = torch.cat([frames, frames[..., -1:].expand(*frames.shape[:-1], 3)], -1)
    padded = torch.cat([padded, padded[..., -1:, :].expand(*padded.shape[:-2], 2, 16)], -2)
    with torch.no_grad():
        for n, member in enumerate(model.members):
            alone = member(padded, t_in=T_IN)[:, T_IN - 1:, ..., :14, :13]
            assert torch.allclose(fc[:, :, n], alone, atol=1e-6)
    assert torch.equal(fc[:, :, 2], frames[:, T_IN - 1:T_IN].expand_as(fc[:, :, 2]))  # persistence
    with torch.no_grad():
        assert model(frames, t_in=T_IN).shape[-2:] == (14, 13)

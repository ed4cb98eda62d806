"""Ranking the zoo for a target (``transmem.zoo.rank``, ``transmem zoo rank``) and the ``auto``
choices of finetune / transfer that use it."""
import json

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from transmem import api, zoo
from transmem.cli import main
from transmem.config import load_experiment
from transmem.data import build_datasets
from transmem.models import create_model
from transmem.transfer import build_tmu

from backbones import trained_convlstm  # a briefly trained zoo entry

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 8,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 2, "hidden": 4, "filter_size": 3, "patch_size": 2},
    "train": {"steps": 4, "batch_size": 4, "t_in": 3, "progress": False, "ckpt_every": 2},
    "eval": {"batch_size": 8},
}
ARCH = {k: v for k, v in TINY["model"].items() if k != "name"}


def _train(clips, steps=30, seed=0, **arch):
    return trained_convlstm({**ARCH, **arch}, clips, steps, seed)


@pytest.fixture(scope="module")
def exp():
    return load_experiment(base=TINY)


@pytest.fixture(scope="module")
def datasets(exp):
    return build_datasets(exp.data)


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory, datasets):
    """Two entries for the target: one trained on the target's own clips, one on uniform noise."""
    root = tmp_path_factory.mktemp("zoo")
    train = datasets["train"]

    def target_clips(step):
        return default_collate([train[(step * 8 + i) % len(train)] for i in range(8)])["frames"]

    def noise_clips(step):
        g = torch.Generator().manual_seed(step)
        return torch.rand(8, 6, 1, 16, 16, generator=g)

    zoo.save_entry(_train(target_clips), root / "digits")
    zoo.save_entry(_train(noise_clips), root / "noise")
    return root


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory, zoo_root):
    """A zoo with one good entry and one of each kind that cannot serve the 1-channel 16x16 target
    (or only as a teacher)."""
    root = tmp_path_factory.mktemp("mixed")
    good, _ = zoo.load_entry(zoo_root / "digits")
    zoo.save_entry(good, root / "digits")
    zoo.save_entry(create_model("convlstm", {**ARCH, "in_channels": 2}), root / "two_channels")
    zoo.save_entry(create_model("convlstm", {**ARCH, "patch_size": 3}), root / "patch3")
    zoo.save_entry(create_model("convlstm", {**ARCH, "in_channels": 3}), root / "rgb")
    tmu, _ = build_tmu("convlstm", ARCH, [good], ["digits"], frame_channels=1)
    zoo.save_entry(tmu, root / "a_tmu")
    bad = zoo.save_entry(good, root / "tampered")
    with open(bad / zoo.WEIGHTS, "ab") as f:
        f.write(b"x")
    return root


def test_rank_puts_the_entry_trained_on_the_target_first(exp, datasets, zoo_root):
    r = zoo.rank(exp, zoo_root=zoo_root, probe_steps=5, seed=0, progress=False, datasets=datasets)
    assert [row["name"] for row in r.rows] == ["digits", "noise"]
    assert [row["rank"] for row in r.rows] == [1, 2]
    digits, noise = r.rows
    assert digits["zero_shot_mse"] < noise["zero_shot_mse"] and digits["probe_mse"] < noise["probe_mse"]
    for row in r.rows:
        assert row["usable"] and row["reason"] is None and row["uses"] == ["finetune", "teacher"]
        assert row["score"] == row["probe_mse"] and row["probe_mse"] != row["zero_shot_mse"]
    assert r.top() == ["digits"] and r.top(2, use="finetune") == ["digits", "noise"]
    assert r.score_key == "probe_mse" and r.target["val_clips"] == 8
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["probe_steps"] == 5 and d["rows"][0]["name"] == "digits" and set(d["baselines"]) == {
        "persistence", "extrapolation"}


def test_zero_shot_scores_are_the_evaluation_mse_on_the_validation_clips(exp, datasets, zoo_root):
    r = zoo.rank(exp, zoo_root=zoo_root, probe_steps=0, progress=False, datasets=datasets)
    assert all(row["probe_mse"] is None and row["score"] == row["zero_shot_mse"] for row in r.rows)
    on_val = load_experiment(base={**TINY, "eval": {"batch_size": 8, "split": "val"}})
    for row in r.rows:
        module, _ = api.load_for_inference(row["path"])
        module.t_in = on_val.train.t_in
        assert row["zero_shot_mse"] == pytest.approx(api.evaluate_forecaster(on_val, module, datasets)["mse"],
                                                     rel=1e-6)
    persistence = api.evaluate_forecaster(on_val, api.load_baseline("persistence", on_val), datasets)["mse"]
    assert r.baselines["persistence"] == pytest.approx(persistence, rel=1e-6)


def test_rank_is_a_function_of_the_seed(exp, datasets, zoo_root):
    def scores(seed):
        r = zoo.rank(exp, zoo_root=zoo_root, probe_steps=3, seed=seed, progress=False, datasets=datasets)
        return [(row["name"], row["zero_shot_mse"], row["probe_mse"]) for row in r.rows]

    a, b, c = scores(0), scores(0), scores(1)
    assert a == b
    assert [x[:2] for x in a] == [x[:2] for x in c]  # zero-shot needs no seed
    assert [x[2] for x in a] != [x[2] for x in c]  # the probe sees other clips and masks


def test_unusable_entries_are_listed_with_their_reason(exp, datasets, mixed_root):
    r = zoo.rank(exp, zoo_root=mixed_root, probe_steps=0, progress=False, datasets=datasets)
    rows = {row["name"]: row for row in r.rows}
    assert set(rows) == {"digits", "two_channels", "patch3", "rgb", "a_tmu", "tampered"}
    assert rows["digits"]["uses"] == ["finetune", "teacher"] and rows["rgb"]["uses"] == ["teacher"]
    assert rows["rgb"]["usable"] and rows["rgb"]["zero_shot_mse"] > 0  # through the gray<->RGB adapter
    reasons = {"two_channels": "2-channel frames", "patch3": "patch size 3 does not divide",
               "a_tmu": "not a backbone", "tampered": "sha256"}
    for name, words in reasons.items():
        assert not rows[name]["usable"] and rows[name]["rank"] is None and rows[name]["score"] is None
        assert words in rows[name]["reason"] and "\n" not in rows[name]["reason"]
    usable = [row["usable"] for row in r.rows]
    assert usable == sorted(usable, reverse=True)  # usable ones first
    assert r.top(1, use="finetune") == ["digits"]
    with pytest.raises(zoo.ZooError, match=r"1 of 6 entries can serve this target as a finetune source, 2 asked"):
        r.top(2, use="finetune")


def test_parse_auto():
    assert zoo.parse_auto("auto") == 1 and zoo.parse_auto(["auto:3"]) == 3
    assert zoo.parse_auto("digits") is None and zoo.parse_auto(["a", "b"]) is None
    with pytest.raises(zoo.ZooError, match="give it alone"):
        zoo.parse_auto(["auto", "digits"])


# --------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def run(*args):
    return main([str(a) for a in args])


def test_cli_rank_table_and_json(tmp_path, cfg, mixed_root, capsys):
    out = tmp_path / "rank.json"
    assert run("zoo", "rank", "--config", cfg, "--zoo-root", mixed_root, "--probe-steps", 2, "--json", out) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1].split()[:3] == ["rank", "name", "model"]
    first = text[2].split()
    assert first[0] == "1" and first[2] == "convlstm"
    assert any(line.split()[1] == "persistence" for line in text[2:])
    assert any("a_tmu" in line and "unusable" in line and "not a backbone" in line for line in text)
    d = json.loads(out.read_text())
    assert d["probe_steps"] == 2 and len(d["rows"]) == 6 and d["rows"][0]["name"] == first[1]
    assert d["baselines"]["persistence"] > 0
    # an existing --json is kept unless --overwrite
    before = out.read_text()
    assert run("zoo", "rank", "--config", cfg, "--zoo-root", mixed_root, "--json", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--overwrite" in err
    assert out.read_text() == before
    assert run("zoo", "rank", "--config", cfg, "--zoo-root", mixed_root, "--probe-steps", 0, "--json", out,
               "--overwrite", "--train.seed", 3, "--train.progress", "true") == 0
    err = capsys.readouterr().err  # progress: plain lines when standard error is not a terminal
    assert "zoo rank entry 7/7" in err
    d = json.loads(out.read_text())
    assert d["probe_steps"] == 0 and d["seed"] == 3 and d["score"] == "zero_shot_mse"


def test_finetune_from_auto_picks_the_top_entry(tmp_path, cfg, zoo_root):
    out = tmp_path / "ft"
    assert run("finetune", "--config", cfg, "--out", out, "--from", "auto", "--zoo-root", zoo_root,
               "--probe-steps", 2) == 0
    ranking = json.loads((out / "ranking.json").read_text())
    assert [r["name"] for r in ranking["rows"]] == ["digits", "noise"]
    card = json.loads((out / "model" / "card.json").read_text())
    assert card["init_from"]["entry"] == str(zoo_root / "digits")
    chosen = card["ranking"]["from"]["chosen"]
    assert [c["name"] for c in chosen] == ["digits"] and chosen[0]["score"] == ranking["rows"][0]["score"]
    assert card["ranking"]["from"]["file"] == "ranking.json"


def test_transfer_auto_teachers_and_init(tmp_path, cfg, zoo_root):
    out = tmp_path / "tr"
    assert run("transfer", "--config", cfg, "--out", out, "--teachers", "auto:2", "--init-from", "auto",
               "--zoo-root", zoo_root, "--probe-steps", 0) == 0
    card = json.loads((out / "model" / "card.json").read_text())
    assert [t["name"] for t in card["teachers"]] == ["digits", "noise"]
    assert card["transfer"]["init_from"] == str(zoo_root / "digits")
    assert [c["name"] for c in card["ranking"]["teachers"]["chosen"]] == ["digits", "noise"]
    assert card["ranking"]["init_from"]["chosen"][0]["name"] == "digits"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["transfer"]["teachers"] == [str(zoo_root / "digits"), str(zoo_root / "noise")]
    assert (out / "ranking.json").is_file()


@pytest.mark.parametrize("command", [("finetune", "--from", "auto"), ("transfer", "--teachers", "auto:2"),
                                     ("transfer", "--teachers", "x", "--init-from", "auto")])
def test_auto_with_an_empty_or_incompatible_zoo_stops_before_any_run_folder(tmp_path, cfg, command, capsys):
    empty = tmp_path / "empty_zoo"
    out = tmp_path / "run"
    assert run(*command, "--config", cfg, "--out", out, "--zoo-root", empty) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no zoo entries" in err
    assert not out.exists()
    bad = tmp_path / "bad_zoo"
    zoo.save_entry(create_model("convlstm", {**ARCH, "in_channels": 2}), bad / "two_channels")
    assert run(*command, "--config", cfg, "--out", out, "--zoo-root", bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0 of 1 entries can serve this target" in err
    assert "2-channel" in err and not out.exists()


def test_auto_refuses_a_used_run_folder_before_ranking(tmp_path, cfg, zoo_root, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert run("finetune", "--config", cfg, "--out", out, "--from", "auto", "--zoo-root", zoo_root) == 2
    assert "run folder exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]

"""Zoo entries: save / load round trip with identical predictions, checksums, refusal to overwrite."""
import json

import pytest
import torch

from backbones import BACKBONES, small
from transmem import zoo
from transmem.models import create_model


@pytest.mark.parametrize("name", BACKBONES)
def test_round_trip_identical_predictions(tmp_path, name):
    torch.manual_seed(0)
    m = small(name, patch_size=2).eval()
    path = zoo.save_entry(m, tmp_path / "zoo" / "a", {"t_in": 3, "t_out": 2})
    assert (path / "weights.safetensors").is_file() and (path / "card.json").is_file()
    card = json.loads((path / "card.json").read_text())
    assert card["model"] == name and card["config"]["hidden"] == 8 and len(card["sha256"]) == 64
    assert card["params"] == sum(p.numel() for p in m.parameters())
    loaded, card2 = zoo.load_entry("a", root=tmp_path / "zoo")
    x = torch.rand(2, 5, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(m(x, t_in=3), loaded(x, t_in=3))
    assert card2 == card


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tmu_round_trip(tmp_path, backbone):
    m = create_model("tmu", backbone=backbone, backbone_config=dict(num_layers=2, hidden=4, filter_size=3, patch_size=2),
                     source_names=["a", "b"], source_channels=[4, 6], tmu_layers="all").eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    zoo.save_entry(m, tmp_path / "t")
    loaded, card = zoo.load_entry(tmp_path / "t")
    assert card["config"]["source_names"] == ["a", "b"] and card["config"]["backbone"] == backbone
    x = torch.rand(1, 4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(m(x, t_in=2), loaded(x, t_in=2))


def test_tampered_weights_are_refused(tmp_path):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    path = zoo.save_entry(m, tmp_path / "e")
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="sha256 .* does not match"):
        zoo.load_entry(path)


def test_existing_entry_is_not_overwritten(tmp_path):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    path = zoo.save_entry(m, tmp_path / "e")
    before = (path / "card.json").read_text()
    with pytest.raises(zoo.ZooError, match="already exists"):
        zoo.save_entry(m, path)
    assert (path / "card.json").read_text() == before
    zoo.save_entry(m, path, {"note": "v2"}, overwrite=True)
    assert json.loads((path / "card.json").read_text())["note"] == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temp folders left behind


def test_missing_and_broken_entries_give_one_line_errors(tmp_path):
    with pytest.raises(zoo.ZooError, match="no zoo entry"):
        zoo.load_entry(tmp_path / "absent", root=tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "card.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="not valid JSON") as e:
        zoo.load_entry(tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_list_entries(tmp_path):
    m = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=2)
    for n in ("b", "a"):
        zoo.save_entry(m, tmp_path / n, {"metrics": {"mse": 1.5}})
    (tmp_path / "junk").mkdir()
    names = [p.name for p, _ in zoo.list_entries(tmp_path)]
    assert names == ["a", "b"]


def test_zoo_table_describes_models_and_data_through_their_registries(tmp_path):
    """`transmem zoo list`: the model column is the model class's describe (a TMU names its
    backbone and sources), the data column the reader's (flying digits name their count); a bad
    entry is a row with its problem."""
    cards = [(tmp_path / "d3", {"model": "convlstm", "config": {}, "data": {"name": "flying_digits", "num_digits": 3},
                                "frame_size": [32, 32], "t_in": 5, "t_out": 5, "train": {"steps": 300},
                                "metrics": {"mse": 41.234}}),
             (tmp_path / "t", {"model": "tmu", "config": {"backbone": "predrnn", "source_names": ["a", "b"]},
                               "data": {"name": "npy"}}),
             (tmp_path / "bad", None, "card lacks the key 'model'")]
    rows = zoo.format_table(cards).splitlines()
    assert rows[0].split()[:3] == ["name", "backbone", "data"]
    assert rows[1].split() == ["d3", "convlstm", "flying_digits", "k=3", "32x32", "5->5", "300", "41.23"]
    assert "tmu(predrnn, 2 src)" in rows[2] and rows[2].split()[-1] == "-" and " npy " in rows[2]
    assert rows[3].startswith("bad") and "unusable: card lacks the key 'model'" in rows[3]
    assert zoo.format_table([]) == "(zoo is empty)"

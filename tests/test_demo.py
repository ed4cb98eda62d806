"""`transmem demo --quick`: the README's main job, end to end, and the report it writes."""
import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from transmem.baselines import extrapolation_available
from transmem.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_metrics_json_has_every_method(demo):
    m = json.loads((demo / "metrics.json").read_text())
    names = set(m["methods"])
    assert {"scratch", "finetune:digits1", "finetune:digits2", "tmu:distill",
            "tmu:distill+finetune-init", "tmu:bank_read", "persistence", "extrapolation"} <= names
    if extrapolation_available() is not None:  # without the nowcast extra the row says so
        assert "not installed" in m["methods"].pop("extrapolation")["note"]
    for name, row in m["methods"].items():
        for key in ("mse", "mae", "ssim", "psnr"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (name, key)
        assert len(row["mse_per_frame"]) == 5
        assert row["mse"] == pytest.approx(np.mean(row["mse_per_frame"]), rel=1e-6)
    assert m["quick"] is True and m["wall_s"] > 0
    # the sharp recipe: the advection backbone on MSE + L1 (README, "The demo")
    assert m["settings"]["model"].startswith("name=advection") and "L1" in m["settings"]["loss"]
    assert (demo / "zoo" / "digits1" / "weights.safetensors").is_file()


def test_metrics_json_names_the_environment(demo):
    """The demo's metrics.json and each run's own record the versions, kernels and threads."""
    m = json.loads((demo / "metrics.json").read_text())
    env = m["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert all("environment" not in row for row in m["methods"].values())  # once, not per row
    runs = sorted((demo / "runs").glob("*/metrics.json"))
    assert len(runs) == 8  # two zoo models, six target methods
    assert all(json.loads(r.read_text())["environment"] == env for r in runs)


def test_report_files_images_and_html(demo):
    md = (demo / "report.md").read_text()
    for name in ("scratch", "finetune:digits2", "tmu:distill"):
        assert f"| {name} |" in md
    html = (demo / "report.html").read_text()
    linked = re.findall(r"\]\((figures/[^)]+)\)", md)
    uris = re.findall(r'src="data:image/(png|gif);base64,([^"]+)"', html)
    assert len(linked) >= 6 and len(uris) == len(linked)
    for kind, data in uris:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.format.lower() == kind
    gif = Image.open(demo / "figures" / "example0.gif")
    assert gif.n_frames == 5  # T_in = T_out = 5 in the quick demo
    grid = Image.open(demo / "figures" / "example0.png")
    assert grid.size[0] > 5 * 32 and grid.size[1] > 8 * 32  # 5 lead times, truth + 6 methods + baselines
    maps = np.load(demo / "figures" / "transfer_tmu-distill_layer0.npz")
    assert maps["gate"].shape == (2, 9, 8, 8)  # sources, steps, grid
    assert maps["gate"].min() >= 0 and maps["gate"].max() <= 1
    assert "dominates" in md or "single source" in md


def test_softmax_source_weights_sum_to_one():
    from transmem.api import load_for_inference  # noqa: F401
    from transmem.data import DataConfig, build_datasets
    from transmem.models import create_model
    from transmem.run_report import transfer_maps
    from transmem.training import ForecastModule, SamplingSchedule
    model = create_model("tmu", backbone="convlstm",
                         backbone_config=dict(num_layers=2, hidden=4, filter_size=3, patch_size=4),
                         source_names=["a", "b", "c"], source_channels=[4, 4, 4], tmu_layers="all",
                         weighting="softmax").eval()
    ds = build_datasets(DataConfig(size=16, frames=6, train_clips=2, val_clips=2, test_clips=5))["test"]
    module = ForecastModule(model, SamplingSchedule(kind="none", t_in=3, frames=6))
    maps = transfer_maps(module, ds, batch_size=2)
    for layer in (0, 1):
        w = maps[layer]["weight"]
        assert w.shape == (3, 5, 4, 4)
        assert np.allclose(w.sum(0), 1.0, atol=1e-5)
        assert np.allclose(maps[layer]["transfer"], w * maps[layer]["gate"])

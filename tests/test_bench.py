"""`transmem bench` on tiny sizes: the JSON has the agreed keys and sane values."""
import json

import pytest
import torch

from transmem.bench import REQUIRED_KEYS, BenchSpec, run_bench
from transmem.cli import main
from transmem.models import create_model

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY = ["--layers", "1", "--hidden", "4", "--filter", "3", "--patch", "4", "--size", "16",
        "--batch", "2", "--frames", "6", "--steps", "10", "--warmup", "1", "--threads", "1"]


def _check(res: dict, params: int) -> None:
    for key in REQUIRED_KEYS:
        assert key in res, key
    for key in ("train_ms", "infer_ms", "seq_per_s", "peak_rss_mb", "gflops", "peak_gflops"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    assert res["params"] == params
    assert len(res["train_ms_all"]) == 10 and len(res["infer_ms_all"]) == 10
    assert res["seq_per_s"] == pytest.approx(2 / (res["train_ms"] / 1e3), rel=1e-3)
    assert res["gflops"] < 10 * res["peak_gflops"]
    assert res["load_avg_before"] is None or len(res["load_avg_before"]) == 3


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # --threads 1 sets the process-wide count: restore it
    yield
    torch.set_num_threads(n)


def test_bench_cli_writes_json_with_the_agreed_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "convlstm", *TINY, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    model = create_model("convlstm", num_layers=1, hidden=4, filter_size=3, patch_size=4)
    _check(res, sum(p.numel() for p in model.parameters()))
    assert res["lightning"]["steps"] >= 10 and res["lightning"]["lightning_ms"] > 0
    assert "train step" in capsys.readouterr().out


def test_bench_tmu_cached_counts_only_the_target(tmp_path):
    spec = BenchSpec(model="tmu", backbone="convlstm", layers=1, hidden=4, filter=3, patch=4, size=16,
                     batch=2, frames=6, teachers=2, cached_bank=True)
    res = run_bench(spec, "both", steps=10, warmup=1, threads=1, json_path=tmp_path / "b.json",
                    lightning=False, peak=True)
    assert json.loads((tmp_path / "b.json").read_text())["params"] == res["params"]
    tmu = create_model("tmu", backbone="convlstm",
                       backbone_config=dict(num_layers=1, hidden=4, filter_size=3, patch_size=4),
                       source_names=["a", "b"], source_channels=[4, 4])
    _check(res, sum(p.numel() for p in tmu.parameters()))  # the frozen teachers are not counted
    assert res["config"]["teachers"] == 2 and res["config"]["cached_bank"] is True

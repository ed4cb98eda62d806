"""benchmarks/transfer_digits.py: the job list and the aggregation (means, paired differences,
table), on fabricated run results -- no training."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("transfer_digits")


def fake_run(bench, root, name, seed, mse):
    d = bench.run_dir(root, name, seed)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({
        "method": name, "seed": seed, "commit": "abc", "mse": mse, "ssim": 0.5, "psnr": 15.0,
        "mae": 80.0, "mse_per_frame": [mse] * 3, "train_steps": 10, "train_wall_s": 1.0}))


def test_jobs_cover_every_group_and_screen_rows_only_on_the_first_seed(bench):
    p = bench.load_preset("quick")
    jobs = bench.jobs(p, with_cross=True)
    assert jobs[:3] == [("pretext:digits1", 0), ("pretext:digits2", 0), ("pretext:radar_mch", 0)]
    for group in (bench.CORE, bench.TUNING, bench.ABLATIONS, bench.CROSS):
        for m in group:
            assert {s for n, s in jobs if n == m} == set(p["seeds"])
    for m in bench.SCREEN:
        assert [s for n, s in jobs if n == m] == [p["seeds"][0]]
    long = bench.load_preset("long")
    assert not any(n.startswith("pretext:") for n, _ in bench.jobs(long, with_cross=True))
    assert bench.zoo_dir(long, Path("/r/bench-transfer-long")) == Path("/r/bench-transfer-cpu/zoo")


def test_aggregate_means_and_paired_differences(bench, tmp_path):
    p = dict(bench.load_preset("quick"), seeds=[0, 1, 2])
    base = {0: 30.0, 1: 31.0, 2: 35.0}
    for s, v in base.items():
        fake_run(bench, tmp_path, "finetune:digits2", s, v)
        fake_run(bench, tmp_path, "tmu:distill", s, v + 1.0 + 0.1 * s)   # always worse, by 1.0..1.2
        fake_run(bench, tmp_path, "scratch", s, 40.0)
    r = bench.aggregate(p, tmp_path, tmp_path / "out.json", "cmd", report=False)
    m = r["methods"]
    assert m["finetune:digits2"]["mse_mean"] == pytest.approx(32.0)
    assert "mse_vs_finetune_paired" not in m["finetune:digits2"]
    paired = m["tmu:distill"]["mse_vs_finetune_paired"]
    assert paired["mean"] == pytest.approx(1.1) and paired["std"] == pytest.approx(0.1)
    assert paired["seeds"] == 3
    # the unpaired sd is dominated by the seed-to-seed spread, the paired one is not
    assert m["tmu:distill"]["mse_std"] > 2.0
    table = (tmp_path / "out.md").read_text()
    assert "| tmu:distill | 33.10 ± 2.74 (-17.2%) | +1.10 ± 0.10 |" in table
    assert (tmp_path / "out.png").stat().st_size > 0
    assert json.loads((tmp_path / "out.json").read_text())["commit"] == "abc"

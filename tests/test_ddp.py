"""Multi-process training: 2 CPU processes (gloo) against 1 process with the same global batch.

What must match: with ``StepSampler`` the 2 processes read, at every step, together exactly the
clips the single process reads (global batch 8 = 2 x 4 vs 1 x 8), the sampling masks and time
flips are drawn for the global batch and split the same way, and DDP averages the two processes'
gradients, which equals the gradient of the mean loss over the 8 clips. The only difference left
is floating-point summation order (one mean over 8 vs two means over 4, then an all-reduce),
amplified a little by Adam's normalisation; measured max |weight difference| ~3e-8 after 12
steps, so the tests allow 1e-5 absolute on weights and 1e-5 relative on the metrics. Each test
checks that two distinct processes (ranks 0 and 1, world size 2) really trained.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from transmem.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast

TINY = {
    "data": {"name": "flying_digits", "size": 16, "frames": 6, "train_clips": 32, "val_clips": 9,
             "test_clips": 8, "num_digits": 1},
    "model": {"name": "convlstm", "num_layers": 1, "hidden": 4, "filter_size": 3, "patch_size": 4},
    "train": {"steps": 12, "batch_size": 8, "t_in": 3, "ckpt_every": 5, "progress": False, "threads": 1,
              "val_every": 4, "reverse_time_prob": 0.5},
    "eval": {"batch_size": 8},
}
DDP = ["--train.batch_size", "4", "--train.strategy", "ddp", "--train.devices", "2", "--train.accelerator", "cpu"]
WEIGHT_ATOL = 1e-5
METRIC_RTOL = 1e-5

WRAPPER = textwrap.dedent('''
    import os, sys
    import torch
    torch.manual_seed(0)  # the same initial weights as the 1-process reference
    from transmem.training import module as M
    _step = M.ForecastModule.training_step
    def training_step(self, batch, i):
        if torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = 0, 1
        with open(os.path.join(os.environ["TM_RANK_DIR"], f"rank{r}-of-{w}-pid{os.getpid()}"), "a") as f:
            f.write(f"{self.global_step} {batch['frames'].shape[0]}\\n")
        return _step(self, batch, i)
    M.ForecastModule.training_step = training_step
    from transmem.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _run_2proc(tmp_path, launcher: list[str], args: list) -> subprocess.CompletedProcess:
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["TM_RANK_DIR"] = str(ranks)
    r = subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    seen = sorted(p.name.split("-pid")[0] for p in ranks.iterdir())
    assert seen == ["rank0-of-2", "rank1-of-2"], seen
    pids = {p.name.split("-pid")[1] for p in ranks.iterdir()}
    assert len(pids) == 2  # two processes
    for p in ranks.iterdir():  # each trained every step on its half of the global batch
        steps = [line.split() for line in p.read_text().splitlines()]
        assert [int(s) for s, _ in steps] == list(range(12)) and {b for _, b in steps} == {"4"}
    return r


def _one_process(cfg, out, *args):
    torch.manual_seed(0)
    assert main([str(a) for a in ["pretrain" if not args else args[0], "--config", cfg, "--out", out,
                                  *(args[1:] if args else [])]]) == 0


def _compare(run1, run2):
    a = load_file(str(run1 / "model" / "weights.safetensors"))
    b = load_file(str(run2 / "model" / "weights.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k]).abs().max().item() for k in a)
    print(f"max |weight diff| 1 vs 2 processes: {diff:.3g} (largest |weight| {moved:.3g})")
    assert diff <= WEIGHT_ATOL, diff
    assert moved > 100 * WEIGHT_ATOL  # the tolerance is small against the weights themselves
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (run1, run2))
    for k in ("mse", "mae", "ssim", "psnr"):
        assert m2[k] == pytest.approx(m1[k], rel=METRIC_RTOL), k
    assert m1["count"] == m2["count"] == 8  # rank 0 evaluated the whole test set once
    return diff


def _val_rows(run):
    import csv
    with open(run / "logs" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["val/mse"])) for r in csv.DictReader(f) if r.get("val/mse")]


def test_ddp_two_processes_match_one_process(tmp_path, cfg):
    """Lightning's own launcher: `transmem pretrain --train.strategy ddp --train.devices 2`."""
    _one_process(cfg, tmp_path / "one")
    _run_2proc(tmp_path, [], ["pretrain", "--config", cfg, "--out", tmp_path / "two", *DDP])
    _compare(tmp_path / "one", tmp_path / "two")
    # validation is split over the processes (9 clips: 5 + 4) and reduced as (sum, weight): the
    # same numbers as on one process
    v1, v2 = _val_rows(tmp_path / "one"), _val_rows(tmp_path / "two")
    assert [s for s, _ in v1] == [s for s, _ in v2] and len(v1) == 3
    for (_, a), (_, b) in zip(v1, v2):
        assert b == pytest.approx(a, rel=METRIC_RTOL)
    # checkpoints are written once, by rank 0, and hold a global data position
    ck = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 12 and ck["transmem"]["data"]["processes"] == 2
    assert ck["transmem"]["data"]["global_batch"] == 8


def test_torchrun_transfer_matches_one_process(tmp_path, cfg):
    """External launcher (torchrun, as for multi-node): every process runs the CLI from the start;
    rank 0 owns the run folder and writes the results."""
    teacher = tmp_path / "teacher"
    _one_process(cfg, teacher, "pretrain", "--train.steps", "4", "--train.val_every", "0")
    args = ["transfer", "--teachers", teacher / "model", "--train.val_every", "0"]
    _one_process(cfg, tmp_path / "one", *args)
    _run_2proc(tmp_path, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
               [args[0], "--config", cfg, "--out", tmp_path / "two", *args[1:], *DDP])
    _compare(tmp_path / "one", tmp_path / "two")


SYNC_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from transmem.metrics import FrameMetrics
    from transmem.training.samplers import ShardSampler

    def data():
        g = torch.Generator().manual_seed(0)
        target = torch.rand(7, 3, 1, 8, 8, generator=g)
        pred = (target + 0.2 * torch.randn(7, 3, 1, 8, 8, generator=g)).clamp(0, 1)
        mask = torch.rand(7, 3, 1, 8, 8, generator=g) > 0.2
        return pred, target, mask

    def run(metric, idx):
        pred, target, mask = data()
        for i in range(0, len(idx), 2):
            j = idx[i:i + 2]
            metric.update(pred[j], target[j], mask[j])
        return metric.compute()

    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        idx = list(ShardSampler(7))  # rank 0: 0 2 4 6, rank 1: 1 3 5 (no padding)
        res = run(FrameMetrics(3, thresholds=[0.3, 0.6]), idx)
        res["shard"] = idx
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.start_processes(worker, args=(port, out), nprocs=2, start_method="fork")
        with open(os.path.join(out, "single.json"), "w") as f:
            json.dump(run(FrameMetrics(3, thresholds=[0.3, 0.6]), list(range(7))), f)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-12, abs=1e-12), path
    else:
        assert a == b, path


def test_frame_metrics_reduce_across_processes(tmp_path):
    """FrameMetrics (sum states) over 2 gloo processes, each on its shard of 7 sequences, equals
    the single-process result on all 7, on every rank."""
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0].pop("shard") == [0, 2, 4, 6] and ranks[1].pop("shard") == [1, 3, 5]
    assert single["count"] == 7
    for res in ranks:
        _close(single, res)

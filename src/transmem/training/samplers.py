"""Which clips each process reads, and in what order; which process this is.

The order of the training clips is a pure function of (seed, global step) (:class:`StepSampler`),
like the sampling masks, so a resumed run sees exactly the batches an uninterrupted one would, on
any number of processes with the same global batch (see ``docs/reliability.md``). Evaluation
splits the clips over the processes without padding (:class:`ShardSampler`).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import TrainConfig


class Indexed(Dataset):
    """Adds the clip index to each item (the bank cache is keyed by it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["index"] = i
        return item


def make_loader(ds, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last=False):
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(Indexed(ds), batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------------------------
# processes


def dist_info() -> tuple[int, int]:
    """``(world size, global rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def is_launch_rank_zero() -> bool:
    """Whether this process is the first one of a distributed launch, judged from the launcher's
    environment before any process group exists: ``RANK`` (torchrun), ``SLURM_PROCID`` (a SLURM
    job step with several tasks), ``NODE_RANK``/``LOCAL_RANK`` (Lightning's own launcher). A plain
    single-process run is rank zero."""
    env = os.environ
    if env.get("RANK", "").strip():
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID", "").strip() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0") or 0) == 0 and int(env.get("LOCAL_RANK", "0") or 0) == 0


def planned_world_size(cfg: TrainConfig) -> int:
    """Number of training processes the Trainer will start for ``cfg`` (best effort)."""
    dev = cfg.devices
    if isinstance(dev, (list, tuple)):
        n = len(dev)
    elif isinstance(dev, int) or (isinstance(dev, str) and dev.strip().isdigit()):
        n = int(dev)
    else:  # "auto" / -1: every GPU when one is used, else one process
        gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1
    return max(n, 1) * max(int(cfg.num_nodes or 1), 1)


# --------------------------------------------------------------------------------------------
# data order


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + 0x2545F491) % (2 ** 63)


class StepSampler(Sampler[int]):
    """Training-clip order as a pure function of (seed, global step), split across processes.

    The clips of epoch ``e`` are ``randperm(n)`` drawn from a generator seeded by (seed, e) (or
    ``0..n-1`` without shuffle). A *global* batch of ``world * batch_size`` consecutive clips of
    that order is consumed per optimizer step; process ``r`` takes every ``world``-th clip of it,
    starting at ``r``. Each iteration starts at the position of the current global step (read from
    ``step_source.global_step``, the Trainer), so a run resumed from a checkpoint -- even in the
    middle of an epoch -- continues with exactly the batches an uninterrupted run would see, and
    the union of what the processes see at a step does not depend on the number of processes.
    Incomplete global batches at the end of an epoch are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), shuffle
        self.step_source = None  # the Trainer (anything with .global_step); None: step 0

    def layout(self) -> tuple[int, int, int, int]:
        """``(world, rank, global batch, global batches per epoch)``."""
        world, rank = dist_info()
        gb = world * self.batch_size
        per_epoch = self.n // gb
        if per_epoch == 0:
            raise ValueError(f"{self.n} training clips are fewer than one global batch "
                             f"({world} process(es) x batch_size {self.batch_size})")
        return world, rank, gb, per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        g.manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` of global step ``step``."""
        return divmod(int(step), self.layout()[3])

    def __iter__(self):
        world, rank, gb, per_epoch = self.layout()
        step = int(getattr(self.step_source, "global_step", 0) or 0)
        epoch, first = divmod(step, per_epoch)
        order = self.order(epoch)
        for k in range(first, per_epoch):
            yield from order[k * gb + rank:(k + 1) * gb:world].tolist()

    def __len__(self) -> int:
        return self.layout()[3] * self.batch_size


class ShardSampler(Sampler[int]):
    """Evaluation order: ``0..n-1``, process ``r`` of ``world`` taking ``r, r+world, ...`` (no
    padding, so every clip is counted exactly once; metrics must be sums reduced over processes)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __iter__(self):
        world, rank = dist_info()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        world, rank = dist_info()
        return len(range(rank, self.n, world))

"""The memory bank: frozen zoo models run over the target clip, their memories adapted to the
target's grid, and an optional cache of it.

Adapters bridge a teacher that differs from the target: its frames are converted to the
teacher's channel count (gray <-> RGB), its layers are mapped to the target's by relative depth,
and its memory is resized (area average down, bilinear up) to the target's latent grid. Channel
counts are not projected here: each TMU distiller outputs its teacher's channel count, so the
regression target is the teacher state itself and cannot collapse.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import TEACHER_INPUTS, check
from ..errors import UserError
from ..files import write_text
from ..models.base import PredictiveRNN



class TeacherMismatch(UserError, ValueError):
    """A teacher that cannot be adapted to the target (one-line message)."""


def convert_channels(frames: torch.Tensor, to: int) -> torch.Tensor:
    c = frames.shape[2]
    if c == to:
        return frames
    if c == 3 and to == 1:
        w = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 1, 3, 1, 1)
        return (frames * w).sum(2, keepdim=True)
    if c == 1 and to == 3:
        return frames.expand(-1, -1, 3, -1, -1)
    raise TeacherMismatch(f"cannot convert {c}-channel frames to {to} channels")


def map_layer(target_layer: int, target_layers: int, teacher_layers: int) -> int:
    """Map a target layer to the teacher layer at the same relative depth (bottom->bottom, top->top)."""
    if target_layers == 1 or teacher_layers == 1:
        return 0 if target_layers == 1 else round(target_layer * (teacher_layers - 1) / (target_layers - 1))
    return round(target_layer * (teacher_layers - 1) / (target_layers - 1))


def resize_state(state: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T, C, h, w) -> (B, T, C, *size)."""
    if tuple(state.shape[-2:]) == tuple(size):
        return state
    b, t = state.shape[:2]
    flat = state.flatten(0, 1)
    mode = "area" if size[0] <= state.shape[-2] else "bilinear"
    out = F.interpolate(flat, size=size, mode=mode) if mode == "area" else \
        F.interpolate(flat, size=size, mode=mode, align_corners=False)
    return out.unflatten(0, (b, t))


class MemoryBank(nn.Module):
    """Frozen teachers and their adapters. ``forward(frames)`` returns, per teacher, a dict
    {target layer: (B, T-1, C_teacher, h_target, w_target)}."""

    def __init__(self, teachers: list[PredictiveRNN], names: list[str], target: nn.Module,
                 layers: list[int], teacher_inputs: str = "ground_truth", frame_channels: int = 1):
        super().__init__()
        check("teacher_inputs", teacher_inputs, TEACHER_INPUTS)
        self.names = list(names)
        self.teacher_inputs = teacher_inputs
        self.layers = list(layers)
        self.target_layers = target.num_layers
        self.target_patch = target.patch_size
        self.frame_channels = frame_channels
        self.teachers = nn.ModuleList(teachers)
        for name, t in zip(names, teachers):
            tc = t.in_channels
            if tc != frame_channels and not {tc, frame_channels} == {1, 3}:
                raise TeacherMismatch(
                    f"teacher '{name}' reads {tc}-channel frames and the target has {frame_channels}: "
                    "only equal counts or gray<->RGB can be adapted")
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)

    def train(self, mode: bool = True):  # teachers stay in eval mode, always
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def source_channels(self) -> list[int]:
        """Memory channels of each teacher at the layers the TMU reads (one count per teacher:
        the TMU's distillers are shared in shape across its layers)."""
        out = []
        for n, t in enumerate(self.teachers):
            counts = {t.hidden_channels(self.teacher_layer(n, l)) for l in self.layers}
            if len(counts) > 1:
                raise TeacherMismatch(f"teacher '{self.names[n]}' has different memory widths {sorted(counts)} "
                                      f"at the layers mapped to TMU layers {self.layers}: use one TMU layer")
            out.append(counts.pop())
        return out

    def teacher_layer(self, n: int, target_layer: int) -> int:
        return map_layer(target_layer, self.target_layers, self.teachers[n].num_layers)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, sampling_mask: torch.Tensor | None = None,
                t_in: int | None = None) -> list[dict[int, torch.Tensor]]:
        h, w = frames.shape[-2] // self.target_patch, frames.shape[-1] // self.target_patch
        out = []
        for n, teacher in enumerate(self.teachers):
            p = teacher.patch_size
            if frames.shape[-1] % p or frames.shape[-2] % p:
                raise TeacherMismatch(f"teacher '{self.names[n]}' patch size {p} does not divide "
                                      f"the frame size {frames.shape[-2]}x{frames.shape[-1]}")
            x = convert_channels(frames, teacher.in_channels)
            wanted = {l: self.teacher_layer(n, l) for l in self.layers}
            if self.teacher_inputs == "ground_truth":
                # only the teacher layers that are read (and those they depend on), no output head
                mems = teacher.ground_truth_memories(x, set(wanted.values()))
            else:  # a teacher reading its own predictions needs every layer and its head
                _, mems = teacher(x, sampling_mask, return_memory=True, t_in=t_in)
            out.append({l: resize_state(mems[tl], (h, w)) for l, tl in wanted.items()})
        return out


    def rollout(self, frames: torch.Tensor, t_in: int) -> list[dict[int, torch.Tensor]]:
        """The bank at test time: every teacher reads the first ``t_in`` frames and then its own
        predictions, whatever ``teacher_inputs`` says, so that no teacher sees a future frame."""
        mask = frames.new_zeros(frames.shape[0], frames.shape[1] - 1)
        mask[:, : t_in - 1] = 1
        mode = self.teacher_inputs
        self.teacher_inputs = "own"
        try:
            return self(frames, mask, t_in)
        finally:
            self.teacher_inputs = mode


class BankCache:
    """Cache of ground-truth-mode banks by clip index, so that epochs after the first skip the
    teacher passes. In memory (float32, exact) or on disk (memory-mapped ``.npy`` per source and
    layer, float32 or float16)."""

    def __init__(self, num_clips: int, directory: str | os.PathLike | None = None,
                 dtype: str = "float32"):
        self.num_clips = num_clips
        self.dir = Path(directory) if directory else None
        self.dtype = np.dtype(dtype)
        self._mem: dict[int, list[dict[int, torch.Tensor]]] = {}
        self._arrays: dict[tuple[int, int], np.memmap] | None = None
        self._filled: np.ndarray | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "bank.json"
            if meta.exists():
                self._open(json.loads(meta.read_text()))

    def _open(self, meta: dict, create: bool = False) -> None:
        mode = "w+" if create else "r+"
        self._arrays = {}
        for key, shape in meta["shapes"].items():
            n, l = map(int, key.split("_"))
            self._arrays[(n, l)] = np.lib.format.open_memmap(
                self.dir / f"bank_{n}_{l}.npy", mode=mode, dtype=self.dtype,
                shape=tuple([self.num_clips] + shape))
        self._filled = np.lib.format.open_memmap(self.dir / "filled.npy", mode=mode,
                                                 dtype=np.bool_, shape=(self.num_clips,))

    def get(self, indices: torch.Tensor):
        idx = indices.tolist()
        if self.dir is None:
            if not all(i in self._mem for i in idx):
                return None
            items = [self._mem[i] for i in idx]
            return [{l: torch.stack([it[n][l] for it in items]) for l in items[0][n]}
                    for n in range(len(items[0]))]
        if self._filled is None or not self._filled[idx].all():
            return None
        out: dict[int, dict[int, torch.Tensor]] = {}
        for (n, l), arr in self._arrays.items():
            out.setdefault(n, {})[l] = torch.from_numpy(np.asarray(arr[idx], dtype=np.float32))
        return [out[n] for n in sorted(out)]

    def put(self, indices: torch.Tensor, bank: list[dict[int, torch.Tensor]]) -> None:
        idx = indices.tolist()
        if self.dir is None:
            for j, i in enumerate(idx):
                self._mem[i] = [{l: s[j].detach().clone() for l, s in src.items()} for src in bank]
            return
        if self._arrays is None:
            meta = {"shapes": {f"{n}_{l}": list(s.shape[1:]) for n, src in enumerate(bank)
                               for l, s in src.items()}}
            self._open(meta, create=True)
            write_text(self.dir / "bank.json", json.dumps(meta))
        for n, src in enumerate(bank):
            for l, s in src.items():
                self._arrays[(n, l)][idx] = s.detach().cpu().numpy().astype(self.dtype)
        for arr in self._arrays.values():
            arr.flush()
        self._filled[idx] = True
        self._filled.flush()

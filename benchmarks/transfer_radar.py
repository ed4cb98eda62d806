#!/usr/bin/env python
"""What does a zoo give a new radar? Leave one network out (issue 26, item 2).

**Networks** (pysteps example data, ../shared/data/radar): MeteoSwiss (mch: 3 events x 40 frames,
5 min), FMI (fmi: 2 x 40, 5 min), OPERA (opera: 1 x 24, 15 min), NOAA MRMS (mrms: 1 x 36, 2 min).
Every network is read as one square region of its composite, area-averaged (mean rain rate over
the valid source pixels) to **8 km per pixel** for all four, and cut into 32 x 32 tiles (256 km):
mch the central 512 km (2 x 2 tiles), fmi 512 km over southern Finland where both events rained
(2 x 2), opera 1024 km over central Europe (4 x 4 tiles, its 2 km grid averaged 4 x 4), mrms
512 km x 512 km (461 x 656 grid cells of 0.01 deg, around 45.5 N, 85 W: where the event rained;
2 x 2). The regions were picked once from maps of rain over the whole archive (as
configs/radar_mrms.yaml picks its region); every method sees the same ones. The networks, their
regions and splits are the entries of ``configs/transfer_radar_networks.yaml``; ``--networks FILE``
runs those of another file (a copy with your networks added: one entry each, nothing else to edit).

**Time steps**: each network keeps its own frame interval (5, 5, 15, 2 min). A model sees frames,
not minutes: a clip is 6 frames, 3 in -> 3 out, so the lead time is 15 min (mch, fmi), 45 min
(opera) or 6 min (mrms). Nothing is resampled; the zoo's entries differ in time step as real
archives do.

**Zoo**: the advected-rain model (synthetic advected rain, as the transfer map's; to convergence
by the rule below on its own validation clips, the first cap `pretext_steps`), and one model per
network in the recommended recipe (the advection backbone pretrained on advected rain, then
finetuned on that network's frames, with flips, rotations and time reversal, to convergence by the
rule below on the network's validation windows, which it does not train on; the first cap
`network_steps`). For a target its own network's model is left out: the zoo is advected_rain and
the three other networks.

**Target splits** (in time, no frame shared between splits; a clip never leaves its window):
mch train 20150515 + the first 28 frames of 20160711, val the last 12 frames of 20160711, test
20170131; fmi train the first 28 frames of 20160928, val its last 12, test 20170509; opera train
frames 0-11 (3 h), val 12-17, test 18-23; mrms train frames 0-15 (32 min), val 16-23, test 24-35.

**Budgets** (target training frames, the first ones in time): 0 (zero-shot: the zoo's top entry
by `zoo.rank` on the zero-shot MSE of the validation clips, and its forecast), ~1 h, ~3 h and all.
A budget is the frames of that many minutes at the network's interval, at least one clip (6
frames); a budget that needs all (or more than) the training frames collapses into `all`: fmi
has 1 h and all (2 h 20); opera has 1.5 h (one clip: 1 h is 4 frames) and all (3 h, = 3 h);
mrms has only all (32 min), which stands in for ~1 h in the verdict.

**Methods**, each with the same validation-selected training: scratch; `finetune:auto` (from the
top entry of `zoo.rank` with its finetuning probe on the budget's clips, seed 0, the CLI's
`--from auto`); `tmu:distill+ft-init` (`api.run_transfer`, distill mode, lambda 0.1, backbone
initialised from that entry, the ranking's top 2 teachers); `tmu:bank_read+ft-init` (the same in
`bank_read` mode with teachers reading their own predictions, transfer_digits' best bank_read
setting); `mix:ft-auto+zoo+baseline` (the mixture, the cheaper variant: the finetuned auto model,
2 zoo entries as they are, not finetuned: the zero-shot entry, then the next of the cell's
ranking; and the registered baseline with the lowest validation MSE, with convex weights fit on
the validation clips, transfer_map's `fit_mixture`); `mix:product` (the same zoo members through
`transmem transfer --mode mixture`, with every registered baseline that scores as a member,
softmax weights per lead); `mix:average` (post hoc, in `verdict_post_hoc` only: the members of
`mix:ft-auto+zoo+baseline` averaged through the product, `--mix-steps 0`). Reference lines
at budget 0: the zero-shot forecast and every registered baseline (`transmem.baselines`, in mm/h
through the reader's units, with the network's time step and 8 km pixels); `best_baseline` is the
one with the lowest *test* MSE (the strongest bar).

**Convergence**: every learned run validates every `val_every` steps and keeps the best
checkpoint (`select_best`). Its `best_step` is the step of the lowest validation MSE (the global
step of `checkpoints/best.ckpt`; `logs/metrics.csv` writes validations at step - 1); a run with
`step_cap < 1.25 * best_step` is resumed from its last checkpoint with the cap doubled (at most
`max_doublings` times), else its cell is flagged `converged: false`. A cell's `best_step` and
`step_cap` are those of its seed nearest to breaking the rule.
3 seeds per learned cell; the test split once per run.

    python benchmarks/transfer_radar.py --workers 2          # the full preset, resumable
    python benchmarks/transfer_radar.py --quick --workers 2  # the protocol at toy scale
    python benchmarks/transfer_radar.py --aggregate          # JSON + Markdown from finished jobs
    python benchmarks/transfer_radar.py --networks mine.yaml --root runs/mine --json mine.json --workers 2

Jobs are claimed through files (``benchmarks/claims.py``); a worker takes the first job whose
inputs are ready, so two workers keep busy; a finished job (its ``result.json``) is never redone.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/claims.py, transfer_map.py, also when imported by path
import claims  # noqa: E402
from convergence import (EXTENDED, binding, extended_from, extension, record, resumable, set_aside,  # noqa: E402
                         train_to_convergence)
import transfer_map as tm  # noqa: E402  (registers the transfer_map_parts dataset)
from claims import claim  # noqa: E402

from transmem import api, zoo  # noqa: E402
from transmem.baselines import get_method  # noqa: E402
from transmem.data import DataConfig, build_datasets, physical_units  # noqa: E402
from transmem.data.clips import ClipDataset  # noqa: E402
from transmem.data.errors import DataError  # noqa: E402
from transmem.errors import UserError  # noqa: E402
from transmem.data.registry import extra_keys, pixel_km as pixel_km_of, register_dataset  # noqa: E402
from transmem.files import write_json  # noqa: E402

SHARED = tm.SHARED
FAMILY = "radar"  # the key of the model/data settings in a preset (transfer_map.experiment reads it)
KM_PER_PIXEL_TARGET = 8.0

NETWORKS_FILE = HERE / "configs" / "transfer_radar_networks.yaml"
NETWORK_KEYS = {"title": str, "minutes": (int, float), "region_km": (int, float), "source": dict,
                "train": list, "val": list, "test": list}


def load_networks(path) -> dict:
    """The networks of a file like ``configs/transfer_radar_networks.yaml`` (reader, region, frame
    interval, tiles, time split), checked: a bad entry exits with one line naming the file and key.
    A window is ``(event, first frame, end frame)`` of that event's frame sequence."""
    path = Path(path)

    def bad(where: str, why: str):
        sys.exit(f"{path}: {where}: {why}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"{path}: cannot read the networks: {' '.join(str(e).split())}")
    if not isinstance(raw, dict) or not raw:
        bad("top level", "expected a mapping of network names to their settings")
    out = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "advected_rain":
            bad(repr(name), "a network name is letters, digits, _ and - (and not advected_rain)")
        if not isinstance(spec, dict):
            bad(name, "expected a mapping of its settings")
        for key, kind in NETWORK_KEYS.items():
            if not isinstance(spec.get(key), kind) or isinstance(spec.get(key), bool):
                bad(f"{name}.{key}", "missing" if key not in spec else f"expected {getattr(kind, '__name__', 'a number')}")
        unknown = sorted(set(spec) - set(NETWORK_KEYS) - {"tiles"})
        if unknown:
            bad(f"{name}.{unknown[0]}", f"unknown key (known: {', '.join([*NETWORK_KEYS, 'tiles'])})")
        if spec["minutes"] <= 0 or spec["region_km"] <= 0:
            bad(f"{name}.{'minutes' if spec['minutes'] <= 0 else 'region_km'}", "must be positive")
        if "tiles" in spec and (not isinstance(spec["tiles"], int) or isinstance(spec["tiles"], bool) or spec["tiles"] < 1):
            bad(f"{name}.tiles", "expected a positive integer")
        if not isinstance(spec["source"].get("name"), str) or not isinstance(spec["source"].get("path"), str):
            bad(f"{name}.source", "needs the reader's `name` and the data's `path`")
        seen = set()
        for split in ("train", "val", "test"):
            if not spec[split]:
                bad(f"{name}.{split}", "needs at least one window")
            for w in spec[split]:
                if not (isinstance(w, list) and len(w) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in w[1:]) and 0 <= w[1] < w[2]):
                    bad(f"{name}.{split}", f"{w!r}: a window is [event, first frame, end frame] with first < end")
                frames = {(w[0], f) for f in range(w[1], w[2])}
                if frames & seen:
                    bad(f"{name}.{split}", f"{w!r} shares frames with an earlier window (no frame in two splits)")
                seen |= frames
        if len(spec["test"]) != 1:
            bad(f"{name}.test", "one test window (the paired diagnostic reads tiles by position in it)")
        out[name] = {**spec, **{k: [(None if w[0] is None else str(w[0]), w[1], w[2]) for w in spec[k]]
                                for k in ("train", "val", "test")}}
    return out


NETWORKS = load_networks(NETWORKS_FILE)


def use_networks(path, p: dict) -> None:
    """Run the networks of another file (``--networks``): they replace the preset's, each tiled as
    the preset says, else as its entry says."""
    global NETWORKS
    NETWORKS = load_networks(path)
    tiles = {n: p.get("tiles", {}).get(n, s.get("tiles")) for n, s in NETWORKS.items()}
    missing = [n for n, t in tiles.items() if t is None]
    if missing:
        sys.exit(f"{path}: {missing[0]}.tiles: missing, and the preset has none for it")
    p["networks"], p["tiles"] = list(NETWORKS), tiles


HOURS = {"1h": 1.0, "3h": 3.0}
SCRATCH, AUTO, DISTILL, BANK, MIX = ("scratch", "finetune:auto", "tmu:distill+ft-init", "tmu:bank_read+ft-init",
                                     "mix:ft-auto+zoo+baseline")
MIXP = "mix:product"  # the same members through `transmem transfer --mode mixture` (the ~1 hour cells)
MIXA = "mix:average"  # the grid mixture's members averaged through the product (`--mix-steps 0`; ~1 hour cells)
TRAINED = (SCRATCH, AUTO, DISTILL, BANK)
TRANSFER = (AUTO, DISTILL, BANK, MIX, MIXP)  # transmem's transfers: the verdict's "best transmem transfer"
POST_HOC = (MIXA,)  # added after the verdict, from what benchmarks/transfer_radar_weights.py saw on the test clips
MIXTURE_JOBS = {MIX: "mix", MIXP: "mixp", MIXA: "mixa"}  # the job of each mixture method
ZERO_SHOT = "zero-shot"
METHOD_TEXT = {
    SCRATCH: "train the backbone from random weights on the budget's clips",
    AUTO: "finetune every weight from the top entry of zoo.rank (validation MSE after a finetuning probe of "
          "probe_steps on the budget's clips, seed 0; probe_steps 0: zero-shot, the product's default), as "
          "`transmem finetune --from auto`",
    DISTILL: "TMU (api.run_transfer), distill mode, lambda 0.1, backbone initialised from the finetune:auto "
             "entry, the ranking's top 2 teacher entries",
    BANK: "TMU in bank_read mode (teachers read their own predictions, transfer.teacher_inputs own), backbone "
          "initialised from the finetune:auto entry, the ranking's top 2 teacher entries",
    MIX: "convex mixture (grid 0.05 on the simplex, fit on the validation clips; transfer_map.fit_mixture) of "
         "the finetuned auto model of the same seed, mix_members zoo entries as they are (the zero-shot entry, "
         "then the next of the cell's ranking), and the registered baseline with the lowest validation MSE (the "
         "cheaper variant: the other members are not finetuned, and at most mix_members of them: the simplex "
         "grid's cost grows fast)",
    MIXP: "the product's mixture (api.run_mixture, `transmem transfer --mode mixture --member-steps 0`) of the "
          "same model members as mix:ft-auto+zoo+baseline and every registered baseline that scores on the "
          "validation clips: softmax weights per lead learned by gradient (100 Adam steps, lr 0.05) on the "
          "validation clips, each baseline in the scale its name declares; ~1 hour cells only",
    MIXA: "the product's mixture without fitting (`transmem transfer --mode mixture --member-steps 0 --mix-steps 0`): "
          "the plain average of mix:ft-auto+zoo+baseline's members (the finetuned auto model, the zoo entries as "
          "they are, the baseline best on validation in its own scale); ~1 hour cells only. Post hoc: added after "
          "benchmarks/transfer_radar_weights.py found equal weights ahead of validation-fit ones on these test "
          "clips, so it counts only in verdict_post_hoc",
    ZERO_SHOT: "budget 0: the zoo entry with the lowest zero-shot validation MSE (zoo.rank, probe_steps 0), "
               "its forecast on the test clips",
    "baseline:<name>": "a registered reference nowcast (transmem.baselines) in mm/h through the reader's units, "
                       "with the network's time step and km per pixel; needs no training data (budget 0)",
    "best_baseline": "the registered baseline with the lowest test MSE for that target (the strongest bar)",
}


# ---------------------------------------------------------------------------------------------
# data: a window of frames of one radar source, read once as a region and served as tiles


def _source_config(cfg: DataConfig) -> DataConfig:
    x = cfg.extra or {}
    n = int(x.get("tiles", 1))
    return DataConfig.from_dict({**x["source"], "size": cfg.size * n, "frames": cfg.frames, "stride": 1,
                                 "split": [1, 0, 0], "cache_dir": cfg.cache_dir})


def _tiles_units(cfg: DataConfig):
    return physical_units(_source_config(cfg))


class Tiles(Dataset):
    """Item ``i``: tile ``i % tiles**2`` (row-major) of clip ``i // tiles**2``, ``size`` pixels square."""

    def __init__(self, clips, tiles: int, size: int):
        self.clips, self.tiles, self.size = clips, int(tiles), int(size)

    def __len__(self) -> int:
        return len(self.clips) * self.tiles ** 2

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        c, t = divmod(i % len(self), self.tiles ** 2)
        y, x = divmod(t, self.tiles)
        s = self.size
        return {k: v[..., y * s:(y + 1) * s, x * s:(x + 1) * s].contiguous() for k, v in self.clips[c].items()}


def event_sequences(cfg: DataConfig) -> tuple[ClipDataset, list[int]]:
    """The source's clips and the indices of the sequences of ``extra.event`` (all without one):
    those the reader names so, or whose event is so named, for readers that cannot read one event
    alone (``extra.events``); a name not found is one line listing the names found."""
    ds = build_datasets(_source_config(cfg))["train"]
    ev, prep = cfg.extra.get("event"), ds.prep
    seqs = [i for i, n in enumerate(prep.names) if ev is None or str(ev) in (n, prep.events[i])]
    if not seqs:
        raise DataError(cfg.extra["source"]["path"], f"event {ev}: no sequence of that name (found: "
                        f"{', '.join(dict.fromkeys(prep.names))})")
    return ds, seqs


@register_dataset("transfer_radar_tiles", units=_tiles_units, extra=("source", "tiles", "window", "event"),
                  pixel_km=lambda cfg: pixel_km_of(_source_config(cfg)),  # the source's, where it declares one
                  inflow="last")  # a tile's edge lies inside the region: rain comes in across it
def build_tiles(cfg: DataConfig) -> dict:
    """``extra.source``: a radar data config, read at ``size * tiles`` pixels square (one event:
    the reader's ``extra.events``, else ``extra.event`` picks its sequences); ``extra.window =
    [a, b]``: the clips whose frames all lie in frames ``a .. b-1`` of a sequence; every clip is
    served as ``tiles x tiles`` tiles of ``size`` pixels. One split, train (``transfer_map_parts``
    puts it in a named split)."""
    a, b = (int(v) for v in cfg.extra["window"])
    ds, seqs = event_sequences(cfg)
    names = ds.prep.names
    keep = [(names.index(name), s) for name, s in ds.clips
            if names.index(name) in seqs and a <= s and s + cfg.frames <= b]
    return {"train": Tiles(ClipDataset(ds.prep, keep, cfg.frames, ds.events), cfg.extra.get("tiles", 1), cfg.size)}


def source_path(net: str) -> Path:
    """Where a network's data lie: its ``source.path``, relative to the shared data folder."""
    return SHARED / NETWORKS[net]["source"]["path"]


def check_sources(p: dict, networks_file) -> None:
    for n in p["networks"]:
        if n not in NETWORKS:
            sys.exit(f"{networks_file}: {n}: the preset runs it, the file has no such network")
        if not source_path(n).exists():
            sys.exit(f"{networks_file}: {n}.source.path: {source_path(n)} not found (relative paths are under "
                     f"{SHARED}, set by TRANSMEM_SHARED_DATA)")


def event_frames(p: dict, net: str, event, cache: Path) -> int:
    """How many frames the network's ``event`` holds (its shortest sequence; ``None``: the whole
    source), read as the jobs read it (through the shared cache)."""
    part = tile_part(net, (event, 0, 1), p)["extra"]
    cfg = DataConfig.from_dict({"name": "transfer_radar_tiles", "size": p["families"][FAMILY]["size"],
                                "frames": frames_per_clip(p), "cache_dir": str(cache), "extra": part})
    ds, seqs = event_sequences(cfg)
    return min(ds.prep.lengths[i] for i in seqs)


def check_windows(p: dict, networks_file, cache: Path) -> None:
    """Before any job, in one line: every validation and test window holds a clip, some training
    window does, and no window runs past its event's frames (it would give fewer clips than the
    JSON counts, silently)."""
    T = frames_per_clip(p)
    for n in p["networks"]:
        spec = NETWORKS[n]
        for split in ("val", "test"):
            for w in spec[split]:
                if w[2] - w[1] < T:
                    sys.exit(f"{networks_file}: {n}.{split}: {list(w)} holds {w[2] - w[1]} frames, fewer than "
                             f"a clip's {T}: it gives no clip")
        if not any(b - a >= T for _, a, b in spec["train"]):
            sys.exit(f"{networks_file}: {n}.train: no window holds a clip's {T} frames")
        lengths = {}
        for split in ("train", "val", "test"):
            for w in spec[split]:
                if w[0] not in lengths:
                    try:
                        lengths[w[0]] = event_frames(p, n, w[0], cache)
                    except UserError as e:  # the reader's one line: a file it cannot read, an event not found
                        sys.exit(f"{networks_file}: {n}.{split}: {list(w)}: {' '.join(str(e).split())}")
                if w[2] > lengths[w[0]]:
                    sys.exit(f"{networks_file}: {n}.{split}: {list(w)} ends past the {lengths[w[0]]} frames of "
                             f"{'event ' + w[0] if w[0] is not None else 'the source'}")


#: preset keys that a rerun in the same folder may change: more seeds, budgets or networks add
#: jobs, a raised max_doublings lets --extend go on; any other change would mix two set-ups
GROWABLE = ("seeds", "budgets", "networks", "tiles", "max_doublings")
STAMP = "setup.json"


def setup_stamp(p: dict) -> dict:
    """What the runs in a folder depend on: each network's entry and tiling, and the preset's
    other settings (as JSON would store them)."""
    nets = {n: {**{k: v for k, v in NETWORKS[n].items() if k != "title"}, "tiles": p["tiles"][n]}  # a title is a label
            for n in p["networks"]}
    return json.loads(json.dumps({"networks": nets, "preset": {k: v for k, v in p.items() if k not in GROWABLE}}))


def check_setup(root: Path, p: dict, write: bool) -> None:
    """Refuse, in one line, to run or aggregate in a folder whose runs were made with another
    set-up (a network's region, splits, source or tiles; the model, the steps...): the results
    would mix the two. Networks the folder has not seen join it; ``write`` records them."""
    f = Path(root) / STAMP
    now = setup_stamp(p)
    was = json.loads(f.read_text()) if f.is_file() else None
    if was is not None:
        for n, spec in now["networks"].items():
            if n in was["networks"] and was["networks"][n] != spec:
                key = next(k for k in sorted(set(spec) | set(was["networks"][n]))
                           if spec.get(k) != was["networks"][n].get(k))
                sys.exit(f"{f}: {n}.{key}: the runs here were made with {was['networks'][n].get(key)!r}, now "
                         f"{spec.get(key)!r}; choose another --root (nothing was run)")
        key = next((k for k in sorted(set(now["preset"]) | set(was["preset"]))
                    if now["preset"].get(k) != was["preset"].get(k)), None)
        if key is not None:
            sys.exit(f"{f}: preset key {key}: the runs here were made with {was['preset'].get(key)!r}, now "
                     f"{now['preset'].get(key)!r}; choose another --root (nothing was run)")
        now["networks"] = {**was["networks"], **now["networks"]}
    if write and now != was:
        Path(root).mkdir(parents=True, exist_ok=True)
        write_json(f, now)


def tile_part(net: str, window: tuple, p: dict) -> dict:
    spec = NETWORKS[net]
    ev, a, b = window
    src = copy.deepcopy(spec["source"])
    src["path"] = str(source_path(net))
    pick = {}
    if ev is not None and "events" in (extra_keys(src["name"]) or ()):
        src.setdefault("extra", {})["events"] = [ev]  # the reader reads that event alone
    elif ev is not None:
        pick = {"event": ev}  # the tiles keep that event's sequences of everything the reader reads
    return {"name": "transfer_radar_tiles", "extra": {"source": src, "tiles": p["tiles"][net], "window": [a, b], **pick}}


def frames_per_clip(p: dict) -> int:
    return int(p["families"][FAMILY]["frames"])


def budget_frames(p: dict, net: str, budget: str) -> int | None:
    """Training frames of a budget; None when it collapses into ``all`` (it needs all the training
    frames, or more)."""
    avail = sum(b - a for _, a, b in NETWORKS[net]["train"])
    if budget == "all":
        return avail
    n = max(math.ceil(HOURS[budget] * 60 / NETWORKS[net]["minutes"]), frames_per_clip(p))
    return None if n >= avail else n


def budgets_of(p: dict, net: str) -> list[str]:
    """The distinct learned budgets of a network, scarce to abundant."""
    out, seen = [], set()
    for b in p["budgets"]:
        n = budget_frames(p, net, b)
        if b != "all" and n is None:
            b, n = ("all", budget_frames(p, net, "all")) if "all" in p["budgets"] else (None, None)
        if b is not None and n not in seen:
            seen.add(n)
            out.append(b)
    return sorted(out, key=lambda b: budget_frames(p, net, b))


def verdict_budget(p: dict, net: str) -> str:
    """~1 hour: the 1h budget, else the smallest one the network has (mrms: all, 32 minutes)."""
    bs = budgets_of(p, net)
    return "1h" if "1h" in bs else bs[0]


def train_windows(p: dict, net: str, budget: str) -> list[tuple]:
    """The first ``budget_frames`` training frames in time order, as windows."""
    left, out = budget_frames(p, net, budget), []
    for ev, a, b in NETWORKS[net]["train"]:
        take = min(left, b - a)
        if take >= frames_per_clip(p):
            out.append((ev, a, a + take))
        left -= take
        if left <= 0:
            break
    return out


def clip_count(p: dict, net: str, windows: list[tuple]) -> int:
    T = frames_per_clip(p)
    return p["tiles"][net] ** 2 * sum(max(0, b - a - T + 1) for _, a, b in windows)


def target_data(p: dict, net: str, budget: str, cache: Path) -> dict:
    parts = {"train": [tile_part(net, w, p) for w in train_windows(p, net, budget)],
             "val": [tile_part(net, w, p) for w in NETWORKS[net]["val"]],
             "test": [tile_part(net, w, p) for w in NETWORKS[net]["test"]]}
    return {"name": "transfer_map_parts", "cache_dir": str(cache), "extra": {"parts": parts}}


def network_data(p: dict, net: str, cache: Path) -> dict:
    """A zoo model's data: every frame of the network but its validation windows, which select the
    model's step (its card's test score is in-sample: the test windows are trained on too; the
    entry serves only the other networks)."""
    spec = NETWORKS[net]
    return {"name": "transfer_map_parts", "cache_dir": str(cache),
            "extra": {"parts": {"train": [tile_part(net, w, p) for w in _merge(spec["train"] + spec["test"])],
                                "val": [tile_part(net, w, p) for w in spec["val"]],
                                "test": [tile_part(net, w, p) for w in spec["test"]]}}}


def _merge(windows: list[tuple]) -> list[tuple]:
    """Adjacent windows of one event joined (so that clips may span the split boundaries)."""
    out = []
    for ev, a, b in sorted(windows, key=lambda w: (str(w[0]), w[1])):
        if out and out[-1][0] == ev and out[-1][2] == a:
            out[-1] = (ev, out[-1][1], b)
        else:
            out.append((ev, a, b))
    return out


def pixel_km(p: dict, net: str) -> float:
    return NETWORKS[net]["region_km"] / (p["families"][FAMILY]["size"] * p["tiles"][net])


def experiment(p: dict, data: dict, steps: int, seed: int, pretext: bool = False):
    exp = tm.experiment(p, FAMILY, data, steps, seed, pretext=pretext)
    exp.eval.thresholds = [0.5, 1.0, 5.0]  # mm/h: csi_1 is at 1 mm/h
    return exp


def cell_experiment(p: dict, root: Path, net: str, budget: str, seed: int, steps: int | None = None):
    return experiment(p, target_data(p, net, budget, cache_dir(root)), p["target_steps"] if steps is None else steps,
                      seed)


# ---------------------------------------------------------------------------------------------
# folders and jobs


def cache_dir(root: Path) -> Path:
    """The decoded regions (``$TRANSMEM_RADAR_CACHE``, else beside the run folder: the presets share it)."""
    return Path(os.environ.get("TRANSMEM_RADAR_CACHE") or Path(root).parent / "transfer-radar-cache")


def zoo_names(p: dict, target: str | None = None) -> list[str]:
    return ["advected_rain"] + [n for n in p["networks"] if n != target]


def zoo_entry(root: Path, name: str) -> Path:
    return root / "zoo" / name


def job_dir(root: Path, job: str, target, budget, method, seed: int) -> Path:
    if job == "zoo":
        return root / "pretext" / method
    if job in ("baselines", "zeroshot"):
        return root / target / job
    if job == "rank":
        return root / target / budget / "rank"
    return root / target / budget / tm.safe(method) / f"seed{seed}"


def jobs(p: dict) -> list[tuple]:
    """(job, target, budget, method, seed), the critical path first: the zoo (advected rain, then
    the networks), the baselines, the zero-shot rows and the rankings, then cell by cell (the ~1
    hour cells first) the runs and the mixtures. A worker takes the first job whose inputs are
    ready, so scratch runs and baselines fill the wait for the zoo."""
    out = [("zoo", None, None, "advected_rain", 0)] + [("zoo", None, None, n, 0) for n in p["networks"]]
    out += [("baselines", t, None, None, 0) for t in p["networks"]]
    out += [("zeroshot", t, None, None, 0) for t in p["networks"]]
    cells = [(t, verdict_budget(p, t)) for t in p["networks"]]
    cells += [(t, b) for t in p["networks"] for b in budgets_of(p, t) if (t, b) not in cells]
    out += [("rank", t, b, None, 0) for t, b in cells]
    for t, b in cells:
        out += [("run", t, b, m, s) for m in TRAINED for s in p["seeds"]]
        out += [("mix", t, b, MIX, s) for s in p["seeds"]]
    out += [(MIXTURE_JOBS[m], t, verdict_budget(p, t), m, s) for m in (MIXP, MIXA)
            for t in p["networks"] for s in p["seeds"]]
    return out


def needs(root: Path, job: str, target, budget, method, seed: int, p: dict) -> list[Path]:
    """The result files a job reads."""
    done = lambda *a: job_dir(root, *a) / "result.json"  # noqa: E731
    if job == "zoo":
        return [] if method == "advected_rain" else [done("zoo", None, None, "advected_rain", 0)]
    if job in ("zeroshot", "rank"):
        return [done("zoo", None, None, e, 0) for e in zoo_names(p, target)]
    if job == "run":
        return [] if method == SCRATCH else [done("rank", target, budget, None, 0)]
    if job in MIXTURE_JOBS.values():
        return [done("run", target, budget, AUTO, seed), done("baselines", target, None, None, 0),
                done("rank", target, budget, None, 0), done("zeroshot", target, None, None, 0)]
    return []


def commit() -> str:
    return claims.commit(REPO, ["src", "benchmarks/transfer_radar.py", "benchmarks/transfer_map.py",
                                "benchmarks/transfer_digits.py", "benchmarks/claims.py",
                                "benchmarks/configs/transfer_radar.yaml"])


# ---------------------------------------------------------------------------------------------
# running


def _csi1(m: dict) -> float | None:
    return ((m.get("csi") or {}).get("1.0") or {}).get("mean")


def _ranking(root: Path, target: str, budget: str) -> dict:
    return json.loads((job_dir(root, "rank", target, budget, None, 0) / "result.json").read_text())


def train_once(method: str, exp, out: Path, resume: bool, rk: dict | None) -> dict:
    if method == SCRATCH:
        return api.run_train(exp, out, resume=resume, kind="scratch")
    if method == AUTO:
        return api.run_train(exp, out, resume=resume, init_from=rk["finetune"])
    exp.transfer.init_from = rk["finetune"]
    if method == BANK:
        exp.transfer.mode, exp.transfer.teacher_inputs, exp.transfer.cache_bank = "bank_read", "own", "none"
    return api.run_transfer(exp, out, resume=resume, teachers=rk["teachers"])


def run_to_convergence(p: dict, root: Path, target: str, budget: str, method: str, seed: int, d: Path) -> dict:
    """Train with validation; while ``cap < 1.25 * best_step`` (and doublings are left), resume
    from the last checkpoint with the cap doubled."""
    rk = None if method == SCRATCH else _ranking(root, target, budget)
    out = d / "run"
    earlier, go_on = extension(d, p["target_steps"])  # stopped unconverged at a lower doubling limit
    t0 = time.time() - (earlier["train_wall_s"] if earlier else 0)

    def train(steps: int, resume: bool) -> dict:
        return train_once(method, cell_experiment(p, root, target, budget, seed, steps=steps), out, resume, rk)
    m, cap, history = train_to_convergence(train, out, max_doublings=p["max_doublings"], **go_on)
    res = {"mse": m["mse"], "csi_1": _csi1(m), "ssim": m.get("ssim"), "mse_per_frame": m.get("mse_per_frame"),
           **record(history, cap), "train_wall_s": round(time.time() - t0, 1),
           "train_clips": clip_count(p, target, train_windows(p, target, budget))}
    if rk is not None:
        res["init_from"] = Path(rk["finetune"]).name
        if method in (DISTILL, BANK):
            res["teachers"] = [Path(t).name for t in rk["teachers"]]
    return {**res, **extended_from(d, earlier)}


def train_zoo_entry(p: dict, root: Path, name: str, d: Path) -> dict:
    """A zoo entry, trained to convergence by the cells' rule; the best checkpoint becomes the
    entry ``zoo/<name>``. The advected-rain model: on synthetic advected rain, validated on its
    own validation clips, the first cap ``pretext_steps``; a network's: finetuned from it on the
    network's frames, validated on its validation windows, the first cap ``network_steps``."""
    out = d / "run"
    pretext = name == "advected_rain"

    def train(steps: int, resume: bool) -> dict:
        if pretext:
            return api.run_train(experiment(p, tm.advected_data(p), steps, 0, pretext=True), out, resume=resume,
                                 kind="pretrain")
        exp = experiment(p, network_data(p, name, cache_dir(root)), steps, 0)
        return api.run_train(exp, out, resume=resume, init_from=zoo_entry(root, "advected_rain"), kind="pretrain")
    t0 = time.time()
    m, cap, history = train_to_convergence(train, out, first_cap=p["pretext_steps" if pretext else "network_steps"],
                                           max_doublings=p["max_doublings"])
    model, card = zoo.load_entry(out / "model")
    own = ("card_version", "name", "model", "config", "params", "sha256")  # save_entry writes these
    zoo.save_entry(model, zoo_entry(root, name), {k: v for k, v in card.items() if k not in own}, overwrite=True)
    return {**m, **record(history, cap), "train_wall_s": round(time.time() - t0, 1)}


def extend(p: dict, root: Path) -> int:
    """Set aside the results of runs that stopped unconverged with doublings left under the
    preset's (raised) ``max_doublings``, and those of the mixtures built on them, so that the next
    ``work`` continues them; returns how many runs were set aside."""
    n = 0
    for job, t, b, m, s in jobs(p):
        if job != "run" or not set_aside(job_dir(root, job, t, b, m, s) / "result.json", p["max_doublings"]):
            continue
        n += 1
        if m == AUTO:  # the mixtures read this run's model
            for m2, job2 in MIXTURE_JOBS.items():
                (job_dir(root, job2, t, b, m2, s) / "result.json").unlink(missing_ok=True)
    return n


def eval_metrics(exp, forecaster, data, split: str) -> dict:
    e = copy.deepcopy(exp)
    e.eval.split = split
    m = api.evaluate_forecaster(e, forecaster, data)
    return {"mse": m["mse"], "csi_1": _csi1(m), "mse_per_frame": m.get("mse_per_frame")}


def mixture_entries(p: dict, root: Path, target: str, rk: dict) -> list[str]:
    """The zoo entries that join a mixture as they are (not finetuned), ``mix_members`` of them:
    the zero-shot entry first (so that the mixture holds the budget-0 forecast and, on the
    validation clips, can do no worse than it), then the cell's ranking, without the entry the
    auto model was finetuned from."""
    zs = json.loads((job_dir(root, "zeroshot", target, None, None, 0) / "result.json").read_text())["entry"]
    ranked = [x["name"] for x in rk["ranking"]["rows"] if x["usable"]]  # best first
    rest = [e for e in ranked if e not in (zs, Path(rk["finetune"]).name)]
    return ([zs] + rest)[:p["mix_members"]]


def load_baseline(p: dict, net: str, name: str, exp):
    return api.load_baseline(name, exp, kmperpixel=pixel_km(p, net), timestep=float(NETWORKS[net]["minutes"]))


def mixture_parts(p: dict, root: Path, target: str, budget: str, seed: int) -> tuple[dict, dict, list[str], Path]:
    """What the mixtures of a cell and seed are made of: the cell's ranking, the validation MSE of
    every baseline that scored there, the zoo entries that join as they are, and the finetuned
    ``auto`` model of this seed."""
    rk = _ranking(root, target, budget)
    base = json.loads((job_dir(root, "baselines", target, None, None, 0) / "result.json").read_text())["baselines"]
    ok = {n: v["val"]["mse"] for n, v in base.items() if "val" in v}
    return rk, ok, mixture_entries(p, root, target, rk), job_dir(root, "run", target, budget, AUTO, seed) / "run" / "model"


def grid_mixture_members(p: dict, root: Path, target: str, budget: str, seed: int, exp) -> tuple[list[str], list]:
    """(names, forecasters) of ``mix:ft-auto+zoo+baseline``: the finetuned auto model, the zoo
    entries as they are, and the baseline with the lowest validation MSE."""
    rk, ok, others, auto_entry = mixture_parts(p, root, target, budget, seed)
    best = min(ok, key=ok.get)
    experts = [api.load_for_inference(auto_entry)[0]]
    experts += [api.load_for_inference(zoo_entry(root, e))[0] for e in others]
    experts += [load_baseline(p, target, best, exp)]
    return [f"{AUTO} ({Path(rk['finetune']).name})"] + others + [f"baseline:{best}"], experts


def execute(job: str, target, budget, method, seed: int, p: dict, root: Path) -> dict:
    d = job_dir(root, job, target, budget, method, seed)
    if job == "zoo":
        return train_zoo_entry(p, root, method, d)
    if job == "baselines":
        exp = cell_experiment(p, root, target, verdict_budget(p, target), 0)
        data = build_datasets(exp.data)
        out, t0 = {}, time.time()
        for name in p["baselines"]:
            if get_method(name).inputs > exp.train.t_in:
                out[name] = {"skipped": f"needs {get_method(name).inputs} input frames; t_in is {exp.train.t_in}"}
                continue
            try:
                f = load_baseline(p, target, name, exp)
                out[name] = {"val": eval_metrics(exp, f, data, "val"), "test": eval_metrics(exp, f, data, "test")}
            except Exception as e:  # not installed, or it failed on these clips: said, not fatal
                out[name] = {"error": repr(e)}
        return {"baselines": out, "wall_s": round(time.time() - t0, 1), "test_clips": len(data["test"]),
                "val_clips": len(data["val"])}
    if job in ("zeroshot", "rank"):
        exp = cell_experiment(p, root, target, budget or verdict_budget(p, target), 0)
        data = build_datasets(exp.data)
        entries = [zoo_entry(root, e) for e in zoo_names(p, target)]
        t0 = time.time()
        probe = 0 if job == "zeroshot" else p["probe_steps"]
        r = zoo.rank(exp, entries=entries, probe_steps=probe, seed=0, progress=False, datasets=data)
        res = {"ranking": r.to_dict(), "rank_wall_s": round(time.time() - t0, 1)}
        if job == "rank":
            res["finetune"] = r.top_rows(1, use="finetune")[0]["path"]
            res["teachers"] = [x["path"] for x in r.top_rows(2, use="teacher")]
            return res
        top = r.top_rows(1)[0]
        module = api.load_for_inference(top["path"])[0]
        return {**res, **eval_metrics(exp, module, data, "test"), "entry": top["name"]}
    if job == "run":
        return run_to_convergence(p, root, target, budget, method, seed, d)
    # the mixture: the finetuned auto model of this seed, the other zoo members, the best baseline on val
    exp = cell_experiment(p, root, target, budget, seed)
    data = build_datasets(exp.data)
    ft = json.loads((job_dir(root, "run", target, budget, AUTO, seed) / "result.json").read_text())
    if job in ("mixp", "mixa"):  # the product, same model members
        _, ok, others, auto_entry = mixture_parts(p, root, target, budget, seed)
        t0 = time.time()
        # mixp: every baseline, weights learned by gradient on the validation clips; mixa: the grid
        # mixture's one baseline (the best on validation), nothing learned: the plain average
        fit = dict(baselines=sorted(ok, key=ok.get)) if job == "mixp" else dict(baselines=[min(ok, key=ok.get)],
                                                                                  mix_steps=0)
        api.run_mixture(exp, d / "run", teachers=[str(auto_entry)] + [str(zoo_entry(root, e)) for e in others],
                        member_steps=0, mix_on="val", **fit)
        module = api.load_for_inference(d / "run" / "model")[0]
        m = eval_metrics(exp, module, data, "test")
        return {**m, "weights": module.model.weights_per_lead(), "fit_wall_s": round(time.time() - t0, 1),
                "best_step": ft["best_step"], "step_cap": ft["step_cap"], "converged": ft["converged"],
                "train_wall_s": round(ft["train_wall_s"] + time.time() - t0, 1), "init_from": ft.get("init_from")}
    names, experts = grid_mixture_members(p, root, target, budget, seed, exp)
    t0 = time.time()
    w = tm.fit_mixture(experts, data["val"])
    m = eval_metrics(exp, tm.Mixture(experts, w), data, "test")
    return {**m, "weights": dict(zip(names, w)), "fit_wall_s": round(time.time() - t0, 1),
            "best_step": ft["best_step"], "step_cap": ft["step_cap"], "converged": ft["converged"],
            "train_wall_s": round(ft["train_wall_s"] + time.time() - t0, 1), "init_from": ft.get("init_from")}


def work(p: dict, root: Path) -> int:
    """Run jobs until none is left that this worker can start: a job is started when its inputs
    are done and nobody holds its claim. A failed job leaves ``error.txt`` and its claim free (a
    rerun retries it); the jobs that need it are skipped. Returns the number of failures."""
    code, failed = commit(), set()
    todo = jobs(p)  # in an order where every job comes after the jobs it needs
    while True:
        ran, waiting, blocked = False, False, set()
        for j in todo:
            job, target, budget, method, seed = j
            d = job_dir(root, *j)
            if (d / "result.json").is_file():
                continue
            deps = needs(root, *j, p)
            if j in failed or any(f in blocked or ((f.parent / "error.txt").is_file() and not f.is_file())
                                  for f in deps):
                blocked.add(d / "result.json")  # it, or an input, failed: a rerun retries them
                continue
            if not all(f.is_file() for f in deps):
                waiting = True
                continue
            if tm.stale_claim(d):  # its worker was stopped: the job is free again
                (d / ".claim").unlink(missing_ok=True)
            if not claim(d):
                waiting = True  # another worker runs it; what needs it may become ready
                continue
            if (d / "run").exists() and not (d / EXTENDED).is_file() and not resumable(d / "run"):
                shutil.rmtree(d / "run")  # a stopped worker's run with nothing to go on from
            (d / "error.txt").unlink(missing_ok=True)
            label = " ".join(str(x) for x in (job, target, budget, method) if x is not None) + \
                (f" seed {seed}" if job in ("run", "mix", "mixp") else "")
            t0 = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] start {label}", flush=True)
            try:
                m = execute(*j, p, root)
            except Exception as e:
                (d / "error.txt").write_text(repr(e))
                (d / ".claim").unlink(missing_ok=True)
                print(f"  FAILED {label}: {e!r}", flush=True)
                failed.add(j)
                continue
            m.update({"job": job, "target": target, "budget": budget, "method": method, "seed": seed,
                      "commit": code, "job_wall_s": round(time.time() - t0, 1)})
            claims.write_run(d / "result.json", m)
            score = f": mse {m['mse']:.4g}" if "mse" in m else ""
            conv = f" (best step {m['best_step']}, cap {m['step_cap']})" if m.get("step_cap") else ""
            print(f"[{time.strftime('%H:%M:%S')}] done {label} in {time.time() - t0:.0f} s{score}{conv}", flush=True)
            ran = True
            break  # from the top: the critical path first
        if ran:
            continue
        if not waiting:
            return len(failed)
        time.sleep(5)


# ---------------------------------------------------------------------------------------------
# results


def _read(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.is_file() else None


def _stats(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def collect(p: dict, root: Path) -> dict:
    cells, missing, commits, zoo_cards, rankings, baseline_notes = [], [], set(), {}, {}, []

    def get(*a):
        r = _read(job_dir(root, *a) / "result.json")
        if r is None:
            missing.append(" ".join(str(x) for x in a if x is not None))
        else:
            commits.add(r["commit"])
        return r
    for e in zoo_names(p):
        r = get("zoo", None, None, e, 0)
        if r is not None:
            zoo_cards[e] = {"test_mse_own_data": r["mse"], "steps": r["train_steps"], "train_wall_s": r["train_wall_s"],
                            "data": "synthetic advected rain" if e == "advected_rain" else
                            f"the frames of {e} but its validation windows, finetuned from advected_rain "
                            "(in-sample test score)",
                            **{k: r[k] for k in ("best_step", "step_cap", "converged", "doublings") if k in r}}
    for t in p["networks"]:
        zs = get("zeroshot", t, None, None, 0)
        if zs is not None:
            cells.append({"target": t, "budget": "0", "method": ZERO_SHOT, "entry": zs["entry"],
                          "per_seed": [{"seed": None, "mse": zs["mse"], "csi_1": zs["csi_1"]}],
                          "mse_mean": zs["mse"], "mse_std": None, "csi_1_mean": zs["csi_1"],
                          "best_step": None, "step_cap": 0, "reference": True})
            rankings[f"{t}/0"] = _rank_summary(zs["ranking"])
        base = get("baselines", t, None, None, 0)
        if base is not None:
            ok = {n: v for n, v in base["baselines"].items() if "test" in v}
            for n, v in ok.items():
                cells.append({"target": t, "budget": "0", "method": f"baseline:{n}", "val_mse": v["val"]["mse"],
                              "per_seed": [{"seed": None, "mse": v["test"]["mse"], "csi_1": v["test"]["csi_1"]}],
                              "mse_mean": v["test"]["mse"], "mse_std": None, "csi_1_mean": v["test"]["csi_1"],
                              "best_step": None, "step_cap": 0, "reference": True})
            if ok:
                n = min(ok, key=lambda k: ok[k]["test"]["mse"])
                cells.append({"target": t, "budget": "0", "method": "best_baseline", "baseline": n,
                              "per_seed": [{"seed": None, "mse": ok[n]["test"]["mse"], "csi_1": ok[n]["test"]["csi_1"]}],
                              "mse_mean": ok[n]["test"]["mse"], "mse_std": None,
                              "csi_1_mean": ok[n]["test"]["csi_1"], "best_step": None, "step_cap": 0,
                              "reference": True})
            for n, v in base["baselines"].items():
                if "error" in v or "skipped" in v:
                    baseline_notes.append(f"{t} {n}: {v.get('error', v.get('skipped'))[:160]}")
        for b in budgets_of(p, t):
            rk = get("rank", t, b, None, 0)
            if rk is not None:
                rankings[f"{t}/{b}"] = {**_rank_summary(rk["ranking"]), "finetune": Path(rk["finetune"]).name,
                                        "teachers": [Path(x).name for x in rk["teachers"]]}
            for m in TRAINED + tuple(MIXTURE_JOBS):
                if m in (MIXP, MIXA) and b != verdict_budget(p, t):
                    continue
                job = MIXTURE_JOBS.get(m, "run")
                runs = [r for r in (get(job, t, b, m, s) for s in p["seeds"]) if r]
                if not runs:
                    continue
                mean, std = _stats([r["mse"] for r in runs])
                cell = {"target": t, "budget": b, "method": m,
                        "per_seed": [{k: r.get(k) for k in ("seed", "mse", "csi_1", "best_step", "step_cap", "converged",
                                                             "doublings", "train_wall_s")} for r in runs],
                        "mse_mean": mean, "mse_std": std, "csi_1_mean": _stats([r["csi_1"] for r in runs])[0],
                        **_binding(runs),
                        "converged": all(r["converged"] for r in runs), "seeds_done": len(runs),
                        "train_clips": clip_count(p, t, train_windows(p, t, b)),
                        "wall_s_mean": float(np.mean([r["train_wall_s"] for r in runs]))}
                if m != SCRATCH:
                    cell["init_from"] = sorted({r.get("init_from") for r in runs if r.get("init_from")})
                if m in (DISTILL, BANK):
                    cell["teachers"] = runs[0].get("teachers")
                if m in MIXTURE_JOBS:
                    cell["weights_per_seed"] = [r["weights"] for r in runs]
                    cell["note"] = ("reuses finetune:auto's runs (its best_step / step_cap); the other members "
                                    "are not trained on the target")
                cells.append(cell)
    return {"cells": cells, "missing": missing, "commits": commits, "zoo": zoo_cards, "rankings": rankings,
            "baseline_notes": baseline_notes}


def _binding(runs: list[dict]) -> dict:
    """A cell's best_step and step_cap: those of its seed nearest to breaking the rule (the
    highest best_step / step_cap), so that the cell keeps the rule exactly when all its seeds do."""
    r = binding(runs)
    return {"best_step": r["best_step"], "step_cap": r["step_cap"], "binding_seed": r["seed"]}


def _rank_summary(r: dict) -> dict:
    return {"score": r["score"], "probe_steps": r["probe_steps"],
            "rows": [{k: x.get(k) for k in ("name", "rank", "score", "zero_shot_mse", "probe_mse", "uses")}
                     for x in r["rows"]],
            "baselines_val_mse": r.get("baselines")}


def verdict(p: dict, cells: list[dict], methods: tuple = TRANSFER) -> dict:
    """Per target at ~1 hour: the best transmem transfer (lowest mean test MSE of ``methods``:
    finetune:auto, the TMUs and the mixtures) against scratch on the same clips, zero-shot and the best registered
    baseline; the goal is to beat all three on at least 3 of the 4 targets (three quarters of the
    targets, rounded up, when another networks file has another number)."""
    rows = {}
    for t in p["networks"]:
        b = verdict_budget(p, t)
        c = {x["method"]: x for x in cells if x["target"] == t and x["budget"] in (b, "0")}
        tr = {m: c[m] for m in methods if m in c}
        row = {"budget": b, "train_minutes": budget_frames(p, t, b) * NETWORKS[t]["minutes"]}
        if not tr or not all(k in c for k in (SCRATCH, ZERO_SHOT, "best_baseline")):
            rows[t] = {**row, "complete": False}
            continue
        best = min(tr, key=lambda m: tr[m]["mse_mean"])
        v = tr[best]["mse_mean"]
        against = {"scratch": c[SCRATCH]["mse_mean"], "zero_shot": c[ZERO_SHOT]["mse_mean"],
                   "best_baseline": c["best_baseline"]["mse_mean"]}
        row.update(complete=True, best_transfer=best, best_transfer_mse=v,
                   best_baseline=c["best_baseline"]["baseline"], zero_shot_entry=c[ZERO_SHOT]["entry"],
                   **{f"{k}_mse": x for k, x in against.items()},
                   **{f"vs_{k}_pct": 100 * (v / x - 1) for k, x in against.items()},
                   **{f"beats_{k}": bool(v < x) for k, x in against.items()},
                   converged=all(tr[m].get("converged", True) for m in tr) and c[SCRATCH].get("converged", True),
                   seeds=min(x.get("seeds_done", 0) for x in list(tr.values()) + [c[SCRATCH]]))
        row["beats_all"] = row["beats_scratch"] and row["beats_zero_shot"] and row["beats_best_baseline"]
        rows[t] = row
    done = [r for r in rows.values() if r.get("complete")]
    count = sum(r["beats_all"] for r in done)
    need = math.ceil(0.75 * len(rows))
    return {"per_target": rows, "targets_won": count, "targets_scored": len(done),
            "goal": f"at least {need} of {len(rows)} targets",
            "goal_met": bool(count >= need) if len(done) == len(rows) else None,
            "rule": "at ~1 hour of target frames (else a network's smallest budget: " +
                    (", ".join(f"{t} {r['budget']}" for t, r in rows.items() if r["budget"] != "1h") or "none") +
                    "), the lowest mean test MSE over seeds "
                    f"among {', '.join(methods)} is below scratch's on the same clips, the zero-shot forecast's and "
                    "the best registered baseline's (lowest test MSE)"}


def convergence(p: dict, cells: list[dict], zoo_cards: dict) -> dict:
    learned = [c for c in cells if not c.get("reference") and c["method"] not in MIXTURE_JOBS]
    bad = [f"{c['target']} {c['budget']} {c['method']}" for c in learned if not c["converged"]]
    bad += [f"zoo {e}" for e, z in zoo_cards.items() if z.get("converged") is False]
    return {"rule": "step_cap >= 1.25 * best_step for every seed (best_step: the step of the lowest validation MSE, "
                    "the checkpoint select_best keeps; a cell's best_step / step_cap are those of its seed nearest to "
                    "breaking the rule); a run that breaks it is resumed from its last checkpoint with the "
                    f"cap doubled, at most {p['max_doublings']} times (first cap {p['target_steps']} steps, "
                    f"validation every {p['val_every']} steps); the zoo's entries by the same rule: the "
                    f"advected-rain model on its validation clips (first cap {p['pretext_steps']} steps, validation "
                    f"every {max(p['pretext_steps'] // 4, 1)}), each network's on its validation windows (first cap "
                    f"{p['network_steps']} steps)",
            "cells": len(learned), "unconverged": bad,
            "doubled_runs": sum(s["doublings"] > 0 for c in learned for s in c["per_seed"]),
            "zoo": {e: {k: z[k] for k in ("best_step", "step_cap", "converged")} for e, z in zoo_cards.items()
                    if "step_cap" in z}}


def networks_info(p: dict) -> dict:
    out = {}
    for n in p["networks"]:
        s = NETWORKS[n]
        out[n] = {"title": s["title"], "frame_minutes": s["minutes"], "km_per_pixel": pixel_km(p, n),
                  "region_km": s["region_km"], "tiles": f"{p['tiles'][n]} x {p['tiles'][n]} of "
                  f"{p['families'][FAMILY]['size']} px", "source": s["source"],
                  "splits": {k: [list(w) for w in s[k]] for k in ("train", "val", "test")},
                  "val_clips": clip_count(p, n, s["val"]), "test_clips": clip_count(p, n, s["test"]),
                  "lead_minutes": (frames_per_clip(p) - p["families"][FAMILY]["t_in"]) * s["minutes"]}
    return out


def budgets_info(p: dict) -> dict:
    out = {}
    for n in p["networks"]:
        m = NETWORKS[n]["minutes"]
        d = {"0": {"frames": 0, "note": "zero-shot: no target training frames (the ranking reads the val clips)"}}
        for b in budgets_of(p, n):
            f = budget_frames(p, n, b)
            d[b] = {"frames": f, "minutes": f * m, "train_clips": clip_count(p, n, train_windows(p, n, b)),
                    "windows": [list(w) for w in train_windows(p, n, b)]}
        collapsed = [b for b in p["budgets"] if b not in d]
        if collapsed:
            d["collapsed"] = {b: ("all" if "all" in d else None) for b in collapsed}
        d["verdict_budget"] = verdict_budget(p, n)
        out[n] = d
    return out


def aggregate(p: dict, root: Path, out_json: Path, command: str, preset: str) -> dict:
    c = collect(p, root)
    fp = p["families"][FAMILY]
    result = {
        "commit": sorted(c["commits"])[0] if len(c["commits"]) == 1 else sorted(c["commits"]),
        "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per run, "
                   "2 runs in parallel (cores shared with other work)",
        "preset": preset, "settings": {k: v for k, v in p.items() if k != "families"},
        "complete": not c["missing"], "missing": c["missing"],
        "backbone": fp["model"], "frame_size": fp["size"], "t_in": fp["t_in"], "t_out": fp["frames"] - fp["t_in"],
        "time_steps": "each network at its own frame interval (" + ", ".join(f"{n} {NETWORKS[n]['minutes']:g} min"
                                                                            for n in p["networks"]) +
                      "): a model sees frames, not minutes; nothing is resampled",
        "networks": networks_info(p),
        "budgets": budgets_info(p),
        "zoo": c["zoo"],
        "baselines_not_scored": c["baseline_notes"],
        "methods": {**{m: METHOD_TEXT[m] for m in TRAINED + tuple(MIXTURE_JOBS) + (ZERO_SHOT,)},
                    "baseline:<name>": METHOD_TEXT["baseline:<name>"], "best_baseline": METHOD_TEXT["best_baseline"]},
        "mse_units": f"MSE per frame: squared error summed over the valid pixels of a {fp['size']} x {fp['size']} frame, values the "
                     "log-scaled rain rate in [0, 1]; csi_1: CSI at 1 mm/h over the test clips",
        "rankings": c["rankings"],
        "cells": c["cells"],
        "convergence": convergence(p, c["cells"], c["zoo"]),
        "verdict": verdict(p, c["cells"]),
        "verdict_post_hoc": {**verdict(p, c["cells"], TRANSFER + POST_HOC),
                             "note": f"with {', '.join(POST_HOC)}, added after the verdict from what the weights "
                                     "diagnostic saw on these test clips: not an out-of-sample result here; a rerun "
                                     "on other networks (--networks) tests it"},
    }
    claims.write_json(out_json, result, runs=[_read(f) for f in Path(root).rglob("result.json")])
    out_json.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# What does a zoo give a new radar? Leave one network out ({r['preset']})", "",
             f"Commit `{r['commit']}`; command `{r['command']}`; {r['machine']}.",
             f"Backbone `{r['backbone']['name']}` {r['backbone']}, {r['frame_size']}x{r['frame_size']} tiles, "
             f"{r['t_in']} -> {r['t_out']} frames; {r['time_steps']}. {r['mse_units']}.",
             f"Convergence: {r['convergence']['rule']}; unconverged cells: "
             f"{', '.join(r['convergence']['unconverged']) or 'none'}; runs extended: {r['convergence']['doubled_runs']}"
             + ("; zoo entries (best step / cap): " + ", ".join(f"{e} {z['best_step']}/{z['step_cap']}" for e, z in
                                                                r["convergence"].get("zoo", {}).items())
                if r["convergence"].get("zoo") else "") + "."]
    if r["baselines_not_scored"]:
        lines += ["", "Baselines without a score (left out of best_baseline): " + "; ".join(r["baselines_not_scored"])]
    if not r["complete"]:
        lines += ["", f"**Incomplete**: {len(r['missing'])} missing: " + ", ".join(r["missing"][:20])
                  + (" ..." if len(r["missing"]) > 20 else "")]
    lines += ["", "| network | frame | km/px | region | val / test clips | budgets (train frames, clips) |",
              "|---|---:|---:|---|---:|---|"]
    for n, info in r["networks"].items():
        bs = ", ".join(f"{b}: {v['frames']} ({v['train_clips']})" for b, v in r["budgets"][n].items()
                       if isinstance(v, dict) and "train_clips" in v)
        col = r["budgets"][n].get("collapsed")
        bs += f"; collapsed: {', '.join(f'{k} -> {v}' for k, v in col.items())}" if col else ""
        lines.append(f"| {n} | {info['frame_minutes']} min | {info['km_per_pixel']:g} | {info['region_km']} km, "
                     f"{info['tiles']} | {info['val_clips']} / {info['test_clips']} | {bs} |")
    for n in r["networks"]:
        bs = ["0"] + [b for b in r["budgets"][n] if b not in ("0", "collapsed", "verdict_budget")]
        lines += ["", f"## target {n} (zoo: everything but {n})", "",
                  "| method | " + " | ".join(f"{b}" for b in bs) + " | CSI 1 mm/h at " + r["budgets"][n]["verdict_budget"]
                  + " | best step / cap |", "|---|" + "---:|" * (len(bs) + 2)]
        methods = list(dict.fromkeys(x["method"] for x in r["cells"] if x["target"] == n))
        for m in methods:
            row = {x["budget"]: x for x in r["cells"] if x["target"] == n and x["method"] == m}
            vals = []
            for b in bs:
                x = row.get(b)
                if x is None:
                    vals.append("–")
                    continue
                sd = f" ± {x['mse_std']:.3f}" if x.get("mse_std") is not None else ""
                tag = f" ({x['entry']})" if x.get("entry") else f" ({x['baseline']})" if x.get("baseline") else ""
                flag = " ⚠" if x.get("converged") is False else ""
                vals.append(f"{x['mse_mean']:.3f}{sd}{tag}{flag}")
            vb = row.get(r["budgets"][n]["verdict_budget"]) or row.get("0")
            steps = ", ".join(f"{x['best_step']}/{x['step_cap']}" for b, x in row.items() if x.get("step_cap"))  # binding seed
            lines.append(f"| {m} | " + " | ".join(vals) + f" | {tm._f(vb.get('csi_1_mean') if vb else None, 3)} | "
                         f"{steps or '–'} |")
    for key, title in (("verdict", "Verdict at ~1 hour of target data"),
                       ("verdict_post_hoc", "Verdict with the post-hoc methods (not out of sample here)")):
        if key in r:
            lines += verdict_lines(r[key], title)
    return "\n".join(lines) + "\n"


def verdict_lines(v: dict, title: str) -> list[str]:
    lines = ["", f"## {title}", "", v["rule"] + "." + (f" {v['note']}." if v.get("note") else ""), "",
              "| target | budget | best transfer | MSE | vs scratch | vs zero-shot | vs best baseline | beats all |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for t, x in v["per_target"].items():
        if not x.get("complete"):
            lines.append(f"| {t} | {x['budget']} | (incomplete) | | | | | |")
            continue
        lines.append(f"| {t} | {x['budget']} ({x['train_minutes']} min) | {x['best_transfer']} | "
                     f"{x['best_transfer_mse']:.3f} | {x['vs_scratch_pct']:+.1f}% | {x['vs_zero_shot_pct']:+.1f}% "
                     f"({x['zero_shot_entry']}) | {x['vs_best_baseline_pct']:+.1f}% ({x['best_baseline']}) | "
                     f"{'yes' if x['beats_all'] else 'no'} |")
    return lines + ["", f"Targets won: {v['targets_won']} of {v['targets_scored']} scored (goal: {v['goal']}; "
                        f"met: {v['goal_met']})."]


def load_preset(name: str) -> dict:
    presets = yaml.safe_load((HERE / "configs" / "transfer_radar.yaml").read_text())
    if name not in presets:
        sys.exit(f"benchmarks/configs/transfer_radar.yaml: unknown preset '{name}'; known: {', '.join(presets)}")
    return presets[name]


def default_root(preset: str) -> Path:
    return (REPO / "runs" / f"transfer-radar-{preset}").resolve()


def default_results(preset: str) -> Path:
    return HERE / "results" / ("transfer_radar.json" if preset == "full" else f"transfer_radar_{preset}.json")


def diagnostic_options(ap: argparse.ArgumentParser) -> None:
    """The options of a diagnostic that reads this script's runs (which preset, folder and networks)."""
    ap.add_argument("--preset", default="full", help="the preset of benchmarks/configs/transfer_radar.yaml that ran")
    ap.add_argument("--root", help="transfer_radar.py's runs (default runs/transfer-radar-<preset>)")
    ap.add_argument("--networks", help="the networks file transfer_radar.py ran with --networks, if any")


def diagnostic_setup(args) -> tuple[dict, Path]:
    """(preset, runs folder) of a diagnostic's ``args`` (:func:`diagnostic_options`); exits in one
    line when the folder holds no runs of this script."""
    p = load_preset(args.preset)
    if args.networks:
        use_networks(args.networks, p)
    root = Path(args.root).resolve() if args.root else default_root(args.preset)
    if not (root / "zoo").is_dir():
        sys.exit(f"{root}: no transfer_radar.py runs here (run benchmarks/transfer_radar.py first)")
    return p, root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", help="a preset of benchmarks/configs/transfer_radar.yaml")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--root", help="where runs go (default runs/transfer-radar-<preset>)")
    ap.add_argument("--json", help="results file (default benchmarks/results/transfer_radar[_<preset>].json)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes to start")
    ap.add_argument("--aggregate", action="store_true", help="only collect finished jobs")
    ap.add_argument("--worker", action="store_true", help="run jobs in this process, do not aggregate")
    ap.add_argument("--networks", help="the networks to run, a file like benchmarks/configs/transfer_radar_networks.yaml "
                                       "(default: that file, the preset's networks of it)")
    ap.add_argument("--extend", action="store_true",
                    help="first set aside unconverged runs with doublings left (after max_doublings was raised)")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    p = load_preset(preset)
    if args.networks:
        use_networks(args.networks, p)
    check_sources(p, args.networks or NETWORKS_FILE)
    root = Path(args.root).resolve() if args.root else default_root(preset)
    if not args.aggregate and not args.worker:  # workers: their parent checked
        check_windows(p, args.networks or NETWORKS_FILE, cache_dir(root))
    out_json = Path(args.json) if args.json else default_results(preset)
    command = "python benchmarks/transfer_radar.py" + ("" if preset == "full" else f" --preset {preset}") + \
        (f" --networks {args.networks}" if args.networks else "") + " --workers 2"
    check_setup(root, p, write=not args.aggregate and not args.worker)  # workers: their parent checked
    if args.extend:
        print(f"--extend: {extend(p, root)} unconverged runs go on", flush=True)
    if args.worker or (args.workers == 1 and not args.aggregate):
        failed = work(p, root)
        if args.worker:
            return 1 if failed else 0
    elif not args.aggregate:
        claims.run_workers([__file__, "--preset", preset, "--root", str(root), "--worker"]
                           + (["--networks", str(Path(args.networks).resolve())] if args.networks else []), args.workers)
    r = aggregate(p, root, out_json, command, preset)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

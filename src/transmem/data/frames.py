"""Folders of frame images (PNG, JPEG, ...) and KTH-style folders of action clips.

Registered dataset ``"frames"``: ``cfg.path`` is a folder; every folder under it (itself
included) that directly holds image files is one sequence, its frames ordered

* by name, in natural order (``f2.png`` before ``f10.png``), by default; or
* by a time stamp parsed from each name with ``extra["time_regex"]`` (a regular expression;
  its group ``t``, else its first group, is the time) and, for dates,
  ``extra["time_format"]`` (a ``strptime`` format, e.g. ``"%Y%m%d%H%M"``); without a format the
  group must be a number. With ``extra["max_gap"]`` (seconds for dates, else the numbers' unit)
  a larger step between two frames splits the folder into two sequences of the same event.

Registered dataset ``"kth"``: a tree such as KTH's ``<action>/<person..._d1>.avi`` or
``<action>/<person>/<clip>/*.png``: every video file (see :mod:`transmem.data.video`) and every
folder directly holding images is one sequence. Sequences are grouped into events by
``extra["group_regex"]`` (default ``person\\d+``, KTH's subject ids), so one person's clips never
end up in two splits; names without a match are their own event. The KTH ``00sequences.txt``
sub-clip boundaries are not read: every file is one sequence.

Frames are read as RGB or gray, converted to ``cfg.channels``, brought to ``cfg.size`` by
``cfg.resize`` and stored as uint8 (8-bit images) or float16 (16-bit images, scaled to [0, 1] by
``extra.white``, the raw value shown as white, else by the largest value the data holds, which is
then written into ``extra.white``: see :func:`fit_white`). Frames of different sizes in
one sequence are an error.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .clips import (CLIP_KEYS, SequenceSpec, build_clip_datasets, fit_options, group_events, natural_key, opt, opt_float,
                    opt_int, parse_time, require_path, split_at_gaps, why)
from .errors import DataError
from ..files import walk
from .registry import DataConfig, Units, register_dataset
from .stacks import data_white, frame_count, image_array, is_wide_image, read_stack
from .video import find_video_files, prepare_frames, video_specs

#: the ``extra`` keys of the ``frames`` and ``kth`` readers
FRAME_KEYS = CLIP_KEYS + ("time_regex", "time_format", "max_gap", "white", "group_regex")
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})


def is_image_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image as ``(H, W)`` (gray: uint8, or uint16 for 16-bit) or ``(H, W, 3)`` uint8 RGB.

    Raises :class:`DataError` for a file Pillow cannot read (unknown format, truncated, ...).
    """
    from PIL import Image
    try:
        with Image.open(os.fspath(path)) as im:
            im.load()
            return image_array(im)
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, zlib.error, ...
        raise DataError(path, f"cannot read image ({why(e, path)})") from None


def list_frames(folder: str | os.PathLike, *, time_regex: str | None = None,
                time_format: str | None = None) -> tuple[list[Path], list[float] | None]:
    """Image files directly in ``folder`` in frame order, and their parsed times (or ``None``).

    Sorted by name (natural order) or, with ``time_regex``, by the time parsed from each name;
    a name without a time, or two frames with one time, is a :class:`DataError`.
    """
    folder = Path(folder)
    try:
        files = [folder / f for f in os.listdir(folder) if is_image_file(f) and (folder / f).is_file()]
    except OSError as e:
        raise DataError(folder, f"cannot list folder ({e.strerror or e})") from None
    if not time_regex:
        return sorted(files, key=lambda p: natural_key(p.name)), None
    try:
        pat = re.compile(time_regex)
    except re.error as e:
        raise DataError(folder, f"extra.time_regex is not a valid regular expression: {e}") from None
    timed = []
    for f in files:
        t = parse_time(f.name, pat, time_format)
        if t is None:
            raise DataError(f, f"no time in the file name (time_regex={time_regex!r}"
                               f"{', time_format=' + repr(time_format) if time_format else ''})")
        timed.append((t, f))
    timed.sort(key=lambda tf: (tf[0], natural_key(tf[1].name)))
    for (t0, f0), (t1, f1) in zip(timed, timed[1:]):
        if t0 == t1:
            raise DataError(f1, f"same time as {f0.name}: two frames with one time stamp")
    return [f for _, f in timed], [t for t, _ in timed]


def read_frames(files: list[Path], channels: int = 1, size: int | None = None, resize: str = "resize", *,
                aspect: str = "crop", crop=None, where=None, white: float | None = None) -> np.ndarray:
    """Read image files (in the given order) into prepared frames ``(T, channels, H, W)``: uint8
    for 8-bit images, float16 in [0, 1] for 16-bit ones (scaled by ``white``, else 1/65535)."""
    if not files:
        raise DataError(where, "empty folder: no frame images found")
    return prepare_frames(((f, read_image(f)) for f in files), channels, size, resize, aspect, crop,
                          where=where or files[0].parent, white=white)


def read_frame_folder(folder: str | os.PathLike, channels: int = 1, size: int | None = None,
                      resize: str = "resize", *, time_regex: str | None = None, time_format: str | None = None,
                      max_frames: int | None = None, aspect: str = "crop", crop=None,
                      white: float | None = None) -> np.ndarray:
    """All frames of one folder (see :func:`list_frames` for the order) as prepared frames
    ``(T, C, H, W)`` (see :func:`read_frames`); 16-bit frames are scaled by ``white``, else by
    the largest value they hold."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "no such folder")
    files, _ = list_frames(folder, time_regex=time_regex, time_format=time_format)
    if not files:
        raise DataError(folder, f"empty folder: no frame images ({', '.join(sorted(IMAGE_EXTS))})")
    files = files[:max_frames] if max_frames else files
    white = white if white is not None else data_white(files)
    return read_frames(files, channels, size, resize, aspect=aspect, crop=crop, where=folder, white=white)


def find_frame_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that directly hold image files."""
    found = []
    for d, dirs, files in walk(root):  # loop-safe, regular files only
        dirs.sort(key=natural_key)
        if any(is_image_file(f) for f in files):
            found.append(Path(d))
    return found


def white_units(cfg: DataConfig) -> Units | None:
    """Raw counts for data read through a white level (16-bit images: ``extra.white``, fitted
    or declared): ``count = value * white``, so scores and forecasts are in the file's own values.
    None for 8-bit images (plain intensities)."""
    white = (cfg.extra or {}).get("white")
    if white is None:
        return None
    w = float(white)
    return Units("counts", lambda x: x * w, lambda v: v / w)


def fit_white(cfg: DataConfig, folders: list[Path]) -> None:
    """Without ``extra.white``, 16-bit images are scaled by the largest value the data holds
    (:func:`~transmem.data.stacks.data_white`), and that level is written into ``cfg.extra``
    (a fitted key: the run's ``config.yaml`` and the card carry it, so ``predict`` and
    ``evaluate`` read new files on the same scale). 8-bit data is left alone."""
    if opt(cfg, "white") is not None:
        return
    files = []
    for d in folders:  # a folder's first image says whether it holds 16-bit data (headers only)
        names = [Path(d) / f for f in sorted(os.listdir(d)) if is_image_file(f) and (Path(d) / f).is_file()]
        if names and is_wide_image(names[0]):
            files += names
    white = data_white(files, opt_int(cfg, "max_frames"))
    if white is not None:
        cfg.extra = dict(cfg.extra or {}, white=white)


def _folder_specs(cfg: DataConfig, folders: list[Path], root: Path, names: list[str], events: list[str]) -> list[SequenceSpec]:
    fo = fit_options(cfg)
    regex, fmt = opt(cfg, "time_regex"), opt(cfg, "time_format")
    max_gap = opt_float(cfg, "max_gap", positive=True)
    maxf = opt_int(cfg, "max_frames")
    white = opt_float(cfg, "white", positive=True)
    specs = []
    for folder, name, event in zip(folders, names, events):
        files, times = list_frames(folder, time_regex=regex, time_format=fmt)
        files, times = _take_stacks(cfg, files, times, name, specs)
        if not files:
            continue
        if maxf:
            files, times = files[:maxf], (times[:maxf] if times else None)
        runs = split_at_gaps(times, max_gap) if (times and max_gap) else [(0, len(files))]
        for k, (a, b) in enumerate(runs):
            part = files[a:b]

            def load(part=part, folder=folder):
                return read_frames(part, cfg.channels, fo["size"], fo["mode"], aspect=fo["aspect"],
                                   crop=fo["crop"], where=folder, white=white), None
            specs.append(SequenceSpec(name if len(runs) == 1 else f"{name}#{k}", event, part, load))
    return specs


def _take_stacks(cfg: DataConfig, files: list[Path], times, name: str, specs: list) -> tuple[list[Path], list | None]:
    """Append a sequence (its own event) for every multi-frame file (TIFF stack, animated PNG)
    of ``files`` to ``specs``; return the single-frame files (and their times)."""
    stacks = [f for f in files if frame_count(f) > 1]
    if not stacks:
        return files, times
    fo = fit_options(cfg)
    maxf = opt_int(cfg, "max_frames")
    white = opt_float(cfg, "white", positive=True)
    names = [f"{name}/{f.name}" for f in stacks]
    for f, sname, event in zip(stacks, names, group_events(names, opt(cfg, "group_regex"), cfg.path)):
        def load(f=f):
            return prepare_frames(iter([(f, fr) for fr in read_stack(f, maxf, white)]), cfg.channels, fo["size"],
                                  fo["mode"], fo["aspect"], fo["crop"], where=f), None
        specs.append(SequenceSpec(sname, event, [f], load))
    keep = [i for i, f in enumerate(files) if f not in set(stacks)]
    return [files[i] for i in keep], ([times[i] for i in keep] if times else None)


@register_dataset("frames", units=white_units, extra=FRAME_KEYS)
def build_frames(cfg: DataConfig) -> dict:
    """Clips from a folder of frames, or a folder of such folders (each one sequence)."""
    root = require_path(cfg, "a folder of frame images")
    if not root.is_dir():
        raise DataError(root, "expected a folder of frame images, got a file")
    folders = find_frame_folders(root)
    if not folders:
        raise DataError(root, f"empty folder: no frame images ({', '.join(sorted(IMAGE_EXTS))})")
    names = [root.name if f == root else os.path.relpath(f, root) for f in folders]
    events = group_events(names, opt(cfg, "group_regex"), cfg.path)
    fit_white(cfg, folders)
    specs = _folder_specs(cfg, folders, root, names, events)
    return build_clip_datasets(cfg, "frames", specs, what="sequences")


KTH_GROUP_REGEX = r"person\d+"


@register_dataset("kth", units=white_units, extra=FRAME_KEYS)
def build_kth(cfg: DataConfig) -> dict:
    """Clips from a KTH-style tree: each video file and each folder of frames is one sequence."""
    root = require_path(cfg, "a folder of action folders (videos or frame folders)")
    if not root.is_dir():
        raise DataError(root, "expected a folder of action folders, got a file")
    videos = find_video_files(root)
    folders = find_frame_folders(root)
    if not videos and not folders:
        raise DataError(root, "empty folder: no video files or frame folders found")
    regex = opt(cfg, "group_regex", KTH_GROUP_REGEX)
    fnames = [root.name if f == root else os.path.relpath(f, root) for f in folders]
    fit_white(cfg, folders)
    specs = video_specs(cfg, videos, root, group_regex=regex)
    specs += _folder_specs(cfg, folders, root, fnames, group_events(fnames, regex, cfg.path))
    # one order for all, whatever the kind of source
    specs.sort(key=lambda s: natural_key(s.name))
    return build_clip_datasets(cfg, "kth", specs, what="events")

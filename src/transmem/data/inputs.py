"""Read one user input (file or folder) into frames for ``transmem predict``.

``predict`` asks the model's reader first (``register_dataset(read_input=)``); for a model trained
on generated data, on a reader that declares nothing, or an input not in its reader's format,
:func:`read_by_extension` reads it as the model's data was read (:data:`READ_KEYS`), through
:func:`read_input_frames`, which dispatches on the extension, and for folders on the contents:

=====================================  ==================================================
input                                  read as
=====================================  ==================================================
``.npy`` / ``.npz``                    array ``(T, H, W)``, ``(T, C, H, W)`` or ``(T, H, W, C)``
                                       with C in {1, 3}; uint8 (/255), uint16 (/65535), bool,
                                       or float already in [0, 1]
video (``.mp4 .avi .mov .mkv ...``)    all frames, through PyAV
``.gif``                               all frames, through Pillow
one image (``.png .jpg ...``)          a single frame; a multi-page TIFF or animated PNG:
                                       all its frames (:mod:`transmem.data.stacks`)
``.h5 .hdf5 .nc ...``                  the HDF5 reader (``dataset``, ``scale``, ... in opts)
folder of FMI / MeteoSwiss radar files one radar event, sorted by the times in the names
folder of images                       a frame folder (name order, or ``time_regex``)
folder of HDF5 files                   their 2-D fields, in name order
=====================================  ==================================================
"""
from __future__ import annotations

import os
import stat
from collections import deque
from pathlib import Path

import numpy as np

from .clips import fit_frames, natural_key, opt_float, opt_int, to_channels, unit_floats, why
from .errors import DataError
from .frames import IMAGE_EXTS, is_image_file, read_frame_folder, read_image
from .hdf5 import is_hdf5_file, read_h5_frames
from .radar import composite_grid, parse_fmi_time, parse_mch_time, radar_kind, read_radar_files, read_radar_folder
from .registry import DataConfig, Grid
from .stacks import data_white, frame_count, read_stack
from .video import as_unit, is_video_file, iter_frames, prepare_frames, read_video

_FIT_KEYS = ("resize", "aspect", "crop")
#: the keys of a model's ``extra`` that change how :func:`read_by_extension` reads an input's values
#: and frames (radar's Z-R relation and scale, 16-bit images' white level, the crop, frame times)
READ_KEYS = ("r_max", "a", "b", "white", "aspect", "crop", "time_regex", "time_format")


def _unit_array(a: np.ndarray, path) -> np.ndarray:
    """Array of frames → float32 ``(T, H, W, C)`` in [0, 1]."""
    if a.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported array dtype {a.dtype}; expected uint8, uint16, bool or float")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:
        raise DataError(path, f"array of shape {a.shape} is one RGB image (H, W, {a.shape[-1]}), not frames: save "
                              f"frames as (T, H, W, {a.shape[-1]}); if these are {a.shape[0]} frames {a.shape[2]} "
                              f"pixels wide, save them as (T, H, W, 1)")
    if a.ndim == 3:
        a = a[..., None]
    elif a.ndim == 4:
        if a.shape[1] in (1, 3):
            a = a.transpose(0, 2, 3, 1)
        elif a.shape[-1] not in (1, 3, 4):
            raise DataError(path, f"array of shape {a.shape}: expected (T, H, W), (T, C, H, W) or (T, H, W, C) "
                                  f"with C = 1 or 3")
    else:
        what = " is one image, not frames" if a.ndim == 2 else ""
        raise DataError(path, f"array of shape {a.shape}{what}: expected (T, H, W), (T, C, H, W) or (T, H, W, C)")
    if 0 in a.shape:
        raise DataError(path, f"empty array of shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype.kind in "iu":
        raise DataError(path, f"integer array of dtype {a.dtype}: use uint8 (0..255) or uint16, or float in [0, 1]")
    return unit_floats(a, path, "the array's float values")


def _refuse_special_frames(folder: Path, names: list[str]) -> None:
    """A forecast starts from the newest frames of a folder: an entry named like a frame (an
    image, radar, HDF5 or video file) that is not a regular file -- a FIFO, a device, a socket --
    would be skipped and the forecast would start from an older frame without a word; refused
    instead (checked with ``stat``, so a FIFO never blocks)."""
    for n in names:
        if n.startswith("."):
            continue
        framelike = (is_image_file(n) or is_hdf5_file(n) or is_video_file(n) or parse_fmi_time(n) is not None
                     or parse_mch_time(n) is not None)
        if not framelike:
            continue
        q = folder / n
        try:
            st = q.stat()
        except OSError as e:
            raise DataError(q, f"named like a frame but cannot be read ({e.strerror or e}): remove it or "
                               "give a folder of regular files") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise DataError(q, "named like a frame but not a regular file (a FIFO, device or socket): the "
                               "forecast would start from an older frame; remove it or give a folder of regular files")


def _white(cfg: DataConfig, files: list[Path], max_frames: int | None) -> float | None:
    """``extra.white`` (the model's, for predict), else the white level 16-bit images hold."""
    white = opt_float(cfg, "white", positive=True)
    return white if white is not None else data_white(files, max_frames)


def _load_array(path: Path, key: str | None, last: int | None = None) -> np.ndarray:
    """The array of a ``.npy`` (memory-mapped: with ``last`` only the last frames are read from
    disk, so that an input larger than memory costs what a short one does) or ``.npz`` file."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is None:
                    if len(names) != 1:
                        raise DataError(path, f"npz holds {len(names)} arrays ({', '.join(names)}); pass key=NAME")
                    key = names[0]
                if key not in names:
                    raise DataError(path, f"no array '{key}' in the npz ({', '.join(names)})")
                return z[key]
        a = np.load(path, allow_pickle=False, mmap_mode="r")
        if last and a.ndim >= 3:
            a = a[-last:]
        return np.array(a)  # a copy: the file is not kept open
    except DataError:
        raise
    except Exception as e:  # ValueError (pickled / bad header), EOFError, zipfile errors, ...
        raise DataError(path, f"cannot read numpy array ({why(e, path)})") from None


def read_input_frames(path: str | os.PathLike, channels: int = 1, size: int | None = None, **opts):
    """Frames of one input as float32 ``(T, C, H, W)`` in [0, 1].

    ``last``: only the last frames are wanted: a ``.npy`` is memory-mapped and only they are read;
    a video is decoded keeping only them (other inputs are read whole: the caller cuts).

    ``size`` (None = native) and ``opts["resize"]`` (``"resize"`` | ``"crop"`` | ``"none"``),
    ``aspect``, ``crop`` act as in the dataset readers. Other opts: ``max_frames``; ``key`` (npz
    array); ``time_regex`` / ``time_format`` (frame folders); ``kind`` (``"fmi"`` | ``"mch"``),
    ``r_max``, ``a``, ``b`` (radar); ``dataset``, ``scale``, ``offset``, ``nodata``,
    ``undetect``, ``units``, ``time_axis`` (HDF5). With ``return_mask=True`` the result is
    ``(frames, mask)``, mask bool ``(T, 1, H, W)`` (all True except for radar / HDF5 no-data).

    Every bad input (missing, unreadable, unsupported, empty, mixed sizes, ...) raises
    :class:`~transmem.data.errors.DataError`.
    """

    p = Path(path).expanduser()
    return_mask = bool(opts.pop("return_mask", False))
    last = opts.pop("last", None)  # only the last frames are wanted (predict): read no more
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise DataError(p, f"last must be an integer >= 1, got {last!r}")
    if channels not in (1, 3):
        raise DataError(p, f"channels must be 1 or 3, got {channels}")
    mode = opts.get("resize", "resize" if size is not None else "none")
    fit = {"aspect": opts.get("aspect", "crop"), "crop": opts.get("crop")}
    extra = {k: v for k, v in opts.items() if k not in _FIT_KEYS}
    cfg = DataConfig(name="input", path=os.fspath(p), size=size, channels=channels, resize=mode,
                     extra=dict(extra, **fit))
    radar_kw = {"r_max": opt_float(cfg, "r_max", 100.0, positive=True)}
    maxf = opt_int(cfg, "max_frames")
    mask = None

    if not p.exists():
        raise DataError(p, "no such file or folder")
    if p.is_file():
        name, suf = p.name.lower(), p.suffix.lower()
        if suf in (".npy", ".npz"):
            a = _unit_array(_load_array(p, opts.get("key"), None if maxf else last), p)
            if maxf:
                a = a[:maxf]
            x = fit_frames(to_channels(a, channels, p), size, mode, path=p, **fit)
        elif suf == ".gif" and parse_mch_time(p.name):  # one MeteoSwiss frame: rain rate, not colors
            x, mask = read_radar_files([p], "mch", channels, size, mode, cfg=cfg, where=p, **fit, **radar_kw)
        elif is_video_file(p) and last:  # decoded in order, keeping only the last frames
            kept = deque(((p, fr) for fr in iter_frames(p, maxf)), maxlen=last)
            if not kept:
                raise DataError(p, "no frames could be decoded (empty or truncated file?)")
            x = prepare_frames(iter(kept), channels, size, mode, where=p, **fit).astype(np.float32) / 255.0
        elif is_video_file(p):
            x = read_video(p, channels, size, mode, max_frames=maxf, **fit).astype(np.float32) / 255.0
        elif (name.endswith(".pgm.gz") or suf == ".pgm") and parse_fmi_time(p.name):
            x, mask = read_radar_files([p], "fmi", channels, size, mode, cfg=cfg, where=p, **fit, **radar_kw)
        elif suf in IMAGE_EXTS and frame_count(p) > 1:  # multi-page TIFF, animated PNG: all frames
            white = _white(cfg, [p], maxf)
            x = as_unit(prepare_frames(((p, f) for f in read_stack(p, maxf, white)), channels, size, mode, where=p,
                                       **fit))
        elif suf in IMAGE_EXTS:
            x = as_unit(prepare_frames(iter([(p, read_image(p))]), channels, size, mode, where=p,
                                       white=_white(cfg, [p], None), **fit))
        elif is_hdf5_file(p):
            x, mask = read_h5_frames(cfg, [p], where=p)
        else:
            raise DataError(p, f"unsupported input format '{p.suffix or p.name}': give a video, GIF, image, "
                               f".npy/.npz, HDF5/NetCDF4 file, or a folder of frames or radar files")
    elif p.is_dir():
        try:
            names = sorted(os.listdir(p))
        except OSError as e:
            raise DataError(p, f"cannot list folder ({e.strerror or e})") from None
        _refuse_special_frames(p, names)
        kind = opts.get("kind") or radar_kind(p)
        if kind is not None:
            if kind not in ("fmi", "mch"):
                raise DataError(p, f"kind must be 'fmi' or 'mch', got {kind!r}")
            x, mask = read_radar_folder(p, kind, channels, size, mode, cfg=cfg, **fit, **radar_kw)
            if maxf:
                x, mask = x[:maxf], mask[:maxf]
        elif any(is_image_file(n) for n in names):
            stacks = [n for n in names if is_image_file(n) and (p / n).is_file() and frame_count(p / n) > 1]
            if stacks:
                raise DataError(p, f"holds {len(stacks)} image stack(s) ({', '.join(stacks[:3])}"
                                   f"{' ...' if len(stacks) > 3 else ''}): point at one")
            x = as_unit(read_frame_folder(p, channels, size, mode, time_regex=opts.get("time_regex"),
                                          time_format=opts.get("time_format"), max_frames=maxf,
                                          white=opt_float(cfg, "white", positive=True), **fit))
        elif any(is_hdf5_file(n) for n in names):
            files = sorted((p / n for n in names if is_hdf5_file(n) and (p / n).is_file()), key=lambda q: natural_key(q.name))
            x, mask = read_h5_frames(cfg, files, where=p)
        elif not [n for n in names if not n.startswith(".")]:
            raise DataError(p, "empty folder")
        else:
            vids = [n for n in names if is_video_file(n)]
            hint = f"; it holds {len(vids)} video file(s): point at one" if vids else ""
            raise DataError(p, f"no frames, radar or HDF5 files directly in the folder{hint}")
    else:
        raise DataError(p, "not a regular file or folder")

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] == 0:
        raise DataError(p, "no frames")
    if return_mask:
        if mask is None:
            mask = np.ones((x.shape[0], 1) + x.shape[2:], dtype=bool)
        return x, np.ascontiguousarray(mask, dtype=bool)
    return x


def read_by_extension(path: str | os.PathLike, cfg: DataConfig, last: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, Grid | None]:
    """``(frames, mask, grid)`` of a forecast's input read by its extension (:func:`read_input_frames`)
    with the :data:`READ_KEYS` of the model's data config ``cfg``: ``resize: none`` keeps the
    native size (the card's frame size is the data's true size), ``crop`` takes the central window,
    ``resize`` scales to ``cfg.size``; only the ``last`` frames are read where the format allows.
    ``grid``: a folder of radar composites read at its own grid has its coordinates
    (:func:`~transmem.data.radar.composite_grid`), anything else None."""
    extra = cfg.extra or {}
    opts = {k: extra[k] for k in READ_KEYS if k in extra}
    if "r_max" in opts:
        opts["r_max"] = float(opts["r_max"])
    if last:
        opts["last"] = int(last)
    frames, mask = read_input_frames(path, channels=cfg.channels, size=None if cfg.resize == "none" else cfg.size,
                                     return_mask=True, resize=cfg.resize, **opts)
    return frames, mask, composite_grid(Path(path).expanduser(), cfg)

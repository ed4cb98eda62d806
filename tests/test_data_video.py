"""Video files, frame folders, KTH-style trees, the clip cache and ``read_input_frames``."""
from __future__ import annotations

import json
import os
import random
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transmem.data import DataConfig, DataError, build_datasets
from transmem.data import video as video_mod
from transmem.data.clips import cache_key, fit_frames, split_events, to_channels
from transmem.data.frames import read_frame_folder
from transmem.data.inputs import read_input_frames
from transmem.data.video import decode_gif, decode_video, read_video

av = pytest.importorskip("av")


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def video_dir(shared_data) -> Path:
    d = shared_data / "video"
    if not d.is_dir():
        pytest.skip(f"real video clips absent ({d})")
    return d


def write_gif(path: Path, frames: np.ndarray, duration: int = 40) -> Path:
    """(T, H, W, 3) uint8 -> animated GIF (palette per frame)."""
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=duration, loop=0)
    return path


def write_mp4(path: Path, frames: np.ndarray, codec: str = "mpeg4") -> Path:
    t, h, w = frames.shape[:3]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def ramp(t: int, h: int = 16, w: int = 20, seed: int = 0) -> np.ndarray:
    """Frames whose mean gray level grows with the frame index (order is visible)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 40, size=(h, w, 3))
    return np.stack([np.clip(base + 20 * i, 0, 255) for i in range(t)]).astype(np.uint8)


# ------------------------------------------------------------------ real video files
def test_carphone_120_frames(video_dir):
    x = read_video(video_dir / "carphone_pristine.mp4", channels=3, size=None)
    assert x.shape == (120, 3, 144, 176) and x.dtype == np.uint8
    assert x.std() > 10  # real content, not a blank decode


def test_realshort_and_gif_native(video_dir):
    x = read_video(video_dir / "realshort.mp4", channels=1, size=None, max_frames=5)
    assert x.shape == (5, 1, 240, 320)
    g = read_video(video_dir / "newtonscradle.gif", channels=3, size=None)
    assert g.shape == (36, 3, 150, 200)
    assert sum(1 for _ in decode_gif(video_dir / "newtonscradle.gif", max_frames=4)) == 4
    assert next(decode_video(video_dir / "realshort.mp4")).shape == (240, 320, 3)


def test_gray_resize_and_crop(video_dir):
    f = video_dir / "carphone_pristine.mp4"
    rgb = read_video(f, channels=3, size=None, max_frames=4).astype(np.float32)
    gray = read_video(f, channels=1, size=None, max_frames=4).astype(np.float32)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert np.abs(gray[:, 0] - luma).max() <= 1.0  # rounding of each value to uint8
    crop = read_video(f, channels=1, size=64, resize="crop", max_frames=4)
    np.testing.assert_array_equal(crop, gray[:, :, 40:104, 56:120].astype(np.uint8))
    small = read_video(f, channels=1, size=32, max_frames=4)
    assert small.shape == (4, 1, 32, 32)
    # resize = center square (144x144), then area average by 4.5: the means agree
    assert abs(small.astype(np.float32).mean() - gray[:, :, :, 16:160].mean()) < 1.0
    stretched = read_video(f, channels=1, size=32, max_frames=4, aspect="stretch")
    assert stretched.shape == (4, 1, 32, 32) and not np.array_equal(stretched, small)


def test_video_dataset_windows(video_dir, tmp_path):
    cfg = DataConfig(name="video", path=str(video_dir / "carphone_pristine.mp4"), frames=10, stride=5, size=16,
                     split=(1, 0, 0))
    ds = build_datasets(cfg)
    assert len(ds["train"]) == (120 - 10) // 5 + 1 and len(ds["val"]) == 0 and len(ds["test"]) == 0
    item = ds["train"][3]
    assert set(item) == {"frames"}
    x = item["frames"]
    assert tuple(x.shape) == (10, 1, 16, 16) and str(x.dtype) == "torch.float32"
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_allclose(ds["train"][1]["frames"][5:].numpy(), ds["train"][2]["frames"][:5].numpy())
    with pytest.raises(DataError, match=r"too few frames.*36.*frames=40"):
        build_datasets(DataConfig(name="video", path=str(video_dir / "realshort.mp4"), frames=40, size=16,
                                  split=(1, 0, 0)))
    with pytest.raises(DataError, match="only 1 sequence "):
        build_datasets(DataConfig(name="video", path=str(video_dir / "realshort.mp4"), frames=10, size=16))


# ------------------------------------------------------------------ folders, splits, cache
def test_video_folder_split_and_cache(tmp_path, monkeypatch):
    vids = tmp_path / "vids"
    vids.mkdir()
    for k in range(5):
        write_gif(vids / f"clip{k}.gif", ramp(6, seed=k))
    write_mp4(vids / "clip5.mp4", ramp(6, h=24, w=32, seed=5))
    cache = tmp_path / "cache"
    cfg = DataConfig(name="video", path=str(vids), frames=4, stride=2, size=8, split=(0.5, 0.25, 0.25),
                     cache_dir=str(cache))
    ds = build_datasets(cfg)
    ev = {k: set(v.events) for k, v in ds.items()}
    assert all(ev.values())
    assert not (ev["train"] & ev["val"]) and not (ev["train"] & ev["test"]) and not (ev["val"] & ev["test"])
    assert set().union(*ev.values()) == {f"clip{k}.{'mp4' if k == 5 else 'gif'}" for k in range(6)}
    assert sum(len(v) for v in ds.values()) == 6 * 2
    for sp, d in ds.items():  # every clip comes from its split's sequences
        assert {n for n, _ in d.clips} <= ev[sp]
    # the split is deterministic
    assert {k: v.events for k, v in build_datasets(cfg).items()} == {k: v.events for k, v in ds.items()}

    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    meta = json.loads((entry / "index.json").read_text())
    assert meta["reader"] == "video" and meta["size"] == 8 and len(meta["names"]) == 6
    assert np.load(entry / "frames.npy", mmap_mode="r").dtype == np.uint8

    def boom(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(video_mod, "decode_gif", boom)
    monkeypatch.setattr(video_mod, "decode_video", boom)
    again = build_datasets(DataConfig(**dict(cfg.to_dict(), frames=3, stride=1)))  # windowing only: cache hit
    assert isinstance(again["train"].prep.data, np.memmap)
    for sp in ds:
        a, b = ds[sp][0]["frames"].numpy(), again[sp][0]["frames"].numpy()
        np.testing.assert_array_equal(a[:3], b)
    with pytest.raises(AssertionError, match="decoded although cached"):
        build_datasets(DataConfig(**dict(cfg.to_dict(), channels=3)))
    k1, _ = cache_key(cfg, "video", [vids / "clip0.gif"])
    k2, _ = cache_key(DataConfig(**dict(cfg.to_dict(), size=9)), "video", [vids / "clip0.gif"])
    k3, _ = cache_key(DataConfig(**dict(cfg.to_dict(), extra={"aspect": "stretch"})), "video", [vids / "clip0.gif"])
    assert len({k1, k2, k3}) == 3


def test_split_events_rules():
    ev = [f"e{k}" for k in range(10)]
    s = split_events(ev, [0.8, 0.1, 0.1])
    assert [len(s[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(sum(s.values(), [])) == sorted(ev)
    s = split_events(ev[:3], [0.8, 0.1, 0.1], order="name")
    assert s == {"train": ["e0"], "val": ["e1"], "test": ["e2"]}
    assert split_events(ev[:1], [1, 0, 0])["train"] == ["e0"]
    with pytest.raises(DataError, match="only 2 events"):
        split_events(ev[:2], [0.8, 0.1, 0.1])


def test_frame_folder_time_regex_and_gaps(tmp_path):
    frames = ramp(8)
    t0 = datetime(2021, 3, 1, 12, 0)
    folder = tmp_path / "cam"
    folder.mkdir()
    order = list(range(8))
    random.Random(1).shuffle(order)
    for rank, i in enumerate(order):  # random prefixes: name order is not time order
        stamp = (t0 + timedelta(minutes=5 * i)).strftime("%Y%m%d%H%M")
        Image.fromarray(frames[i]).save(folder / f"{rank:02d}_img_{stamp}.png")
    opts = {"time_regex": r"_(\d{12})\.png$", "time_format": "%Y%m%d%H%M"}
    x = read_frame_folder(folder, channels=3, size=None, **opts)
    np.testing.assert_array_equal(x, frames.transpose(0, 3, 1, 2))
    by_name = read_frame_folder(folder, channels=3, size=None)
    assert not np.array_equal(by_name, x)
    # a gap of 10 minutes splits the folder into two sequences of one event
    os.remove(next(folder.glob(f"*_{(t0 + timedelta(minutes=15)).strftime('%Y%m%d%H%M')}.png")))
    ds = build_datasets(DataConfig(name="frames", path=str(folder), frames=3, size=8, split=(1, 0, 0),
                                   extra=dict(opts, max_gap=360)))
    assert ds["train"].clips == [("cam#0", 0), ("cam#1", 0), ("cam#1", 1)]  # frames 0-2 | 4-7
    assert ds["train"].events == ["cam"]


def test_frame_folders_natural_order_and_errors(tmp_path):
    frames = ramp(12)
    seq = tmp_path / "root" / "seqA"
    seq.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(frames[i]).convert("L").save(seq / f"f{i}.png")
    x = read_frame_folder(seq, channels=1, size=None)
    gray = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in frames])
    np.testing.assert_array_equal(x[:, 0], gray)  # f2 before f10
    ds = build_datasets(DataConfig(name="frames", path=str(tmp_path / "root"), frames=12, size=8, split=(1, 0, 0)))
    assert len(ds["train"]) == 1 and ds["train"].clips == [("seqA", 0)]
    Image.fromarray(frames[0][:8]).save(seq / "f99.png")
    with pytest.raises(DataError, match="mixed frame sizes") as ei:
        read_frame_folder(seq, size=8)
    assert "f99.png" in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        build_datasets(DataConfig(name="frames", path=str(tmp_path / "empty"), frames=2))


def test_kth_tree_grouped_by_person(tmp_path):
    root = tmp_path / "kth"
    k = 0
    for action in ("boxing", "walking"):
        (root / action).mkdir(parents=True)
        for person in ("person01", "person02", "person03"):
            write_gif(root / action / f"{person}_{action}_d1_uncomp.gif", ramp(5, seed=k))
            k += 1
    fr = root / "running" / "person04_running_d2"
    fr.mkdir(parents=True)
    for i, f in enumerate(ramp(5, h=12, w=12)):
        Image.fromarray(f).save(fr / f"{i:03d}.jpg")
    ds = build_datasets(DataConfig(name="kth", path=str(root), frames=4, size=8, split=(0.5, 0.25, 0.25)))
    ev = {sp: set(d.events) for sp, d in ds.items()}
    assert set().union(*ev.values()) == {"person01", "person02", "person03", "person04"}
    assert sum(len(e) for e in ev.values()) == 4  # each person in exactly one split
    for sp, d in ds.items():
        for name, _ in d.clips:
            assert next(p for p in ev[sp] if p in name)
    assert sum(len(d) for d in ds.values()) == 7 * 2


# ------------------------------------------------------------------ read_input_frames
def test_read_input_frames_real_video(video_dir):
    g = read_input_frames(video_dir / "newtonscradle.gif", size=32)
    assert g.shape == (36, 1, 32, 32) and 0 <= g.min() and g.max() <= 1
    v, m = read_input_frames(video_dir / "realshort.mp4", channels=3, max_frames=3, return_mask=True)
    assert v.shape == (3, 3, 240, 320) and m.shape == (3, 1, 240, 320) and m.all()


def test_read_input_frames_dispatch(tmp_path):
    a = np.random.default_rng(0).random((5, 10, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    x = read_input_frames(tmp_path / "a.npy")
    assert x.shape == (5, 1, 10, 12) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], a)
    np.save(tmp_path / "b.npy", (a[:, None].repeat(3, 1) * 255).astype(np.uint8))
    assert read_input_frames(tmp_path / "b.npy", channels=3, size=8).shape == (5, 3, 8, 8)
    write_mp4(tmp_path / "v.mp4", ramp(6, h=24, w=32))
    assert read_input_frames(tmp_path / "v.mp4", size=8).shape == (6, 1, 8, 8)
    write_gif(tmp_path / "g.gif", ramp(4))
    assert read_input_frames(tmp_path / "g.gif", channels=3).shape == (4, 3, 16, 20)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(ramp(4)):
        Image.fromarray(f).save(folder / f"{i}.png")
    assert read_input_frames(folder, size=8).shape == (4, 1, 8, 8)
    np.save(tmp_path / "nan.npy", np.full((3, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        read_input_frames(tmp_path / "nan.npy")
    (tmp_path / "x.xyz").write_bytes(b"hello")
    with pytest.raises(DataError, match="unsupported input format"):
        read_input_frames(tmp_path / "x.xyz")


def test_read_input_frames_radar_folder(shared_data):
    d = shared_data / "radar" / "mch" / "20170131"
    if not d.is_dir():
        pytest.skip(f"MeteoSwiss radar data absent ({d})")
    x, m = read_input_frames(d, size=16, return_mask=True)
    assert x.shape == (40, 1, 16, 16) and m.shape == (40, 1, 16, 16) and m.dtype == bool
    assert 0 <= x.min() and x.max() <= 1


def test_channel_and_fit_helpers():
    x = np.zeros((2, 4, 6, 3), dtype=np.float32)
    x[..., 0] = 1.0
    g = to_channels(x, 1)
    assert g.shape == (2, 1, 4, 6) and np.allclose(g, 0.299)
    assert to_channels(np.ones((2, 4, 6)), 3).shape == (2, 3, 4, 6)
    y = np.arange(2 * 1 * 6 * 8, dtype=np.float32).reshape(2, 1, 6, 8)
    assert fit_frames(y, 4, "crop").shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(fit_frames(y, 4, "crop"), y[:, :, 1:5, 2:6])
    assert fit_frames(y, None).shape == y.shape
    assert fit_frames(y, 12).shape == (2, 1, 12, 12)  # growing: bilinear
    np.testing.assert_allclose(fit_frames(y, 3, crop=[0, 0, 6, 6]), y[:, :, :6, :6].reshape(2, 1, 3, 2, 3, 2).mean((3, 5)))
    with pytest.raises(DataError, match="smaller than size"):
        fit_frames(y, 7, "crop")
    with pytest.raises(DataError, match="resize: expected one of resize, crop, none"):
        fit_frames(y, 4, "zoom")

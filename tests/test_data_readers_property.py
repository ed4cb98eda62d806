"""Property tests: malformed input reaches every reader and only ever yields a one-line DataError.

Inputs: random bytes, truncated and bit-flipped files of every supported format (synthetic ones
always; real ones from ../shared/data when present), arrays of random shapes / dtypes / NaNs,
empty folders, frames of mixed sizes, and nonsense configs.
"""
from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from transmem.data import DataConfig, DataError, build_datasets
from transmem.data.inputs import read_input_frames

av = pytest.importorskip("av")
h5py = pytest.importorskip("h5py")

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# where each kind of file goes for the dataset builders: (reader name, relative path in the root)
BUILD_AS = {
    "png": ("frames", "seq/0001.png"),
    "jpg": ("frames", "seq/0001.jpg"),
    "gif": ("video", "clip.gif"),
    "mp4": ("video", "clip.mp4"),
    "kth": ("kth", "boxing/person01_boxing_d1.mp4"),
    "fmi": ("radar_fmi", "20200101/202001011200_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz"),
    "mch": ("radar_mch", "20200101/AQC200011200F_00005.801.gif"),
    "h5": ("hdf5", "event.h5"),
    "npy": (None, "a.npy"),
}


def one_line_data_error(fn) -> str:
    """Run ``fn``: it may succeed or raise DataError with a one-line message, nothing else."""
    try:
        fn()
    except DataError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return "error"
    return "ok"


def _gif_bytes(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=40)
    return buf.getvalue()


def _synthetic_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (12, 10, 3), dtype=np.uint8) for _ in range(3)]
    out = {}
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG")
    out["png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="JPEG")
    out["jpg"] = buf.getvalue()
    out["gif"] = _gif_bytes(frames)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.mp4"
        with av.open(str(p), "w") as c:
            s = c.add_stream("mpeg4", rate=10)
            s.width, s.height, s.pix_fmt = 16, 12, "yuv420p"
            for f in frames * 2:
                for pk in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(
                        np.pad(f, ((0, 0), (0, 6), (0, 0)))), format="rgb24")):
                    c.mux(pk)
            for pk in s.encode():
                c.mux(pk)
        out["mp4"] = p.read_bytes()
        out["kth"] = out["mp4"]
        h = Path(d) / "x.h5"
        with h5py.File(h, "w") as f:
            f.create_dataset("precip", data=rng.random((3, 8, 8)).astype(np.float32))
        out["h5"] = h.read_bytes()
        n = Path(d) / "x.npy"
        np.save(n, rng.random((3, 8, 8)).astype(np.float32))
        out["npy"] = n.read_bytes()
    out["fmi"] = gzip.compress(b"P5\n# obstime 202001011200\n10 12\n255\n" + rng.integers(0, 256, 120, dtype=np.uint8).tobytes())
    pal = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), mode="P")
    pal.putpalette(list(range(256)) * 3)
    buf = io.BytesIO()
    pal.save(buf, format="GIF")
    out["mch"] = buf.getvalue()
    return out


SEEDS = _synthetic_seeds()


def _mutate(data: bytes, op: str, cut: float, flips: list[tuple[float, int]], junk: bytes) -> bytes:
    if op == "truncate":
        return data[: int(cut * len(data))]
    if op == "flip":
        b = bytearray(data)
        for pos, val in flips:
            b[int(pos * (len(b) - 1))] = val
        return bytes(b)
    if op == "junk_tail":
        return data[: int(cut * len(data))] + junk
    return junk  # random bytes


mutations = st.tuples(
    st.sampled_from(["truncate", "flip", "junk_tail", "random"]),
    st.floats(0, 1),
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.binary(max_size=300),
)


def _check_file(kind: str, data: bytes, root: Path) -> None:
    reader, rel = BUILD_AS[kind]
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if kind == "fmi":  # a second, valid frame so that the event is long enough to reach the decoder
        (path.parent / "202001011205_fmi.pgm.gz").write_bytes(SEEDS["fmi"])
    if kind == "mch":
        (path.parent / "AQC200011205F_00005.801.gif").write_bytes(SEEDS["mch"])
    target = path.parent if kind in ("fmi", "mch") else path
    one_line_data_error(lambda: read_input_frames(target, size=8))
    if reader is not None:
        cfg = DataConfig(name=reader, path=str(root if kind != "h5" else path), frames=2, size=8, split=(1, 0, 0))
        one_line_data_error(lambda: build_datasets(cfg))


@SETTINGS
@given(kind=st.sampled_from(sorted(SEEDS)), mutation=mutations)
def test_malformed_synthetic_files(kind, mutation):
    data = _mutate(SEEDS[kind], *mutation)
    with tempfile.TemporaryDirectory() as d:
        _check_file(kind, data, Path(d))


def test_unmodified_seeds_are_read():
    """The seeds themselves are valid, so the mutations above start from real formats."""
    for kind in ("png", "gif", "mp4", "fmi", "mch", "h5", "npy"):
        with tempfile.TemporaryDirectory() as d:
            reader, rel = BUILD_AS[kind]
            p = Path(d) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(SEEDS[kind])
            x = read_input_frames(p if kind not in ("fmi", "mch") else p.parent, size=8)
            assert x.ndim == 4 and x.shape[2:] == (8, 8), kind


@pytest.fixture(scope="module")
def real_heads(shared_data) -> dict[str, bytes]:
    """The first 48 KiB of real files of each format (truncation keeps the real headers)."""
    files = {
        "mp4": shared_data / "video" / "realshort.mp4",
        "gif": shared_data / "video" / "newtonscradle.gif",
        "fmi": next(iter(sorted((shared_data / "radar" / "fmi" / "pgm" / "20160928").glob("*.pgm.gz"))), None),
        "mch": next(iter(sorted((shared_data / "radar" / "mch" / "20150515").glob("*.gif"))), None),
    }
    heads = {k: p.read_bytes()[: 48 * 1024] for k, p in files.items() if p is not None and p.is_file()}
    if not heads:
        pytest.skip("no real video / radar files under the shared data folder")
    return heads


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), cut=st.floats(0, 1))
def test_truncated_real_files(real_heads, data, cut):
    kind = data.draw(st.sampled_from(sorted(real_heads)))
    head = real_heads[kind]
    with tempfile.TemporaryDirectory() as d:
        _check_file(kind, head[: int(cut * len(head))], Path(d))


# ------------------------------------------------------------------ arrays
dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_,
                          np.complex64])


@SETTINGS
@given(arr=dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5))))
def test_arrays_of_any_shape_and_dtype(arr):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.npy"
        np.save(p, arr)
        res = []

        def read():
            res.append(read_input_frames(p, channels=1))
        if one_line_data_error(read) == "ok":
            x = res[0]
            assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 1
            assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
        h = Path(d) / "a.h5"
        with h5py.File(h, "w") as f:
            f.create_dataset("x", data=arr)
        for extra in ({}, {"dataset": "/x", "nodata": 0, "scale": 0.5}):
            cfg = DataConfig(name="hdf5", path=str(h), frames=2, size=4, split=(1, 0, 0), extra=extra)
            one_line_data_error(lambda: build_datasets(cfg))


# ------------------------------------------------------------------ folders and configs
@SETTINGS
@given(sizes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=5),
       name=st.sampled_from(["frames", "kth"]))
def test_frame_folders_of_mixed_sizes(sizes, name):
    with tempfile.TemporaryDirectory() as d:
        seq = Path(d) / "person01_seq"
        seq.mkdir()
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.full((h, w), 10 * i, dtype=np.uint8)).save(seq / f"{i}.png")
        cfg = DataConfig(name=name, path=d, frames=min(2, len(sizes)), size=4, split=(1, 0, 0))
        outcome = one_line_data_error(lambda: build_datasets(cfg))
        assert outcome == ("ok" if len(set(sizes)) == 1 else "error")


@pytest.mark.parametrize("name", ["video", "frames", "kth", "radar_fmi", "radar_mch", "hdf5"])
def test_empty_and_missing_folders(tmp_path, name):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"\0")
    for folder in ("empty", "hidden"):
        with pytest.raises(DataError, match="empty folder") as ei:
            build_datasets(DataConfig(name=name, path=str(tmp_path / folder), frames=2))
        assert "\n" not in str(ei.value)
    with pytest.raises(DataError, match="no such file"):
        build_datasets(DataConfig(name=name, path=str(tmp_path / "missing"), frames=2))
    with pytest.raises(DataError, match="empty folder"):
        read_input_frames(tmp_path / "empty")


@pytest.fixture(scope="module")
def gif_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gifs")
    for k in range(3):
        (d / f"c{k}.gif").write_bytes(_gif_bytes([np.full((6, 5, 3), 40 * i + k, np.uint8) for i in range(5)]))
    return d


@SETTINGS
@given(frames=st.integers(-1, 6), stride=st.integers(-1, 3), size=st.sampled_from([None, -3, 0, 1, 4, 4.5, "8"]),
       channels=st.integers(0, 4), resize=st.sampled_from(["resize", "crop", "none", "zoom"]),
       split=st.lists(st.one_of(st.floats(-1, 1), st.just(float("nan"))), min_size=2, max_size=4),
       extra=st.sampled_from([{}, {"aspect": "tilt"}, {"crop": [0, 0, 99, 99]}, {"crop": "x"},
                              {"max_frames": 0}, {"splits": {"train": ["c0.gif"]}}, {"splits": ["c0.gif"]},
                              {"split_order": "random"}, {"group_regex": "("}, "notadict"]))
def test_nonsense_configs(gif_folder, frames, stride, size, channels, resize, split, extra):
    cfg = DataConfig(name="video", path=str(gif_folder), frames=frames, stride=stride, size=size, channels=channels,
                     resize=resize, split=tuple(split), extra=extra)
    one_line_data_error(lambda: build_datasets(cfg))

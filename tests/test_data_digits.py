"""MNIST IDX reader, digit pools and the flying-digits generator."""
from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from transmem.data import DataConfig, DataError, build_datasets
from transmem.data.flying_digits import FlyingDigits, digit_size_for, generate_clips
from transmem.data.mnist import (assert_disjoint, load_digit_pools, read_idx, read_mnist_images,
                                 read_mnist_labels, split_by_index)

MNIST_IMAGES_MD5 = "2646ac647ad5339dbf082846283269ea"  # decompressed file, from ../shared/data/README.md
MNIST_LABELS_MD5 = "27ae3e4e09519cfbb04c329615203637"


@pytest.fixture(scope="module")
def mnist_dir(shared_data):
    d = shared_data / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files absent from {d}")
    return d


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _assert_one_line_error(excinfo, name: str):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert name in msg


# ---------------------------------------------------------------- IDX reader
def test_mnist_reader_real_files(mnist_dir):
    img_path = mnist_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(img_path.read_bytes())
    assert hashlib.md5(raw).hexdigest() == MNIST_IMAGES_MD5
    images = read_mnist_images(img_path)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(-1), np.frombuffer(raw[16:], np.uint8))
    lab_path = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    assert hashlib.md5(gzip.decompress(lab_path.read_bytes())).hexdigest() == MNIST_LABELS_MD5
    labels = read_mnist_labels(lab_path)
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_idx_reader_plain_and_gz_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(_idx_bytes(arr, 2051))
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(arr, 2051)))
    assert np.array_equal(read_mnist_images(plain), arr)
    assert np.array_equal(read_mnist_images(gz), arr)


@pytest.mark.parametrize("case", ["missing", "truncated", "truncated_gz", "wrong_magic", "labels_as_images",
                                  "extra_bytes", "tiny"])
def test_idx_reader_bad_files(tmp_path, case):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    good = _idx_bytes(arr, 2051)
    name = f"bad-{case}-idx3-ubyte" + (".gz" if case == "truncated_gz" else "")
    p = tmp_path / name
    if case == "truncated":
        p.write_bytes(good[:-100])
    elif case == "truncated_gz":
        p.write_bytes(gzip.compress(good)[:-30])
    elif case == "wrong_magic":
        p.write_bytes(struct.pack(">I", 1234) + good[4:])
    elif case == "labels_as_images":
        p.write_bytes(_idx_bytes(np.zeros(5, np.uint8), 2049))
    elif case == "extra_bytes":
        p.write_bytes(good + b"\0" * 10)
    elif case == "tiny":
        p.write_bytes(b"\0\0")
    with pytest.raises(DataError) as e:
        read_mnist_images(p)
    _assert_one_line_error(e, name)


def test_label_reader_rejects_image_file(tmp_path):
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(_idx_bytes(np.zeros((2, 28, 28), np.uint8), 2051))
    with pytest.raises(DataError) as e:
        read_mnist_labels(p)
    _assert_one_line_error(e, p.name)
    with pytest.raises(DataError):
        read_idx(tmp_path / "nothing-here")


def test_mnist_dir_without_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_digit_pools(tmp_path)
    _assert_one_line_error(e, tmp_path.name)


# ---------------------------------------------------------------- digit pools
def test_builtin_pools_disjoint_and_varied():
    pools = load_digit_pools()
    assert set(pools) == {"train", "val", "test"}
    for p in pools.values():
        assert p.dtype == np.uint8 and p.shape[1:] == (28, 28) and len(p) >= 500
        assert not p.flags.writeable
    assert len(pools["train"]) >= 2000
    assert_disjoint(pools)
    train = pools["train"]
    assert len({im.tobytes() for im in train}) == len(train)  # all samples differ
    lit = (train > 0).mean(axis=(1, 2))
    assert 0.05 < lit.mean() < 0.4 and lit.min() > 0.02  # digits, not blank or solid
    assert train.max() == 255 or train.max() > 200
    assert load_digit_pools() is pools  # cached


def test_mnist_pools_split_by_index(mnist_dir):
    pools = load_digit_pools(mnist_dir)
    assert {k: len(v) for k, v in pools.items()} == {"train": 8000, "val": 1000, "test": 1000}
    images = read_mnist_images(mnist_dir / "t10k-images-idx3-ubyte.gz")
    s = split_by_index(len(images))
    for k in pools:
        assert np.array_equal(pools[k], images[s[k]])
    assert_disjoint(pools)


# ---------------------------------------------------------------- generator
def test_generator_shape_range_determinism():
    a = generate_clips(2, 8, "train", size=64, frames=12, seed=3)
    assert a.shape == (8, 12, 64, 64) and a.dtype == np.uint8
    assert a.max() > 200 and a.min() == 0
    b = generate_clips(2, 8, "train", size=64, frames=12, seed=3)
    assert a.tobytes() == b.tobytes()
    c = generate_clips(2, 8, "train", size=64, frames=12, seed=4)
    assert not np.array_equal(a, c)
    v = generate_clips(2, 8, "val", size=64, frames=12, seed=3)
    assert not np.array_equal(a, v)
    # clip i is a function of its index alone: lazily generated slices match the bulk result
    assert np.array_equal(generate_clips(2, 3, "train", size=64, frames=12, seed=3, start=4), a[4:7])
    # fewer frames = the same trajectories, cut
    assert np.array_equal(generate_clips(2, 8, "train", size=64, frames=5, seed=3), a[:, :5])


def test_generator_motion_and_digit_count():
    one = generate_clips(1, 64, "test", size=64, frames=10, seed=1)
    three = generate_clips(3, 64, "test", size=64, frames=10, seed=1)
    assert (three > 0).mean() > 1.8 * (one > 0).mean()
    # the digits move: consecutive frames differ in most clips
    moved = (one[:, 1:] != one[:, :-1]).any(axis=(2, 3)).mean()
    assert moved > 0.9
    # a single digit keeps its pixels (it is pasted, never clipped by the walls)
    mass = one.reshape(64, 10, -1).astype(np.int64).sum(-1)
    assert (mass == mass[:, :1]).all()


def test_generator_small_canvas():
    assert digit_size_for(64) == 28 and digit_size_for(128) == 28 and digit_size_for(32) == 14
    a = generate_clips(2, 4, "train", size=32, frames=6, seed=0)
    assert a.shape == (4, 6, 32, 32) and a.max() > 100


def test_generator_bad_args():
    for kwargs in ({"num_digits": 0}, {"split": "dev"}, {"frames": 0}, {"size": 2}):
        args = {"num_digits": 2, "num_clips": 2, "split": "train", **kwargs}
        with pytest.raises(DataError) as e:
            generate_clips(**args)
        assert "\n" not in str(e.value)


def test_registered_builder_and_dataset():
    cfg = DataConfig(name="flying_digits", num_digits=2, size=32, frames=6, seed=5,
                     train_clips=6, val_clips=3, test_clips=2)
    ds = build_datasets(cfg)
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "val": 3, "test": 2}
    item = ds["train"][0]
    x = item["frames"]
    assert x.dtype == torch.float32 and x.shape == (6, 1, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    direct = FlyingDigits(2, 6, "train", 32, 6, 5)
    assert torch.equal(direct[3]["frames"], ds["train"][3]["frames"])


def test_generator_real_mnist(mnist_dir):
    a = generate_clips(2, 4, "val", size=64, frames=5, seed=0, mnist_dir=mnist_dir)
    b = generate_clips(2, 4, "val", size=64, frames=5, seed=0)
    assert a.shape == b.shape and not np.array_equal(a, b)

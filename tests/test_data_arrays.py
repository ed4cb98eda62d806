"""Readers of Moving MNIST .npy and PredRNN .npz arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transmem.data import DataConfig, DataError, build_datasets


def _moving_mnist_like(T=20, N=10, H=16, W=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (T, N, H, W), dtype=np.uint8)


def _predrnn_arrays(n=6, t_in=4, t_out=4, C=1, H=8, W=8, dtype=np.float32, seed=0):
    L = t_in + t_out
    clips = np.zeros((2, n, 2), dtype=np.int32)
    clips[0, :, 0] = np.arange(n) * L
    clips[0, :, 1] = t_in
    clips[1, :, 0] = np.arange(n) * L + t_in
    clips[1, :, 1] = t_out
    raw = np.random.default_rng(seed).random((n * L, C, H, W))
    raw = (raw * 255).astype(np.uint8) if dtype == np.uint8 else raw.astype(dtype)
    return {"clips": clips, "dims": np.array([[C, H, W]], dtype=np.int32), "input_raw_data": raw}


def _assert_one_line(excinfo, name):
    msg = str(excinfo.value)
    assert "\n" not in msg and name in msg, msg


# ---------------------------------------------------------------- npy
def test_npy_reader_splits_values_memmap(tmp_path):
    arr = _moving_mnist_like()
    p = tmp_path / "mnist_test_seq.npy"
    np.save(p, arr)
    ds = build_datasets(DataConfig(name="npy", path=str(p), frames=20, size=16, split=(0.6, 0.2, 0.2)))
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "val": 2, "test": 2}
    assert isinstance(ds["train"].array, np.memmap)
    x = ds["val"][1]["frames"]  # sequence 7
    assert x.dtype == torch.float32 and x.shape == (20, 1, 16, 16)
    assert torch.allclose(x[:, 0], torch.from_numpy(arr[:, 7].astype(np.float32) / 255))


def test_npy_windows_and_resize(tmp_path):
    arr = _moving_mnist_like(T=12, N=4, H=16, W=16)
    p = tmp_path / "seq.npy"
    np.save(p, arr)
    ds = build_datasets(DataConfig(name="npy", path=str(p), frames=10, stride=1, size=8, split=(0.5, 0.25, 0.25)))
    assert len(ds["train"]) == 2 * 3  # 2 sequences x 3 windows
    x = ds["train"][1]["frames"]  # sequence 0, frames 1..10
    assert x.shape == (10, 1, 8, 8)
    ref = arr[1:11, 0].astype(np.float32).reshape(10, 8, 2, 8, 2).mean((2, 4)) / 255
    assert np.allclose(x[:, 0].numpy(), ref, atol=1e-5)
    crop = build_datasets(DataConfig(name="npy", path=str(p), frames=12, size=8, resize="crop",
                                     split=(0.5, 0.25, 0.25)))
    assert torch.allclose(crop["test"][0]["frames"][:, 0], torch.from_numpy(arr[:, 3, 4:12, 4:12] / 255).float())


def test_npy_other_layout_and_float(tmp_path):
    arr = np.random.default_rng(1).random((5, 6, 8, 8)).astype(np.float32)  # N, T, H, W
    p = tmp_path / "nthw.npy"
    np.save(p, arr)
    ds = build_datasets(DataConfig(name="npy", path=str(p), frames=6, size=8, extra={"layout": "NTHW"},
                                   split=(0.6, 0.2, 0.2)))
    assert np.allclose(ds["test"][0]["frames"][:, 0].numpy(), arr[4])


# ---------------------------------------------------------------- npz
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader(tmp_path, compressed):
    d = _predrnn_arrays(n=10, dtype=np.float32)
    p = tmp_path / "moving-mnist-train.npz"
    (np.savez_compressed if compressed else np.savez)(p, **d)
    ds = build_datasets(DataConfig(name="npz", path=str(p), frames=8, size=8, split=(0.8, 0.1, 0.1)))
    assert {k: len(v) for k, v in ds.items()} == {"train": 8, "val": 1, "test": 1}
    assert isinstance(ds["train"].array, np.memmap) != compressed
    x = ds["test"][0]["frames"]
    assert x.shape == (8, 1, 8, 8)
    assert np.allclose(x.numpy(), d["input_raw_data"][72:80])


def test_npz_uint8_rgb_to_gray(tmp_path):
    d = _predrnn_arrays(n=4, C=3, dtype=np.uint8)
    p = tmp_path / "rgb.npz"
    np.savez(p, **d)
    ds = build_datasets(DataConfig(name="npz", path=str(p), frames=6, size=8, channels=1, split=(0.5, 0.25, 0.25)))
    x = ds["train"][1]["frames"]
    assert x.shape == (6, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    ds3 = build_datasets(DataConfig(name="npz", path=str(p), frames=6, size=8, channels=3, split=(0.5, 0.25, 0.25)))
    assert torch.allclose(ds3["train"][3]["frames"], torch.from_numpy(d["input_raw_data"][8:14] / 255).float())  # seq 1


def test_pickled_dataset_reopens_memmap(tmp_path):
    import pickle
    p = tmp_path / "seq.npy"
    np.save(p, _moving_mnist_like(T=10, N=4, H=8, W=8))
    ds = build_datasets(DataConfig(name="npy", path=str(p), frames=10, size=8, split=(0.5, 0.25, 0.25)))["train"]
    blob = pickle.dumps(ds)
    assert len(blob) < 4 * 10 * 8 * 8  # the data is not in the pickle
    assert torch.equal(pickle.loads(blob)[1]["frames"], ds[1]["frames"])


# ---------------------------------------------------------------- bad input
def _bad_npy(tmp_path, case):
    name = f"bad_{case}.npy"
    p = tmp_path / name
    kw = {"frames": 10, "size": 8}
    if case == "missing":
        pass
    elif case == "not_npy":
        p.write_bytes(b"this is not an array")
    elif case == "npz_as_npy":
        np.savez(tmp_path / "x.npz", a=np.zeros(3))
        (tmp_path / "x.npz").rename(p)
    elif case == "ndim":
        np.save(p, np.zeros((10, 8, 8), np.uint8))
    elif case == "dtype":
        np.save(p, np.zeros((10, 4, 8, 8), np.int64))
    elif case == "float_range":
        np.save(p, np.full((10, 4, 8, 8), 2.0, np.float32))
    elif case == "nan":
        a = np.zeros((10, 4, 8, 8), np.float32)
        a[3, 1, 2, 2] = np.nan
        np.save(p, a)
    elif case == "few_frames":
        np.save(p, np.zeros((5, 4, 8, 8), np.uint8))
    elif case == "layout":
        np.save(p, np.zeros((10, 4, 8, 8), np.uint8))
        kw["extra"] = {"layout": "XYZW"}
    elif case == "object":
        np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "too_few_sequences":
        np.save(p, np.zeros((10, 2, 8, 8), np.uint8))
    return name, DataConfig(name="npy", path=str(p), **kw)


@pytest.mark.parametrize("case", ["missing", "not_npy", "npz_as_npy", "ndim", "dtype", "float_range", "nan",
                                  "few_frames", "layout", "object", "too_few_sequences"])
def test_npy_bad_input(tmp_path, case):
    name, cfg = _bad_npy(tmp_path, case)
    with pytest.raises(DataError) as e:
        build_datasets(cfg)
    _assert_one_line(e, name)


@pytest.mark.parametrize("case", ["missing", "not_zip", "missing_keys", "clips_shape", "clips_dtype", "dims_shape",
                                  "dims_mismatch", "clips_gap", "clips_overflow", "raw_ndim", "raw_dtype",
                                  "float_range", "few_frames"])
def test_npz_bad_input(tmp_path, case):
    name = f"bad_{case}.npz"
    p = tmp_path / name
    d = _predrnn_arrays(n=6)
    frames = 8
    if case == "missing":
        pass
    elif case == "not_zip":
        p.write_bytes(b"PK but not really a zip")
    else:
        if case == "missing_keys":
            del d["dims"]
        elif case == "clips_shape":
            d["clips"] = d["clips"][0]
        elif case == "clips_dtype":
            d["clips"] = d["clips"].astype(np.float32)
        elif case == "dims_shape":
            d["dims"] = d["dims"][0]
        elif case == "dims_mismatch":
            d["dims"] = np.array([[1, 16, 16]])
        elif case == "clips_gap":
            d["clips"][1, 2, 0] += 1
        elif case == "clips_overflow":
            d["clips"][1, 5, 1] = 100
        elif case == "raw_ndim":
            d["input_raw_data"] = d["input_raw_data"][:, 0]
        elif case == "raw_dtype":
            d["input_raw_data"] = d["input_raw_data"].astype(np.int16)
        elif case == "float_range":
            d["input_raw_data"] = d["input_raw_data"] * 255
        elif case == "few_frames":
            frames = 9
        np.savez(p, **d)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="npz", path=str(p), frames=frames, size=8))
    _assert_one_line(e, name)


def test_missing_path_in_config():
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name="npy", path=None))
    assert "path" in str(e.value)


def test_reader_with_a_missing_optional_dependency_is_named_not_skipped(monkeypatch):
    import importlib

    from transmem.data import DataConfig, DataError, build_datasets
    from transmem.data import registry

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "transmem.data.video":
            raise ModuleNotFoundError("No module named 'av'", name="av")
        if name == "transmem.data.frames":
            raise ModuleNotFoundError("No module named 'numpyx'", name="numpyx")
        return real(name, *a, **k)

    registry.list_datasets()  # every reader registered first
    monkeypatch.setattr(registry, "_NOT_LOADED", {})
    monkeypatch.setattr(registry, "_SCANNED", False)  # the scan runs once per process: again here
    monkeypatch.delitem(registry._DATASETS, "video")
    monkeypatch.setattr(registry.importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError):  # a missing dependency that is not an extra is an error
        registry.list_datasets()
    monkeypatch.setattr(registry.importlib, "import_module",
                        lambda name, *a, **k: real(name, *a, **k) if name != "transmem.data.video" else fake(name))
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(name="video", path="x.mp4"))
    msg = str(err.value)
    assert "video" in msg and "needs av" in msg and "transmem[video]" in msg and "\n" not in msg

"""MNIST IDX files and the digit pools that flying digits are drawn from.

Two sources of 28×28 uint8 digits:

* **real MNIST** (``mnist_dir``): the IDX image files ``train-images-idx3-ubyte`` and/or
  ``t10k-images-idx3-ubyte`` (gzip-compressed ``.gz`` or plain). Nothing is ever downloaded.
* **built-in glyphs** (no ``mnist_dir``): the digits 0–9 drawn procedurally from a small
  hand-made stroke font, each sample with its own random jitter, affine warp and stroke width.
  These are rendered glyphs, not handwriting; they need no file and no network.

Either way :func:`load_digit_pools` returns disjoint ``train`` / ``val`` / ``test`` pools.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# Real MNIST: images of all files found, in this order, concatenated, then split by index.
MNIST_IMAGE_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test, contiguous by index
SPLITS = ("train", "val", "test")

# Built-in glyphs: pool sizes and one generation seed per split (so the pools never share a sample).
BUILTIN_POOL_SIZES = {"train": 6000, "val": 1000, "test": 1000}
BUILTIN_SEEDS = {"train": 1_000_003, "val": 2_000_029, "test": 3_000_017}


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt gzip stream
        raise DataError(path, f"cannot read ({type(e).__name__}: {e})") from None


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) into a read-only uint8 array.

    Header: big-endian magic ``0x0000 08 ndim`` then ``ndim`` big-endian uint32 sizes, then the
    payload. Raises :class:`DataError` naming the file when it is missing, truncated, longer than
    its header says, or has a wrong magic number.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(path, f"truncated: {len(raw)} bytes, no IDX header")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DataError(path, f"wrong magic number {magic} (expected {expected_magic}); not an IDX file of this kind")
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08:
        raise DataError(path, f"wrong magic number {magic}; only unsigned-byte IDX files are supported")
    ndim = magic & 0xFF
    if ndim == 0:
        raise DataError(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(path, f"truncated: {len(raw)} bytes, header needs {header_len}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(shape)
    got = len(raw) - header_len
    if got < expected:
        raise DataError(path, f"truncated: header says {shape} = {expected} bytes of data, file has {got}")
    if got > expected:
        raise DataError(path, f"{got - expected} unexpected bytes after the {shape} data the header declares")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def read_mnist_images(path: str | os.PathLike) -> np.ndarray:
    """Images of an IDX3 file (magic 2051) as uint8 ``(n, rows, cols)``."""
    arr = read_idx(path, IMAGES_MAGIC)
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(path, f"empty image array of shape {arr.shape}")
    return arr


def read_mnist_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels of an IDX1 file (magic 2049) as uint8 ``(n,)``."""
    arr = read_idx(path, LABELS_MAGIC)
    if arr.size and arr.max() > 9:
        raise DataError(path, f"label {int(arr.max())} out of range 0..9")
    return arr


def find_mnist_image_files(mnist_dir: str | os.PathLike) -> list[Path]:
    """The MNIST image files present in ``mnist_dir`` (train first, then t10k)."""
    d = Path(mnist_dir)
    if not d.is_dir():
        raise DataError(d, "MNIST folder not found")
    found = []
    for stem in MNIST_IMAGE_FILES:
        dotted = stem.replace("-idx3", ".idx3")  # some mirrors write train-images.idx3-ubyte
        for name in (stem + ".gz", stem, dotted + ".gz", dotted):
            if (d / name).is_file():
                found.append(d / name)
                break
    if not found:
        raise DataError(d, f"no MNIST image file ({' or '.join(s + '[.gz]' for s in MNIST_IMAGE_FILES)})")
    return found


def split_by_index(n: int, fractions=SPLIT_FRACTIONS) -> dict[str, slice]:
    """Contiguous train / val / test slices of ``range(n)``: the first 80 %, the next 10 %, the rest."""
    n_train = int(n * fractions[0])
    n_val = int(n * fractions[1])
    return {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}


@functools.lru_cache(maxsize=4)
def _mnist_pools(mnist_dir: str) -> dict[str, np.ndarray]:
    files = find_mnist_image_files(mnist_dir)
    images = []
    for f in files:
        arr = read_mnist_images(f)
        if arr.shape[1:] != (28, 28):
            raise DataError(f, f"expected 28x28 digits, got {arr.shape[1]}x{arr.shape[2]}")
        images.append(arr)
    allimg = np.concatenate(images) if len(images) > 1 else images[0]
    if len(allimg) < 10:
        raise DataError(files[0], f"only {len(allimg)} images; need at least 10 to split into pools")
    pools = {k: _readonly(allimg[s].copy()) for k, s in split_by_index(len(allimg)).items()}
    return pools


# --------------------------------------------------------------------------------------------
# Built-in digit source: a stroke font, rasterised with per-sample variation
# --------------------------------------------------------------------------------------------
def _arc(cx, cy, rx, ry, a0, a1, n=12):
    """Points of an elliptic arc (degrees, y down: 0 = right, 90 = down, 270 = up)."""
    a = np.deg2rad(np.linspace(a0, a1, n + 1))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def _poly(*pts):
    return np.asarray(pts, dtype=np.float64)


def _glyph_strokes() -> dict[int, list[np.ndarray]]:
    """Each digit as a list of polylines in a box x in [0, 1], y in [0, 1] (y down)."""
    return {
        0: [_arc(0.5, 0.5, 0.3, 0.46, 0, 360, 16)],
        1: [_poly((0.34, 0.22), (0.52, 0.04), (0.52, 0.96))],
        2: [np.concatenate([_arc(0.5, 0.3, 0.27, 0.25, 195, 380, 10), _poly((0.22, 0.95), (0.82, 0.95))])],
        3: [_arc(0.47, 0.28, 0.25, 0.23, 200, 450, 10), _arc(0.47, 0.73, 0.29, 0.23, 270, 520, 10)],
        4: [_poly((0.66, 0.96), (0.66, 0.04), (0.16, 0.68), (0.86, 0.68))],
        5: [np.concatenate([_poly((0.78, 0.05), (0.33, 0.05), (0.28, 0.45)),
                            _arc(0.5, 0.68, 0.28, 0.27, 215, 520, 11)])],
        6: [_arc(0.72, 0.62, 0.46, 0.58, 265, 180, 6), _arc(0.5, 0.72, 0.25, 0.23, 180, 540, 12)],
        7: [_poly((0.18, 0.05), (0.82, 0.05), (0.42, 0.96))],
        8: [_arc(0.5, 0.27, 0.22, 0.22, 90, 450, 12), _arc(0.5, 0.72, 0.27, 0.23, 270, 630, 12)],
        9: [_arc(0.5, 0.29, 0.26, 0.24, 0, 360, 12), _poly((0.76, 0.29), (0.72, 0.62), (0.62, 0.96))],
    }


def _segments(strokes: list[np.ndarray]) -> np.ndarray:
    """Polylines -> array of segments (S, 2 endpoints, 2 coords)."""
    return np.concatenate([np.stack([p[:-1], p[1:]], 1) for p in strokes])


def _render_class(segs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``n`` varied samples of one glyph given as segments (S, 2, 2). Returns uint8 (n, 28, 28)."""
    S = segs.shape[0]
    pts = segs.reshape(1, S * 2, 2).repeat(n, 0) - 0.5  # centred glyph box
    # Smooth random warp (a low-frequency sinusoid per axis) plus a little per-point noise; the
    # noise is shared by coincident endpoints so that strokes stay connected.
    k = rng.normal(0.0, 3.0, size=(n, 2, 2))  # wave vectors, one per axis
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 2))
    amp = rng.uniform(0.0, 0.05, size=(n, 1, 2))
    pts = pts + amp * np.sin(np.einsum("npj,nij->npi", pts, k) + phase)
    uniq, inv = np.unique(np.round(pts[0], 6), axis=0, return_inverse=True)
    pts = pts + rng.normal(0.0, 0.01, size=(n, len(uniq), 2))[:, inv.reshape(-1)]
    # Per-sample affine: rotation, anisotropic scale, shear.
    rot = np.deg2rad(rng.uniform(-15, 15, n))
    sx = rng.uniform(0.7, 1.15, n)
    sy = rng.uniform(0.85, 1.1, n)
    shear = rng.uniform(-0.35, 0.25, n)  # handwriting leans right more often
    c, s = np.cos(rot), np.sin(rot)
    A = np.empty((n, 2, 2))
    # M = R @ Shear @ Scale ; x' = M x
    A[:, 0, 0] = c * sx - s * 0
    A[:, 0, 1] = (c * shear - s) * sy
    A[:, 1, 0] = s * sx
    A[:, 1, 1] = (s * shear + c) * sy
    pts = np.einsum("nij,npj->npi", A, pts)
    # Fit the glyph's height to ~18..21 px like MNIST's 20 px box, centre its bounding box at (14, 14).
    lo, hi = pts.min(1), pts.max(1)
    extent = np.maximum((hi - lo).max(1), 1e-6)
    px = rng.uniform(17.0, 21.0, n) / extent
    pts = (pts - ((lo + hi) / 2)[:, None]) * px[:, None, None] + 13.5 + rng.normal(0, 0.5, (n, 1, 2))
    pts = pts.reshape(n, S, 2, 2).astype(np.float32)
    half_width = rng.uniform(0.8, 1.9, n).astype(np.float32)
    # Distance from every pixel centre to the nearest segment, then a soft-edged stroke.
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    px_, py_ = xx.reshape(1, -1), yy.reshape(1, -1)  # (1, 784)
    best = np.full((n, 784), np.inf, dtype=np.float32)
    apx, apy, t, tmp = (np.empty((n, 784), dtype=np.float32) for _ in range(4))
    for j in range(S):
        ax, ay = pts[:, j, 0, 0:1], pts[:, j, 0, 1:2]  # (n, 1)
        dx, dy = pts[:, j, 1, 0:1] - ax, pts[:, j, 1, 1:2] - ay
        inv = 1.0 / np.maximum(dx * dx + dy * dy, 1e-9)
        np.subtract(px_, ax, out=apx)
        np.subtract(py_, ay, out=apy)
        np.multiply(apx, dx * inv, out=t)
        t += apy * (dy * inv)
        np.clip(t, 0.0, 1.0, out=t)
        apx -= t * dx
        apy -= t * dy
        np.multiply(apx, apx, out=tmp)
        tmp += apy * apy
        np.minimum(best, tmp, out=best)
    dist = np.sqrt(best)
    val = np.clip(half_width[:, None] + 0.5 - dist, 0.0, 1.0)
    peak = rng.uniform(0.85, 1.0, n).astype(np.float32)[:, None]
    return np.round(val * peak * 255.0).astype(np.uint8).reshape(n, 28, 28)


def render_builtin_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` procedurally rendered 28×28 digit glyphs (uint8) and their labels, deterministic in ``seed``.

    Labels cycle 0..9 (so classes are balanced); each sample has its own point jitter, rotation
    (±15°), scale, shear, stroke width and position.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    out = np.empty((n, 28, 28), dtype=np.uint8)
    strokes = _glyph_strokes()
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        if len(idx):
            out[idx] = _render_class(_segments(strokes[digit]), len(idx), rng)
    # Shuffle so that consecutive samples are not in label order.
    perm = rng.permutation(n)
    return out[perm], labels[perm].astype(np.uint8)


def _hashes(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images]


@functools.lru_cache(maxsize=1)
def _builtin_pools() -> dict[str, np.ndarray]:
    pools, seen = {}, set()
    for split in SPLITS:
        imgs, _ = render_builtin_digits(BUILTIN_POOL_SIZES[split], BUILTIN_SEEDS[split])
        h = _hashes(imgs)
        keep = np.array([x not in seen for x in h], dtype=bool)  # drop any exact repeat of an earlier pool
        seen.update(h)
        pools[split] = _readonly(imgs[keep])
    assert_disjoint(pools)
    return pools


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def assert_disjoint(pools: dict[str, np.ndarray]) -> None:
    """Raise ``AssertionError`` if two pools share an identical image."""
    hashed = {k: set(_hashes(v)) for k, v in pools.items()}
    names = list(hashed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = hashed[a] & hashed[b]
            if common:
                raise AssertionError(f"digit pools '{a}' and '{b}' share {len(common)} identical images")


def load_digit_pools(mnist_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Disjoint digit pools ``{"train", "val", "test"}``, each uint8 ``(n, 28, 28)``, read-only.

    With ``mnist_dir``: the MNIST image files found there (train then t10k, concatenated), split by
    index: first 80 % train, next 10 % val, last 10 % test. Without: the built-in rendered glyphs
    (6000 / 1000 / 1000, one generation seed per split). Both are cached in memory.
    """
    if mnist_dir is None:
        return _builtin_pools()
    return _mnist_pools(os.fspath(Path(mnist_dir).resolve()))

"""Tiny datasets in the official on-disk formats, for tests that must not download.

Plain functions so any test can import them: `from fakes import write_fake_cifar10`.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def write_fake_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py/` as the official python pickles: data_batch_1..5 (the
    n_train rows split across them), test_batch, batches.meta. Returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)]
    for i, n in enumerate(sizes, start=1):
        _write_cifar_batch(folder / f"data_batch_{i}", n, rng, f"training batch {i} of 5")
    _write_cifar_batch(folder / "test_batch", n_test, rng, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": max(sizes), "label_names": CIFAR10_CLASSES, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return folder


def _write_cifar_batch(path: Path, n: int, rng: np.random.Generator, label: str) -> None:
    # Row layout: 1024 red, then green, then blue values, each 32x32 row-major.
    batch = {
        "batch_label": label,
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"fake_{i}.png" for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def write_fake_mnist(
    root: Path, n_train: int, n_test: int, seed: int = 0, cls_name: str = "MNIST"
) -> Path:
    """`root/<cls_name>/raw/` with the four uncompressed IDX files torchvision reads
    (cls_name="FashionMNIST" for Fashion-MNIST). Returns that folder."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: big-endian magic (0x08 = uint8 in the third byte, ndim in the fourth), the
    dimensions as big-endian uint32, then the raw bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


# Solid colours per class, far apart, so a decoded image's class is visible in its pixels.
IMAGEFOLDER_COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]


def write_fake_imagefolder(
    root: Path,
    classes: list[str],
    n_train: int,
    n_test: int,
    name: str = "imagenet",
    seed: int = 0,
) -> Path:
    """`root/<name>/{train,val}/<class>/*.JPEG` as a local ImageNet copy is laid out (val
    already sorted into class folders): per class n_train and n_test small JPEGs of assorted
    sizes and aspect ratios, each a solid colour (IMAGEFOLDER_COLOURS, by class position in
    `classes` as given) with a little noise. Returns `root/<name>`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / name
    for split, n in (("train", n_train), ("val", n_test)):
        for k, cls in enumerate(classes):
            folder = base / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(20, 60, 2))
                colour = np.array(IMAGEFOLDER_COLOURS[k % len(IMAGEFOLDER_COLOURS)])
                pixels = colour + rng.integers(-8, 9, (h, w, 3))
                img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
                img.save(folder / f"{cls}_{split}_{i}.JPEG", quality=95)
    return base

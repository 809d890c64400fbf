"""ImageNet from a local copy in torchvision's ImageFolder layout, prepared once to uint8 .npy.

    <data.root>/imagenet/train/<wnid>/*.JPEG
    <data.root>/imagenet/val/<wnid>/*.JPEG      (validation images sorted into class folders)

The class index is torchvision's (sorted folder names). Each image is decoded once, its
shorter side resized to image_size / CROP_FRACTION and its centre image_size² kept (the
usual ImageNet evaluation transform, used for both splits so train and test images show
objects at one scale), and written as uint8 (N, 3, S, S) rows into a memory-mapped .npy,
chunk by chunk: the whole set (about 190 GB at 224 px) is never in memory. Training reads it
back through `memmap.MemmapImages`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data.files import META, sha256_file
from sgdnoise.data.memmap import LAYOUT, npy_record
from sgdnoise.data.sources import channel_stats_from_counts, identity, normalization
from sgdnoise.paths import resolve_under_root

# Dataset name -> its folder under data.root.
FOLDERS = {"imagenet": "imagenet"}
# Resize the shorter side to image_size / 0.875 (256 for 224) before the centre crop.
CROP_FRACTION = 0.875
DEFAULT_IMAGE_SIZE = 224  # data.image_size: null
# Images decoded per chunk: bounds memory (chunk × 3 × S² bytes) and sets the write size.
CHUNK = 512
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class Scan:
    """What an ImageFolder copy holds: class names (index = position) and (path, class) lists."""

    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def scan(cfg: DataConfig, root: Path | None = None) -> Scan:
    """List the files of `cfg.name` under data.root. Raises ConfigError when the layout is
    not there; nothing is written."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    name = cfg.name
    base = resolve_under_root(cfg.root, root) / FOLDERS[name]
    layout = (
        f"torchvision's ImageFolder layout: {base}/train/<wnid>/*.JPEG and "
        f"{base}/val/<wnid>/*.JPEG, val sorted into the same class folders"
    )
    if cfg.download:
        raise ConfigError(
            "data.download", f"{name} cannot be downloaded (its licence needs a manual one)",
            f"false, with a local copy in {layout}",
        )  # fmt: skip
    train_dir, val_dir = base / "train", base / "val"
    try:
        train = ImageFolder(str(train_dir), loader=_no_loader)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(
            "data.root", f"{name} files not found under {train_dir} ({_first_line(e)})", layout
        ) from None
    if not val_dir.is_dir():
        raise ConfigError("data.root", f"{name} has no {val_dir}", layout)
    val_classes = {e.name for e in os.scandir(val_dir) if e.is_dir()}
    if not val_classes:
        raise ConfigError(
            "data.root",
            f"{val_dir} is not sorted into class folders (move each image into val/<wnid>/, "
            "e.g. with the ILSVRC2012 validation labels)",
            layout,
        )
    unknown = sorted(val_classes - set(train.class_to_idx))
    if unknown:
        raise ConfigError(
            "data.root",
            f"{val_dir} has class folders that train/ lacks ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''})",
            layout,
        )
    # Validation samples under the training class index; a class may have no validation image.
    test = ImageFolder.make_dataset(
        str(val_dir), train.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
    )
    if not test:
        raise ConfigError("data.root", f"{name} has no images under {val_dir}/<wnid>/", layout)
    return Scan(classes=list(train.classes), train=list(train.samples), test=test)


def _no_loader(path: str) -> Any:
    raise AssertionError("ImageFolder is used for its file index only")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def decode(path: str, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size): shorter side to size / CROP_FRACTION, centre crop."""
    from PIL import Image

    short = round(size / CROP_FRACTION)
    with Image.open(path) as img:
        # JPEG only: decode at the smallest power-of-two reduction that keeps both sides
        # >= `short` (several times faster on ImageNet's large photos); a no-op otherwise.
        img.draft("RGB", (short, short))
        img = img.convert("RGB")  # greyscale and CMYK files exist in ImageNet
        w, h = img.size
        # As torchvision's Resize(int): the shorter side becomes `short`, aspect kept.
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def write(folder: Path, found: Scan, cfg: DataConfig) -> None:
    """Decode every image of `found` into `folder`: {train,test}_{x,y}.npy and meta.json.

    `folder` is the hidden sibling `prepare` renames into place, so a failure here leaves
    no prepared folder behind.
    """
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    counts = np.zeros((3, 256), dtype=np.int64)
    with ThreadPoolExecutor(_workers()) as pool:  # PIL releases the GIL while decoding
        for split, samples in (("train", found.train), ("test", found.test)):
            # Channel statistics come from the training images only.
            hist = counts if split == "train" else None
            _write_images(folder / f"{split}_x.npy", samples, size, pool, hist, cfg.name, split)
            labels = np.asarray([label for _, label in samples], dtype=np.int64)
            np.save(folder / f"{split}_y.npy", labels)
    mean, std = channel_stats_from_counts(torch.from_numpy(counts))
    files = {
        f"{a}.npy": npy_record(folder / f"{a}.npy", sha256_file(folder / f"{a}.npy"))
        for a in ("train_x", "train_y", "test_x", "test_y")
    }
    meta = {
        "name": cfg.name,
        "layout": LAYOUT,
        "input_shape": [3, size, size],
        "num_classes": len(found.classes),
        "classes": found.classes,
        "n_train": len(found.train),
        "n_test": len(found.test),
        # The CIFAR recipe (pad 4, crop, flip) on the stored centre crops; see the README.
        "augment": "crop_flip",
        "normalization": normalization("load", mean, std, scale=255.0),
        "files": files,
        # One digest for the run's provenance: of the per-file digests, in name order.
        "checksum": _digest_of(files),
        "source": identity(cfg),
    }
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _workers() -> int:
    """Decoding threads: the cores this process may use, at most 8 (disk-bound beyond)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def _digest_of(files: dict[str, dict[str, Any]]) -> str:
    text = "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def _write_images(
    file: Path,
    samples: list[tuple[str, int]],
    size: int,
    pool: ThreadPoolExecutor,
    counts: np.ndarray | None,
    name: str,
    split: str,
) -> None:
    """Decode `samples` in chunks into a (N, 3, size, size) uint8 .npy; add the pixel values'
    histograms per channel to `counts` when given."""
    n = len(samples)
    out = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    t0 = last = time.monotonic()
    for lo in range(0, n, CHUNK):
        paths = [path for path, _ in samples[lo : lo + CHUNK]]
        chunk = np.stack(list(pool.map(decode, paths, [size] * len(paths))))
        out[lo : lo + len(paths)] = chunk
        if counts is not None:
            for c in range(3):
                counts[c] += np.bincount(chunk[:, c].reshape(-1), minlength=256)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            done = lo + len(paths)
            rate = done / (now - t0)
            print(
                f"prepare {name} {split}: {done:,}/{n:,} images, {rate:,.0f}/s, "
                f"about {(n - done) / rate / 60:.0f} min left",
                file=sys.stderr,
                flush=True,
            )
            last = now
    out.flush()
    del out  # closes the map before the file is hashed and renamed

"""Where each dataset's raw arrays come from, one function per dataset.

Every loader returns a `Source`: train/test tensors in the layout that is stored
(images as (N, C, H, W), labels int64) plus the facts the rest of the project needs.
Nothing here writes to data/prepared; `prepare` does that from a `Source`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdnoise.config import ConfigError, DataConfig, counts_for_identity
from sgdnoise.paths import resolve_under_root


@dataclass
class Source:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    augment: str | None
    # None: the stored tensors are used as they are. Otherwise a dict, see `normalization`.
    normalization: dict[str, Any] | None


def normalization(
    at: str, mean: list[float], std: list[float], scale: float = 1.0
) -> dict[str, Any]:
    """Per-channel normalisation record, kept in meta.json.

    at="load": the stored tensors are raw (e.g. uint8) and the loader computes
    (x / scale - mean) / std over channel dim 1. at="prepare": already applied; recorded
    so a reader knows what the stored values mean.
    """
    return {"at": at, "scale": scale, "mean": mean, "std": std}


def identity(cfg: DataConfig) -> dict[str, Any]:
    """The keys of the data config that change the data (see config.spec identity flag)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in fields(cfg)
        if counts_for_identity(f, getattr(cfg, f.name))
    }


def load_source(cfg: DataConfig, root: Path | None = None) -> Source:
    """The raw arrays of `cfg.name`. Raises ConfigError when official files are missing."""
    try:
        loader = LOADERS[cfg.name]
    except KeyError:
        raise ConfigError(
            "data.name", f"unknown dataset {cfg.name!r}", " | ".join(LOADERS)
        ) from None
    return loader(cfg, root)


def _split(n: int, train_split: float) -> int:
    return int(n * train_split)


def _labels(y: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64).clone()


def _floats(x: Any) -> torch.Tensor:
    # A compact copy: torch.save writes a view's whole underlying storage.
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()


# ---------------------------------------------------------------------------------------
# Generated / bundled datasets (always offline)


def mnist1d(cfg: DataConfig, root: Path | None = None) -> Source:
    """MNIST-1D generated locally (`get_dataset` would download the reference pickle)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = cfg.num_samples, cfg.train_split, cfg.seed
    # make_dataset reseeds the global `random` and numpy RNGs; keep the caller's streams intact.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return Source(
        train_x=_floats(d["x"]),
        train_y=_labels(d["y"]),
        test_x=_floats(d["x_test"]),
        test_y=_labels(d["y_test"]),
        input_shape=(int(d["x"].shape[1]),),
        num_classes=10,
        augment=None,
        normalization=None,  # make_dataset already centres and scales the whole set
    )


def digits(cfg: DataConfig, root: Path | None = None) -> Source:
    """scikit-learn's bundled 8x8 digits (1797 images), split after a seeded permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[:, None]  # (N, 1, 8, 8), values 0..16
    y = np.asarray(bunch.target)
    perm = np.random.default_rng(cfg.seed).permutation(len(y))
    x, y = x[perm], y[perm]
    n_train = _split(len(y), cfg.train_split)
    # One channel, so per-channel statistics are the train set's global mean/std (per-pixel
    # std would be 0 on the always-blank border pixels).
    mean, std = float(x[:n_train].mean()), float(x[:n_train].std())
    x = (x - mean) / std
    return Source(
        train_x=_floats(x[:n_train]),
        train_y=_labels(y[:n_train]),
        test_x=_floats(x[n_train:]),
        test_y=_labels(y[n_train:]),
        input_shape=(1, 8, 8),
        num_classes=10,
        augment=None,
        normalization=normalization("prepare", [mean], [std]),
    )


SYNTHETIC_DIM, SYNTHETIC_HIDDEN, SYNTHETIC_CLASSES = 20, 64, 10


def synthetic(cfg: DataConfig, root: Path | None = None) -> Source:
    """Teacher-student task: x ~ N(0, I_20), y = argmax of a fixed random 2-layer ReLU net."""
    g = torch.Generator().manual_seed(cfg.seed)
    d, h, k = SYNTHETIC_DIM, SYNTHETIC_HIDDEN, SYNTHETIC_CLASSES
    w1 = torch.randn(d, h, generator=g, dtype=torch.float64) / d**0.5
    b1 = torch.randn(h, generator=g, dtype=torch.float64) * 0.1
    w2 = torch.randn(h, k, generator=g, dtype=torch.float64) / h**0.5
    x = torch.randn(cfg.num_samples, d, generator=g, dtype=torch.float64)
    logits = torch.relu(x @ w1 + b1) @ w2
    # Centre the logits so no class dominates just through the ReLU's positive mean.
    y = (logits - logits.mean(0)).argmax(1)
    x = x.float()
    n_train = _split(cfg.num_samples, cfg.train_split)
    return Source(
        train_x=x[:n_train].clone(),
        train_y=y[:n_train].clone(),
        test_x=x[n_train:].clone(),
        test_y=y[n_train:].clone(),
        input_shape=(d,),
        num_classes=k,
        augment=None,
        normalization=None,  # already standard normal
    )


# ---------------------------------------------------------------------------------------
# torchvision datasets, read from their official on-disk formats


@cache
def _torchvision_classes() -> dict[str, type]:
    """The dataset classes, imported lazily (torchvision is slow to import)."""
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

    class AnyCopyCIFAR10(CIFAR10):
        """CIFAR-10 with existence-only file checks: the constructor's md5 check would reject
        any copy that is not byte-identical to the official archive (and the tests' fakes).
        Our sha256 over the prepared tensors is the recorded integrity check instead."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    # MNIST classes are used as they are: their folder name is the class name.
    return {"cifar10": AnyCopyCIFAR10, "mnist": MNIST, "fashion_mnist": FashionMNIST}


# Where under data.root torchvision's classes find each dataset's official files.
FILES_DIR = {
    "cifar10": "cifar-10-batches-py",
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
}


def _open(name: str, root: Path, train: bool, download: bool) -> Any:
    cls = _torchvision_classes()[name]
    try:
        return cls(str(root), train=train, download=download)
    except (RuntimeError, OSError) as e:
        if download:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                "data.download",
                f"could not download {name} into {root} ({first})",
                f"network access, or the official {name} files under data.root",
            ) from None
        raise ConfigError(
            "data.root",
            f"{name} files not found under {root} (looked in {root / FILES_DIR[name]})",
            f"a folder with the official {name} files, or data.download=true",
        ) from None


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std (in [0, 1] units) of a uint8 (N, C, H, W) tensor, from
    256-bin histograms: no float copy of the whole set, and order-independent sums."""
    counts = [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]
    return channel_stats_from_counts(torch.stack(counts))


def channel_stats_from_counts(counts: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (in [0, 1] units) from (C, 256) uint8-value histograms, which a
    streaming writer can sum chunk by chunk (see imagefolder)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(counts.shape[0]):
        counts_c = counts[c].double()
        n = counts_c.sum()
        mean = (counts_c * values).sum() / n
        var = (counts_c * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return means, stds


def _torchvision(
    name: str, cfg: DataConfig, root: Path | None, image_layout: Callable[[Any], torch.Tensor]
) -> Source:
    raw_root = resolve_under_root(cfg.root, root)
    train = _open(name, raw_root, True, cfg.download)
    test = _open(name, raw_root, False, cfg.download)
    # Whole-array conversion of `.data`/`.targets`; __getitem__ would build a PIL image each.
    train_x, test_x = image_layout(train.data), image_layout(test.data)
    mean, std = _channel_stats(train_x)
    return Source(
        train_x=train_x,
        train_y=_labels(train.targets),
        test_x=test_x,
        test_y=_labels(test.targets),
        input_shape=tuple(int(s) for s in train_x.shape[1:]),
        num_classes=len(train.classes),
        augment="crop_flip" if name == "cifar10" else None,
        # Stored as uint8 (4x smaller); normalised on the device at load time.
        normalization=normalization("load", mean, std, scale=255.0),
    )


def _hwc_to_chw(data: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data, np.uint8).transpose(0, 3, 1, 2)))


def _add_channel(data: Any) -> torch.Tensor:
    return torch.as_tensor(data, dtype=torch.uint8).unsqueeze(1).contiguous().clone()


def cifar10(cfg: DataConfig, root: Path | None = None) -> Source:
    return _torchvision("cifar10", cfg, root, _hwc_to_chw)


def mnist(cfg: DataConfig, root: Path | None = None) -> Source:
    return _torchvision("mnist", cfg, root, _add_channel)


def fashion_mnist(cfg: DataConfig, root: Path | None = None) -> Source:
    return _torchvision("fashion_mnist", cfg, root, _add_channel)


LOADERS: dict[str, Callable[[DataConfig, Path | None], Source]] = {
    "mnist1d": mnist1d,
    "digits": digits,
    "cifar10": cifar10,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "synthetic": synthetic,
}

"""Data layer: prepare/load round trips, official on-disk formats, batched augmentation."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data.augment import apply_crop_flip, crop_flip, crop_flip_params
from sgdnoise.data.prepare import prepare
from sgdnoise.data.store import ensure_prepared, load, load_prepared

from fakes import write_fake_cifar10, write_fake_mnist


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def meta_of(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def stamps(folder: Path) -> tuple[int, ...]:
    return tuple(
        p.stat().st_mtime_ns for p in (folder, folder / "tensors.pt", folder / "meta.json")
    )


# ---------------------------------------------------------------------------------------
# prepare: files, sizes, checksum, idempotence, determinism


def test_mnist1d_prepare_writes_files_with_sizes_and_checksum(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200, train_split=0.8, seed=3)
    out = prepare(cfg, root=tmp_path)

    assert out == tmp_path / "data" / "prepared" / "mnist1d"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tensors.pt"]
    meta = meta_of(out)
    assert (meta["n_train"], meta["n_test"]) == (160, 40)
    assert meta["input_shape"] == [40] and meta["num_classes"] == 10
    assert meta["augment"] is None and meta["name"] == "mnist1d"
    assert meta["checksum"] == sha256(out / "tensors.pt")
    assert meta["source"] == {"name": "mnist1d", "num_samples": 200, "train_split": 0.8, "seed": 3}

    t = torch.load(out / "tensors.pt", weights_only=True)
    assert t["train_x"].shape == (160, 40) and t["train_x"].dtype == torch.float32
    assert t["test_x"].shape == (40, 40)
    assert t["train_y"].dtype == torch.int64 and set(t["train_y"].tolist()) <= set(range(10))
    # No temporary siblings are left next to the prepared folder.
    assert [p.name for p in out.parent.iterdir()] == ["mnist1d"]


def test_second_prepare_is_a_noop_and_a_change_reprepares(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200)
    out = prepare(cfg, root=tmp_path)
    before = stamps(out)

    assert prepare(cfg, root=tmp_path) == out
    assert ensure_prepared(cfg, root=tmp_path) == out
    # data.root / data.download are not identity: changing them reuses the folder.
    assert prepare(DataConfig(name="mnist1d", num_samples=200, root="elsewhere"), tmp_path) == out
    assert stamps(out) == before

    out2 = prepare(DataConfig(name="mnist1d", num_samples=300), root=tmp_path)
    assert out2 == out
    meta = meta_of(out)
    assert (meta["n_train"], meta["n_test"], meta["source"]["num_samples"]) == (240, 60, 300)
    assert meta["checksum"] == sha256(out / "tensors.pt")
    assert [p.name for p in out.parent.iterdir()] == ["mnist1d"]


def test_corrupted_tensors_are_detected(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200)
    out = prepare(cfg, root=tmp_path)
    good = (out / "tensors.pt").read_bytes()
    (out / "tensors.pt").write_bytes(good[:-10] + b"0123456789")

    with pytest.raises(ConfigError, match="checksum") as e:
        load_prepared(out)
    assert e.value.key == "data.name"
    # prepare verifies the checksum, not only meta.source, and rewrites the folder.
    prepare(cfg, root=tmp_path)
    assert (out / "tensors.pt").read_bytes() == good


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200, seed=7)
    a = (prepare(cfg, root=tmp_path / "a") / "tensors.pt").read_bytes()
    b = (prepare(cfg, root=tmp_path / "b") / "tensors.pt").read_bytes()
    assert a == b
    other = DataConfig(name="mnist1d", num_samples=200, seed=8)
    assert (prepare(other, root=tmp_path / "c") / "tensors.pt").read_bytes() != a


def test_mnist1d_generation_leaves_global_rngs_alone(tmp_path: Path) -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    prepare(DataConfig(name="mnist1d", num_samples=200), root=tmp_path)
    assert np.random.rand() == expected


# ---------------------------------------------------------------------------------------
# bundled / generated datasets


def test_digits_loads_standardised(tmp_path: Path) -> None:
    data = load(DataConfig(name="digits", seed=1), root=tmp_path)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(data.train_x.mean().item()) < 1e-4
    assert abs(data.train_x.std(unbiased=False).item() - 1) < 1e-4
    assert set(data.train_y.tolist()) == set(range(10))
    # The split follows data.seed.
    other = load(DataConfig(name="digits", seed=2), root=tmp_path / "b")
    assert not torch.equal(other.train_y, data.train_y)


def test_synthetic_teacher_student(tmp_path: Path) -> None:
    cfg = DataConfig(name="synthetic", num_samples=500, train_split=0.8, seed=5)
    data = load(cfg, root=tmp_path)
    assert data.train_x.shape == (400, 20) and data.test_x.shape == (100, 20)
    assert data.input_shape == (20,) and data.num_classes == 10
    counts = torch.bincount(data.train_y, minlength=10)
    assert (counts > 0).sum() >= 5  # a real multi-class task, not one dominant class
    again = load(cfg, root=tmp_path / "again")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)


# ---------------------------------------------------------------------------------------
# torchvision datasets from the official on-disk formats


def test_fake_cifar10_loads_through_prepare(tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path / "data" / "raw", n_train=23, n_test=7, seed=1)
    data = load(DataConfig(name="cifar10"), root=tmp_path)  # data.root defaults to data/raw

    assert data.train_x.shape == (23, 3, 32, 32) and data.test_x.shape == (7, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.meta["augment"] == "crop_flip"
    norm = data.meta["normalization"]
    assert norm["at"] == "load" and len(norm["mean"]) == 3 and len(norm["std"]) == 3
    # Training-set statistics: each channel has mean 0 and std 1 after loading.
    flat = data.train_x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(3), atol=1e-4)

    # Layout: the first stored image is the first pickle row as (C, H, W), normalised.
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="latin1")
    raw = torch.from_numpy(first["data"][0].reshape(3, 32, 32).astype(np.float32)) / 255
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]
    assert torch.allclose(data.train_x[0], (raw - mean) / std, atol=1e-5)
    assert data.train_y[0].item() == first["labels"][0]

    # Stored compactly as uint8.
    stored = torch.load(ensure_prepared(DataConfig(name="cifar10"), tmp_path) / "tensors.pt")
    assert stored["train_x"].dtype == torch.uint8


@pytest.mark.parametrize(
    ("name", "cls_name"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_fake_mnist_formats_load_through_prepare(tmp_path: Path, name: str, cls_name: str) -> None:
    raw_dir = write_fake_mnist(tmp_path / "raw", n_train=12, n_test=5, seed=2, cls_name=cls_name)
    cfg = DataConfig(name=name, root=str(tmp_path / "raw"))  # an absolute data.root
    data = load(cfg, root=tmp_path)

    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (5, 1, 28, 28)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.meta["augment"] is None and data.meta["name"] == name
    assert abs(data.train_x.mean().item()) < 1e-5
    assert abs(data.train_x.std(unbiased=False).item() - 1) < 1e-4

    # The first image and labels are the IDX payloads (after the 16- and 8-byte headers).
    pixels = np.frombuffer((raw_dir / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    labels = np.frombuffer((raw_dir / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    norm = data.meta["normalization"]
    expected = (torch.from_numpy(pixels[:784].reshape(1, 28, 28).astype(np.float32)) / 255
                - norm["mean"][0]) / norm["std"][0]  # fmt: skip
    assert torch.allclose(data.train_x[0], expected, atol=1e-5)
    assert data.train_y.tolist() == labels.tolist()


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion_mnist"])
def test_missing_files_raise_config_error_and_write_nothing(tmp_path: Path, name: str) -> None:
    # Fashion-MNIST must not be satisfied by MNIST's folder (the folder is the class name).
    write_fake_mnist(tmp_path / "data" / "raw", 3, 2) if name == "fashion_mnist" else None
    with pytest.raises(ConfigError) as e:
        prepare(DataConfig(name=name), root=tmp_path)

    assert e.value.key == "data.root"
    assert f"{name} files not found under" in e.value.problem
    assert "data.download=true" in e.value.allowed
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    prepared = tmp_path / "data" / "prepared"
    assert not prepared.exists() or not any(p.is_dir() for p in prepared.iterdir())


def test_load_prepared_of_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no readable prepared data"):
        load_prepared(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------
# crop_flip


def reference_crop_flip(x, top, left, flip, pad):
    """One sample at a time, the obvious way."""
    out = []
    for k in range(x.shape[0]):
        padded = F.pad(x[k], (pad, pad, pad, pad))
        h, w = x.shape[2], x.shape[3]
        window = padded[:, int(top[k]) : int(top[k]) + h, int(left[k]) : int(left[k]) + w]
        out.append(window.flip(-1) if flip[k] else window)
    return torch.stack(out)


def batch(n: int = 16, c: int = 3, h: int = 8, w: int = 6) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_crop_flip_shape_and_reproducibility() -> None:
    x = batch()
    a = crop_flip(x, torch.Generator().manual_seed(1))
    b = crop_flip(x, torch.Generator().manual_seed(1))
    c = crop_flip(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_flip_matches_per_sample_reference() -> None:
    x, pad = batch(n=32), 3
    params = crop_flip_params(32, torch.Generator().manual_seed(4), pad)
    out = crop_flip(x, torch.Generator().manual_seed(4), pad=pad)
    assert torch.equal(out, reference_crop_flip(x, *params, pad))
    # Drawing for a global batch and slicing gives the same samples as the whole batch.
    sub = apply_crop_flip(x[8:16], *(p[8:16] for p in params), pad=pad)
    assert torch.equal(sub, out[8:16])


def test_crop_flip_flip_is_an_exact_mirror() -> None:
    x = batch(n=64)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=0)  # no crop: only flips
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert torch.all(mirrored ^ same)  # every sample is exactly one of the two
    assert 0 < int(mirrored.sum()) < 64


def test_crop_flip_parameters_differ_per_sample() -> None:
    top, left, flip = crop_flip_params(64, torch.Generator().manual_seed(0), pad=4)
    assert int(top.min()) >= 0 and int(top.max()) <= 8 and int(left.max()) <= 8
    assert len(set(top.tolist())) > 3 and len(set(left.tolist())) > 3
    assert 0 < int(flip.sum()) < 64
    # A pure shift shows up in the output: samples are cropped at different places.
    x = torch.arange(8 * 8, dtype=torch.float32).view(1, 1, 8, 8).expand(64, 1, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=4)
    assert len({tuple(o.flatten().tolist()) for o in out}) > 10

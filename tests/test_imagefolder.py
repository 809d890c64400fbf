"""ImageNet from a local ImageFolder copy: prepared once to uint8 .npy, read lazily."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data import imagefolder
from sgdnoise.data.memmap import MemmapImages
from sgdnoise.data.prepare import prepare
from sgdnoise.data.store import _inputs, load, load_prepared

from fakes import IMAGEFOLDER_COLOURS, write_fake_imagefolder
from helpers import cli

# Given out of order on purpose: the class index is the position in sorted folder names.
CLASSES = ["n03", "n01", "n02"]
SIZE = 16


def cfg(**kw) -> DataConfig:
    return DataConfig(name="imagenet", image_size=kw.pop("image_size", SIZE), **kw)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A project root with a fake ImageNet under data/raw (data.root's default)."""
    write_fake_imagefolder(tmp_path / "data" / "raw", CLASSES, n_train=4, n_test=2)
    return tmp_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_prepare_writes_uint8_arrays_labels_and_checksums(copy: Path) -> None:
    out = prepare(cfg(), root=copy)

    assert out == copy / "data" / "prepared" / "imagenet"
    names = ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert [p.name for p in out.parent.iterdir()] == ["imagenet"]  # no temporary siblings
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["n01", "n02", "n03"] and meta["num_classes"] == 3
    assert (meta["n_train"], meta["n_test"]) == (12, 6)
    assert meta["input_shape"] == [3, SIZE, SIZE] and meta["augment"] == "crop_flip"
    assert meta["source"]["image_size"] == SIZE and meta["source"]["name"] == "imagenet"

    train_x = np.load(out / "train_x.npy")
    assert train_x.shape == (12, 3, SIZE, SIZE) and train_x.dtype == np.uint8
    assert np.load(out / "test_x.npy").shape == (6, 3, SIZE, SIZE)
    # Labels follow torchvision's ImageFolder: sorted folders, sorted files within each.
    assert np.load(out / "train_y.npy").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.load(out / "test_y.npy").tolist() == [0, 0, 1, 1, 2, 2]
    # Channels are RGB in dim 1: each image shows its class colour (n01 was given second).
    for row, label in zip(train_x, np.load(out / "train_y.npy"), strict=True):
        colour = IMAGEFOLDER_COLOURS[CLASSES.index(meta["classes"][label])]
        assert np.allclose(row.reshape(3, -1).mean(1), colour, atol=6)

    # Every file's sha256 is recorded, and the run's checksum is a digest of them.
    for name, rec in meta["files"].items():
        assert rec["sha256"] == sha256(out / name) and rec["bytes"] == (out / name).stat().st_size
    listing = "".join(f"{n}:{meta['files'][n]['sha256']}\n" for n in sorted(meta["files"]))
    assert meta["checksum"] == hashlib.sha256(listing.encode()).hexdigest()
    norm = meta["normalization"]
    assert norm["at"] == "load" and norm["scale"] == 255.0 and len(norm["mean"]) == 3
    flat = train_x.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    assert np.allclose(norm["mean"], flat.mean(1)) and np.allclose(norm["std"], flat.std(1))


def test_each_image_is_the_usual_resize_and_centre_crop(tmp_path: Path) -> None:
    """PNG (no JPEG draft decoding): exactly torchvision's Resize(S / 0.875) + CenterCrop(S)."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, Resize

    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "raw" / "imagenet"
    images = {}
    for split in ("train", "val"):
        for w, h in ((50, 23), (21, 40)):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            (folder / split / "n0").mkdir(parents=True, exist_ok=True)
            img.save(folder / split / "n0" / f"{w}x{h}.png")
            images[split, f"{w}x{h}"] = img
    out = prepare(cfg(), root=tmp_path)

    reference = Compose([Resize(round(SIZE / 0.875)), CenterCrop(SIZE)])
    stored = np.load(out / "train_x.npy")
    for row, name in zip(stored, ("21x40", "50x23"), strict=True):  # sorted file names
        expected = np.asarray(reference(images["train", name])).transpose(2, 0, 1)
        assert np.array_equal(row, expected), name


def test_lazy_images_index_like_the_loaded_array(copy: Path) -> None:
    out = prepare(cfg(), root=copy)
    data = load_prepared(out, "cpu")
    full = np.load(out / "train_x.npy")
    norm = data.meta["normalization"]

    x = data.train_x
    assert isinstance(x, MemmapImages)
    assert len(x) == 12 and x.shape == (12, 3, SIZE, SIZE) and data.n_train == 12
    assert x.device == torch.device("cpu") and x.dtype == torch.float32
    assert data.input_shape == (3, SIZE, SIZE) and data.num_classes == 3
    # A shuffled index with a repeat, as a batch that spans two epochs can hold.
    idx = torch.tensor([7, 2, 11, 0, 2, 9, 5])
    got = x[idx]
    assert got.dtype == torch.float32 and got.shape == (7, 3, SIZE, SIZE)
    assert torch.equal(got, _inputs(torch.from_numpy(full[idx.numpy()]), norm))
    # Slices, as the evaluator takes them, and the test split.
    assert torch.equal(x[3:10], _inputs(torch.from_numpy(full[3:10]), norm))
    assert torch.equal(x[-1], _inputs(torch.from_numpy(full[-1:]), norm)[0])
    test_full = np.load(out / "test_x.npy")
    assert torch.equal(data.test_x[0:6], _inputs(torch.from_numpy(test_full), norm))
    assert data.train_y.dtype == torch.int64 and data.train_y.tolist()[:5] == [0, 0, 0, 0, 1]
    # Normalised with the training set's statistics: mean 0 and std 1 per channel.
    flat = x[0:12].transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(3), atol=1e-4)


def test_second_prepare_is_a_cheap_noop_and_damage_is_caught(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = prepare(cfg(), root=copy)
    before = stamps(out)

    # Up to date: no image decoded, no file hashed again.
    def forbidden(*args):
        raise AssertionError("an up-to-date folder must not be decoded or hashed again")

    monkeypatch.setattr(imagefolder, "decode", forbidden)
    monkeypatch.setattr(imagefolder, "sha256_file", forbidden)
    assert prepare(cfg(), root=copy) == out
    assert load(cfg(), root=copy).n_train == 12
    assert stamps(out) == before
    monkeypatch.undo()

    # A truncated array is caught at load (by its size) and replaced by prepare.
    with open(out / "train_x.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ConfigError, match="train_x.npy has 1000 bytes") as e:
        load_prepared(out)
    assert e.value.key == "data.name"
    prepare(cfg(), root=copy)
    assert load_prepared(out).train_x.shape == (12, 3, SIZE, SIZE)

    # image_size changes the data: a new folder.
    prepare(cfg(image_size=8), root=copy)
    assert load_prepared(out).train_x.shape == (12, 3, 8, 8)


def test_interrupted_prepare_leaves_no_prepared_folder(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = imagefolder.decode, []

    def failing(path: str, size: int) -> np.ndarray:
        calls.append(path)
        if len(calls) > 7:  # part of the training images are written by now
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(imagefolder, "decode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(), root=copy)
    prepared = copy / "data" / "prepared"
    assert list(prepared.iterdir()) == []  # neither the folder nor a hidden half-written one

    # Interrupting the rebuild of an existing folder leaves the previous version in place.
    monkeypatch.undo()
    out = prepare(cfg(), root=copy)
    meta = (out / "meta.json").read_text()
    calls.clear()
    monkeypatch.setattr(imagefolder, "decode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(image_size=8), root=copy)
    assert [p.name for p in prepared.iterdir()] == ["imagenet"]
    assert (out / "meta.json").read_text() == meta
    assert load_prepared(out).train_x.shape == (12, 3, SIZE, SIZE)


def test_missing_copy_is_a_config_error_naming_the_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        prepare(cfg(), root=tmp_path)
    assert e.value.key == "data.root"
    assert "imagenet files not found under" in e.value.problem
    assert str(tmp_path / "data" / "raw" / "imagenet" / "train") in e.value.problem
    assert "train/<wnid>/*.JPEG" in e.value.allowed and "val/<wnid>/*.JPEG" in e.value.allowed
    assert "\n" not in str(e.value) and e.value.__suppress_context__
    assert not (tmp_path / "data" / "prepared").exists()

    with pytest.raises(ConfigError) as e:
        prepare(cfg(download=True), root=tmp_path)
    assert e.value.key == "data.download"


def test_unsorted_val_is_a_config_error(tmp_path: Path) -> None:
    base = write_fake_imagefolder(tmp_path / "data" / "raw", CLASSES, n_train=2, n_test=1)
    # The official validation tarball: every image directly in val/.
    for image in list((base / "val").rglob("*.JPEG")):
        image.rename(base / "val" / image.name)
    for folder in (base / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(ConfigError, match="not sorted into class folders") as e:
        prepare(cfg(), root=tmp_path)
    assert e.value.key == "data.root"
    # Class folders train/ lacks would get no label.
    (base / "val" / "n09").mkdir()
    with pytest.raises(ConfigError, match="class folders that train/ lacks"):
        prepare(cfg(), root=tmp_path)
    assert not (tmp_path / "data" / "prepared").exists()


def test_cli_prepare_without_the_copy_exits_2_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text("data: {name: imagenet}\n")
    res = cli(root, "prepare")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: data.root: imagenet files not found under ")
    assert "; allowed: torchvision's ImageFolder layout: " in lines[0]
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]

    write_fake_imagefolder(root / "data" / "raw", CLASSES, n_train=1, n_test=1)
    res = cli(root, "prepare", "-P", "data.image_size=8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(root / "data" / "prepared" / "imagenet")

"""The user's own data: arrays in a file (`data.name: tensors`, `data.path`) or returned by
a callable (`data.name: mypkg.data:load`), checked and turned into a `Source` that
`prepare` writes like any built-in dataset.

The arrays are `train_x`, `test_x` (inputs, N examples first) and, for classification,
`train_y`, `test_y` (integer labels 0 .. K-1, K = data.num_classes or 1 + the largest label).
Without labels the task is reconstruction (the model maps inputs to inputs). Anything that
would make training fail later (a missing array, mismatched lengths, labels out of range,
non-finite inputs, crop_flip on non-images) is a ConfigError here, raised before anything is
written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data import USER_DATA
from sgdnoise.data.files import ARRAYS, TENSOR_FILES
from sgdnoise.data.sources import Source, normalization
from sgdnoise.paths import resolve_under_root
from sgdnoise.usercode import UserCodeError, first_line, is_import_path, load

FORMS = "train_x, test_x (inputs) and, for classification, train_y, test_y (integer labels)"


def is_user_data(name: str) -> bool:
    return name == USER_DATA or is_import_path(name)


def load_user(cfg: DataConfig, root: Path | None = None) -> Source:
    """The user's arrays for `cfg`, checked; raises ConfigError naming the key at fault."""
    if cfg.name == USER_DATA:
        assert cfg.path is not None  # config requires it
        key, where, arrays = "data.path", cfg.path, _read(resolve_under_root(cfg.path, root))
    else:
        key, where, arrays = "data.name", cfg.name, _call(cfg.name, root)
    return _source(cfg, key, where, arrays)


def _read(path: Path) -> dict[str, Any]:
    allowed = "a .pt or .npz file, or a folder of .npy files, holding " + FORMS
    try:
        if path.is_dir():
            return {n: np.load(path / f"{n}.npy", allow_pickle=False)
                    for n in ARRAYS if (path / f"{n}.npy").is_file()}  # fmt: skip
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {n: npz[n] for n in npz.files}
        if path.suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping):
                raise ConfigError("data.path", f"{path.name} holds a {type(obj).__name__}, not "
                                  "a mapping of names to tensors", allowed)  # fmt: skip
            return dict(obj)
    except ConfigError:
        raise
    except Exception as e:  # unreadable, truncated, pickled objects, ...
        raise ConfigError("data.path", f"cannot read {path} ({first_line(e)})", allowed) from None
    raise ConfigError("data.path", f"{path.name} is not one of {TENSOR_FILES}", allowed)


def _call(path: str, root: Path | None) -> dict[str, Any]:
    allowed = f"a callable returning a mapping of {FORMS}"
    try:
        loader = load(path, root)
    except UserCodeError as e:
        raise ConfigError("data.name", e.problem, e.allowed) from None
    try:
        out = loader()
    except Exception as e:
        raise ConfigError("data.name", f"{path}() raised {first_line(e)}", allowed) from None
    if not isinstance(out, Mapping):
        raise ConfigError(
            "data.name", f"{path}() returned a value of type {type(out).__name__}", allowed
        )
    return dict(out)


def _source(cfg: DataConfig, key: str, where: str, arrays: dict[str, Any]) -> Source:
    def bad(problem: str, allowed: str = FORMS) -> ConfigError:
        return ConfigError(key, f"{where}: {problem}", allowed)

    for name in ("train_x", "test_x"):
        if name not in arrays:
            found = ", ".join(sorted(map(str, arrays))) or "nothing"
            raise bad(f"no {name} (found {found})")
    labelled = [n for n in ("train_y", "test_y") if n in arrays]
    if len(labelled) == 1:
        other = "test_y" if labelled[0] == "train_y" else "train_y"
        raise bad(f"{labelled[0]} but no {other}", "labels for both splits, or for neither")
    xs = [_inputs(arrays[n], n, bad) for n in ("train_x", "test_x")]
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise bad(f"train_x examples have shape {tuple(xs[0].shape[1:])}, test_x examples "
                  f"{tuple(xs[1].shape[1:])}", "one example shape for both splits")  # fmt: skip
    if labelled:
        ys = [_labels(arrays[n], n, bad) for n in ("train_y", "test_y")]
        for x, y, n in zip(xs, ys, ("train", "test"), strict=True):
            if len(x) != len(y):
                raise bad(f"{n}_x has {len(x)} examples but {n}_y {len(y)} labels",
                          "as many labels as inputs")  # fmt: skip
        num_classes = _num_classes(cfg, ys, bad)
    else:  # reconstruction: no labels; the loop still indexes a label tensor per example
        ys = [torch.zeros(len(x), dtype=torch.int64) for x in xs]
        num_classes = 0
    shape = tuple(int(s) for s in xs[0].shape[1:])
    if cfg.augment == "crop_flip" and len(shape) != 3:
        inputs = ", ".join(map(str, shape))
        raise ConfigError(
            "data.augment",
            f"crop_flip needs images (N, C, H, W); {where} holds inputs (N, {inputs})",
            "null for these inputs",
        )  # fmt: skip
    norm = None
    if cfg.normalize == "channel":
        xs, norm = _standardize(xs)
    return Source(
        train_x=xs[0], train_y=ys[0], test_x=xs[1], test_y=ys[1], input_shape=shape,
        num_classes=num_classes, augment=cfg.augment, normalization=norm,
    )  # fmt: skip


def _array(value: Any, name: str, bad) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise bad(f"{name} is not an array ({first_line(e)})") from None


def _inputs(value: Any, name: str, bad) -> torch.Tensor:
    a = _array(value, name, bad)
    if a.ndim < 2 or a.shape[0] == 0:
        raise bad(f"{name} has shape {a.shape}", "inputs of shape (N, ...) with N >= 1 and "
                  "at least one feature")  # fmt: skip
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise bad(f"{name} holds {a.dtype} values", "real numbers")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).clone()
    if not torch.isfinite(x).all():
        raise bad(f"{name} holds non-finite values", "finite numbers")
    return x


def _labels(value: Any, name: str, bad) -> torch.Tensor:
    a = _array(value, name, bad)
    if a.ndim != 1:
        raise bad(f"{name} has shape {a.shape}", "labels of shape (N,)")
    if not np.issubdtype(a.dtype, np.integer):
        raise bad(f"{name} holds {a.dtype} values", "integer labels")
    return torch.from_numpy(a.astype(np.int64)).clone()


def _num_classes(cfg: DataConfig, ys: list[torch.Tensor], bad) -> int:
    k = cfg.num_classes
    for y, name in zip(ys, ("train_y", "test_y"), strict=True):
        if not len(y):
            continue
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (k is not None and hi >= k):
            label = lo if lo < 0 else hi
            limit = f"0 .. {k - 1} (data.num_classes = {k})" if k else ">= 0"
            raise bad(f"{name} holds label {label}, out of range", f"integer labels {limit}")
    return k if k is not None else 1 + max(int(y.max()) for y in ys if len(y))


def _standardize(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Each channel (dim 1) to zero mean and unit std over the training set (all examples
    and positions); a constant channel is only centred."""
    x = xs[0].double()
    dims = [0, *range(2, x.dim())]
    mean, std = x.mean(dims), x.std(dims, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = [((t.double() - mean.view(shape)) / std.view(shape)).float() for t in xs]
    return out, normalization("prepare", mean.tolist(), std.tolist())

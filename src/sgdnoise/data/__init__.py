"""Datasets by name. Light to import: the loaders pull in torch only when called.

Besides these, `data.name` takes the user's own data (data/tensors.py): `tensors` (arrays in
the file at `data.path`) or the import path of a callable returning them."""

from __future__ import annotations

# name -> input kind, which decides the models that accept it (see models.INPUT_KINDS).
DATASETS: dict[str, str] = {
    "mnist1d": "sequence",
    "digits": "image",
    "cifar10": "image",
    "mnist": "image",
    "fashion_mnist": "image",
    # A local copy in torchvision's ImageFolder layout, prepared to memory-mapped .npy files.
    "imagenet": "image",
    "synthetic": "vector",
    # The noisy quadratic model (Zhang et al. 2019): no examples, its exact expected loss.
    "nqm": "nqm",
}

# The user's arrays in a .pt / .npz file or a folder of .npy files at data.path.
USER_DATA = "tensors"

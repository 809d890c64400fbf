"""Datasets by name. Light to import: the loaders pull in torch only when called."""

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

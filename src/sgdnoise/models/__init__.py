"""Models by name. Light to import: building a model pulls in torch only when called.

Besides these, `model.name` takes the import path of the user's own factory (models/user.py)."""

from __future__ import annotations

# Per-model defaults for the size keys (`model.depth`, `model.width`); null in params
# means "the model's default", and the resolved value is what a run records.
#   mlp:         depth = hidden layers, width = hidden units
#   cnn1d:       depth = conv layers,   width = channels
#   wrn:         depth = 6n + 4,        width = widening factor k (16-4 by default)
#   autoencoder: fixed 784-1000-500-250-30 and mirror; depth/width unused
#   resnet50:    torchvision's; depth/width unused
MODEL_DEFAULTS: dict[str, dict[str, int | None]] = {
    "mlp": {"depth": 2, "width": 256},
    "cnn1d": {"depth": 3, "width": 32},
    "wrn": {"depth": 16, "width": 4},
    "autoencoder": {"depth": None, "width": None},
    "resnet50": {"depth": None, "width": None},
    "nqm": {"depth": None, "width": None},  # sized by the `nqm` section
}

# Which normalizations each model implements.
MODEL_NORMS: dict[str, tuple[str, ...]] = {
    "mlp": ("none", "batch", "ghost"),
    "cnn1d": ("none", "batch", "ghost"),
    "wrn": ("batch", "ghost", "skipinit"),
    "autoencoder": ("none", "batch", "ghost"),
    "resnet50": ("batch", "ghost"),
    "nqm": ("none",),
}

# Which dataset input kinds (data.DATASETS) each model accepts.
INPUT_KINDS: dict[str, tuple[str, ...]] = {
    "mlp": ("sequence", "image", "vector"),
    "cnn1d": ("sequence",),
    "wrn": ("image",),
    "autoencoder": ("sequence", "image", "vector"),
    "resnet50": ("image",),
    "nqm": ("nqm",),
}

# The norms of a model given by import path: `batch` and `none` leave it as written, `ghost`
# replaces its BatchNorm1d/2d layers by ghost batch norm (models/user.py).
USER_NORMS: tuple[str, ...] = ("none", "batch", "ghost")

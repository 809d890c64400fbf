"""Helpers for tests: small projects in temporary directories and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# A few hundred MNIST-1D examples and a small MLP: each run takes a second or two.
SMALL: dict[str, Any] = {
    "data": {"name": "mnist1d", "num_samples": 600},
    "model": {"name": "mlp", "width": 32},
    "train": {
        "optimizer": "momentum",
        "lr_eff": 0.1,
        "batch_size": 32,
        "budget": {"unit": "steps", "value": 20},
        "eval_points": 2,
        "threads": 1,
    },
    "tracking": {"experiment": "tests"},
}


def write_project(root: Path, params: dict[str, Any], template: Path | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if template is not None:
        shutil.copy(template, root / "mlflow.db")
    return root


def cli(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the real `sgdnoise` command line in `root`."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sgdnoise.cli", *args],
        cwd=root,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"

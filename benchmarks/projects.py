"""Temporary projects for the sweep benchmarks: write params.yaml, prepare the data once
(outside every timing), and the environment a fresh `sgdnoise` process should see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def clean_env() -> dict[str, str]:
    """No inherited tracking store or root, and no thread count: the sweep sets its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    env.pop("OMP_NUM_THREADS", None)
    return env


def write_project(root: Path, params: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "sgdnoise.cli", "prepare"], cwd=root, env=clean_env(),
                   check=True, capture_output=True)  # fmt: skip

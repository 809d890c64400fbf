"""Where things live: the project root, prepared data and the default tracking store.

Every path is absolute and derived from the project root, so DVC stages, `mlflow run`,
tests in temporary directories and sweep workers never scatter databases or data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT_ENV = "SGDNOISE_ROOT"
_MARKERS = ("params.yaml", "MLproject")


def project_root() -> Path:
    """The directory holding params.yaml (or MLproject), searched upwards from the cwd.

    $SGDNOISE_ROOT wins; with no marker anywhere above, the cwd is the root.
    """
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if any((d / m).is_file() for m in _MARKERS):
            return d
    return cwd


def default_params_file() -> Path:
    return project_root() / "params.yaml"


def prepared_dir(dataset: str, root: Path | None = None) -> Path:
    return (root or project_root()) / "data" / "prepared" / prepared_name(dataset)


def prepared_name(dataset: str) -> str:
    """The folder name of a dataset's prepared files: its name, with a user loader's import
    path made a plain file name (`mypkg.data:load` -> `mypkg.data-load`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")


def how_to_get_prepared(dataset: str) -> str:
    """What a machine that has neither a file-read dataset's prepared folder nor its files
    should run: fetch the prepared copy from the DVC remote (the same bytes, so the same data
    checksum in every run), or prepare it where the files are (README "Data")."""
    return (
        f"`dvc pull data/prepared/{prepared_name(dataset)}` (the prepared data, from the DVC "
        "remote), or `sgdnoise prepare` where the files are"
    )


def store_root(root: Path | None = None) -> Path:
    """Where the tracking store, the sweeps' Optuna journals and checkpoints live: the
    project root, or, inside the temporary workspace of a DVC experiment (`dvc exp run
    --temp` and `--queue` run in a copy under <repo>/.dvc/tmp/exps/ and delete it
    afterwards), the repository that workspace was copied from."""
    root = (root or project_root()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def default_tracking_uri(root: Path | None = None) -> str:
    """MLflow 3's default store, but pinned to an absolute path at the project root (the
    repository's, for a DVC experiment's temporary workspace: see store_root)."""
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def resolve_under_root(path: str, root: Path | None = None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p

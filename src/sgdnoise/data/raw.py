"""Where a dataset read from files has them, and what a worker that has neither those files
nor the prepared folder is told.

On many machines the prepared folder travels through a DVC remote (`dvc pull
data/prepared/<name>`), not the raw files: a worker with neither must not set out to
prepare (ImageNet is 200 GB of decoding), nor fail later with a message about the raw files
only. Generated datasets (mnist1d, synthetic, digits) and user loaders (code in the
repository) have no raw files: they are prepared wherever they are needed.
"""

from __future__ import annotations

from pathlib import Path

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data import USER_DATA
from sgdnoise.data.imagefolder import FOLDERS
from sgdnoise.data.sources import FILES_DIR
from sgdnoise.paths import how_to_get_prepared, prepared_name, resolve_under_root


def raw_files(cfg: DataConfig, root: Path | None = None) -> tuple[str, Path] | None:
    """The config key naming where `cfg`'s data is read from, and that file or folder;
    None for data generated from params or returned by code."""
    if cfg.name in FILES_DIR:
        return "data.root", resolve_under_root(cfg.root, root) / FILES_DIR[cfg.name]
    if cfg.name in FOLDERS:
        return "data.root", resolve_under_root(cfg.root, root) / FOLDERS[cfg.name]
    if cfg.name == USER_DATA and cfg.path is not None:
        return "data.path", resolve_under_root(cfg.path, root)
    return None


def unavailable(cfg: DataConfig, root: Path | None = None) -> ConfigError | None:
    """The error for a machine without `cfg`'s prepared folder when its files are not here
    either (None when they are, or when nothing needs files). With data.download the
    files are fetched instead, so the loader's own messages apply."""
    found = raw_files(cfg, root)
    if found is None or cfg.download:
        return None
    key, path = found
    if path.exists():
        return None
    return ConfigError(
        key,
        f"no prepared {cfg.name} data in data/prepared/{prepared_name(cfg.name)} and its "
        f"files are not here either ({path} does not exist)",
        how_to_get_prepared(cfg.name),
    )

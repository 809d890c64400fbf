"""The names and checksum of a prepared dataset's files (data/prepared/<dataset>/)."""

from __future__ import annotations

import hashlib
from pathlib import Path

TENSORS, META = "tensors.pt", "meta.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

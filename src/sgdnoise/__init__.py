"""sgdnoise: the batch-size x learning-rate x budget study of Smith, Elsen & De (2020).

From Python: `sgdnoise.load_runs(study)` and `sgdnoise.load_table(study)` return a study's
runs and table as pandas DataFrames, `sgdnoise.analyze(study, out=...)` writes its tables
and figures (sgdnoise.api). They are imported on first use, so `import sgdnoise` stays
cheap (no torch, no MLflow).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["analyze", "load_runs", "load_table"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sgdnoise import api

        return getattr(api, name)
    raise AttributeError(f"module 'sgdnoise' has no attribute {name!r}")

"""The user's own code, named by an import path: `package.module:callable`, or
`file.py:callable` relative to the project root (a file next to params.yaml).

Used for `model.name` and `data.name`. Locating a callable's source and hashing it needs no
import (config does it for every run key, so editing the code makes new runs); importing it
and fetching the callable is `load`. The project root goes on sys.path first, so the same
path resolves in sweep workers, torchrun processes and DVC or `mlflow run` stages, which
all run from the project root. Light: no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgdnoise.data.files import cached_sha256
from sgdnoise.paths import project_root

_IDENT = r"[A-Za-z_]\w*"
_PATH = re.compile(
    rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*|[^:]+\.py):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$"
)
ALLOWED = "package.module:callable or file.py:callable (relative to the project root)"


class UserCodeError(ValueError):
    """An import path that does not lead to a callable (config turns it into ConfigError)."""

    def __init__(self, problem: str, allowed: str = ALLOWED):
        self.problem, self.allowed = problem, allowed
        super().__init__(problem)


def is_import_path(name: str) -> bool:
    """Whether `name` has the form of an import path (built-in names have no colon)."""
    return _PATH.match(name) is not None


def split(path: str) -> tuple[str, str]:
    """(module or file, attribute) of an import path."""
    m = _PATH.match(path)
    if m is None:
        raise UserCodeError(f"{path!r} is not an import path")
    return m.group("module"), m.group("attr")


def _on_sys_path(folder: Path) -> None:
    text = str(folder)
    if text not in sys.path:
        sys.path.insert(0, text)


def source_file(path: str, root: Path | None = None) -> Path:
    """The file that defines the module of `path`, found without running it (a dotted
    module's parent packages are imported, as Python's finder needs)."""
    root = (root or project_root()).resolve()
    module, _ = split(path)
    if module.endswith(".py"):
        file = Path(module).expanduser()
        file = file if file.is_absolute() else root / file
        if not file.is_file():
            raise UserCodeError(f"{module} does not exist under {root}")
        return file.resolve()
    _on_sys_path(root)
    try:
        spec = importlib.util.find_spec(module)
    except Exception as e:  # a parent package that fails to import
        raise UserCodeError(f"cannot import {module} ({first_line(e)})") from None
    if spec is None:
        raise UserCodeError(f"cannot import {module} (no module of that name on sys.path)")
    if spec.origin is None or not Path(spec.origin).is_file():
        raise UserCodeError(f"{module} has no source file (a namespace or built-in module)")
    return Path(spec.origin).resolve()


def source_sha256(path: str, root: Path | None = None) -> str:
    """SHA-256 of the source file of `path`'s module: part of a run's identity."""
    return cached_sha256(source_file(path, root))


def load(path: str, root: Path | None = None) -> Callable[..., Any]:
    """Import `path`'s module and return its callable. Raises UserCodeError."""
    root = (root or project_root()).resolve()
    module_name, attr = split(path)
    file = source_file(path, root)
    try:
        if module_name.endswith(".py"):
            module = _import_file(file, root)
        else:
            module = importlib.import_module(module_name)
    except UserCodeError:
        raise
    except BaseException as e:  # SyntaxError, ImportError, or anything the module raises
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserCodeError(f"cannot import {module_name} ({first_line(e)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserCodeError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(f"{path} is a {type(obj).__name__}, not a callable")
    return obj


def _import_file(file: Path, root: Path) -> Any:
    """A file imported once per process under a private name derived from its path (so two
    `nets.py` in different folders do not collide); its folder and the project root go on
    sys.path, so it can import its neighbours."""
    try:
        rel = file.relative_to(root).with_suffix("")
    except ValueError:
        rel = file.with_suffix("")
    name = "_sgdnoise_user_" + re.sub(r"\W", "_", str(rel))
    if name in sys.modules:
        return sys.modules[name]
    _on_sys_path(root)
    _on_sys_path(file.parent)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"{file} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`: an error of the user's code, in one line."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__

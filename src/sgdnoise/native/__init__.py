"""Small C kernels for the study's hot loops, compiled on first use.

Two loops are too fine-grained for torch or numpy to run near the CPU's limits: the packed
MLP step at the small batch sizes of the noise-dominated regime (mlp_step.c, used by
sgdnoise.models.native_mlp) and the exact NQM recursion, 8,000 steps of a few passes over
10⁴ dimensions (nqm.c, used by sgdnoise.theory.nqm). Each kernel computes what its Python
path computes; the tests hold them to each other. A third measures the CPU's arithmetic limit
(peak.c, used by benchmarks/study_efficiency.py).

A kernel is compiled with the machine's C compiler (`$CC`, else `cc`) for the CPU it runs on,
into a cache keyed by the source, the compiler and the machine (`$SGDNOISE_CACHE`, else
~/.cache/sgdnoise), once; later processes load the cached library. With no compiler, or
with SGDNOISE_NATIVE=0, `library` returns None and the callers take their Python paths
(one line on stderr says why, once per process and kernel).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared"]
# The MLP kernel's products are fused multiply-adds; in the NQM kernel a*b + c rounds twice,
# as numpy's separate operations do, so it gives numpy's bits.
CONTRACT = {"mlp_step": "-ffp-contract=fast", "nqm": "-ffp-contract=off",
            "peak": "-ffp-contract=fast"}  # fmt: skip

_libs: dict[str, Any] = {}  # name -> loaded library, or False once it failed

# Each kernel's exported functions: (argument types, result type), declared once at load.
_P, _I, _I64, _F, _D = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float,
                        ctypes.c_double)  # fmt: skip
SIGNATURES: dict[str, dict[str, tuple[list[Any], Any]]] = {
    "mlp_step": {
        "sgdn_mlp_step": ([_I, _I, _I, *[_P] * 9, _F, _F, _P], None),
        "sgdn_mlp_steps": ([_I, _I, _I, _I, *[_P] * 13, _F, _F, _P], None),
        "sgdn_mlp_accum_step": ([_I, _I, _I, _I, *[_P] * 10, _F, _F, _P, _P], None),
        "sgdn_mlp_grad_floats": ([_I, _P], _I64),
        "sgdn_mlp_ws_floats": ([_I, _I, _P], _I64),
        "sgdn_mlp_eval": ([_I, _I, _I, *[_P] * 7], None),
        "sgdn_mlp_eval_ws_floats": ([_I, _P], _I64),
    },
    "peak": {
        "sgdn_fma_lanes": ([], _I),
        "sgdn_fma_loop": ([_I64], _F),
    },
    "nqm": {
        "sgdn_nqm_sgd": ([_I64, *[_P] * 5, _I64, _I64, _P, _I64, _I, _D, _P, _P], _I64),
        "sgdn_nqm_momentum": ([_I64, *[_P] * 7, _I64, _D, _I64, _P, _I64, _I, _D], _I64),
    },
}


def enabled() -> bool:
    return os.environ.get("SGDNOISE_NATIVE", "1") != "0"


def cache_dir() -> Path:
    if os.environ.get("SGDNOISE_CACHE"):
        return Path(os.environ["SGDNOISE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sgdnoise"


def _build(name: str) -> Path:
    """The compiled library of HERE/<name>.c for this compiler and CPU (built once, cached)."""
    cc = os.environ.get("CC") or "cc"
    source = HERE / f"{name}.c"
    flags = [*FLAGS, CONTRACT[name]]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256(
        source.read_bytes()
        + " ".join([cc, *flags, version.stdout, platform.machine(), platform.node()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: processes that start together each build their
        # own copy, and none ever loads a half-written file.
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *flags, "-o", str(tmp), str(source), "-lm"], check=True,
                           capture_output=True, text=True)  # fmt: skip
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def library(name: str) -> Any:
    """The ctypes library of kernel `name` with its functions' signatures declared, or None
    (disabled, or it could not be built)."""
    if name not in _libs:
        if not enabled():
            _libs[name] = False
        else:
            try:
                lib = ctypes.CDLL(str(_build(name)))
                for fn, (argtypes, restype) in SIGNATURES[name].items():
                    getattr(lib, fn).argtypes, getattr(lib, fn).restype = argtypes, restype
                _libs[name] = lib
            except (OSError, subprocess.CalledProcessError) as e:
                detail = (getattr(e, "stderr", None) or str(e)).strip().replace("\n", " ")
                print(f"sgdnoise: the native {name} kernel could not be built ({detail[:200]}); "
                      "using the Python path", file=sys.stderr)  # fmt: skip
                _libs[name] = False
    return _libs[name] or None

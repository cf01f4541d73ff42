"""The fast BLAS path for CPU nodes on Linux.

The mlx-cpu wheel links a reference BLAS; preloading an optimized one (Debian's
libopenblas0-pthread) makes dense float32 matmuls ~60x faster. A preload only takes
effect at process start, so the CLI re-executes itself once with LD_PRELOAD set.
macOS nodes use Metal/Accelerate and never take this path.
"""

from __future__ import annotations

import glob
import os
import sys

ACTIVE_ENV = "EXO_TOOLS_BLAS_ACTIVE"
SWITCH_ENV = "EXO_TOOLS_BLAS"  # "off" disables the preload

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def reexec_with_fast_blas(command: list[str]) -> None:
    """Replace this process with `python COMMAND...` with the optimized BLAS preloaded.

    Does nothing when no optimized BLAS is installed, off Linux, or when already active.
    """
    if not sys.platform.startswith("linux") or os.environ.get(SWITCH_ENV, "").lower() == "off":
        return
    if os.environ.get(ACTIVE_ENV):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload or "mkl" in preload:
        # The user preloaded a BLAS themselves: note it, no re-exec needed.
        os.environ[ACTIVE_ENV] = preload
        return
    library = find_openblas()
    if library is None:
        return
    environment = dict(os.environ)
    environment["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    environment[ACTIVE_ENV] = library
    os.execve(sys.executable, [sys.executable, *command], environment)

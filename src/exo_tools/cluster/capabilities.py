"""What a node brings: memory, chip name, MLX device (platform-neutral probes)."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import psutil

from .view import Capabilities

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def chip_name() -> str:
    """CPU/SoC brand string: sysctl on macOS, /proc/cpuinfo on Linux, platform otherwise."""
    try:
        if sys.platform == "darwin":
            result = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            )
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("chip probe failed: %s", error)
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def mlx_device() -> str:
    """MLX's default device, or "" when MLX cannot be imported (imported lazily: it is heavy)."""
    try:
        import mlx.core as mx

        return str(mx.default_device())
    except Exception as error:  # any import/runtime failure just means "no MLX here"
        log.debug("MLX unavailable: %s", error)
        return ""


@lru_cache(maxsize=1)
def matmul_gflops() -> float:
    """MLX's speed at a decode-shaped product (one row times a 4096x4096 float32 matrix),
    best of a few runs; 0.0 when MLX is unavailable.

    Decoding is a chain of such products, bound by memory bandwidth, so this ranks machines
    the way their decode speed does."""
    try:
        import mlx.core as mx

        size = 4096
        matrix = mx.random.normal((size, size))
        row = mx.random.normal((1, size))
        mx.eval(matrix, row)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            mx.eval(row @ matrix)
            best = min(best, time.perf_counter() - started)
        del matrix
        mx.clear_cache()
        return round(2 * size * size / best / 1e9, 2)
    except Exception as error:  # no MLX here: placement falls back to memory
        log.debug("matmul probe failed: %s", error)
        return 0.0


def probe() -> Capabilities:
    memory = psutil.virtual_memory()
    return Capabilities(
        memory_total=int(memory.total),
        memory_available=int(memory.available),
        chip=chip_name(),
        mlx_device=mlx_device(),
        matmul_gflops=matmul_gflops(),
    )


class Ewma:
    """Exponentially weighted moving average for link latency."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> float:
        self.value = (
            sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
        )
        return self.value

"""Shared pieces of the benchmark scripts: the prompt, mlx-lm measurements, tables."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PASSAGE = (
    "The history of computing is a story of people who wanted to calculate faster. "
    "From the abacus to mechanical calculators, from vacuum tubes to transistors, each "
    "step made machines smaller, cheaper and more reliable. "
)


def benchmark_messages(tokenizer: Any, prompt_tokens: int) -> list[dict[str, str]]:
    """A user message whose rendered prompt is close to `prompt_tokens` tokens."""
    body = ""
    while True:
        candidate = body + PASSAGE
        messages = [{"role": "user", "content": candidate + "\nContinue this essay at length."}]
        length = len(tokenizer.encode(tokenizer.apply_chat_template(messages)))
        if length > prompt_tokens:
            break
        body = candidate
    return [{"role": "user", "content": body + "\nContinue this essay at length."}]


def default_model_path() -> Path:
    from exo_tools.models import sources
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID

    home = sources.default_home()
    return sources.fetch(CATALOG[DEFAULT_MODEL_ID], sources.default_models_dir(home))


def measure_mlx_lm(
    loaded: Any, prompt: list[int], max_tokens: int, repeats: int
) -> dict[str, float]:
    """mlx-lm's own stream_generate on an already loaded model: median of `repeats` runs."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    wrapper = TokenizerWrapper(
        PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend),
        eos_token_ids=list(loaded.tokenizer.eos_token_ids),
    )
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        mx.reset_peak_memory()
        started = time.perf_counter()
        first = last = started
        count = 0
        final: Any = None
        for response in stream_generate(loaded.model, wrapper, prompt, max_tokens=max_tokens):
            now = time.perf_counter()
            if count == 0:
                first = now
            last = now
            count += 1
            final = response
        runs.append(
            {
                "ttft_s": first - started,
                "prefill_tps": len(prompt) / (first - started),
                "decode_tps": (count - 1) / (last - first) if count > 1 else 0.0,
                "tokens": float(count),
                "mlx_peak_mb": mx.get_peak_memory() / 1e6,
                "reported_prefill_tps": float(final.prompt_tps) if final else 0.0,
            }
        )
    return median_run(runs)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e6 if sys.platform == "darwin" else 1e3)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


@contextmanager
def mlx_lm_server(folder: Path) -> Iterator[str]:
    """`python -m mlx_lm.server` on an MLX folder, with the OpenBLAS preload the nodes
    use (2 threads); yields its URL."""
    from exo_tools.blas import find_openblas
    from tests.helpers.nodes import free_port

    port = free_port()
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "2"
    library = find_openblas()
    if library and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = library
    log = (folder.parent / "mlx_lm_server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited; see {log.name}")
            try:
                if requests.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mlx_lm.server did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def load_default() -> Any:
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    return load_model(
        CATALOG[DEFAULT_MODEL_ID], default_model_path(), dtype="float32", progress=False
    )


def start_worker(script: str, spec: list[Any], threads: int) -> subprocess.Popen[str]:
    """`script --worker SPEC` in a process of its own with `threads` BLAS threads and the
    OpenBLAS preload a node uses; it prints its result as JSON on its last line."""
    from exo_tools.blas import find_openblas

    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    library = find_openblas()
    if library:
        env["LD_PRELOAD"] = library
    return subprocess.Popen(
        [sys.executable, script, "--worker", json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def worker_result(process: subprocess.Popen[str]) -> dict[str, float]:
    """What a `start_worker` process printed last."""
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"a worker failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])

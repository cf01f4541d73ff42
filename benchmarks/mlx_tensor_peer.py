"""The peer to beat for tensor parallelism: MLX's own (mx.distributed ring backend with
mlx-lm's `Model.shard`, as `mlx_lm.utils.sharded_load` uses) on the same model and prompt.

`measure_mlx_tensor(n, ...)` launches `mlx.launch --backend ring` with `n` local processes
(OPENBLAS_NUM_THREADS=1, OpenBLAS preloaded like the nodes) running this file as a worker;
rank 0 reports TTFT and decode tok/s as JSON. mlx-lm shards heads evenly, so `n` must
divide the model's KV heads (3 for SmolLM2-135M: only n=3 runs).

    python benchmarks/mlx_tensor_peer.py --processes 3 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import benchmark_messages, default_model_path


def measure_mlx_tensor(
    processes: int, prompt_tokens: int, max_tokens: int, timeout: float = 900.0
) -> dict[str, float]:
    """Run the workers under mlx.launch; rank 0's measurements."""
    from exo_tools.blas import find_openblas

    launcher = Path(sys.executable).with_name("mlx.launch")
    env_args: list[str] = ["--env", "OPENBLAS_NUM_THREADS=1"]
    library = find_openblas()
    if library and sys.platform.startswith("linux"):
        env_args += ["--env", f"LD_PRELOAD={library}"]
    command = [
        str(launcher),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        str(processes),
        *env_args,
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--prompt-tokens",
        str(prompt_tokens),
        "--max-tokens",
        str(max_tokens),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"mlx.launch exited with {result.returncode}:\n{result.stdout[-2000:]}\n"
        f"{result.stderr[-2000:]}"
    )


def worker(prompt_tokens: int, max_tokens: int) -> None:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    group = mx.distributed.init()
    loaded = load_model(
        CATALOG[DEFAULT_MODEL_ID], default_model_path(), dtype="float32", progress=False
    )
    model: Any = loaded.model
    model.shard(group)
    mx.eval(model.parameters())
    wrapper = TokenizerWrapper(
        PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend),
        eos_token_ids=list(loaded.tokenizer.eos_token_ids),
    )
    messages = benchmark_messages(loaded.tokenizer, prompt_tokens)
    prompt = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages))
    for _ in stream_generate(model, wrapper, prompt, max_tokens=4):  # warm-up
        pass
    mx.reset_peak_memory()
    started = time.perf_counter()
    first = last = started
    count = 0
    for _ in stream_generate(model, wrapper, prompt, max_tokens=max_tokens):
        now = time.perf_counter()
        if count == 0:
            first = now
        last = now
        count += 1
    if group.rank() == 0:
        result = {
            "ttft_s": first - started,
            "decode_tps": (count - 1) / (last - first) if count > 1 else 0.0,
            "tokens": float(count),
            "mlx_peak_mb": mx.get_peak_memory() / 1e6,
            "processes": float(group.size()),
        }
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.prompt_tokens, args.max_tokens)
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    print(json.dumps(measure_mlx_tensor(args.processes, args.prompt_tokens, args.max_tokens)))


if __name__ == "__main__":
    main()

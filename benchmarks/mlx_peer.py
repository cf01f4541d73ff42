"""The peers to beat: MLX's own distributed inference (mx.distributed ring backend) with
mlx-lm's own model code, on the same model and prompt.

- tensor: mlx-lm's `Model.shard(group)`, as `mlx_lm.utils.sharded_load` does. mlx-lm
  shards heads evenly, so the process count must divide the model's KV heads (3 for
  SmolLM2-135M: only 3 runs).
- pipeline: mlx-lm's `PipelineMixin.pipeline(group)` (layer ranges, activations sent
  rank to rank, the last layers' output all-gathered), as `mlx_lm.utils.pipeline_load`
  does. mlx-lm's llama has no pipeline support, but its Qwen2 model does, and Qwen2 is
  the llama architecture plus q/k/v biases: SmolLM2's weights run in it with zero biases.
  The worker checks that its greedy tokens equal llama's before it measures.

`measure_mlx_peer(mode, n, ...)` launches `mlx.launch --backend ring` with `n` local
processes (OPENBLAS_NUM_THREADS=1, OpenBLAS preloaded like the nodes) running this file
as a worker; rank 0 reports TTFT and decode tok/s as JSON.

    python benchmarks/mlx_peer.py --mode pipeline --processes 2 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import benchmark_messages, default_model_path

MODES = ("tensor", "pipeline")


def measure_mlx_peer(
    mode: str, processes: int, prompt_tokens: int, max_tokens: int, timeout: float = 900.0
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
        "--mode",
        mode,
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


def _as_qwen2(llama: Any) -> Any:
    """The same network in mlx-lm's Qwen2 model (which supports pipelining): llama's
    weights, q/k/v biases of zero."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    args = llama.args
    model = qwen2.Model(
        qwen2.ModelArgs(
            model_type="qwen2",
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            intermediate_size=args.intermediate_size,
            num_attention_heads=args.num_attention_heads,
            rms_norm_eps=args.rms_norm_eps,
            vocab_size=args.vocab_size,
            num_key_value_heads=args.num_key_value_heads,
            max_position_embeddings=args.max_position_embeddings or 32768,
            rope_theta=args.rope_theta,
            rope_traditional=args.rope_traditional,
            rope_scaling=args.rope_scaling,
            tie_word_embeddings=args.tie_word_embeddings,
        )
    )
    weights = dict(tree_flatten(llama.parameters()))
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("_proj.bias"):
            weights[name] = mx.zeros_like(value)
    model.load_weights(list(weights.items()), strict=True)
    return model


def _greedy_tokens(model: Any, prompt: list[int], count: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    tokens: list[int] = []
    for _ in range(count):
        token = int(mx.argmax(logits[0, -1]).item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return tokens


def worker(mode: str, prompt_tokens: int, max_tokens: int) -> None:
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
    tokenizer, model = loaded.tokenizer, cast(Any, loaded.model)
    del loaded  # only the model this rank runs stays in memory
    messages = benchmark_messages(tokenizer, prompt_tokens)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    if mode == "tensor":
        model.shard(group)
    else:
        reference = _greedy_tokens(model, prompt, 8)
        model = _as_qwen2(model)
        model.model.pipeline(group)
        if _greedy_tokens(model, prompt, 8) != reference:
            raise RuntimeError("the Qwen2 pipeline does not compute what llama does")
    mx.eval(model.parameters())
    wrapper = TokenizerWrapper(
        PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend),
        eos_token_ids=list(tokenizer.eos_token_ids),
    )
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
    parser.add_argument("--mode", choices=MODES, default="tensor")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mode, args.prompt_tokens, args.max_tokens)
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    print(
        json.dumps(measure_mlx_peer(args.mode, args.processes, args.prompt_tokens, args.max_tokens))
    )


if __name__ == "__main__":
    main()

"""Node API vs mlx-lm in-process on the same model, same prompt, same run.

    .venv/bin/python benchmarks/api_vs_mlx_lm.py [--prompt-tokens 512] [--max-tokens 128]

Prints prefill and decode tok/s, time to first token and peak memory for both, and the
API's ratio to mlx-lm. Both use the same BLAS (the optimized one when installed) and the
same weight precision. A third row sends the same request with a `response_format`
json_schema (a grammar-constrained decode) and gives its ratio to the unconstrained API
request of the same run (target >= 0.95, i.e. <= 5% cost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    benchmark_messages,
    default_model_path,
    measure_mlx_lm,
    median_run,
    peak_rss_mb,
    print_table,
)

# Long enough that max_tokens, not the grammar, ends the constrained decode.
ESSAY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "essay": {"type": "string", "minLength": 2000}},
    "required": ["title", "essay"],
    "additionalProperties": False,
}
CONSTRAINED = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": ESSAY_SCHEMA}}
}


def measure_api(
    url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    repeats: int,
    extra: dict[str, object] | None = None,
) -> dict[str, float]:
    import requests

    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
        started = time.perf_counter()
        first = last = started
        count = 0
        usage: dict[str, int] = {}
        with requests.post(
            f"{url}/v1/chat/completions", json=body, stream=True, timeout=600
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        if count == 0:
                            first = now
                        last = now
                        count += 1
        tokens = usage.get("completion_tokens", count)
        runs.append(
            {
                "ttft_s": first - started,
                "prefill_tps": usage.get("prompt_tokens", 0) / (first - started),
                # Deltas can hold more than one token (multi-byte characters): use usage.
                "decode_tps": (tokens - 1) / (last - first) if tokens > 1 else 0.0,
                "tokens": float(tokens),
            }
        )
    return median_run(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from exo_tools.blas import reexec_with_fast_blas

    reexec_with_fast_blas([__file__, *sys.argv[1:]])
    # Read by OpenBLAS when it loads: only the node process, started below, sees a change.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))

    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model
    from tests.helpers.nodes import node_environment, start_node

    model_path = default_model_path()
    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], model_path, dtype=args.dtype, progress=False)
    tokenizer = loaded.tokenizer
    messages = benchmark_messages(tokenizer, args.prompt_tokens)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))

    env = node_environment(threads=int(os.environ["OPENBLAS_NUM_THREADS"]))
    env["EXO_TOOLS_MODELS_DIR"] = str(model_path.parent.parent)
    node = start_node("--dtype", args.dtype, env=env)
    try:
        # Warm both up, then alternate runs so background noise hits both alike.
        measure_mlx_lm(loaded, prompt, 4, 1)
        measure_api(node.url, DEFAULT_MODEL_ID, messages, 4, 1)
        measure_api(node.url, DEFAULT_MODEL_ID, messages, 4, 1, CONSTRAINED)
        reference_runs, api_runs, constrained_runs = [], [], []
        for _ in range(args.repeats):
            reference_runs.append(measure_mlx_lm(loaded, prompt, args.max_tokens, 1))
            api_runs.append(measure_api(node.url, DEFAULT_MODEL_ID, messages, args.max_tokens, 1))
            constrained_runs.append(
                measure_api(node.url, DEFAULT_MODEL_ID, messages, args.max_tokens, 1, CONSTRAINED)
            )
        reference, api = median_run(reference_runs), median_run(api_runs)
        constrained = median_run(constrained_runs)
        reference_rss = peak_rss_mb()
        health = node.health()
        memory = health["memory"]
        assert isinstance(memory, dict)
    finally:
        node.stop()

    print(
        f"model {DEFAULT_MODEL_ID} ({health['dtype']}), prompt {len(prompt)} tokens, "
        f"{args.max_tokens} generated, median of {args.repeats}, "
        f"BLAS {os.environ.get('EXO_TOOLS_BLAS_ACTIVE') or 'bundled reference'}"
    )
    rows = [
        [
            "mlx-lm in-process",
            f"{reference['prefill_tps']:.1f}",
            f"{reference['decode_tps']:.2f}",
            f"{reference['ttft_s'] * 1000:.0f}",
            f"{reference['tokens']:.0f}",
            f"{reference['mlx_peak_mb']:.0f}",
            f"{reference_rss:.0f}",
        ],
        [
            "exo-tools node API",
            f"{api['prefill_tps']:.1f}",
            f"{api['decode_tps']:.2f}",
            f"{api['ttft_s'] * 1000:.0f}",
            f"{api['tokens']:.0f}",
            f"{memory['mlx_peak'] / 1e6:.0f}",
            f"{memory['rss'] / 1e6:.0f}",
        ],
        [
            "API / mlx-lm",
            f"{api['prefill_tps'] / reference['prefill_tps']:.2f}x",
            f"{api['decode_tps'] / reference['decode_tps']:.2f}x",
            "",
            "",
            "",
            "",
        ],
        [
            "node API, response_format json_schema",
            f"{constrained['prefill_tps']:.1f}",
            f"{constrained['decode_tps']:.2f}",
            f"{constrained['ttft_s'] * 1000:.0f}",
            f"{constrained['tokens']:.0f}",
            "",
            "",
        ],
        [
            "json_schema / unconstrained API",
            f"{constrained['prefill_tps'] / api['prefill_tps']:.2f}x",
            f"{constrained['decode_tps'] / api['decode_tps']:.3f}x",
            "",
            "",
            "",
            "",
        ],
    ]
    print_table(
        "Node API vs mlx-lm",
        ["", "prefill tok/s", "decode tok/s", "TTFT ms", "tokens", "MLX peak MB", "RSS MB"],
        rows,
    )


if __name__ == "__main__":
    main()

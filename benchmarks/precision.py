"""Weight precision options on this device: which is fastest, at what memory.

    .venv/bin/python benchmarks/precision.py [--prompt-tokens 256] [--max-tokens 64]

Each row runs in its own process, because an optimized BLAS only takes effect when
preloaded at process start. `--dtype auto` of the node picks from what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    benchmark_messages,
    default_model_path,
    measure_mlx_lm,
    print_table,
)

DTYPES = ["native", "float32", "bfloat16"]


def measure_one(dtype: str, prompt_tokens: int, max_tokens: int, repeats: int) -> dict[str, float]:
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    loaded = load_model(
        CATALOG[DEFAULT_MODEL_ID], default_model_path(), dtype=dtype, progress=False
    )
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(benchmark_messages(tokenizer, prompt_tokens))
    )
    measure_mlx_lm(loaded, prompt, 4, 1)  # warm-up
    result = measure_mlx_lm(loaded, prompt, max_tokens, repeats)
    result["weight_mb"] = loaded.weight_bytes / 1e6
    result["prompt"] = float(len(prompt))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_one(args.child, args.prompt_tokens, args.max_tokens, args.repeats)
        print(json.dumps(result))
        return

    from exo_tools.blas import ACTIVE_ENV, find_openblas

    library = find_openblas()
    blas_options: list[tuple[str, dict[str, str]]] = [
        ("bundled reference", {"EXO_TOOLS_BLAS": "off"})
    ]
    if library and sys.platform.startswith("linux"):
        blas_options.append(("OpenBLAS", {"LD_PRELOAD": library, ACTIVE_ENV: library}))
    rows = []
    for blas_name, extra_env in blas_options:
        for dtype in DTYPES:
            env = {**os.environ, **extra_env}
            env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    dtype,
                    "--prompt-tokens",
                    str(args.prompt_tokens),
                    "--max-tokens",
                    str(args.max_tokens),
                    "--repeats",
                    str(args.repeats),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            rows.append(
                [
                    blas_name,
                    dtype,
                    f"{result['prefill_tps']:.1f}",
                    f"{result['decode_tps']:.2f}",
                    f"{result['weight_mb']:.0f}",
                    f"{result['mlx_peak_mb']:.0f}",
                ]
            )
            print(f"measured {blas_name} {dtype}", file=sys.stderr)
    import mlx.core as mx

    print(
        f"device {mx.default_device()}, prompt ~{args.prompt_tokens} tokens, "
        f"{args.max_tokens} generated, median of {args.repeats}"
    )
    print_table(
        "Weight precision",
        ["BLAS", "dtype", "prefill tok/s", "decode tok/s", "weights MB", "MLX peak MB"],
        rows,
    )


if __name__ == "__main__":
    main()

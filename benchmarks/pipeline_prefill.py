"""A long prompt's time to first token, cold: one node against a 2-stage pipeline.

    .venv/bin/python benchmarks/pipeline_prefill.py [--prompt-tokens 4096] [--repeats 1]

On a pipeline the prefill chunks stream on (stage 1 works on chunk i while stage 0 runs
chunk i + 1, `engine/driver.py` `PIPELINE_PREFILL_CHUNK`), so a long prompt's TTFT can
drop below one node's. Every process gets OPENBLAS_NUM_THREADS=1 (the same threads per
process), and every request starts with a text of its own, so no prefix cache entry
helps. Prints one table: TTFT per target and the ratio to one node in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import benchmark_messages, default_model_path, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1, help="cold prompts per target")
    args = parser.parse_args()
    if args.prompt_tokens < 16 or args.repeats < 1:
        parser.error("--prompt-tokens must be at least 16 and --repeats at least 1")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

    from benchmarks.pipeline import start_pipeline, stream_once
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], default_model_path(), progress=False)
    messages = benchmark_messages(loaded.tokenizer, args.prompt_tokens)
    prompt = loaded.tokenizer.apply_chat_template(messages)
    tokens = len(loaded.tokenizer.encode(prompt))
    del loaded

    def cold() -> list[dict[str, str]]:
        # A different first line each time: the prompt shares no prefix with any before.
        text = f"Note {uuid.uuid4().hex}.\n{messages[0]['content']}"
        return [{"role": "user", "content": text}]

    ttft: dict[int, float] = {}
    for count in (1, 2):
        nodes = start_pipeline(count)
        try:
            stream_once(nodes[0].url, cold()[:1], 4)  # warm-up: streams open, code paths run
            runs = [stream_once(nodes[0].url, cold(), 1)["ttft_s"] for _ in range(args.repeats)]
        finally:
            for node in nodes:
                node.stop()
        ttft[count] = statistics.median(runs)
    print_table(
        f"TTFT of a cold {tokens}-token prompt, OPENBLAS_NUM_THREADS=1 per process, "
        f"median of {args.repeats}",
        ["target", "TTFT s", "vs 1 node"],
        [
            ["1 node", f"{ttft[1]:.2f}", "1.00x"],
            ["2-stage pipeline", f"{ttft[2]:.2f}", f"{ttft[2] / ttft[1]:.2f}x"],
        ],
    )


if __name__ == "__main__":
    main()

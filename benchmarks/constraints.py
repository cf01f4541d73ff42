"""Decode speed with and without a grammar constraint, same model, same run.

    .venv/bin/python benchmarks/constraints.py [--max-tokens 96] [--repeats 3]

Generates greedily from the default model the way the runner drives the Sampler (one
forward, one sample, `.item()` per token), unconstrained and under each constraint kind,
alternating runs so machine noise hits all alike. Prints decode tok/s (median of
`--repeats`), the ratio to unconstrained, and llguidance's mask time per token.
The target is a ratio >= 0.95 (<= 5% cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_model_path, print_table

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "write",
            "parameters": {
                "type": "object",
                "properties": {"filePath": {"type": "string"}, "content": {"type": "string"}},
                "required": ["filePath", "content"],
                "additionalProperties": False,
            },
        },
    }
]
LIST_SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import mlx.core as mx

    from exo_tools import constraints as C
    from exo_tools.engine.sampling import Sampler
    from exo_tools.engine.shard import ShardModel
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model
    from exo_tools.types import SamplingParams

    loaded = load_model(
        CATALOG[DEFAULT_MODEL_ID], default_model_path(), dtype=args.dtype, progress=False
    )
    tokenizer = loaded.tokenizer
    started = time.perf_counter()
    grammar = C.grammar_tokenizer(DEFAULT_MODEL_ID, tokenizer)
    grammar_seconds = time.perf_counter() - started
    model = ShardModel(loaded.model, loaded.shard)
    messages = [
        {"role": "system", "content": "Answer with JSON."},
        {
            "role": "user",
            "content": "List as many fruits as you can, as a JSON object with an 'items' list.",
        },
    ]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=True)
    # The lazy constraint stays in free text here: its cost while the model is not calling.
    cases: dict[str, str | None] = {
        "none": None,
        "json_object": C.json_object_constraint(),
        "json_schema": C.json_schema_constraint(LIST_SCHEMA),
        "tool_call": C.tool_call_constraint(TOOLS, "hermes", parallel=False),
        "lazy (free text)": C.lazy_tool_call_constraint(TOOLS, "hermes"),
    }

    def run(constraint: str | None) -> dict[str, float]:
        cache = model.make_cache()
        model.forward(mx.array(prompt[:-1])[None], cache)
        mx.eval([c.state for c in cache])
        started = time.perf_counter()
        sampler = Sampler(SamplingParams(temperature=0.0, constraint=constraint), grammar)
        next_input, tokens = prompt[-1], 0
        for _ in range(args.max_tokens):
            logits = model.forward(mx.array([[next_input]]), cache)[:, -1, :]
            next_input = int(sampler(logits).item())
            tokens += 1
            if next_input in tokenizer.eos_token_ids:
                break
        seconds = time.perf_counter() - started
        state = sampler.constraint
        mask_ms = state.mask_seconds / max(state.masks_computed, 1) * 1e3 if state else 0.0
        return {"tokens": tokens, "tok_s": tokens / seconds, "mask_ms": mask_ms}

    run(None)  # warm up
    results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, constraint in cases.items():
            results[name].append(run(constraint))
    base = statistics.median(r["tok_s"] for r in results["none"])
    rows: list[list[str]] = []
    for name, runs in results.items():
        tok_s = statistics.median(r["tok_s"] for r in runs)
        rows.append(
            [
                name,
                f"{statistics.median(r['tokens'] for r in runs):.0f}",
                f"{tok_s:.1f}",
                f"{tok_s / base:.3f}",
                f"{statistics.median(r['mask_ms'] for r in runs):.3f}" if name != "none" else "-",
            ]
        )
    print_table(
        f"Constrained decode, {DEFAULT_MODEL_ID} ({loaded.dtype}, {mx.default_device()}), "
        f"median of {args.repeats}; grammar tokenizer built in {grammar_seconds:.2f}s",
        ["constraint", "tokens", "decode tok/s", "ratio", "mask ms/token"],
        rows,
    )


if __name__ == "__main__":
    main()

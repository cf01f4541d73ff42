"""Greedy generation with mlx-lm's own `stream_generate`, as the reference for the node.

Run as a subprocess with the same BLAS preload as the node (see `reference_generate`),
so both compute with the same kernels: `python mlx_lm_reference.py MODEL DTYPE` reads a
JSON list of {"messages", "max_tokens", "top_logprobs"?} on stdin and prints a JSON list of
{"tokens": [...], "logprobs": [[logprob, [[id, logprob], ...]], ...]} (logprobs only for
cases with "top_logprobs").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def reference_generate(
    model_path: Path, dtype: str, cases: list[dict[str, Any]]
) -> list[list[int]]:
    """mlx-lm's greedy token ids for each case."""
    return [result["tokens"] for result in reference_run(model_path, dtype, cases)]


def reference_run(
    model_path: Path, dtype: str, cases: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """mlx-lm's greedy tokens for each case, with log-probabilities where a case asks."""
    from exo_tools.blas import ACTIVE_ENV, find_openblas

    env = dict(os.environ)
    library = find_openblas()
    if library and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = library
        env[ACTIVE_ENV] = library
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, __file__, str(model_path), dtype],
        input=json.dumps(cases).encode(),
        capture_output=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout)


def main() -> None:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    model_path, dtype = Path(sys.argv[1]), sys.argv[2]
    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], model_path, dtype=dtype, progress=False)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend)
    wrapper = TokenizerWrapper(hf_tokenizer, eos_token_ids=list(loaded.tokenizer.eos_token_ids))
    outputs: list[dict[str, Any]] = []
    for case in json.loads(sys.stdin.read()):
        prompt = loaded.tokenizer.encode(
            loaded.tokenizer.apply_chat_template(case["messages"]), add_special_tokens=True
        )
        top = case.get("top_logprobs")
        tokens: list[int] = []
        logprobs: list[Any] = []
        for response in stream_generate(
            loaded.model, wrapper, prompt, max_tokens=case["max_tokens"]
        ):
            if response.token in loaded.tokenizer.eos_token_ids:
                continue
            tokens.append(response.token)
            if top is not None:
                row = response.logprobs.astype(mx.float32)
                best = mx.argsort(-row)[:top].tolist()
                logprobs.append(
                    [row[response.token].item(), [[i, row[i].item()] for i in best]]  # type: ignore[index]
                )
        outputs.append({"tokens": tokens, "logprobs": logprobs})
    print(json.dumps(outputs))


if __name__ == "__main__":
    main()

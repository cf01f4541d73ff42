"""Greedy generation with mlx-lm's own `stream_generate`, as the reference for the node.

Run as a subprocess with the same BLAS preload as the node (see `reference_generate`),
so both compute with the same kernels: `python mlx_lm_reference.py MODEL DTYPE` reads a
JSON list of {"messages", "max_tokens"} on stdin and prints a JSON list of token-id lists.
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
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    model_path, dtype = Path(sys.argv[1]), sys.argv[2]
    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], model_path, dtype=dtype, progress=False)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend)
    wrapper = TokenizerWrapper(hf_tokenizer, eos_token_ids=list(loaded.tokenizer.eos_token_ids))
    outputs: list[list[int]] = []
    for case in json.loads(sys.stdin.read()):
        prompt = loaded.tokenizer.encode(
            loaded.tokenizer.apply_chat_template(case["messages"]), add_special_tokens=True
        )
        tokens = [
            response.token
            for response in stream_generate(
                loaded.model, wrapper, prompt, max_tokens=case["max_tokens"]
            )
            if response.token not in loaded.tokenizer.eos_token_ids
        ]
        outputs.append(tokens)
    print(json.dumps(outputs))


if __name__ == "__main__":
    main()

"""The default model written as a Hugging Face / MLX folder (what mlx-lm's own server and
the node's folder source load), from the project's GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from exo_tools.models.loader import LoadedModel, parameter_arrays


def export_hf_folder(loaded: LoadedModel, folder: Path) -> None:
    """Write the loaded model the way Hugging Face / mlx-lm save one."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(parameter_arrays(loaded.model)))
    config = {k: v for k, v in loaded.config.items() if k != "add_bos_token"}
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded.tokenizer.backend.save(str(folder / "tokenizer.json"))
    assert loaded.tokenizer.chat_template is not None
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": loaded.tokenizer.chat_template.source,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
            }
        )
    )
    # mlx-lm's server stops at these (the tokenizer config's eos alone it does not use).
    eos = sorted(loaded.tokenizer.eos_token_ids)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))

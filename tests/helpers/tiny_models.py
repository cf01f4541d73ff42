"""Random-weight tiny models of mlx-lm's own classes, written as Hugging Face folders.

Each architecture is built from mlx-lm's `ModelArgs`/`Model` with small dimensions and the
default model's tokenizer (its 49152-token vocabulary), so the folders load through the
node's loader like any model people download. Sliding windows and attention chunks are 8
tokens, shorter than the tests' prompts, so every kind of mask is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

from exo_tools.models.tokenizer import TextTokenizer

VOCAB = 49152
WINDOW = 8  # sliding windows and attention chunks, in tokens

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_MOE: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_BASE, "model_type": "llama"},
    "qwen2": {**_BASE, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**_BASE, "model_type": "qwen3"},
    "qwen3_moe": {**_BASE, **_MOE, "model_type": "qwen3_moe"},
    "qwen3_next": {
        **_BASE,
        **_MOE,
        "model_type": "qwen3_next",
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "shared_expert_intermediate_size": 32,
        "partial_rotary_factor": 0.5,
        "full_attention_interval": 2,
    },
    "gemma3_text": {
        **_BASE,
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 16,
    },
    "gpt_oss": {
        **_BASE,
        "model_type": "gpt_oss",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "deepseek_v3": {
        **_BASE,
        "model_type": "deepseek_v3",
        "num_key_value_heads": 4,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    },
    "glm4_moe": {
        **_BASE,
        "model_type": "glm4_moe",
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "routed_scaling_factor": 1.0,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "rope_scaling": None,
        "use_qk_norm": True,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,
    },
    "granite": {
        **_BASE,
        "model_type": "granite",
        "tie_word_embeddings": True,
        "logits_scaling": 4.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "cohere2": {
        **_BASE,
        "model_type": "cohere2",
        "layer_norm_eps": 1e-5,
        "logit_scale": 0.0625,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    },
    "phi3": {**_BASE, "model_type": "phi3"},
    "olmo2": {**_BASE, "model_type": "olmo2"},
    "starcoder2": {**_BASE, "model_type": "starcoder2", "norm_epsilon": 1e-5},
    "llama4": {
        "model_type": "llama4",
        "text_config": {
            **_BASE,
            "model_type": "llama4_text",
            "attention_bias": False,
            "attention_chunk_size": WINDOW,
            "interleave_moe_layer_step": 2,
            "intermediate_size_mlp": 128,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "rope_scaling": None,
            "use_qk_norm": True,
        },
    },
}


def build_model(architecture: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The mlx-lm model of `architecture` with random weights, and its config."""
    config = json.loads(json.dumps(CONFIGS[architecture]))
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Larger than default init so the layers matter next to the residual stream.
    params = [(name, value) for name, value in tree_flatten(model.parameters())]
    model.load_weights([(name, value * 2.0) for name, value in params], strict=True)
    mx.eval(model.parameters())
    return model, config


def write_tiny_model(
    architecture: str,
    folder: Path,
    tokenizer: TextTokenizer,
    seed: int = 0,
    bits: int | None = None,
) -> Path:
    """Write `architecture` as a Hugging Face folder (config, safetensors, tokenizer); with
    `bits`, quantized and saved by mlx-lm's own quantize and save, as mlx-community
    publishes models."""
    model, config = build_model(architecture, seed)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    template = tokenizer.chat_template.source if tokenizer.chat_template else None
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": template,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
            }
        )
    )
    return folder

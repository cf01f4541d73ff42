"""Every tool-call format, by name. ``FORMATS`` is the registry's keys."""

from __future__ import annotations

from .format import ToolFormat
from .formats import (
    deepseek_v3,
    deepseek_v31,
    functionary_v3_2,
    glm45,
    gpt_oss,
    granite,
    hermes,
    hunyuan_a13b,
    kimi_k2,
    llama3_json,
    llama4_pythonic,
    minimax_m2,
    mistral,
    phi4_mini_json,
    pythonic,
    qwen3_coder,
    seed_oss,
    xlam,
)

REGISTRY: dict[str, ToolFormat] = {
    module.FORMAT.name: module.FORMAT
    for module in (
        hermes,
        qwen3_coder,
        llama3_json,
        pythonic,
        mistral,
        gpt_oss,
        deepseek_v3,
        kimi_k2,
        glm45,
        minimax_m2,
        deepseek_v31,
        llama4_pythonic,
        functionary_v3_2,
        granite,
        phi4_mini_json,
        xlam,
        seed_oss,
        hunyuan_a13b,
    )
}
FORMATS: tuple[str, ...] = tuple(REGISTRY)


def get_format(fmt: str) -> ToolFormat:
    """The format named ``fmt``; ``ValueError`` names the supported ones."""
    found = REGISTRY.get(fmt)
    if found is None:
        raise ValueError(f"unknown tool-call format {fmt!r}; supported: {', '.join(FORMATS)}")
    return found


def check_format(fmt: str) -> str:
    get_format(fmt)
    return fmt


def keeps_special_tokens(fmt: str) -> bool:
    """Whether ``fmt``'s markers are special tokens, so the server must detokenize
    with special tokens kept for the parser to see them."""
    return get_format(fmt).keeps_special_tokens


def infer_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or ``None`` if it shows none.

    Formats are tried by ``template_priority``: more specific markers first
    (Qwen3-Coder templates also contain ``<tool_call>``; harmony templates mention
    many tokens).
    """
    if not chat_template:
        return None
    for spec in sorted(REGISTRY.values(), key=lambda f: -f.template_priority):
        if spec.matches_template(chat_template):
            return spec.name
    return None

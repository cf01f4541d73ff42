"""Tokenizer and chat template: one wrapper whatever the model's source."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# Ids that end a turn in common families, used when the metadata names only one eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. raise_exception in the template)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # HF templates expect non-ASCII kept as is and key order preserved.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A Jinja chat template rendered the way Hugging Face renders it."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = environment.from_string(source)
        self._bos_token = bos_token
        self._eos_token = eos_token

    @property
    def renders_tools(self) -> bool:
        """Whether the template itself uses the `tools` variable."""
        return "tools" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except TemplateError as error:
            raise ChatTemplateError(f"chat template failed: {error}") from error


class TextTokenizer:
    """Encode/decode plus the special tokens generation needs."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token
        eos = set(eos_token_ids)
        for token in _END_OF_TURN_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None and token_id in self.special_token_ids:
                eos.add(token_id)
        self.eos_token_ids = frozenset(eos)
        bos = self.id_to_token(bos_token_id) if bos_token_id is not None else ""
        eos_text = self.id_to_token(min(eos)) if eos else ""
        self.chat_template = (
            ChatTemplate(chat_template, bos_token=bos, eos_token=eos_text)
            if chat_template
            else None
        )

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(
            index
            for index, token in self.backend.get_added_tokens_decoder().items()
            if token.special
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template")
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )

    @classmethod
    def from_hf_folder(cls, folder: Path) -> TextTokenizer:
        """tokenizer.json + tokenizer_config.json (+ generation_config.json) as HF saves them."""
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        template = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            template = template_file.read_text()
        elif isinstance(template, list):
            # A list of named templates: the "default" one is the chat template.
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default") or next(iter(named.values()), None)

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return tokenizer.token_to_id(value) if isinstance(value, str) else None

        eos_ids: set[int] = set()
        eos_from_config = token_id(config.get("eos_token"))
        if eos_from_config is not None:
            eos_ids.add(eos_from_config)
        generation_eos = generation.get("eos_token_id")
        if isinstance(generation_eos, int):
            eos_ids.add(generation_eos)
        elif isinstance(generation_eos, list):
            eos_ids.update(int(i) for i in generation_eos)
        return cls(
            tokenizer,
            bos_token_id=token_id(config.get("bos_token")),
            eos_token_ids=eos_ids,
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE splits multi-byte characters across tokens, and SentencePiece decoders
    drop a leading space at the start of a decode, so each step decodes a short window
    that starts one emitted step back and releases only the new, complete characters.
    """

    def __init__(self, tokenizer: TextTokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def flush(self) -> str:
        decode = self._decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

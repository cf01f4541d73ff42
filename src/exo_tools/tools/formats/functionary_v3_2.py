"""Functionary v3.2: ``>>>NAME\n{...}`` per call, ``>>>all\n`` before text; the
prompt ends with ``>>>``, so the output may start right at ``NAME\n``."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, Engine, NotCall, Step, Verdict
from .._scan import dumps
from ..format import JsonCallGrammar, ToolFormat

RECIPIENT = ">>>"
_HEADER_RE = re.compile(r"([\w.\-]+)\n")
_HEADER_PREFIX_RE = re.compile(r"[\w.\-]*")


class FunctionaryEngine(Engine):
    markers = (RECIPIENT,)
    drop_tokens = ("<|eot_id|>", "<|eom_id|>")
    bare_json = False

    opened = False  # the first recipient line was read

    def step_content(self, text: str, pos: int, eos: bool, truncated: bool) -> Step | None:
        if not self.opened and pos == 0 and not text.startswith(RECIPIENT):
            # The prompt's own `>>>` opened this recipient line.
            verdict = self._recipient(text, 0, 0, eos)
            if verdict is None:
                return None
            self.opened = True
            if not isinstance(verdict, NotCall):
                return verdict
        self.opened = True
        return super().step_content(text, pos, eos, truncated)

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        return self._recipient(text, i, i + len(RECIPIENT), eos)

    def _recipient(self, text: str, i: int, k: int, eos: bool) -> Verdict:
        header = _HEADER_RE.match(text, k)
        if header is None:
            if not eos and _HEADER_PREFIX_RE.fullmatch(text, k):
                return None
            return NOT
        name = header.group(1)
        if name == "all":
            return [], header.end()  # what follows is text for the user
        if i == k and self.tools.resolve(name) is None:
            return NOT
        return self.as_step(self.arguments_after(text, header.end(), eos, start=i, name=name), i)


class FunctionaryV32(ToolFormat):
    name = "functionary_v3_2"
    models = "Functionary small/medium v3.2"
    engine = FunctionaryEngine
    template_markers = (">>>all",)
    template_priority = 6
    grammar = JsonCallGrammar(
        head=lambda name: (f"{RECIPIENT}{name}\n",),
        tail="",
        separator="",
        trigger=RECIPIENT,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "".join(f"{RECIPIENT}{n}\n{dumps(a)}" for n, a in calls)


FORMAT = FunctionaryV32()

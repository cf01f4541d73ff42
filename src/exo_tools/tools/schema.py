"""Declared-tool lookup and schema-aware argument normalization.

Small models get argument *types* wrong far more often than argument *meaning*:
``"3"`` for an integer, a JSON string for an object, ``file_path`` for
``filePath``. ``normalize_arguments`` repairs exactly those mistakes, and only
where the schema makes the repair unambiguous; a value it cannot repair is left
as the model wrote it so the tool can report a precise error.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

from ._scan import dumps, loads

_INT_RE = re.compile(r"[+-]?\d+")
_NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_MAX_DEPTH = 32

# Keys models use interchangeably for a file path. A key from this group is renamed
# only to the single member the schema declares and the call lacks.
_ALIAS_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"filePath", "file_path", "filepath", "path", "file", "filename", "fileName"}),
)


def tool_name(tool: Mapping[str, Any]) -> str | None:
    """Name of an OpenAI tool entry (``{"type":"function","function":{...}}``) or a bare one."""
    fn = tool.get("function")
    spec = fn if isinstance(fn, Mapping) else tool
    name = spec.get("name")
    return name if isinstance(name, str) and name else None


def tool_spec(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else tool


class ToolIndex:
    """Declared tools by name, with the name-resolution rules every parser shares."""

    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self.specs: dict[str, Mapping[str, Any]] = {}
        for tool in tools or []:
            if isinstance(tool, Mapping):
                name = tool_name(tool)
                if name is not None:
                    self.specs.setdefault(name, tool_spec(tool))
        self._folded: dict[str, list[str]] = {}
        for name in self.specs:
            self._folded.setdefault(name.casefold(), []).append(name)

    def resolve(self, name: str) -> str | None:
        """The declared name for ``name``: exact, else a unique case-insensitive match."""
        if name in self.specs:
            return name
        matches = self._folded.get(name.casefold(), [])
        return matches[0] if len(matches) == 1 else None

    def parameters(self, name: str) -> dict[str, Any] | None:
        spec = self.specs.get(name)
        if spec is None:
            return None
        params = spec.get("parameters")
        return params if isinstance(params, dict) else {}

    def __contains__(self, name: str) -> bool:
        return name in self.specs


def normalize_arguments(
    arguments: dict[str, Any], parameters_schema: dict[str, Any]
) -> dict[str, Any]:
    """Repair ``arguments`` against a JSON-schema ``parameters`` object; see module docs.

    Returns a new dict; the input is not modified.
    """
    result = _Normalizer(parameters_schema).coerce(copy.deepcopy(arguments), parameters_schema, 0)
    return result if isinstance(result, dict) else arguments


def _types_of(schema: Mapping[str, Any]) -> list[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    return []


def matches_type(value: Any, type_name: str) -> bool:
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_name == "boolean":
        return isinstance(value, bool)
    if type_name == "null":
        return value is None
    if type_name == "object":
        return isinstance(value, dict)
    if type_name == "array":
        return isinstance(value, list)
    return True


def _key_fold(key: str) -> str:
    return key.replace("_", "").replace("-", "").casefold()


class _Normalizer:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def deref(self, schema: Any, depth: int) -> Mapping[str, Any]:
        """Follow local ``$ref`` pointers (``#/$defs/X``), as pydantic emits them."""
        while (
            isinstance(schema, Mapping)
            and isinstance(schema.get("$ref"), str)
            and depth < _MAX_DEPTH
        ):
            ref: str = schema["$ref"]
            if not ref.startswith("#/"):
                return {}
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, Mapping) else None
            schema = target
            depth += 1
        return schema if isinstance(schema, Mapping) else {}

    def coerce(self, value: Any, schema: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            return value
        s = self.deref(schema, depth)
        if not s:
            return value
        for sub in s.get("allOf") or []:
            value = self.coerce(value, sub, depth + 1)
        union = s.get("anyOf") or s.get("oneOf")
        if isinstance(union, list) and union:
            value = self._coerce_union(value, union, depth)
        types = _types_of(s)
        if len(types) > 1:
            base = {k: v for k, v in s.items() if k != "type"}
            value = self._coerce_union(value, [{**base, "type": t} for t in types], depth)
        elif types:
            value = self._coerce_type(value, types[0], s, depth)
        elif isinstance(s.get("properties"), Mapping) and isinstance(value, dict | str):
            value = self._coerce_type(value, "object", s, depth)
        return self._coerce_enum(value, s)

    def _coerce_union(self, value: Any, branches: list[Any], depth: int) -> Any:
        resolved = [self.deref(b, depth) for b in branches]
        # Prefer a branch the value already satisfies, so valid input is never rewritten
        # into another branch's type.
        for branch in resolved:
            types = _types_of(branch)
            if types and any(matches_type(value, t) for t in types):
                return self.coerce(value, branch, depth + 1)
        for branch in resolved:
            types = _types_of(branch)
            candidate = self.coerce(value, branch, depth + 1)
            if types and any(matches_type(candidate, t) for t in types):
                return candidate
        return value

    def _coerce_type(self, value: Any, type_name: str, s: Mapping[str, Any], depth: int) -> Any:
        if type_name == "object":
            if isinstance(value, str):
                decoded = _try_json(value)
                if isinstance(decoded, dict):
                    value = decoded
            return self._coerce_object(value, s, depth) if isinstance(value, dict) else value
        if type_name == "array":
            if isinstance(value, str):
                decoded = _try_json(value)
                value = decoded if isinstance(decoded, list) else [value]
            elif value is not None and not isinstance(value, list):
                value = [value]
            if isinstance(value, list):
                items = s.get("items")
                if isinstance(items, Mapping):
                    value = [self.coerce(v, items, depth + 1) for v in value]
            return value
        if type_name in ("integer", "number"):
            return _to_number(value, integer=type_name == "integer")
        if type_name == "boolean":
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            return value
        if type_name == "null":
            if isinstance(value, str) and value.strip().lower() in ("null", "none"):
                return None
            return value
        if type_name == "string":
            if isinstance(value, bool | int | float | dict | list):
                # Lossless: the JSON text of the value (a tool wanting JSON-in-a-string
                # gets exactly that).
                return dumps(value)
            return value
        return value

    def _coerce_object(
        self, obj: dict[str, Any], s: Mapping[str, Any], depth: int
    ) -> dict[str, Any]:
        props_raw = s.get("properties")
        props: Mapping[str, Any] = props_raw if isinstance(props_raw, Mapping) else {}
        if props:
            obj = _apply_aliases(obj, props)
        out: dict[str, Any] = {}
        additional = s.get("additionalProperties", True)
        for key, val in obj.items():
            if key in props:
                out[key] = self.coerce(val, props[key], depth + 1)
            elif additional is False:
                continue  # the schema forbids it; the tool would reject the whole call
            elif isinstance(additional, Mapping):
                out[key] = self.coerce(val, additional, depth + 1)
            else:
                out[key] = val
        for key, sub in props.items():
            if key in out:
                continue
            sub_s = self.deref(sub, depth)
            if "default" in sub_s:
                out[key] = copy.deepcopy(sub_s["default"])
        required = s.get("required")
        for key in required if isinstance(required, list) else []:
            if key in out or key not in props:
                continue
            # The only sound fill for a missing required field: the schema admits exactly
            # one value (``const`` or a one-element ``enum``).
            sub_s = self.deref(props[key], depth)
            if "const" in sub_s:
                out[key] = copy.deepcopy(sub_s["const"])
            elif isinstance(sub_s.get("enum"), list) and len(sub_s["enum"]) == 1:
                out[key] = copy.deepcopy(sub_s["enum"][0])
        return out

    @staticmethod
    def _coerce_enum(value: Any, s: Mapping[str, Any]) -> Any:
        enum = s.get("enum")
        if not isinstance(enum, list) or not isinstance(value, str) or value in enum:
            return value
        folded = value.strip().casefold()
        hits = [e for e in enum if isinstance(e, str) and e.casefold() == folded]
        return hits[0] if len(hits) == 1 else value


def _apply_aliases(obj: dict[str, Any], props: Mapping[str, Any]) -> dict[str, Any]:
    """Rename undeclared keys to the declared property they clearly mean.

    A rename happens only when the target is declared, absent from the call and the
    only candidate, so a correct call is never changed.
    """
    out = dict(obj)
    for key in list(obj):
        if key in props:
            continue
        candidates = [p for p in props if p not in out and _key_fold(p) == _key_fold(key)]
        if len(candidates) != 1:
            group = next((g for g in _ALIAS_GROUPS if key in g), None)
            candidates = (
                [p for p in props if group and p in group and p not in out] if group else []
            )
        if len(candidates) == 1:
            # Rebuild to keep the original key order (stable output for tests and logs).
            out = {(candidates[0] if k == key else k): v for k, v in out.items()}
    return out


def _try_json(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        return loads(stripped)
    except ValueError:
        return None


def _to_number(value: Any, *, integer: bool) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if _INT_RE.fullmatch(text):
            return int(text)
        if _NUMBER_RE.fullmatch(text):
            number = float(text)
            if math.isfinite(number):
                value = number
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def object_properties(parameters_schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The properties of a plain object schema, where each member normalizes on its
    own (no root-level combinators or references); ``None`` otherwise."""
    if any(k in parameters_schema for k in ("allOf", "anyOf", "oneOf", "$ref", "not")):
        return None
    if parameters_schema.get("type", "object") != "object":
        return None
    props = parameters_schema.get("properties")
    return props if isinstance(props, Mapping) else {}


def normalize_property(parameters_schema: dict[str, Any], key: str, value: Any) -> Any:
    """``value`` normalized as the declared property ``key`` of a plain object schema,
    exactly as ``normalize_arguments`` normalizes that member."""
    props = object_properties(parameters_schema) or {}
    return _Normalizer(parameters_schema).coerce(copy.deepcopy(value), props.get(key), 1)


def is_verbatim_string(parameters_schema: dict[str, Any], key: str) -> bool:
    """Whether normalization keeps any string value of property ``key`` unchanged, so
    its characters can be streamed before the value is complete."""
    props = object_properties(parameters_schema)
    if props is None or key not in props:
        return False
    s = _Normalizer(parameters_schema).deref(props[key], 1)
    if any(k in s for k in ("enum", "allOf", "anyOf", "oneOf", "properties")):
        return False
    return _types_of(s) in ([], ["string"])

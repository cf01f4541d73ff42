"""Schema-aware argument normalization."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from exo_tools.tools import normalize_arguments


def obj(
    properties: dict[str, Any], required: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], **extra}


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        ({"type": "integer"}, "42", 42),
        ({"type": "integer"}, " -7 ", -7),
        ({"type": "integer"}, 3.0, 3),
        ({"type": "integer"}, 3.5, 3.5),  # never destructive
        ({"type": "integer"}, "many", "many"),
        ({"type": "integer"}, True, True),
        ({"type": "number"}, "2.5", 2.5),
        ({"type": "number"}, "1e3", 1000.0),
        ({"type": "number"}, "nan", "nan"),
        ({"type": "boolean"}, "TRUE", True),
        ({"type": "boolean"}, "false", False),
        ({"type": "boolean"}, "yes", "yes"),
        ({"type": "null"}, "null", None),
        ({"type": "string"}, 5, "5"),
        ({"type": "string"}, {"a": 1}, '{"a": 1}'),
        ({"type": "string"}, None, None),
        ({"type": "object", "properties": {"n": {"type": "integer"}}}, '{"n": "1"}', {"n": 1}),
        ({"type": "array", "items": {"type": "integer"}}, '[1, "2"]', [1, 2]),
        ({"type": "array", "items": {"type": "string"}}, "a.py", ["a.py"]),
        ({"type": "array"}, 7, [7]),
        ({"type": "string", "enum": ["Celsius", "Fahrenheit"]}, "celsius", "Celsius"),
        ({"type": "string", "enum": ["a", "A"]}, "a", "a"),
        ({"type": "string", "enum": ["ab", "AB"]}, "Ab", "Ab"),  # ambiguous: left alone
        ({"type": ["integer", "null"]}, "5", 5),
        ({"type": ["integer", "null"]}, "null", None),
        ({"type": ["string", "integer"]}, "5", "5"),  # already valid for a branch
        ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", True),
        (
            {"oneOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
            '["1"]',
            [1],
        ),
    ],
)
def test_value_coercion(schema: dict[str, Any], value: Any, expected: Any) -> None:
    assert normalize_arguments({"v": value}, obj({"v": schema})) == {"v": expected}


def test_aliases_only_when_target_declared_and_missing() -> None:
    schema = obj({"filePath": {"type": "string"}, "oldString": {"type": "string"}}, ["filePath"])
    assert normalize_arguments({"file_path": "a", "old_string": "x"}, schema) == {
        "filePath": "a",
        "oldString": "x",
    }
    assert normalize_arguments({"path": "a"}, schema) == {"filePath": "a"}
    assert normalize_arguments({"file": "a"}, schema) == {"filePath": "a"}
    # Target already present: the extra key is not merged over it.
    assert normalize_arguments({"filePath": "a", "path": "b"}, schema) == {
        "filePath": "a",
        "path": "b",
    }
    snake = obj({"file_path": {"type": "string"}})
    assert normalize_arguments({"filePath": "a"}, snake) == {"file_path": "a"}
    # Two declared candidates: ambiguous, untouched.
    two = obj({"path": {"type": "string"}, "filePath": {"type": "string"}})
    assert normalize_arguments({"file": "a"}, two) == {"file": "a"}


def test_defaults_required_and_additional_properties() -> None:
    schema = obj(
        {
            "city": {"type": "string"},
            "units": {"type": "string", "default": "metric"},
            "kind": {"const": "weather"},
            "mode": {"type": "string", "enum": ["fast"]},
            "days": {"type": "integer"},
        },
        ["city", "kind", "mode", "days"],
        additionalProperties=False,
    )
    out = normalize_arguments({"extra": 1}, schema)
    # city/days are required but have no single valid value: left missing.
    assert out == {"units": "metric", "kind": "weather", "mode": "fast"}
    open_schema = obj({"a": {"type": "integer"}})
    assert normalize_arguments({"a": "1", "extra": "2"}, open_schema) == {"a": 1, "extra": "2"}
    typed_extra = obj({}, additionalProperties={"type": "integer"})
    assert normalize_arguments({"x": "3"}, typed_extra) == {"x": 3}


def test_nested_objects_arrays_and_refs() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "$defs": {
            "Edit": {
                "type": "object",
                "properties": {"line": {"type": "integer"}, "old_string": {"type": "string"}},
            }
        },
        "properties": {
            "edits": {"type": "array", "items": {"$ref": "#/$defs/Edit"}},
            "options": {"type": "object", "properties": {"dry": {"type": "boolean"}}},
        },
    }
    args = {"edits": '[{"line": "3", "oldString": "a"}]', "options": {"dry": "true"}}
    before = copy.deepcopy(args)
    assert normalize_arguments(args, schema) == {
        "edits": [{"line": 3, "old_string": "a"}],
        "options": {"dry": True},
    }
    assert args == before, "input must not be mutated"


def test_schema_without_type_but_with_properties() -> None:
    schema = {"properties": {"n": {"type": "integer"}}}
    assert normalize_arguments({"n": "4"}, schema) == {"n": 4}
    assert normalize_arguments({"n": "4"}, {}) == {"n": "4"}

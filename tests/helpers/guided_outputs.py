"""The guided-generation cases of the tests: each constraint, prompts for it, and a check
of an output written here independently of llguidance (Python's `re`, membership, and a
recursive-descent parser of the test's Lark grammar)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DATE = r"\d{4}-\d{2}-\d{2}"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
SENTIMENTS = ["positive", "negative", "neutral"]

# Arithmetic, recursive through parentheses: not a regular language.
ARITHMETIC_LARK = r"""
start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: /[ ]?[-+*\/][ ]?/
NUMBER: /[0-9]{1,6}/
"""

# A record as llama.cpp users write one in GBNF.
RECORD_GBNF = r"""
root ::= "Name: " name "\nAge: " age
name ::= word (" " word)?
word ::= [A-Z] [a-z]{1,15}
age ::= [0-9]{1,3}
"""

_OP = re.compile(r"[ ]?[-+*/][ ]?")
_NUMBER = re.compile(r"[0-9]{1,6}")
_WORD = r"[A-Z][a-z]{1,15}"
_RECORD_LINES = (
    ("Name: ", re.compile(rf"{_WORD}( {_WORD})?")),
    ("Age: ", re.compile(r"[0-9]{1,3}")),
)


def is_date(text: str) -> bool:
    return re.fullmatch(DATE, text) is not None


def is_phone(text: str) -> bool:
    return re.fullmatch(PHONE, text) is not None


def is_sentiment(text: str) -> bool:
    return text in SENTIMENTS


def is_arithmetic(text: str) -> bool:
    """Whether `text` is a sentence of ARITHMETIC_LARK."""

    def expr(at: int) -> int | None:
        end = term(at)
        while end is not None and (op := _OP.match(text, end)):
            end = term(op.end())
        return end

    def term(at: int) -> int | None:
        if text.startswith("(", at):
            end = expr(at + 1)
            return end + 1 if end is not None and text.startswith(")", end) else None
        number = _NUMBER.match(text, at)
        return number.end() if number else None

    return expr(0) == len(text)


def is_record(text: str) -> bool:
    """Whether `text` is a sentence of RECORD_GBNF."""
    lines = text.split("\n")
    if len(lines) != len(_RECORD_LINES):
        return False
    return all(
        line.startswith(label) and value.fullmatch(line.removeprefix(label)) is not None
        for line, (label, value) in zip(lines, _RECORD_LINES, strict=True)
    )


@dataclass(frozen=True)
class GuidedCase:
    """One kind of guided request: the body fields that constrain it, its prompts, the
    check of an output, and the token limit its requests run with."""

    name: str
    fields: dict[str, Any]
    prompts: list[str]
    check: Callable[[str], bool]
    max_tokens: int


_PEOPLE = [
    ("Maria Lopez", 34, "Madrid"),
    ("John Smith", 51, "Boston"),
    ("Aiko Tanaka", 28, "Osaka"),
    ("Pierre Martin", 45, "Lyon"),
    ("Fatima Khan", 39, "Lahore"),
    ("Lars Berg", 62, "Oslo"),
    ("Chen Wei", 23, "Shanghai"),
    ("Olga Petrova", 57, "Kazan"),
    ("Diego Ruiz", 31, "Quito"),
    ("Emma Brown", 19, "Leeds"),
    ("Kofi Mensah", 44, "Accra"),
    ("Anna Nowak", 36, "Krakow"),
    ("Ravi Patel", 27, "Pune"),
    ("Sofia Rossi", 48, "Turin"),
    ("Tom Walker", 70, "Perth"),
    ("Ines Silva", 22, "Porto"),
    ("Yusuf Demir", 33, "Izmir"),
    ("Mia Schulz", 41, "Bremen"),
    ("Omar Haddad", 55, "Amman"),
    ("Lucy Green", 29, "Dublin"),
]
_EVENTS = [
    "the first Moon landing",
    "the fall of the Berlin Wall",
    "the signing of the US Declaration of Independence",
    "the end of World War II in Europe",
    "the launch of Sputnik",
    "the opening of the Eiffel Tower",
    "the sinking of the Titanic",
    "the first iPhone release",
    "the start of the French Revolution",
    "the founding of the United Nations",
]
_REVIEWS = [
    "I loved this phone, the battery lasts forever!",
    "The food was cold and the waiter was rude.",
    "The package arrived on Tuesday.",
    "Best concert of my life, the band was amazing.",
    "This is the worst hotel I have ever stayed in.",
    "The meeting is scheduled for 3 pm.",
    "Fantastic service, I will come back again.",
    "The screen cracked after two days, very disappointed.",
    "The train leaves from platform four.",
    "What a wonderful surprise, thank you so much!",
    "The software keeps crashing and support never answers.",
    "The book has 320 pages.",
    "My kids adore this game, great value.",
    "Terrible sound quality, I returned it.",
    "The shop opens at nine.",
    "Delicious pizza and friendly staff.",
    "The flight was delayed for six hours, awful.",
    "The report is written in English.",
    "Absolutely brilliant film, I cried at the end.",
    "The chair broke the first time I sat on it.",
]
_SUMS = [
    "ten",
    "twenty-four",
    "seven times eight",
    "one hundred",
    "forty-two",
    "three plus four, times two",
    "fifteen",
    "the number of days in a week",
    "twelve divided by three",
    "nine squared",
    "fifty minus eight",
    "the sum of one, two and three",
    "eighty-one",
    "six times seven",
    "two hundred and five",
    "a hundred divided by four",
    "eleven plus twelve",
    "three",
    "sixty-four",
    "ninety-nine minus nine",
]

CASES = [
    GuidedCase(
        "regex (date)",
        {"guided_regex": DATE},
        [f"On what date did {event} happen? Answer with the date only." for event in _EVENTS],
        is_date,
        12,
    ),
    GuidedCase(
        "regex (phone)",
        {"structured_outputs": {"regex": PHONE}},
        [
            f"Make up a US phone number for {name}, a customer from {city}."
            for name, _, city in _PEOPLE[:10]
        ],
        is_phone,
        16,
    ),
    GuidedCase(
        "choice",
        {"structured_outputs": {"choice": SENTIMENTS}},
        [f"Is this review positive, negative or neutral? {review}" for review in _REVIEWS],
        is_sentiment,
        4,
    ),
    GuidedCase(
        "Lark grammar",
        {"structured_outputs": {"grammar": ARITHMETIC_LARK}},
        [f"Write an arithmetic expression whose value is {sum_}." for sum_ in _SUMS],
        is_arithmetic,
        8,
    ),
    GuidedCase(
        "GBNF grammar",
        {"grammar": RECORD_GBNF},
        [
            f"{name} is {age} years old and lives in {city}. Fill in the record."
            for name, age, city in _PEOPLE
        ],
        is_record,
        12,
    ),
]

"""The checks every input rule is built from: a value's type, its range, one of a set of choices.
Each raises `InputError` naming the field, the rule and the value."""

from __future__ import annotations

from typing import Any

from sdcog.errors import InputError


def require_type(field: str, value: Any, kinds: tuple[type, ...], label: str) -> None:
    # bool is an int subclass; `true` is never a valid size or count.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InputError(field, f"must be {label}, got {value!r}")


def check_range(field: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise InputError(field, f"must be between {low} and {high}, got {value}")


def check_int(field: str, value: Any, low: int, high: int) -> int:
    require_type(field, value, (int,), "an integer")
    check_range(field, value, low, high)
    return value


def check_number(field: str, value: Any, low: float, high: float) -> float:
    require_type(field, value, (int, float), "a number")
    check_range(field, value, low, high)
    return float(value)


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return value

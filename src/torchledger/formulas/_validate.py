"""Argument checks shared by the formula modules: every public function validates at its boundary."""

from __future__ import annotations

from collections.abc import Iterable


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (>= 1)")
    return value


def non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 0, else raise ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    if value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (>= 0)")
    return value


def positive_number(name: str, value: object) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a positive number")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def int_tuple(name: str, value: object, ndim: int, *, minimum: int) -> tuple[int, ...]:
    """Expand an int or a sequence of ints to a tuple of length ``ndim``, each >= ``minimum``."""
    items: tuple[object, ...]
    if isinstance(value, int) and not isinstance(value, bool):
        items = (value,) * ndim
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = tuple(value)
    else:
        raise ValueError(f"{name}={value!r} must be an int or a sequence of {ndim} ints")
    if len(items) != ndim:
        raise ValueError(f"{name}={value!r} must have {ndim} entries, one per spatial dimension")
    ints: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ValueError(f"{name}={value!r} must hold integers >= {minimum}")
        ints.append(item)
    return tuple(ints)


def one_of(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError listing them."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(options)}")
    return value

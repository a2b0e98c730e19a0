"""argparse ``type=`` functions shared by the commands: a bad value is a one-line usage error (exit 2)
before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from esolm.errors import UserError


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= ``lo``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int = int_at_least(1)


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval from ``lo`` to ``hi`` (closed unless ``*_open``)."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        value = _float(text)
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise argparse.ArgumentTypeError(f"must lie in {span}, got {text!r}")
        return value

    parse.__name__ = f"number in {span}"
    return parse


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


unit_interval = float_in(0.0, 1.0)  # alpha0
top_p = float_in(0.0, 1.0, lo_open=True)  # nucleus threshold; 1 = no filtering
open_fraction = float_in(0.0, 1.0, lo_open=True, hi_open=True)  # held-out fraction


def _items(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def positive_int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``."""
    return [positive_int(t) for t in _items(text)]


def unit_interval_list(text: str) -> list[float]:
    """``"0.25,1"`` -> ``[0.25, 1.0]``, each in [0, 1]."""
    return [unit_interval(t) for t in _items(text)]


def choice_list(choices: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        items = _items(text)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(choices)})")
        return items

    parse.__name__ = "comma-separated list"
    return parse


def text(value: str) -> str:
    """Command-line text that is valid UTF-8 (undecodable argv bytes arrive as surrogate escapes)."""
    from esolm.data.tokenizers import check_text

    try:
        return check_text(value, "text")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None

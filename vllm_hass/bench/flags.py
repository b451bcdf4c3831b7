"""Comma-separated list flags shared by the bench's commands (one-line errors naming the flag)."""

from __future__ import annotations

from vllm_hass.errors import UserError


def int_list(value: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        items = [int(v) for v in value.split(",")]
    except ValueError:
        items = []
    if not items or any(v < minimum for v in items):
        what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise UserError(f"{flag} {value}: expected comma-separated {what}, e.g. 1,8,32")
    return sorted(set(items))


def float_list(value: str, flag: str) -> list[float]:
    try:
        items = [float(v) for v in value.split(",")]
    except ValueError:
        items = []
    if not items or any(not v >= 0 for v in items):
        raise UserError(f"{flag} {value}: expected comma-separated temperatures >= 0, e.g. 0,1")
    return list(dict.fromkeys(items))


def int_list_arg(flag: str):
    """argparse type for a comma-separated list of positive ints (one-line error naming the flag)."""
    import argparse

    def parse(value: str) -> list[int]:
        try:
            return int_list(value, flag)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse

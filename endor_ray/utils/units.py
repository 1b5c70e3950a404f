"""Sizes: parsing budgets given by users, printing byte counts for people."""

from __future__ import annotations

import re

from endor_ray.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(value: str | int | None, what: str) -> tuple[int | None, int | None]:
    """'8GiB' -> (bytes, None); '12' or 12 -> (None, 12 layers); None -> (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, int):
        layers = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} {value!r} is neither a layer count (12) nor a size (8GiB, 500MB)")
        number, unit = match.groups()
        if unit:
            return int(float(number) * _UNITS[unit.lower()]), None
        if "." in number:
            raise ConfigError(f"{what} {value!r}: a layer count must be a whole number")
        layers = int(number)
    if layers < 0:
        raise ConfigError(f"{what} must not be negative, got {value!r}")
    return None, layers


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")

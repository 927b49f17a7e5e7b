"""Durations and sizes as people write them in config files and on the command line.

A duration is a number of seconds or a string of units in decreasing order (`500ms`, `30s`,
`5m`, `1h`, `1d`, `1h30m`, `1.5s`); a size is a number of bytes or a string with a decimal
(`KB` = 1000) or binary (`KiB` = 1024) unit. Numbers given as strings (`"60"`, from a
command-line flag) are accepted too, so `--delay 60` and `--delay 1m` mean the same.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_NUMBER = r"(\d+(?:\.\d+)?)"
_PLAIN = re.compile(_NUMBER)
_COMPOUND = re.compile("".join(f"(?:{_NUMBER}{unit})?" for unit in _SECONDS))

_BYTES = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_duration(value: str | float) -> float:
    """Seconds in `value`; ValueError with the accepted forms if it is not a duration."""
    if isinstance(value, str):
        text = value.strip()
        if _PLAIN.fullmatch(text):
            return float(text)
        parts = _COMPOUND.fullmatch(text)
        if not text or parts is None:
            raise ValueError(
                f"expected a duration like 500ms, 30s, 5m, 1h, 1d, got {json.dumps(value)}"
            )
        return sum(
            float(n) * unit for n, unit in zip(parts.groups(), _SECONDS.values(), strict=True) if n
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a duration like 500ms, 30s, 5m, 1h, 1d, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a duration of 0 seconds or more, got {value}")
    return float(value)


def parse_size(value: str | int) -> int:
    """Bytes in `value` (`512KB`, `1MiB`, `2GB`, or a plain integer); ValueError otherwise."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"expected a size like 512KiB, 1MiB, 1GB, got {json.dumps(value)}")
        number, unit = match.groups()
        return int(Decimal(number) * _BYTES[(unit or "b").lower()])
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a size like 512KiB, 1MiB, 1GB, got {value!r}")
    if value < 0:
        raise ValueError(f"expected a size of 0 bytes or more, got {value}")
    return value


def format_duration(seconds: float) -> str:
    """The shortest string `parse_duration` reads back as `seconds` (to the millisecond)."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if 0 < seconds < 0.001:
        return f"{seconds * 1000:g}ms"
    millis = round(seconds * 1000)
    days, millis = divmod(millis, 86_400_000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    text = "".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n)
    if secs and millis:
        text += f"{secs}.{millis:03d}".rstrip("0") + "s"
    elif secs:
        text += f"{secs}s"
    elif millis:
        text += f"{millis}ms"
    return text or "0s"

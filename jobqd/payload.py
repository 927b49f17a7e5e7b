"""Job args to JSON text, refusing at enqueue anything the task could not get back intact."""

from __future__ import annotations

import json
from typing import Any

from jobqd.errors import PayloadError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

_encoder = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _find_offender(value: Any, path: str) -> tuple[str, Any] | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path} key {key!r}", key
            found = _find_offender(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _find_offender(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return path, value
    if value is None or isinstance(value, str | int | float | bool):
        return None
    return path, value


def encode(args: Any, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """JSON text for `args`; TypeError names the first value JSON cannot carry."""
    if args is None:
        args = {}
    try:
        text = _encoder.encode(args)
    except (TypeError, ValueError) as exc:
        found = _find_offender(args, "args")
        where, value = found if found else ("args", args)
        raise TypeError(
            f"{where} = {value!r} ({type(value).__name__}) is not JSON-serializable: "
            "job args must be dicts, lists, str, int, float, bool or None"
        ) from exc
    size = len(text.encode())
    if size > max_bytes:
        raise PayloadError(
            f"job args are {size} bytes as JSON, over the limit of {max_bytes} bytes: "
            "store large data elsewhere and pass a reference"
        )
    return text

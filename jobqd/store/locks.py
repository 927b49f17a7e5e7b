"""Advisory-lock keys: one bigint per (schema, purpose), and how pg_locks shows it.

The migration runner and the leader each take a session advisory lock; jobqctl and the http
child look the holder up in pg_locks, which stores a bigint key as two unsigned 32-bit halves.
"""

from __future__ import annotations

import hashlib


def lock_key(schema: str, purpose: str) -> int:
    """A stable signed 64-bit advisory lock key, distinct per schema and purpose."""
    digest = hashlib.sha256(f"jobqd:{schema}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def pg_locks_parts(key: int) -> dict[str, int]:
    """A bigint key as pg_locks shows it: `classid` the high 32 bits, `objid` the low, both
    unsigned (the statements compare them as bigint)."""
    return {"classid": (key >> 32) & 0xFFFFFFFF, "objid": key & 0xFFFFFFFF}

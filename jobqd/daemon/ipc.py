"""Child-to-master messages over a pipe: one JSON object per line.

The master holds no database connection, so this pipe is how it learns what its children are
doing (booted, busy slots, metric deltas). A closed pipe is also how a child learns that its
master is gone.
"""

from __future__ import annotations

import json
import os
from typing import Any


class Sender:
    """The child's end. Messages stay far below PIPE_BUF-sized chunks in practice; a write
    to a master that is gone raises BrokenPipeError, which the caller treats as orphaning."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, kind: str, **fields: Any) -> None:
        data = (json.dumps({"kind": kind, **fields}, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


class Receiver:
    """The master's end: feed it what a non-blocking read returned, get whole messages back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """Read what is available; returns (messages, still_open)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return [], True
        if not chunk:
            return [], False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue
        return messages, True

"""Child-to-master messages over a pipe: one JSON object per line.

The master holds no database connection, so this pipe is how it learns what its children are
doing (booted, busy slots, metric deltas). A closed pipe is also how a child learns that its
master is gone.

Two kinds of message, as dataclasses: `Booted` once the child is ready for work, `Status`
periodically. On the wire a field that is None is left out, so each role sends only what it
knows (a worker its busy slots, maintenance its leadership, http nothing but that it lives).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Booted:
    """The child is ready for work; `process_id` is its jobqd.processes row, if it has one."""

    role: str
    process_id: int | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """What a child reports every second; `metrics` is a `MetricStore.snapshot_delta()`."""

    busy: int | None = None
    concurrency: int | None = None
    leader: bool | None = None
    metrics: dict[str, Any] | None = None


Message = Booted | Status

_KINDS: dict[type, str] = {Booted: "booted", Status: "status"}


def encode(message: Message) -> bytes:
    """One line: the kind and the fields that are set."""
    document: dict[str, Any] = {"kind": _KINDS[type(message)]}
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if value is not None:
            document[field.name] = value
    return (json.dumps(document, separators=(",", ":")) + "\n").encode()


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    return value if isinstance(value, kind) else None


def decode(document: dict[str, Any]) -> Message | None:
    """The message a JSON object carries; None for an unknown kind. A field of the wrong type
    reads as absent, so a malformed message cannot break the master."""
    kind = document.get("kind")
    if kind == "booted":
        return Booted(
            role=_typed(document.get("role"), str) or "",
            process_id=_typed(document.get("process_id"), int),
            queue=_typed(document.get("queue"), str),
        )
    if kind == "status":
        return Status(
            busy=_typed(document.get("busy"), int),
            concurrency=_typed(document.get("concurrency"), int),
            leader=_typed(document.get("leader"), bool),
            metrics=_typed(document.get("metrics"), dict),
        )
    return None


class Sender:
    """The child's end. Messages stay far below PIPE_BUF-sized chunks in practice; a write
    to a master that is gone raises OSError (BrokenPipeError), which the child's lifecycle
    treats as orphaning."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: Message) -> None:
        view = memoryview(encode(message))
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


class Receiver:
    """The master's end: the JSON objects of whole lines, from what a non-blocking read
    returned. Lines that are not JSON objects are skipped; `decode` types the rest."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """Read what is available; returns (objects, still_open)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return [], True
        if not chunk:
            return [], False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        documents = []
        for line in lines:
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict):
                documents.append(document)
        return documents, True

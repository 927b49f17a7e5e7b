"""Retry delays: one policy type for job retries and for restarting crashed children."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """`exponential`: base * 2^(attempt-1) up to cap; `fixed`: base every time. Both spread by
    +/- jitter (a fraction) so that jobs failing together do not come back together."""

    kind: str = "exponential"
    base: float = 1.0
    cap: float = 3600.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        if self.kind == "fixed":
            delay = self.base
        else:
            delay = min(self.cap, self.base * (2 ** max(0, min(attempt - 1, 62))))
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, delay if self.kind == "fixed" else min(self.cap, delay))

    def as_json(self) -> str:
        """The fields as the database keeps them (queues.backoff, tasks.backoff), for the SQL
        protocol's fail(), whose backoff_delay() computes `delay` the same way."""
        return json.dumps(asdict(self))

    @classmethod
    def from_settings(cls, settings: object) -> Backoff:
        return cls(
            kind=settings.kind,  # type: ignore[attr-defined]
            base=settings.base,  # type: ignore[attr-defined]
            cap=settings.cap,  # type: ignore[attr-defined]
            jitter=settings.jitter,  # type: ignore[attr-defined]
        )

"""What the master says about its children: the STATUS= line for systemd and the `health`
message for the http child. Both are pure functions of the children, the specs and their
restart bookkeeping, so they are tested without processes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from jobqd.daemon.children import MAINTENANCE, WORKER, Child, ChildSpec, Ident, Restarts
from jobqd.daemon.roll import DONE, Roll


def _restarts_of(restarts: Mapping[Ident, Restarts], spec: ChildSpec) -> Restarts:
    return restarts.get(spec.ident) or Restarts()


def serving(children: Collection[Child]) -> dict[Ident, Child]:
    """The child that serves each spec identity: not being stopped, and not a roll's
    replacement still booting beside the child it replaces."""
    found: dict[Ident, Child] = {}
    for child in children:
        if child.stopping_since is None:
            ident = child.spec.ident
            if ident not in found or found[ident].replaces is not None:
                found[ident] = child
    return found


def status_line(
    children: Collection[Child],
    specs: list[ChildSpec],
    restarts: Mapping[Ident, Restarts],
    *,
    stopping: str | None,
    reload_failed: bool,
    now: float,
    roll: Roll | None = None,
) -> str:
    """One line for systemd's STATUS=: workers, busy slots, leadership, restarts, a roll
    under way or failed; while stopping (`"drain"` or `"fast"`), only how many children are
    left."""
    if stopping:
        word = "draining" if stopping == "drain" else "stopping"
        return f"{word}: {len(children)} children left"
    live = list(serving(children).values())
    workers = [c for c in live if c.spec.kind == WORKER]
    leader = any(c.leads(now) for c in live if c.spec.kind == MAINTENANCE)
    busy = sum(c.busy for c in workers)
    slots = sum(c.concurrency for c in workers)
    total = sum(r.total for r in restarts.values())
    line = (
        f"{len(workers)} worker{'' if len(workers) == 1 else 's'}, {busy}/{slots} slots busy, "
        f"leader: {'yes' if leader else 'no'}, {total} restarts"
    )
    looping = [s.name for s in specs if _restarts_of(restarts, s).crash_looping]
    if looping:
        line += f"; crash loop: {', '.join(looping)}"
    if reload_failed:
        line += "; last reload failed, running on the previous configuration"
    if roll is not None and roll.state != DONE:
        line += f"; roll {roll.number} {roll.progress()}"
    return line


def health(
    children: Collection[Child],
    specs: list[ChildSpec],
    restarts: Mapping[Ident, Restarts],
    *,
    preparing: str = "",
    ready: bool,
    stopping: bool,
    status: str,
    master_alive_at: float,
    now: float,
    roll: Roll | None = None,
) -> dict[str, Any]:
    """The `health` message for the http child: one entry per wanted spec, named as in the
    logs, with `pid` None while the spec waits to be restarted, and `preparing`, why the
    workers are not started yet ("" once the database is prepared), and `roll`, the last
    roll's progress (None before any). Children being stopped are left out: their specs are
    either retired or already filled by a replacement."""
    by_ident = serving(children)
    entries: dict[str, Any] = {}
    for spec in specs:
        child = by_ident.get(spec.ident)
        spec_restarts = _restarts_of(restarts, spec)
        entries[spec.name] = {
            "role": spec.kind,
            "queue": spec.queue,
            "index": spec.index,
            "pid": child.pid if child else None,
            "booted": bool(child and child.booted),
            "started_at": child.started_wall if child else None,
            "busy": child.busy if child else 0,
            "concurrency": child.concurrency if child else 0,
            "leader": None if child is None or child.leader is None else child.leads(now),
            "restarts": spec_restarts.total,
            "crash_looping": spec_restarts.crash_looping,
            "crash_loop": spec_restarts.describe() if spec_restarts.crash_looping else None,
            "last_exit": spec_restarts.last_exit,
        }
    return {
        "kind": "health",
        "children": entries,
        "master_alive_at": master_alive_at,
        "preparing": preparing,
        "ready": ready,
        "stopping": stopping,
        "status": status,
        "roll": roll.document() if roll is not None else None,
    }

"""Reload planning: what a HUP changes, worked out from the old and new settings alone.

The master applies the plan (stop, start, log); keeping the decision here makes it testable
without processes. A spec is replaced when its identity stays but its settings key changed,
started when its identity is new, retired when its identity is gone, unchanged otherwise.
Database settings never change on reload: they take effect at the next restart, so they are
carried over from the running settings before the specs are compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from jobqd.config import Settings
from jobqd.daemon.children import ChildSpec, Ident, Restarts, specs_for


@dataclass(frozen=True)
class ReloadPlan:
    """The outcome of a reload: the settings and specs to run with from now on, and the
    names of the specs in each class of change (for the log line)."""

    settings: Settings
    specs: list[ChildSpec]
    replaced: list[str]
    started: list[str]
    retired: list[str]
    database_changed: bool  # the new database settings were ignored until the next restart
    log_changed: bool
    renewed: frozenset[Ident]  # idents whose restart bookkeeping starts afresh

    @property
    def unchanged(self) -> int:
        return len(self.specs) - len(self.replaced) - len(self.started)

    def changes(self) -> dict[str, list[str]]:
        """The log fields of the `reloaded` line."""
        return {"replaced": self.replaced, "started": self.started, "retired": self.retired}

    def keeps(self, spec: ChildSpec) -> bool:
        """Whether a child running `spec` stays: its spec is wanted exactly as it is."""
        return spec in self.specs

    def restarts(self, old: Mapping[Ident, Restarts]) -> dict[Ident, Restarts]:
        """The restart bookkeeping after the reload: kept for unchanged specs, fresh for new
        and replaced ones (a fixed config gets out of a crash loop at once), dropped for
        retired ones."""
        wanted = {spec.ident for spec in self.specs}
        kept = {i: r for i, r in old.items() if i in wanted and i not in self.renewed}
        return kept | {ident: Restarts() for ident in self.renewed}


def plan_reload(old: Settings, current: list[ChildSpec], new: Settings) -> ReloadPlan:
    """Compare the running `old` settings and `current` specs with freshly loaded `new`."""
    database_changed = new.database != old.database
    if database_changed:
        new = dataclasses.replace(new, database=old.database)
    wanted = {spec.ident: spec for spec in specs_for(new)}
    running = {spec.ident: spec for spec in current}
    replaced = [s.name for i, s in running.items() if i in wanted and wanted[i] != s]
    return ReloadPlan(
        settings=new,
        specs=list(wanted.values()),
        replaced=replaced,
        started=[s.name for i, s in wanted.items() if i not in running],
        retired=[s.name for i, s in running.items() if i not in wanted],
        database_changed=database_changed,
        log_changed=new.log != old.log,
        renewed=frozenset(i for i, s in wanted.items() if running.get(i) != s),
    )

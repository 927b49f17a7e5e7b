"""The named statements and the code agree: every statement in jobqd/store/sql/*.sql is run
somewhere in jobqd/, every statement name jobqd/ uses exists, and no other SQL is written in
Python except where it cannot be named.

Statements are reached as `sql.NAME`, `self.sql.NAME`, `statements.NAME` or
`queries(schema).NAME`; the test reads the source, so a new accessor needs a name ending in
`sql` or `statements`, or a `queries(...)` call.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import jobqd
from jobqd.store import sql as sql_module
from jobqd.store.sql import _raw

PACKAGE = Path(jobqd.__file__).parent
ACCESSORS = {"sql", "_sql", "statements", "_statements"}
# Attributes of a Queries object, or of the sql module, that are not statements.
NOT_STATEMENTS = {"schema"} | {name for name in vars(sql_module) if not name.startswith("_")}
# The only SQL built in Python: (UN)LISTEN's channel is an identifier and cannot be bound.
INLINE_SQL_ALLOWED = {
    ("store/connections.py", "subscribe"),
    ("store/connections.py", "unsubscribe"),
}


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path))


def _is_accessor(node: ast.expr) -> bool:
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id == "queries"
    if isinstance(node, ast.Name):
        return node.id in ACCESSORS
    if isinstance(node, ast.Attribute):
        return node.attr in ACCESSORS
    return False


def _used() -> dict[str, set[str]]:
    """Statement names used in jobqd/, each with the modules using it."""
    used: dict[str, set[str]] = {}
    for module, tree in _trees():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _is_accessor(node.value)
                and node.attr not in NOT_STATEMENTS
            ):
                used.setdefault(node.attr, set()).add(module)
    return used


def test_every_named_statement_is_used():
    unused = sorted(set(_raw()) - set(_used()))
    assert unused == [], f"named in jobqd/store/sql but run nowhere in jobqd/: {unused}"


def test_every_statement_name_used_exists():
    missing = {name: sorted(m) for name, m in _used().items() if name not in _raw()}
    assert missing == {}, f"used in jobqd/ but not named in jobqd/store/sql: {missing}"


def test_statement_names_start_with_a_subject():
    """`-- name: subject_verb`, the subject a .sql file's name (or one of two kept as named)."""
    subjects = {path.stem for path in (PACKAGE / "store" / "sql").glob("*.sql")}
    subjects |= {"locks", "tasks"}  # pg_locks look-ups in leader.sql, task rows in queues.sql
    odd = sorted(name for name in _raw() if name.split("_", 1)[0] not in subjects)
    assert odd == []


def _inline_sql() -> Iterator[tuple[str, str, int]]:
    """(module, function, line) of each execute()/SQL() given literal text, not a name."""
    for module, tree in _trees():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                callee = node.func
                name = callee.attr if isinstance(callee, ast.Attribute) else None
                literal = isinstance(node.args[0], ast.JoinedStr) or (
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                )
                if name in {"execute", "executemany", "SQL"} and literal:
                    yield module, function.name, node.lineno


def test_no_inline_sql_but_where_it_cannot_be_named():
    found = sorted({(m, f) for m, f, _ in _inline_sql()} - INLINE_SQL_ALLOWED)
    assert found == [], f"SQL written inline instead of named in jobqd/store/sql: {found}"

"""Every SQL statement jobqd runs, named, loaded from the .sql files beside this module.

Each file holds one subject's blocks, each starting with `-- name: SUBJECT_VERB`; `{schema}` in
a statement is replaced by the quoted schema name once per schema. Values are always bound
parameters (`%(name)s`), never formatted in. Two things are sent that are not named here: the
migration files themselves (store/migrate.py runs each as one script) and LISTEN, whose channel
is an identifier and cannot be bound (store/connections.subscribe quotes it).
tests/unit/test_statements.py checks that every name is used and every name used exists.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from importlib import resources

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@functools.cache
def _raw() -> dict[str, str]:
    statements: dict[str, str] = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text()
        parts = _HEADER.split(text)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in statements:
                raise RuntimeError(f"SQL statement {name!r} is defined twice")
            statements[name] = body.strip().rstrip(";")
    return statements


class Queries:
    """The statements for one schema, as attributes: `queries("jobqd").leases_claim`."""

    def __init__(self, schema: str) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}: use lowercase letters, digits, _")
        self.schema = schema
        quoted = quote_ident(schema)
        for name, text in _raw().items():
            setattr(self, name, text.replace("{schema}", quoted))

    def __getattr__(self, name: str) -> str:
        raise AttributeError(f"no SQL statement named {name!r}")


@functools.cache
def queries(schema: str = "jobqd") -> Queries:
    return Queries(schema)


def int_array(values: list[int]) -> str:
    """A Postgres array literal for integers: much cheaper to build than letting the driver
    adapt a list element by element, which matters on the worker's per-batch statements."""
    return "{" + ",".join(map(str, values)) + "}"


def nullable_int_array(values: list[int | None]) -> str:
    """A Postgres array literal for integers that may be NULL; refuses anything else."""
    return "{" + ",".join(_integer(v) for v in values) + "}"


def float_array(values: list[float | None]) -> str:
    """A Postgres array literal for float8 (NULL for None)."""
    return "{" + ",".join("NULL" if v is None else repr(float(v)) for v in values) + "}"


def timestamp_array(values: list[datetime | None]) -> str:
    """A Postgres array literal for timestamptz (NULL for None), in ISO 8601."""
    return "{" + ",".join("NULL" if v is None else _timestamp(v) for v in values) + "}"


def text_array(values: list[str | None]) -> str:
    """A Postgres array literal for text (NULL for None), quoted and escaped."""
    return "{" + ",".join(_element(v) for v in values) + "}"


def _element(value: str | None) -> str:
    if value is None:
        return "NULL"
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _integer(value: int | None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected an integer, got {value!r}")


def _timestamp(value: datetime) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    return '"' + value.isoformat() + '"'

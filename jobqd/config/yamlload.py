"""YAML for config files: a line for every key, no duplicate keys, `${VAR}` interpolation.

PyYAML forgets where values came from and silently keeps the last of two equal keys; config
errors must instead point at FILE:LINE. So the loader walks the composed node tree itself,
recording the line of every mapping key and sequence item under its key path, e.g.
`("queues", "emails", "lease")` or `("tasks", "report", "command", 0)`.

Interpolation follows Docker Compose, on string scalars after parsing (so a value can never
inject YAML structure): `${VAR}` (error if unset), `${VAR:-default}` (unset or empty),
`${VAR-default}` (unset), `${VAR:?message}` (error if unset or empty), `${VAR?message}` (error
if unset), and `$$` for a literal `$`; any other `$` is kept as written. An unquoted scalar
takes the type of its result (`concurrency: ${WORKERS:-8}` is the integer 8); quote it to
keep a string. Mapping keys are always strings, the text as written, and are not interpolated.

A reference may stand wherever YAML allows a scalar, flow collections included
(`database: {url: ${DATABASE_URL}}`, `imports: [${APP}.tasks]`), although YAML reads `{` and
`}` there as structure: before parsing, every `${...}` is masked by a plain word that appears
nowhere else in the text, and unmasked in the scalars (and keys) it landed in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

Path = tuple[str | int, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_DOLLAR = re.compile(r"\$(\$|\{[^}]*\}|\{)?")
_MASKED = re.compile(r"\$(\$|\{[^}\n]*\})")  # what is masked: ${...} on one line; $$ stays
_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", re.DOTALL)


class LoadError(ValueError):
    """The text is not a loadable document; `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Document:
    """Plain Python data (dicts, lists, scalars) and the line of every key path in it."""

    data: Any
    filename: str
    lines: Mapping[Path, int]

    def line(self, path: Path) -> int:
        """Line of `path`, or of its nearest ancestor present in the file (1 for the top)."""
        while path not in self.lines:
            path = path[:-1]
        return self.lines[path]


def format_path(path: Path) -> str:
    """`queues.emails.lease`, `tasks.report.command[0]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def format_error(filename: str, line: int, path: Path, message: str) -> str:
    """One error line in the shape every config problem takes: FILE:LINE: key.path: message."""
    where = f"{filename}:{line}: "
    return where + (f"{format_path(path)}: {message}" if path else message)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with `${...}` references replaced from `env`; ValueError names what is wrong."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(1)
        if token is None or token == "$":
            return "$"
        if token == "{":
            raise ValueError('unclosed "${" (write "$$" for a literal "$")')
        reference = _REFERENCE.fullmatch(token[1:-1])
        if reference is None:
            raise ValueError(f'bad variable reference "${token}"')
        name, op, argument = reference.groups()
        value = env.get(name)
        if op is None and value is None:
            raise ValueError(
                f"environment variable {name} is not set (write ${{{name}:-default}} to give a "
                "default)"
            )
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None):
            if op.endswith("?"):
                raise ValueError(argument or f"environment variable {name} is not set or empty")
            return argument
        return value or ""

    return _DOLLAR.sub(replace, text)


class _Masks:
    """The `${...}` references of a text, each replaced by a word of its own for parsing."""

    def __init__(self, text: str) -> None:
        prefix = "jobqdref"
        while prefix in text:
            prefix += "x"
        self.references: dict[str, str] = {}

        def mask(match: re.Match[str]) -> str:
            if match.group(1) == "$":
                return "$$"
            word = f"{prefix}{len(self.references)}z"
            self.references[word] = match.group(0)
            return word

        self.text = _MASKED.sub(mask, text)
        self._word = re.compile(re.escape(prefix) + r"\d+z")

    def unmask(self, value: str) -> str:
        if not self.references:
            return value
        return self._word.sub(lambda match: self.references[match.group(0)], value)


class Loader(yaml.SafeLoader):
    """SafeLoader that builds a `Document` and collects every problem instead of the first."""

    def __init__(self, text: str, filename: str, env: Mapping[str, str]) -> None:
        self.masks = _Masks(text)
        super().__init__(self.masks.text)
        self.filename = filename
        self.env = env
        self.lines: dict[Path, int] = {(): 1}
        self.problems: list[tuple[int, str]] = []
        self._checked: set[int] = set()
        self._open: set[int] = set()

    def document(self) -> Document:
        """Compose and convert the single document; LoadError lists everything wrong with it."""
        try:
            node = self.get_single_node()
            data = None if node is None else self._value(node, ())
        except yaml.MarkedYAMLError as exc:
            raise LoadError([_describe(self.filename, exc)]) from None
        except yaml.YAMLError as exc:
            raise LoadError([f"{self.filename}: {exc}"]) from None
        finally:
            self.dispose()
        if self.problems:
            raise LoadError([message for _, message in sorted(self.problems, key=lambda p: p[0])])
        return Document(data, self.filename, self.lines)

    def _problem(self, node: yaml.Node, path: Path, message: str) -> None:
        line = node.start_mark.line + 1
        self.problems.append((line, format_error(self.filename, line, path, message)))

    def _value(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._open:
            self._problem(node, path, "an alias refers to a node that contains it")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            return self._mapping(node, path)
        finally:
            self._open.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.lines[(*path, index)] = item.start_mark.line + 1
            items.append(self._value(item, (*path, index)))
        return items

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._check_keys(node, path)
        self.flatten_mapping(node)
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.masks.unmask(key_node.value)
            self.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = self._value(value_node, (*path, key))
        return result

    def _check_keys(self, node: yaml.MappingNode, path: Path) -> None:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, path, "a mapping key must be a plain value")
                continue
            line = key_node.start_mark.line + 1
            key = self.masks.unmask(key_node.value)
            if key in first:
                self._problem(key_node, (*path, key), f"duplicate key (first at line {first[key]})")
            first.setdefault(key, line)

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        value = self.masks.unmask(node.value)
        if node.tag != _STR_TAG or "$" not in value:
            if value != node.value:  # a reference under another tag (!!binary ${X}): as written
                node = yaml.ScalarNode(node.tag, value, node.start_mark, node.end_mark, node.style)
            return self.construct_object(node)
        try:
            text = interpolate(value, self.env)
        except ValueError as exc:
            self._problem(node, path, str(exc))
            return None
        if node.style is not None:
            return text
        tag = self.resolve(yaml.ScalarNode, text, (True, False))
        return self.construct_object(yaml.ScalarNode(tag, text, node.start_mark, node.end_mark))


def _describe(filename: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
    problem = exc.problem or exc.context or "not valid YAML"
    context = f" ({exc.context})" if exc.problem and exc.context else ""
    return f"{where}: {problem}{context}"


def load(text: str, filename: str = "<string>", env: Mapping[str, str] = os.environ) -> Document:
    """Parse `text` (named `filename` in errors) into a `Document`; LoadError if it cannot."""
    return Loader(text, filename, env).document()

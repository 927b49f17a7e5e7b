"""first_line: the one cut of an error message to a line, safe on empty messages."""

from __future__ import annotations

from jobqd.errors import first_line


def test_first_line_keeps_the_first_line_of_the_message():
    assert first_line(RuntimeError("  bad thing\nDETAIL: more\n")) == "bad thing"


def test_first_line_of_an_empty_or_blank_message_is_the_type_name():
    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError(" \n ")) == "ValueError"

"""What reaches a terminal or a page is shown as text: escapes stripped, unshown characters escaped."""

from __future__ import annotations

import pytest

from evalq.text import escape_control, strip_ansi


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("plain", "plain"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("carriage\rreturn", "carriage\\x0dreturn"),
        ("c1\x9b31m", "c1\\x9b31m"),
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),
        ("line\u2028forged", "line\\u2028forged"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("\ufeffbom", "\\ufeffbom"),
        ("emoji \U0001f468\u200d\U0001f4bb", "emoji \U0001f468\u200d\U0001f4bb"),
    ],
)
def test_unshown_characters_are_written_as_escapes(given: str, shown: str) -> None:
    assert escape_control(given) == shown


def test_newlines_are_kept_only_when_asked() -> None:
    assert escape_control("a\nb") == "a\\x0ab"
    assert escape_control("a\nb\x1b", lines=True) == "a\nb\\x1b"


def test_terminal_sequences_are_stripped() -> None:
    assert strip_ansi("\x1b[32m100%\x1b[0m|\x1b[?25l") == "100%|"

"""Text from other processes made safe to show: terminal escapes stripped, control characters escaped.

Job output, labels, reasons and paths reach a terminal (the CLI) and a page (the dashboard).
The patterns live here once, below every process that shows such text.
"""

from __future__ import annotations

import re

from .fields import CONTROL

__all__ = ["ANSI_ESCAPE", "escape_control", "strip_ansi"]

# CSI sequences, as tqdm and loggers write them (colours, cursor moves, erase line).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences."""
    return ANSI_ESCAPE.sub("", text)


def escape_control(text: object, *, lines: bool = False) -> str:
    """`text` with each control, bidirectional or invisible character written as an escape
    (`\\xNN`, `\\uNNNN`); `lines` keeps newlines."""
    parts = str(text).split("\n") if lines else [str(text)]
    return "\n".join(CONTROL.sub(_escape, part) for part in parts)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

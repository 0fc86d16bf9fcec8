"""Text from other processes made safe to show: terminal escapes stripped, control characters escaped.

Job output, labels, reasons and paths reach a terminal (the CLI) and a page (the dashboard).
The patterns live here once, below every process that shows such text.
"""

from __future__ import annotations

import re

from .schemas import CONTROL

__all__ = ["ANSI_ESCAPE", "escape_control", "strip_ansi"]

# CSI sequences, as tqdm and loggers write them (colours, cursor moves, erase line).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences."""
    return ANSI_ESCAPE.sub("", text)


def escape_control(text: object, *, lines: bool = False) -> str:
    """`text` with each control character written as a `\\xNN` escape; `lines` keeps newlines."""
    parts = str(text).split("\n") if lines else [str(text)]
    return "\n".join(CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", part) for part in parts)

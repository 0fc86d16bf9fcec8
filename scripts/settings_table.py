"""Rewrite the configuration table in a Markdown file from the settings Structs."""

from __future__ import annotations

import sys
from pathlib import Path

from evalq.config import settings_table

BEGIN, END = "<!-- settings-table:begin -->\n", "<!-- settings-table:end -->"


def main(path: str) -> None:
    target = Path(path)
    text = target.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    target.write_text(head + BEGIN + settings_table() + END + tail)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "README.md")

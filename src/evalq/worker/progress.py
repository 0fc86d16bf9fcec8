"""Progress from lmms-eval's tqdm bars, e.g. `Model Responding:  45%|████▌     | 9/20 [...]`.

tqdm redraws a bar with `\\r`, so the stream is split on `\\r` as well as `\\n`, and ANSI
colour codes are stripped before matching.

A journaled run gives the model its requests a chunk at a time (`journal_hooks.py`), and
each chunk draws its own short bar, so those bars would make the progress jump back at
every chunk. The journal prints its own line for the whole request type instead, marked
with `OWN_MARK` (`own_line`), and an end line after the type's last chunk (`own_end`):
from the first own line until the end line, every other bar is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..schemas import Progress
from ..text import strip_ansi

__all__ = ["OWN_MARK", "ProgressParser", "own_end", "own_line"]

_BAR = re.compile(
    r"(?:^|\s)(?:(?P<phase>[^|:\r\n]{1,80}):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)"
)

OWN_MARK = "[evalq progress]"
_OWN_END = "end"


def own_line(phase: str, done: int, total: int) -> str:
    """evalq's own progress line: `[evalq progress] Model Responding:  40%|####      | 320/800`."""
    percent = 100 * done // total if total > 0 else 100
    return f"{OWN_MARK} {phase}: {percent:3d}%|{'#' * (percent // 10):<10}| {done}/{total}"


def own_end() -> str:
    """The line that ends evalq's own progress: lmms-eval's bars count again after it."""
    return f"{OWN_MARK} {_OWN_END}"


class ProgressParser:
    """Feed raw output; get a Progress for each bar update seen."""

    def __init__(self) -> None:
        self._pending = ""
        self._own = False

    def feed(self, chunk: bytes | str) -> Iterator[Progress]:
        text = chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
        text = self._pending + text
        pieces = re.split(r"[\r\n]", text)
        # The last piece may be a bar still being written: keep it for the next chunk.
        self._pending = pieces.pop()[-4096:]
        for piece in pieces:
            progress = self._parse(piece)
            if progress is not None:
                yield progress

    def _parse(self, piece: str) -> Progress | None:
        line = strip_ansi(piece)
        if OWN_MARK in line:
            # A bar still being drawn may precede it on the same line: only what follows counts.
            own = line.rsplit(OWN_MARK, 1)[1]
            if own.strip() == _OWN_END:
                self._own = False
                return None
            progress = self.parse_line(own)
            if progress is not None:
                self._own = True
            return progress
        return None if self._own else self.parse_line(line)

    @staticmethod
    def parse_line(line: str) -> Progress | None:
        match = _BAR.search(strip_ansi(line))
        if not match:
            return None
        done, total = int(match.group("done")), int(match.group("total"))
        if total <= 0:
            return None
        phase = (match.group("phase") or "").strip() or "running"
        return Progress(phase=phase, done=done, total=total, percent=round(100.0 * done / total, 1))

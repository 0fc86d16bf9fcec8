"""Progress from lmms-eval's tqdm bars, e.g. `Model Responding:  45%|████▌     | 9/20 [...]`.

tqdm redraws a bar with `\\r`, so the stream is split on `\\r` as well as `\\n`, and ANSI
colour codes are stripped before matching.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..schemas import Progress
from ..text import strip_ansi

__all__ = ["ProgressParser"]

_BAR = re.compile(
    r"(?:^|\s)(?:(?P<phase>[^|:\r\n]{1,80}):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)"
)


class ProgressParser:
    """Feed raw output; get a Progress for each bar update seen."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, chunk: bytes | str) -> Iterator[Progress]:
        text = chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
        text = self._pending + text
        pieces = re.split(r"[\r\n]", text)
        # The last piece may be a bar still being written: keep it for the next chunk.
        self._pending = pieces.pop()[-4096:]
        for piece in pieces:
            progress = self.parse_line(piece)
            if progress is not None:
                yield progress

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

"""The journal's files and fingerprints, without lmms-eval: frames a tailing reader can trust,
records turned into what a resume and the cache read, and fingerprints that change when
and only when what the model is asked changes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from evalq.worker import fingerprint
from evalq.worker.fingerprint import is_cacheable, request_fingerprint, results_fingerprint
from evalq.worker.journal import (
    COUNTS_FILE,
    FRAME_BYTES,
    JOURNAL_FILE,
    JournalSettings,
    JournalWriter,
    cache_from,
    read_frames,
    resume_from,
)

KEY = ("generate_until", "t", 0, 0)


def _response(
    doc: int, answer: Any = "A", *, fp: str | None = "f", n: int = 0, cacheable: bool = True
) -> tuple[Any, ...]:
    return ("response", ("generate_until", "t", doc, 0), fp if fp is None else f"{fp}{doc}", n, answer, cacheable)


def _writer(directory: Path, **settings: Any) -> JournalWriter:
    return JournalWriter(directory, JournalSettings(**settings))


def test_settings_default_where_the_file_or_a_key_is_missing(tmp_path: Path) -> None:
    assert JournalSettings.read(tmp_path) == JournalSettings(flush_count=256, flush_seconds=5.0, chunk=32, seed=False)
    (tmp_path / "settings.json").write_text(json.dumps({"chunk": 8, "seed": True}))
    assert JournalSettings.read(tmp_path) == JournalSettings(chunk=8, seed=True)
    (tmp_path / "settings.json").write_text(json.dumps({"chunk": 0}))
    with pytest.raises(ValueError, match="at least 1"):
        JournalSettings.read(tmp_path)


def test_a_tailing_reader_gets_complete_frames_only_and_a_torn_one_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_FILE
    assert read_frames(path, 0) == ([], 0)
    writer = _writer(tmp_path, flush_count=2, flush_seconds=600)
    writer.add(_response(0))
    writer.due()
    assert read_frames(path, 0) == ([], 0), "one record waits for the second"
    writer.add(_response(1))
    writer.due()
    frames, offset = read_frames(path, 0)
    assert frames == [[_response(0), _response(1)]] and offset == path.stat().st_size
    writer.close()

    # A frame torn by a kill: its length is there, not all of its bytes.
    payload = pickle.dumps([_response(2)], protocol=4)
    with open(path, "ab") as handle:
        handle.write(len(payload).to_bytes(4, "big") + payload[:-3])
    assert read_frames(path, offset) == ([], offset)
    assert read_frames(path, 0)[1] == offset

    # The next run cuts it off before appending, so its frames read as frames.
    writer = _writer(tmp_path)
    writer.add(_response(3))
    writer.close()
    frames, end = read_frames(path, offset)
    assert frames == [[_response(3)]] and end == path.stat().st_size
    assert json.loads((tmp_path / COUNTS_FILE).read_text())["responses_computed"] == 0


def test_frames_stay_under_the_frame_size_and_a_larger_record_goes_alone(tmp_path: Path) -> None:
    writer = _writer(tmp_path, flush_count=10_000, flush_seconds=600)
    for doc in range(40):
        writer.add(_response(doc, "x" * 50_000))
    writer.add(_response(40, "y" * (FRAME_BYTES + 1)))
    writer.add(_response(41))
    writer.close()
    frames, _ = read_frames(tmp_path / JOURNAL_FILE)
    sizes = [len(pickle.dumps(frame, protocol=4)) for frame in frames]
    assert [r[1][2] for frame in frames for r in frame] == list(range(42))
    assert all(size <= FRAME_BYTES for size, frame in zip(sizes, frames, strict=True) if len(frame) > 1), sizes
    assert [len(frame) for frame in frames if frame[0][1][2] == 40] == [1]
    assert len(frames) >= 5


def test_a_record_the_reader_would_refuse_is_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = _writer(tmp_path)
    writer.add(("score", ("t", 0, "none", 0), "r", {"path": Path("/")}))
    writer.add(("score", ("t", 1, "none", 0), "r", {"vector": np.arange(3.0), "f1": ("A", "B")}))
    writer.close()
    frames, _ = read_frames(tmp_path / JOURNAL_FILE)
    assert [r[1] for frame in frames for r in frame] == [("t", 1, "none", 0)]
    assert "a score is not journaled" in capsys.readouterr().out


def test_many_threads_write_each_record_once(tmp_path: Path) -> None:
    writer = _writer(tmp_path, flush_count=7, flush_seconds=0.001)

    def score(thread: int) -> None:
        for doc in range(300):
            writer.add(("score", ("t", thread * 1000 + doc, "none", 0), None, {"m": float(doc)}))
            writer.count("scores_computed")
            writer.due()

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    frames, _ = read_frames(tmp_path / JOURNAL_FILE)
    keys = [r[1][1] for frame in frames for r in frame]
    assert sorted(keys) == sorted(t * 1000 + d for t in range(4) for d in range(300))
    assert json.loads((tmp_path / COUNTS_FILE).read_text())["scores_computed"] == 1200


def test_records_become_a_resume_and_a_cache() -> None:
    records = [
        _response(0, "A"),
        _response(0, "B", n=1, cacheable=False),
        _response(1, "C", fp=None),
        ("score", ("t", 0, "none", 0), "r0", {"exact_match": 1.0}),
        _response(0, "D"),  # the same request answered again later: the later answer counts
    ]
    assert resume_from(records) == {
        "responses": {(KEY, "f0", 0): "D", (KEY, "f0", 1): "B", (("generate_until", "t", 1, 0), None, 0): "C"},
        "scores": {(("t", 0, "none", 0), "r0"): {"exact_match": 1.0}},
    }
    assert cache_from(records) == {("f0", 0): "D"}, "neither a sampled answer nor one with no fingerprint"


def _request(*args: Any, doc_id: int = 0, split: str | None = "test") -> Any:
    return SimpleNamespace(args=args, task_name="t", doc_id=doc_id, metadata={"split": split} if split else {})


def _visuals(doc: dict[str, Any]) -> Any:
    return doc["visual"]


def _fp(request: Any, docs: dict[str, Any] | None = None, reqtype: str = "generate_until") -> str | None:
    return request_fingerprint(reqtype, request, {"t": {"test": docs or [{}]}})


def test_a_fingerprint_covers_the_arguments_and_what_the_callables_give_for_the_document(tmp_path: Path) -> None:
    base = _fp(_request("Q?", {"until": ["\n"], "max_new_tokens": 4}, None, 0, "t", "test"))
    assert base is not None and len(base) == 64
    assert base == _fp(_request("Q?", {"max_new_tokens": 4, "until": ["\n"]}, None, 0, "t", "test")), "key order"
    assert base != _fp(_request("Q!", {"until": ["\n"], "max_new_tokens": 4}, None, 0, "t", "test"))
    assert base != _fp(_request("Q?", {"until": ("\n",), "max_new_tokens": 4}, None, 0, "t", "test"))
    assert base != _fp(_request("Q?", {"until": ["\n"], "max_new_tokens": 4.0}, None, 0, "t", "test"))
    assert base != _fp(_request("Q?", {"until": ["\n"], "max_new_tokens": 4}, None, 0, "t", "test"), reqtype="x")

    def with_visual(visual: Any) -> str | None:
        return _fp(_request("Q?", _visuals, 0, "t", "test"), [{"visual": visual}])

    image = Image.new("RGB", (4, 3), (10, 20, 30))
    other = image.copy()
    other.putpixel((1, 1), (0, 0, 0))
    assert with_visual([image]) == with_visual([image.copy()]) != with_visual([other])
    assert with_visual([image]) != with_visual([image.convert("L")])
    array = np.zeros((2, 3), dtype=np.float32)
    assert with_visual(array) == with_visual(array.copy()) != with_visual(array.astype(np.float64))
    assert with_visual({"array": array, "sampling_rate": 16000}) != with_visual({"array": array, "sampling_rate": 8000})
    assert with_visual(np.array(["a", 1], dtype=object)) == with_visual(np.array(["a", 1], dtype=object))

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"frames" * 100)
    first = with_visual([str(video)])
    video.write_bytes(b"frameZ" * 100)
    assert first != with_visual([str(video)]), "a file counts by its content"
    assert with_visual(["not a file"]) == with_visual(["not a file"])

    # A callable that fails, an object with no canonical form, no document: no fingerprint.
    assert with_visual(object()) is None
    assert _fp(_request("Q?", _visuals, 0, "t", "test"), [{}]) is None
    assert _fp(_request("Q?", _visuals, split=None)) is None
    assert _fp(_request("", " B")) is not None, "a request with no callable needs no document"


def test_a_large_file_counts_by_its_size_mtime_and_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprint, "LARGE_FILE", 3 << 20)
    video = tmp_path / "long.mp4"
    video.write_bytes(b"a" * (4 << 20))

    def fp() -> str | None:
        return _fp(_request("Q?", _visuals, 0, "t", "test"), [{"visual": str(video)}])

    before = fp()
    stat = video.stat()
    with open(video, "r+b") as handle:  # the middle changes, size and mtime do not
        handle.seek(2 << 20)
        handle.write(b"b")
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp() == before
    with open(video, "r+b") as handle:
        handle.write(b"b")
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp() != before, "its first MiB counts"


def test_results_fingerprint_depends_on_values_not_on_which_objects_hold_them() -> None:
    shared = (0.0, False)
    assert results_fingerprint([shared, shared]) == results_fingerprint([(0.0, False), (0.0, False)])
    assert results_fingerprint(["A"]) != results_fingerprint(["B"])
    assert results_fingerprint([threading.Lock()]) is None


@pytest.mark.parametrize(
    ("reqtype", "gen_kwargs", "seed", "cacheable"),
    [
        ("loglikelihood", {"temperature": 1.0}, False, True),
        ("generate_until", {"max_new_tokens": 4}, False, True),
        ("generate_until", {"temperature": 0, "do_sample": False}, False, True),
        ("generate_until", {"temperature": "0.0"}, False, True),
        ("generate_until", {"temperature": 0.7}, False, False),
        ("generate_until", {"do_sample": True}, False, False),
        ("generate_until", {"do_sample": "true", "temperature": 0}, False, False),
        ("generate_until", {"temperature": "hot"}, False, False),
        ("generate_until", {"temperature": 0.7, "do_sample": True}, True, True),
    ],
)
def test_what_may_be_cached(reqtype: str, gen_kwargs: dict[str, Any], seed: bool, cacheable: bool) -> None:
    request = _request("Q?", gen_kwargs, None, 0, "t", "test")
    assert is_cacheable(reqtype, request, "fp", seed=seed) is cacheable
    assert is_cacheable(reqtype, request, None, seed=True) is False


_SIGTERM_CHILD = """
import os, signal, sys, time
from pathlib import Path
from evalq.worker.journal_hooks import journaling

directory = Path(sys.argv[1])
before = signal.getsignal(signal.SIGTERM)
with journaling(directory):
    assert signal.getsignal(signal.SIGTERM) is not before
assert signal.getsignal(signal.SIGTERM) is before, "the handler is the process's own again"
with journaling(directory) as journal:
    journal.writer.add(("score", ("t", 0, "none", 0), None, 1.0))
    journal.writer.count("scores_computed")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("not ended by SIGTERM")
"""


def test_sigterm_writes_what_waits_and_ends_the_process_as_sigterm_does(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text(json.dumps({"flush_count": 100, "flush_seconds": 600}))
    child = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == -signal.SIGTERM, child.stdout + child.stderr
    frames, _ = read_frames(tmp_path / JOURNAL_FILE)
    assert frames == [[("score", ("t", 0, "none", 0), None, 1.0)]]
    assert json.loads((tmp_path / COUNTS_FILE).read_text())["scores_computed"] == 1

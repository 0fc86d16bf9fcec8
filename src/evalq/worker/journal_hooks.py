"""Journaling one lmms-eval run: every response and score written as it comes, and taken
back instead of computed where the job's own journal or the response cache has it.

`journaling(DIR)` opens the journal (`journal.py` has its files and records); inside it,
`Journal.responses()` wraps the request methods of each model instance lmms-eval builds
and `Journal.scores()` every call of a task's `process_results`. For each request, in
order: the answer in `resume.pkl` for its (key, fingerprint, occurrence) is taken
(`resumed`); else the answer in `cache.pkl` for its (fingerprint, occurrence), when the
request is cacheable (`reused`, and journaled, so the job's own journal holds it); else
the model computes it. The requests to compute go to the model's method `chunk` at a time,
in their order, and each chunk's answers are journaled when it returns; a frame is
written when `flush_count` records wait or `flush_seconds` passed (checked after each
chunk and each score), at the end of the run however it ends, and on SIGTERM. So a kill
loses at most one flush window plus the chunk in progress. The chunk should be at least
the model's batch size, which it cannot exceed; a model batches within each chunk, so a
batch's make-up (its padding) can differ from an unchunked run's.

A score is taken from `resume.pkl` when its (task, document, filter, call) and the
fingerprint of what `process_results` is given match (`fingerprint.results_fingerprint`);
otherwise the task scores it and the score is journaled. Scoring runs on lmms-eval's
threads; the journal's writer is shared by them.

`rescore` loads no model: the class lmms-eval asks for is swapped for a replayer
(`lmms_hooks.replaying`), every request is answered from `resume.pkl` by its key and
occurrence whatever its fingerprint (the task's prompt may have changed; how many were
answered for a different prompt is printed once), a missing one ends the run with an
error naming it, and every score is computed again with today's task code.

Limits: `generate_until_agentic` requests are not journaled (the model is asked as
without a journal); a call the model makes to its own request methods while answering is
not journaled apart from the call it belongs to. With several ranks, a model whose request
methods synchronise the ranks needs the same number of calls on each, which a resume of
unequal parts does not keep.

The progress of the model's answers is evalq's own line (`progress.own_line`), printed
at the start of each request type (answers taken back count as done) and after each
chunk, and ended with `progress.own_end`: each chunk's own bar would restart from zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .fingerprint import FileDigests, is_cacheable, request_fingerprint, results_fingerprint
from .journal import JournalSettings, JournalWriter, load_cache, load_resume
from .lmms_hooks import REQUEST_TYPES, Key, ScoreCall, ScoreKey, on_create, patched_get_model, replaying, request_key
from .lmms_hooks import scoring as scoring_hook
from .progress import own_end, own_line

__all__ = ["Journal", "journaling"]

_PHASE = "Model Responding"
_ABSENT = object()


class Journal:
    """One run's journal: what it may take back, and the writer of what it computes."""

    def __init__(self, directory: Path, *, rescore: bool = False) -> None:
        self.directory = directory
        self.rescore = rescore
        self.settings = JournalSettings.read(directory)
        self.resume = load_resume(directory)
        # A rescore answers from the job's own responses only.
        self.cache: Mapping[tuple[str, int], Any] = {} if rescore else load_cache(directory)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.writer = JournalWriter(directory, self.settings, rank=self.rank)
        self.occurrences: dict[Key, int] = defaultdict(int)
        self.mismatched = 0
        self.replayed = 0
        # (key, occurrence) -> (fingerprint, answer): how a rescore finds its answers.
        self._by_occurrence: dict[tuple[Any, int], tuple[str | None, Any]] = {}
        if rescore:
            for (key, fp, n), answer in self.resume.responses.items():
                self._by_occurrence[(tuple(key), n)] = (fp, answer)
        self._local = threading.local()
        self._files: FileDigests = {}
        self._drawing = False

    # -- the model's answers ----------------------------------------------------------

    @contextlib.contextmanager
    def responses(self) -> Iterator[None]:
        """Journal every request to each model lmms-eval builds during the block (a rescore:
        answer them from the journal, and build no model)."""
        wrapped: list[tuple[Any, dict[str, Any]]] = []

        def wrap(lm: Any) -> Any:
            self.writer.set_model_loaded(not self.rescore)
            saved: dict[str, Any] = {}
            for reqtype in REQUEST_TYPES:
                real = getattr(lm, reqtype, None)
                if real is None:
                    continue
                saved[reqtype] = vars(lm).get(reqtype, _ABSENT)
                setattr(lm, reqtype, self._method(lm, reqtype, real))
            wrapped.append((lm, saved))
            return lm

        with contextlib.ExitStack() as stack:
            if self.rescore:
                stack.enter_context(patched_get_model(replaying({})))
            stack.enter_context(patched_get_model(lambda cls: on_create(cls, wrap)))
            stack.enter_context(self._agentic_passes_through())
            try:
                yield
            finally:
                for lm, saved in wrapped:
                    for reqtype, before in saved.items():
                        if before is _ABSENT:
                            with contextlib.suppress(AttributeError):
                                delattr(lm, reqtype)  # back to the class's own method
                        else:
                            setattr(lm, reqtype, before)

    @contextlib.contextmanager
    def _passing(self) -> Iterator[None]:
        """Requests made in the block go to the model as they are, unjournaled."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    @contextlib.contextmanager
    def _agentic_passes_through(self) -> Iterator[None]:
        """lmms-eval runs agentic requests in `evaluator._run_generate_until_agentic`, looked
        up in its module when called, one `generate_until` call per step."""
        import lmms_eval.evaluator as evaluator

        original = evaluator._run_generate_until_agentic

        def run(*args: Any, **kwargs: Any) -> Any:
            with self._passing():
                return original(*args, **kwargs)

        evaluator._run_generate_until_agentic = run
        try:
            yield
        finally:
            evaluator._run_generate_until_agentic = original

    def _method(self, lm: Any, reqtype: str, real: Callable[[list[Any]], list[Any]]) -> Callable[..., Any]:
        def method(requests: list[Any], *args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "depth", 0) or args or kwargs:
                return real(requests, *args, **kwargs)
            with self._passing():  # what the model asks itself while answering is part of this call
                return self._answer(lm, reqtype, list(requests), real)

        return method

    def _answer(self, lm: Any, reqtype: str, requests: list[Any], real: Callable[[list[Any]], list[Any]]) -> list[Any]:
        total = len(requests)
        answers: list[Any] = [None] * total
        todo: list[tuple[int, Key, str | None, int]] = []
        fingerprints: dict[int, str | None] = {}  # by request object: `repeats` clones are one object
        task_dict = getattr(lm, "task_dict", None)
        resumed = reused = 0
        for index, request in enumerate(requests):
            key = request_key(reqtype, request)
            n = self.occurrences[key]
            self.occurrences[key] = n + 1
            if id(request) not in fingerprints:
                fingerprints[id(request)] = request_fingerprint(reqtype, request, task_dict, self._files)
            fp = fingerprints[id(request)]
            if self.rescore:
                answers[index] = self._replayed(key, fp, n)
                resumed += 1
            elif (key, fp, n) in self.resume.responses:
                answers[index] = self.resume.responses[(key, fp, n)]
                resumed += 1
            elif fp is not None and (fp, n) in self.cache and self._cacheable(reqtype, request, fp):
                answers[index] = self.cache[(fp, n)]
                self.writer.add(("response", key, fp, n, answers[index], True))
                reused += 1
            else:
                todo.append((index, key, fp, n))
        self.writer.count("responses_resumed", resumed)
        self.writer.count("responses_reused", reused)
        self.writer.due()
        done = total - len(todo)
        self._drawing = total > 0
        self._progress(own_line(_PHASE, done, total))
        try:
            for start in range(0, len(todo), self.settings.chunk):
                part = todo[start : start + self.settings.chunk]
                got = real([requests[index] for index, _, _, _ in part])
                if len(got) != len(part):
                    raise RuntimeError(f"the model gave {len(got)} answers to {len(part)} {reqtype} requests")
                for (index, key, fp, n), answer in zip(part, got, strict=True):
                    answers[index] = answer
                    cacheable = self._cacheable(reqtype, requests[index], fp)
                    self.writer.add(("response", key, fp, n, answer, cacheable))
                self.writer.count("responses_computed", len(part))
                self.writer.due()
                done += len(part)
                self._progress(own_line(_PHASE, done, total))
        finally:
            self._progress(own_end())
        return answers

    def _replayed(self, key: Key, fp: str | None, n: int) -> Any:
        found = self._by_occurrence.get((key, n))
        if found is None:
            raise RuntimeError(f"no journaled response for {key} (answer {n + 1}); the job's journal does not hold it")
        if found[0] != fp:
            self.mismatched += 1
        self.replayed += 1
        return found[1]

    def _cacheable(self, reqtype: str, request: Any, fp: str | None) -> bool:
        return is_cacheable(reqtype, request, fp, seed=self.settings.seed)

    def _progress(self, line: str) -> None:
        if self.rank == 0 and self._drawing:  # as lmms-eval draws its bars on rank 0 only
            print(line, file=sys.stderr, flush=True)

    # -- the task's scores -------------------------------------------------------------

    @contextlib.contextmanager
    def scores(self) -> Iterator[None]:
        """Journal every `process_results` call during the block, or take it from the job's
        journal when it was given the same results (never in a rescore)."""

        def score(key: ScoreKey, call: ScoreCall) -> Any:
            results_fp = results_fingerprint(call.results)
            if not self.rescore and (key, results_fp) in self.resume.scores:
                self.writer.count("scores_reused")
                return self.resume.scores[(key, results_fp)]
            value = call()
            self.writer.add(("score", key, results_fp, value))
            self.writer.count("scores_computed")
            self.writer.due()
            return value

        with scoring_hook(score):
            yield

    def close(self) -> None:
        if self.rescore and self.mismatched:
            print(
                f"[evalq rescore] {self.mismatched} of {self.replayed} responses answered another prompt than "
                "the task builds today (its prompt or inputs changed since the run)",
                file=sys.stderr,
                flush=True,
            )
        self.writer.close()


@contextlib.contextmanager
def journaling(directory: Path, *, rescore: bool = False) -> Iterator[Journal]:
    """The run's journal, written to the end whatever happens, and on SIGTERM before the
    process ends as SIGTERM would end it."""
    journal = Journal(directory, rescore=rescore)
    try:
        with _flushed_on_sigterm(journal.writer):
            yield journal
    finally:
        journal.close()


@contextlib.contextmanager
def _flushed_on_sigterm(writer: JournalWriter) -> Iterator[None]:
    """A cancel or a time limit ends the run with SIGTERM (to its process group; in the
    resident process, to that process, whose main thread runs the job): write what waits
    first. Python runs the handler in the main thread between two bytecodes, so a model in
    one long native call delays it; the worker's SIGKILL after its grace still bounds it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if writer.held_here():  # interrupted while writing a frame: end once it is written
            writer.after_release(lambda: handler(signum, frame))
            return
        with contextlib.suppress(Exception):
            writer.flush(timeout=5.0)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            raise SystemExit(128 + signum)  # not reached: the default action ends the process

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

"""evalq's hooks into lmms-eval, inside an evaluation process: the model class it builds from.

lmms-eval asks `models.get_model(name)` for the class it builds its model from, and then
asks the model for responses through one method per request type. evalq changes what that
call hands back, and nothing else of lmms-eval's run:

- a resident process hands back the model an earlier job built (`resident_process.py`);
- a sharded job's piece keeps every response the model gives (`recording`);
- a sharded job's merge answers every request from the pieces' responses (`replaying`);
- a journaled run wraps them once more (`journal_hooks.py`).

It also changes what one call of lmms-eval's scoring hands back: a piece keeps every score
`process_results` gives its documents, and the merge hands back those scores in place of
calling it (`scoring`).

lmms-eval is imported only when a hook is used: the zygote imports this before it forks jobs.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "REQUEST_TYPES",
    "Key",
    "ScoreCall",
    "ScoreKey",
    "Scorer",
    "on_create",
    "patched_get_model",
    "recording",
    "replaying",
    "request_key",
    "scoring",
]

# The methods by which lmms-eval asks a model for responses, one per request type.
REQUEST_TYPES = ("loglikelihood", "generate_until", "generate_until_multi_round")

Key = tuple[str, str, Any, int]
# One call of a task's `process_results`, as pieces and merge both know it: (task, document,
# filter, call). Call 0 scores all the document's responses; with `repeats`, lmms-eval calls
# it again once per response (calls 1 to repeats).
ScoreKey = tuple[str, Any, str, int]


class ScoreCall:
    """One call of a task's `process_results`, not made yet: `results` is what it is given,
    and calling this makes the call."""

    def __init__(self, real: Callable[..., Any], doc: Any, results: Any, args: tuple[Any, ...], kwargs: Any) -> None:
        self._real = real
        self.doc = doc
        self.results = results
        self._args = args
        self._kwargs = kwargs

    def __call__(self) -> Any:
        return self._real(self.doc, self.results, *self._args, **self._kwargs)


# How a call is answered: given its key and the task's own call, its value.
Scorer = Callable[[ScoreKey, ScoreCall], Any]


def request_key(reqtype: str, request: Any) -> Key:
    """A request as a sharded job's pieces and merge both know it: (type, task, document, index)."""
    return (reqtype, str(request.task_name), request.doc_id, int(request.idx))


@contextlib.contextmanager
def patched_get_model(make: Callable[[type], type]) -> Iterator[None]:
    """lmms-eval asks `models.get_model(name)` for the class it builds the model from: hand it
    `make(that class)` instead, until the block ends (a resident process runs many jobs)."""
    import lmms_eval.models as models

    original = models.get_model

    def get_model(model_name: str, force_simple: bool = False) -> type:
        return make(original(model_name, force_simple))

    models.get_model = get_model  # type: ignore[assignment]
    try:
        yield
    finally:
        models.get_model = original  # type: ignore[assignment]


def on_create(cls: Any, change: Callable[[Any], Any]) -> type:
    """A stand-in for the model class whose instances pass through `change` once built."""

    def create_from_arg_string(klass: type, arg_string: str, additional_config: Any = None) -> Any:
        return change(cls.create_from_arg_string(arg_string, additional_config))

    return type(cls.__name__, (), {"create_from_arg_string": classmethod(create_from_arg_string)})


@contextlib.contextmanager
def recording(kept: dict[Key, list[Any]]) -> Iterator[None]:
    """Keep every response the model gives during the block. The model instance's request
    methods are wrapped (its class is left alone, so lmms-eval reports the same backend),
    and unwrapped when the block ends."""
    wrapped: list[Any] = []

    def wrap(lm: Any) -> Any:
        for reqtype in REQUEST_TYPES:
            real = getattr(lm, reqtype, None)
            if real is None:
                continue

            def method(requests: list[Any], real: Any = real, reqtype: str = reqtype) -> Any:
                answers = real(requests)
                for request, answer in zip(requests, answers, strict=False):
                    kept[request_key(reqtype, request)].append(answer)
                return answers

            setattr(lm, reqtype, method)
        wrapped.append(lm)
        return lm

    with patched_get_model(lambda cls: on_create(cls, wrap)):
        try:
            yield
        finally:
            for lm in wrapped:
                for reqtype in REQUEST_TYPES:
                    with contextlib.suppress(AttributeError):
                        delattr(lm, reqtype)  # back to the class's own method


def replaying(answers: Mapping[Key, list[Any]]) -> Callable[[type], type]:
    """For `patched_get_model`: the model class swapped for one that answers each request from
    `answers`, in the order they were given, and never loads weights. It keeps the real
    class's name, module and `is_simple` (which decides how tasks build their prompts); a
    missing answer raises."""
    from lmms_eval.api.model import lmms

    cursor: dict[Key, int] = defaultdict(int)

    def replay(reqtype: str) -> Callable[..., Any]:
        def method(self: Any, requests: list[Any]) -> list[Any]:
            out = []
            for request in requests:
                key = request_key(reqtype, request)
                values = answers.get(key, [])
                index = cursor[key]
                if index >= len(values):
                    raise RuntimeError(f"no recorded response for {key} (answer {index + 1}); a piece is missing")
                cursor[key] = index + 1
                out.append(values[index])
            return out

        return method

    def replayer(cls: type) -> type:
        def create_from_arg_string(klass: type, arg_string: str, additional_config: Any = None) -> Any:
            return klass()

        body: dict[str, Any] = {name: replay(name) for name in REQUEST_TYPES}
        body["is_simple"] = getattr(cls, "is_simple", True)
        body["create_from_arg_string"] = classmethod(create_from_arg_string)
        body["generate_until_agentic"] = lambda self, requests: (_ for _ in ()).throw(
            RuntimeError("agentic requests are not replayed")
        )
        made = type(cls.__name__, (lmms,), body)
        made.__module__, made.__qualname__ = cls.__module__, cls.__qualname__
        return made

    return replayer


class _ScoredTask:
    """A task as lmms-eval's scoring of one document sees it: the task itself, except that
    `process_results` goes through the scorer, keyed by this document and filter. One is
    made per document and filter, so the threads lmms-eval scores on share no state."""

    def __init__(self, task: Any, key: tuple[str, Any, str], scorer: Scorer) -> None:
        self._evalq_task = task
        self._evalq_key = key
        self._evalq_scorer = scorer
        self._evalq_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._evalq_task, name)

    def process_results(self, doc: Any, results: Any, *args: Any, **kwargs: Any) -> Any:
        task_name, doc_id, filter_key = self._evalq_key
        call = self._evalq_calls
        self._evalq_calls += 1
        real = self._evalq_task.process_results
        return self._evalq_scorer((task_name, doc_id, filter_key, call), ScoreCall(real, doc, results, args, kwargs))


@contextlib.contextmanager
def scoring(scorer: Scorer) -> Iterator[None]:
    """Every call lmms-eval's `evaluate` makes to a task's `process_results` goes through
    `scorer` during the block. lmms-eval scores one document at a time in
    `evaluator._process_document_results(item, task=..., filter_key=...)`, looked up in its
    module when called: it is given the task wrapped for that document, so this works for
    every task, whatever class or function scores it."""
    import lmms_eval.evaluator as evaluator

    original = evaluator._process_document_results

    def process_document(item: Any, *, task: Any, filter_key: str, **kwargs: Any) -> Any:
        doc_id, _, requests = item
        name = str(requests[0].task_name) if requests else str(getattr(task.config, "task", ""))
        return original(
            item, task=_ScoredTask(task, (name, doc_id, filter_key), scorer), filter_key=filter_key, **kwargs
        )

    evaluator._process_document_results = process_document
    try:
        yield
    finally:
        evaluator._process_document_results = original

"""What README documents of the package's top level is what `evalq` exports.

A documented name is one README writes as `evalq.Name` (a class or a dunder: lowercase
`evalq.x` are NATS subjects, modules and files), imports with `from evalq import ...`, or
shows in code in the SDK section (*From Python*) as a CamelCase name of two words or more
that is not a builtin (`JobInfo`, `JobFailed`; a single capitalised word there may just
begin a comment's sentence).
The events README lists by their `type` are documented too: each must be exported under
the class that carries that type, so `isinstance(event, evalq.Completed)` works.
"""

from __future__ import annotations

import ast
import builtins
import re
import typing

import msgspec

import evalq

from .conftest import REPO

README = (REPO / "README.md").read_text()
SDK_SECTION = "From Python"
EVENTS_SECTION = "Events"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`([^`\n]+)`")
_CAMEL = re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b")
_DOTTED = re.compile(r"\bevalq\.([A-Z]\w*|__\w+__)(?![.\w-])")
_IMPORT_LINE = re.compile(r"\bfrom evalq import ([\w ,]+)")


def section(text: str, title: str) -> str:
    """The body of the heading `title`, up to the next heading of its level or above; a `#`
    line inside a fenced block is code, not a heading."""
    lines = text.splitlines(keepends=True)
    level = 0
    body: list[str] = []
    fenced = False
    for line in lines:
        heading = None if fenced else re.match(r"(#+) (.*?)[ \t]*$", line)
        if line.startswith("```"):
            fenced = not fenced
        if heading and level and len(heading.group(1)) <= level:
            break
        if level:
            body.append(line)
        elif heading and heading.group(2) == title:
            level = len(heading.group(1))
    assert level, f"README has no section {title!r}"
    return "".join(body)


def code_of(text: str) -> list[str]:
    """The fenced blocks and the inline code spans of `text`."""
    blocks = [body for _, body in _FENCE.findall(text)]
    return blocks + _SPAN.findall(_FENCE.sub("", text))


def imported_from_evalq(text: str) -> set[str]:
    names: set[str] = set()
    for language, body in _FENCE.findall(text):
        if language == "python":
            for node in ast.walk(ast.parse(body)):
                if isinstance(node, ast.ImportFrom) and node.module == "evalq" and node.level == 0:
                    names |= {alias.name for alias in node.names}
    for line in _FENCE.sub("", text).splitlines():
        for match in _IMPORT_LINE.finditer(line):
            names |= {name.split(" as ")[0].strip() for name in match.group(1).split(",") if name.strip()}
    return names


def documented_names(text: str) -> set[str]:
    names = set(_DOTTED.findall(text)) | imported_from_evalq(text)
    for code in code_of(section(text, SDK_SECTION)):
        names |= {name for name in _CAMEL.findall(code) if not hasattr(builtins, name)}
    return names


def event_classes() -> dict[str, type]:
    """Each event `type` the SDK decodes, with its class."""
    return {cls.__struct_config__.tag: cls for cls in typing.get_args(evalq.Event)}


def documented_event_types(text: str) -> set[str]:
    """The event types README's Events section names: its code spans that are words, less the
    fields the events carry (`job_id`, `model_reused`, ...), which it names too; a word that
    is both (`progress`) is an event type."""
    classes = event_classes()
    fields = {f.encode_name for cls in classes.values() for f in msgspec.structs.fields(cls)} | {"type"}
    words = {span for span in _SPAN.findall(section(text, EVENTS_SECTION)) if re.fullmatch(r"[a-z_]+", span)}
    return words - (fields - set(classes))


def test_every_documented_name_is_exported() -> None:
    names = documented_names(README)
    # The SDK section's own examples: should the parsing ever find none, this test would pass on nothing.
    assert {"Client", "AsyncClient", "JobInfo", "JobFailed", "__version__"} <= names, names
    missing = sorted(name for name in names if name not in evalq.__all__)
    assert not missing, f"README documents {missing}, which evalq.__all__ does not export"
    for name in names:
        assert getattr(evalq, name, None) is not None, f"evalq.{name} is documented but not importable"


def test_every_documented_event_type_is_exported_under_its_class() -> None:
    types = documented_event_types(README)
    classes = event_classes()
    assert {"queued", "started", "progress", "completed", "failed", "cancelled"} <= types, types
    unknown = sorted(types - set(classes))
    assert not unknown, f"README's Events section names {unknown}, which no event class carries"
    exported = {getattr(evalq, name) for name in evalq.__all__}
    missing = sorted(classes[t].__name__ for t in types if classes[t] not in exported)
    assert not missing, f"the documented event classes {missing} are not in evalq.__all__"


def test_all_holds_importable_names_once_and_every_event_class() -> None:
    assert len(evalq.__all__) == len(set(evalq.__all__))
    namespace: dict[str, object] = {}
    exec("from evalq import *", namespace)
    assert set(evalq.__all__) <= set(namespace)
    # What `watch` yields must be matchable by class from the top level, whatever README lists.
    assert set(event_classes().values()) <= {namespace[name] for name in evalq.__all__}


def test_the_extraction_finds_names_however_they_are_written() -> None:
    """The parsing itself, on a README of its own: a name documented any of these ways that
    the package did not export would fail the tests above."""
    text = (
        "# x\n\n`evalq.Alpha` and evalq.__gamma__; `evalq.submit` is a subject, evalq.toml a file.\n"
        "\n## From Python\n\n```python\nfrom evalq import (\n    Beta,\n    Delta as D,\n)\n"
        "# a comment line that is no heading\nx = Epsilon()  # raises JobZeta / TimeoutError\n```\n\n"
        "Inline: `from evalq import Eta, Theta`, `IotaKappa.method()`, and prose LambdaMu.\n\n"
        "## Other\n\n`NotSdkName` and `from evalq.sub import Omicron`.\n\n"
        "### Events\n\n`queued`, `progress` (with `progress`), `completed` (with `metrics` and `job_id`), `paused`.\n"
    )
    assert documented_names(text) == {
        "Alpha",
        "__gamma__",
        "Beta",
        "Delta",
        "JobZeta",
        "Eta",
        "Theta",
        "IotaKappa",
    }
    assert documented_event_types(text) == {"queued", "progress", "completed", "paused"}

"""The constrained scalars of the wire types: every pattern a field is checked against, and
the annotated types built from them, each defined once.

`schemas.py` builds its Structs from these; a module that checks a value the same way
(a job id on a command line, a label printed to a terminal) imports the pattern from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from msgspec import Meta

__all__ = [
    "ARG_KEY",
    "ARG_TEXT",
    "CONTROL",
    "ID_PREFIX",
    "JOB_ID",
    "JOB_ID_SEGMENT",
    "NAME_PATTERN",
    "PRIORITIES",
    "SECRET_KEY",
    "ArgDict",
    "ArgString",
    "BatchSize",
    "Device",
    "JobId",
    "Labels",
    "Limit",
    "Name",
    "OutputDir",
    "PoolName",
    "Priority",
    "check_args",
    "format_args",
]

# Patterns are anchored with `\A...\Z`, never `^...$`: msgspec searches with them, and `$`
# also matches before a final newline, which would let `"default\n"` through.
NAME_PATTERN = r"\A[A-Za-z0-9_.\-]+\Z"
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=NAME_PATTERN)]
# Pools become stream names and subject tokens: no dots.
PoolName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"\A[A-Za-z0-9_\-]+\Z")]
# A job id is a lowercase UUID4, as the gateway assigns them; `JOB_ID.fullmatch` checks one.
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
JobId = Annotated[str, Meta(pattern=rf"\A{JOB_ID.pattern}\Z")]
# The start of a job id, as a short id is given (`evalq status 1a2b`).
ID_PREFIX = re.compile(r"[0-9a-f\-]{1,36}")
# lmms-eval splits `k=v,k=v` on `,` and `=`: either character inside a key or value
# would silently change the arguments, so both are refused; so are control characters.
# These two checks run in EvaluateRequest.__post_init__ rather than as `Meta(pattern=...)`:
# msgspec (0.19-0.22) corrupts its heap when a union holds a pattern-constrained str beside
# a dict of str values, and the process aborts later.
JOB_ID_SEGMENT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Both are used with fullmatch, so a final newline is not let through.
ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
# Characters that act on a terminal or a page instead of showing: C0, DEL and C1 controls;
# bidirectional overrides, embeddings, isolates and marks, which reorder what follows (a
# label `\u202e...` prints backwards); the line and paragraph separators, which break a line
# where no newline shows; and invisible ones (zero-width space, word joiner, byte-order
# mark), which make two different texts look alike. The zero-width joiner and non-joiner
# (U+200C, U+200D) stay allowed: scripts such as Persian and emoji sequences need them.
_UNSHOWN = "\x00-\x1f\x7f-\x9f\u061c\u180e\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
ARG_TEXT = re.compile(f"[^,={_UNSHOWN}]*")
# None may be in a label, which is printed wherever events are; the CLI escapes them in
# whatever it prints.
CONTROL = re.compile(f"[{_UNSHOWN}]")
# Keys that name a credential. A request is readable by every submitter (status, events,
# the dashboard), so credentials belong in the worker's environment, never in a request.
# Exact names, and suffixes such as `_api_key`; `eos_token` and the like are not secrets.
SECRET_KEY = re.compile(
    r"(?:token|hf_token|api_?key|access_token|auth_token|use_auth_token|api_token|bearer_token|password|passwd|"
    r"secret|secret_key|client_secret|private_key|credentials?|aws_secret_access_key|aws_session_token"
    r"|[a-z0-9_.\-]*_(?:api_?key|secret|password|access_token|auth_token|api_token|secret_key|private_key))",
    re.IGNORECASE,
)
# lmms-eval reads an int in model_args/gen_kwargs back from text and hands it to the model,
# where it may become a C integer or a float: bounded to the ints a float holds exactly.
ArgInt = Annotated[int, Meta(ge=-(2**53), le=2**53)]
ArgValue = Union[Annotated[str, Meta(max_length=4096)], bool, ArgInt, float]
ArgDict = Annotated[dict[Annotated[str, Meta(min_length=1, max_length=128)], ArgValue], Meta(max_length=64)]
ArgString = Annotated[str, Meta(max_length=16384)]
BatchSize = Union[
    Annotated[int, Meta(ge=1, le=65536)],
    Annotated[str, Meta(pattern=r"\Aauto(:[1-9][0-9]{0,3})?\Z")],
]
Limit = Union[Annotated[int, Meta(ge=1, le=10**9)], Annotated[float, Meta(gt=0.0, le=1.0)]]
Device = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9_:]+(,[A-Za-z0-9_:]+)*\Z")]
# A relative name kept under the worker's results root: no absolute path, no `..`.
OutputDir = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=256,
        pattern=r"\A(?!/)(?!.*(?:\A|/)\.\.?(?:/|\Z))[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*\Z",
    ),
]
LabelKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
LabelValue = Annotated[str, Meta(max_length=256)]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=32)]

# The levels of a job's priority, lowest first (DESIGN.md, "Scheduling").
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "urgent")
Priority = Literal["low", "normal", "high", "urgent"]


def check_args(args: dict[str, Any] | str | None, field: str) -> None:
    """Refuse what lmms-eval's `k=v,k=v` parser would misread; the message carries the path."""
    if args is None:
        return
    if isinstance(args, str):
        pairs = [item.partition("=") for item in args.split(",")] if args else []
        for index, (key, eq, value) in enumerate(pairs):
            if not eq or not ARG_KEY.fullmatch(key) or not ARG_TEXT.fullmatch(value):
                raise ValueError(
                    f"Expected `k=v,k=v` with no `,` or `=` inside a key or value, got item {index} "
                    f"{key + eq + value!r} - at `$.{field}`"
                )
            _refuse_secret(key, value, field)
        return
    for key, value in args.items():
        if not ARG_KEY.fullmatch(key):
            raise ValueError(f"Invalid key {key!r}: expected a name matching {ARG_KEY.pattern!r} - at `$.{field}`")
        if isinstance(value, str) and not ARG_TEXT.fullmatch(value):
            raise ValueError(f"Expected a value with no `,`, `=` or control character - at `$.{field}.{key}`")
        _refuse_secret(key, value, field)


def _refuse_secret(key: str, value: object, field: str) -> None:
    # A flag such as `use_auth_token=True` says to use the worker's own token: no secret.
    if SECRET_KEY.fullmatch(key) and not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
        raise ValueError(
            f"Expected no credential in a request: {key!r} would be readable by every submitter; "
            f"set it in the worker's environment (e.g. HF_TOKEN) instead - at `$.{field}.{key}`"
        )


def format_args(args: Mapping[str, object] | str | None) -> str:
    """`model_args`/`gen_kwargs` as lmms-eval reads them, `k=v,k=v` (values were validated to
    hold no `,` or `=`): what a worker passes, and what the pool policy checks."""
    if args is None:
        return ""
    if isinstance(args, str):
        return args
    parts = []
    for key, value in args.items():
        text = str(value) if not isinstance(value, bool) else ("True" if value else "False")
        parts.append(f"{key}={text}")
    return ",".join(parts)

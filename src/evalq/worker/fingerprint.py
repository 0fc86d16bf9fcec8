"""Fingerprints: what a request asks the model, and what a task's scoring is given, as a hash.

A journaled response is taken again only for a request with the same fingerprint, so a
resume after the task's prompt changed, or a cached answer to another question, is never
used. A request's fingerprint is the sha256 of a canonical encoding of its type and each
of its arguments (`request.args`, as lmms-eval's task builds them): strings, numbers,
booleans and None as themselves, dicts (by sorted key), lists and tuples element by
element, and each callable among them (`doc_to_visual`, `doc_to_messages`,
`doc_to_target`, a multi-round `doc_to_text`) by what it returns for the request's
document, found as the models find it, `lm.task_dict[task][split][doc_id]`. In what a
callable returns, PIL images count by mode, size, palette and pixels; numpy arrays by
dtype, shape and bytes; bytes as they are; and a string that names an existing file by its
path, size and content. A file over `LARGE_FILE` counts by its size, modification time
and its first and last MiB, so an edit in its middle that keeps its size and mtime goes
unseen; a file is read once per run for each (path, size, modification time, inode).
Anything else (a decoder object, a tensor, a callable that raises) leaves the
request with no fingerprint (None): such a request resumes by its key and occurrence
alone, and is never cached.

What the fingerprint does not cover: the model (the worker scopes a cache to it), a seed
(sampled answers are cached only when the request names one), and anything the model
reads besides its request.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
from typing import Any

__all__ = ["LARGE_FILE", "FileDigests", "is_cacheable", "request_fingerprint", "results_fingerprint", "samples"]

LARGE_FILE = 64 << 20
_EDGE = 1 << 20
_DEPTH = 64
_PATH_MAX = 4096

# Files already read in a run, by (path, size, mtime_ns, inode): one video asked about many
# times is read once per run.
FileDigests = dict[tuple[str, int, int, int], bytes]


class _Unfingerprintable(Exception):
    pass


class _Document:
    """The request's document, fetched once and only if a callable needs it."""

    def __init__(self, request: Any, task_dict: Any) -> None:
        self.request = request
        self.task_dict = task_dict
        self.loaded = False
        self.value: Any = None

    def get(self) -> Any:
        if not self.loaded:
            metadata = getattr(self.request, "metadata", None) or {}
            split = metadata.get("split")
            if split is None or self.task_dict is None:
                raise _Unfingerprintable("the request names no document")
            self.value = self.task_dict[self.request.task_name][split][self.request.doc_id]
            self.loaded = True
        return self.value


def request_fingerprint(reqtype: str, request: Any, task_dict: Any, files: FileDigests | None = None) -> str | None:
    """The request's fingerprint (hex), or None where a part of it cannot be taken. `files`
    keeps the files read, for the next requests of the run."""
    digest = hashlib.sha256()
    document = _Document(request, task_dict)
    files = {} if files is None else files
    try:
        _feed(digest, reqtype, 0, files=None)
        for value in request.args:
            if callable(value) and not isinstance(value, type):
                digest.update(b"C")
                _feed(digest, value(document.get()), 0, files=files)
            else:
                _feed(digest, value, 0, files=None)
    except Exception:
        return None
    return digest.hexdigest()


def results_fingerprint(results: Any) -> str | None:
    """The fingerprint of what a `process_results` call is given: its pickle, without the
    pickler's memo, so equal values fingerprint alike whether or not they are one object."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=4)
    pickler.fast = True
    try:
        pickler.dump(results)
    except Exception:
        return None
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def samples(gen_kwargs: Any) -> bool:
    """Whether generation settings ask the model to sample: `do_sample` set, or a
    temperature above 0 (a value that is not a number counts as sampling)."""
    if not isinstance(gen_kwargs, dict):
        return False
    do_sample = gen_kwargs.get("do_sample")
    if isinstance(do_sample, str):
        do_sample = do_sample.strip().lower() not in ("", "0", "false", "no", "off", "none")
    if do_sample:
        return True
    temperature = gen_kwargs.get("temperature")
    if temperature is None:
        return False
    try:
        return float(temperature) != 0.0
    except (TypeError, ValueError):
        return True


def is_cacheable(reqtype: str, request: Any, fp: str | None, *, seed: bool) -> bool:
    """Whether another job may take this answer: it has a fingerprint, and asking again
    gives the same answer (a log-likelihood, a generation that does not sample, or a
    sampled one under a seed the request names)."""
    if fp is None:
        return False
    if reqtype == "loglikelihood" or seed:
        return True
    return not any(samples(value) for value in request.args if isinstance(value, dict))


def _feed(digest: Any, value: Any, depth: int, *, files: FileDigests | None) -> None:
    if depth > _DEPTH:
        raise _Unfingerprintable("nested too deep")
    if value is None:
        digest.update(b"N")
    elif isinstance(value, bool):
        digest.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        digest.update(b"I%d;" % value)
    elif isinstance(value, float):
        digest.update(b"F" + value.hex().encode() + b";")
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        digest.update(b"S%d:" % len(data) + data)
        if files is not None and _names_a_file(value):
            digest.update(b"P" + _file_digest(value, files))
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        digest.update(b"Y%d:" % len(data) + data)
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: (type(item[0]).__name__, str(item[0])))
        digest.update(b"D%d:" % len(items))
        for key, item in items:
            _feed(digest, key, depth + 1, files=files)
            _feed(digest, item, depth + 1, files=files)
    elif isinstance(value, list | tuple):
        digest.update(b"%s%d:" % (b"L" if isinstance(value, list) else b"T", len(value)))
        for item in value:
            _feed(digest, item, depth + 1, files=files)
    elif not _feed_array(digest, value, depth, files=files) and not _feed_image(digest, value):
        raise _Unfingerprintable(f"a {type(value).__name__} is not fingerprinted")


def _feed_array(digest: Any, value: Any, depth: int, *, files: FileDigests | None) -> bool:
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray | numpy.generic):
        return False
    if value.dtype.hasobject:  # its bytes are addresses: its elements count instead
        digest.update(b"O")
        _feed(digest, value.tolist(), depth + 1, files=files)
        return True
    data = numpy.ascontiguousarray(value).tobytes()
    digest.update(b"A" + value.dtype.str.encode() + repr(value.shape).encode() + hashlib.sha256(data).digest())
    return True


def _feed_image(digest: Any, value: Any) -> bool:
    image = sys.modules.get("PIL.Image")
    if image is None or not isinstance(value, image.Image):
        return False
    palette = value.getpalette() if value.mode in ("P", "PA") else None
    digest.update(b"M" + value.mode.encode() + repr(value.size).encode() + repr(palette).encode())
    digest.update(hashlib.sha256(value.tobytes()).digest())
    return True


def _names_a_file(value: str) -> bool:
    if not value or len(value) > _PATH_MAX or "\0" in value or "\n" in value:
        return False
    try:
        return os.path.isfile(value)
    except (OSError, ValueError):
        return False


def _file_digest(path: str, files: FileDigests) -> bytes:
    status = os.stat(path)
    known = (path, status.st_size, status.st_mtime_ns, status.st_ino)
    if known in files:
        return files[known]
    digest = hashlib.sha256(b"%d:" % status.st_size)
    with open(path, "rb") as handle:
        if status.st_size <= LARGE_FILE:
            while block := handle.read(_EDGE):
                digest.update(block)
        else:
            digest.update(b"%d;" % status.st_mtime_ns)
            digest.update(handle.read(_EDGE))
            handle.seek(status.st_size - _EDGE)
            digest.update(handle.read(_EDGE))
    files[known] = digest.digest()
    return files[known]

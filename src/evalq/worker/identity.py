"""A model's identity, as the response cache keys it: what decides its answers.

A cached answer is reused only for the same model: the same lmms-eval class, the same
arguments (parsed and sorted, so `a=1,b=2` and `b=2,a=1` are one), the same weights, and the
same lmms-eval version. A path alone is not an identity: a checkpoint folder written again
in place holds another model under the same name. So every local file or folder an argument
names is fingerprinted by its content: each file's relative path and size, and a hash of its
bytes (whole for files up to 32 MiB; for larger ones the first and last MiB and 16 blocks of
64 KiB spread between them). Reading a few MiB per file keeps this fast for checkpoints of
any size; a rewrite that changed none of those bytes would go unnoticed, which retraining
(every tensor changes) never does. Copies of one checkpoint on two hosts share an identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from ..schemas import EvaluateRequest, format_args

__all__ = ["file_fingerprint", "model_identity", "path_fingerprint"]

_WHOLE = 32 * 1024 * 1024
_EDGE = 1024 * 1024
_BLOCK = 64 * 1024
_BLOCKS = 16
# A folder with more files than this is not a checkpoint: its identity is its listing's.
_MAX_FILES = 10_000


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= _WHOLE:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(handle.read(_EDGE))
        step = (size - 2 * _EDGE) // (_BLOCKS + 1)
        for index in range(1, _BLOCKS + 1):
            handle.seek(_EDGE + index * step)
            digest.update(handle.read(_BLOCK))
        handle.seek(size - _EDGE)
        digest.update(handle.read(_EDGE))
    return digest.hexdigest()


def path_fingerprint(path: Path) -> str | None:
    """A local file's or folder's content fingerprint; None when it is neither."""
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            count += 1
            if count > _MAX_FILES:
                return digest.hexdigest()
            file = Path(root) / name
            if not file.is_file():
                continue
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            digest.update(file_fingerprint(file).encode())
    return digest.hexdigest()


def _lmms_version() -> str:
    try:
        return metadata.version("lmms_eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_identity(request: EvaluateRequest, *, cwd: Path | None = None) -> str:
    """The model's identity as a hash: class, sorted arguments, their local paths' content
    fingerprints, and lmms-eval's version."""
    args = format_args(request.model_args)
    pairs = sorted(item.partition("=")[::2] for item in args.split(",") if item) if args else []
    weights: dict[str, str] = {}
    for key, value in pairs:
        if not value or ("/" not in value and not value.startswith(".")):
            continue
        candidate = Path(value) if Path(value).is_absolute() or cwd is None else cwd / value
        fingerprint = path_fingerprint(candidate)
        if fingerprint is not None:
            weights[key] = fingerprint
    body = {"model": request.model, "args": pairs, "weights": weights, "lmms_eval": _lmms_version()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40]

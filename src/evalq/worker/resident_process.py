"""Inside a resident model process: jobs run one after another, the model built once.

Spawned from the zygote (`python -m evalq.worker.resident_process --control-fd N`), with
lmms-eval already imported and CUDA untouched. For each `ResidentRun` (see `resident.py`)
it points its output at the job's pipe and runs the job's module as `python -m` would:
lmms-eval, or evalq's entry (`entry.py`: a whole job or a piece). lmms-eval builds its model through
`models.get_model(name).create_from_arg_string(args, config)`; that call is answered with
the model built by an earlier job when the class, the arguments and the config are the
same, and otherwise builds it (after dropping the old one) and keeps it. Two things of the
kept model are reset for every job: its `task_dict`, and its `clean()`, which lmms-eval
calls at the end of a run and which would delete the model's modules.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from ..children import exit_code, run_as_main
from .entry import ENTRY_MODULE
from .entry import main as entry_main
from .lmms_hooks import patched_get_model
from .resident import MAX_MESSAGE, Done, Loaded, ResidentRun, decode, encode

__all__ = ["main"]


class _Kept:
    def __init__(self) -> None:
        self.key: tuple[str, ...] | None = None
        self.model: Any = None

    def drop(self) -> None:
        self.key, self.model = None, None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _cuda_memory() -> str:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return "cuda not initialised"
    return f"cuda memory_allocated {torch.cuda.memory_allocated()} bytes"


def _light_clean() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _keeping(kept: _Kept, control: socket.socket) -> Iterator[None]:
    def build(cls: Any) -> type:
        def create_from_arg_string(klass: type, arg_string: str, additional_config: Any = None) -> Any:
            key = (
                cls.__module__,
                cls.__qualname__,
                arg_string,
                json.dumps(additional_config, sort_keys=True, default=str),
            )
            if kept.key == key and kept.model is not None:
                message = Loaded(reused=True)
            else:
                kept.drop()
                begun = time.monotonic()
                kept.model = cls.create_from_arg_string(arg_string, additional_config)
                kept.key = key
                message = Loaded(reused=False, seconds=round(time.monotonic() - begun, 3))
            model = kept.model
            model.task_dict = {}
            model.clean = _light_clean  # lmms-eval's own clean() deletes the model's modules
            how = "reused" if message.reused else f"loaded in {message.seconds} s"
            print(f"[evalq resident] model {how}; {_cuda_memory()}", flush=True)
            control.send(encode(message))
            return model

        return type(cls.__name__, (), {"create_from_arg_string": classmethod(create_from_arg_string)})

    with patched_get_model(build):
        yield


def _run(module: str, argv: list[str]) -> int:
    """Run the module as `python -m` would; lmms-eval ends with `sys.exit`, which ends the
    job here, not the process."""
    if module == ENTRY_MODULE:
        try:
            return entry_main(argv)
        except SystemExit as done:
            return exit_code(done)
    return run_as_main(module, argv)


def serve(control: socket.socket) -> int:
    kept = _Kept()
    home = os.getcwd()
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 1)
        if not data:
            kept.drop()
            print(f"[evalq resident] released; {_cuda_memory()}", flush=True)
            return 0  # the worker closed its end: release the model by exiting
        request = decode(data)
        if not isinstance(request, ResidentRun) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            control.send(encode(Done(code=2, crashed=True)))
            return 2
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(fds[0])
        code, crashed = 1, False
        try:
            os.chdir(request.cwd)
            with _keeping(kept, control):
                code = _run(request.module, request.argv)
        except BaseException:
            traceback.print_exc()
            crashed = True
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.chdir(home)
        control.send(encode(Done(code=code, crashed=crashed)))
        if crashed:
            return 1  # what raised may have left the model in any state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalq.worker.resident_process")
    parser.add_argument("--control-fd", type=int, required=True)
    options = parser.parse_args(argv)
    control = socket.socket(fileno=options.control_fd)
    return serve(control)


if __name__ == "__main__":
    sys.exit(main())

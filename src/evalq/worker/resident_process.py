"""Inside a resident model process: jobs run one after another, the model built once.

Spawned from the zygote (`python -m evalq.worker.resident_process --control-fd N`), with
lmms-eval already imported and CUDA untouched. For each `ResidentRun` (see `resident.py`)
it points its output at the job's pipe and runs the job's module as `python -m` would:
lmms-eval, or evalq's entry (`entry.py`: a whole job or a piece). lmms-eval builds its model through
`models.get_model(name).create_from_arg_string(args, config)`; that call is answered with
the model built by an earlier job when the class, the arguments and the config are the
same, and so is the model's identity (the content of the files the arguments name; a run
that brings none is matched by its arguments alone). When they differ only in the weights
folder, or not at all but the identity does (the folder was written again in place), the
kept model takes the new checkpoint's weights in place where that gives what a fresh load
would (`weight_swap.py`: the folder is compared with what the loaded checkpoint held when
it was loaded; the comparison with its own checkpoint that this needs is made between
jobs). Otherwise it
builds the model (after dropping the old one) and keeps it. Two things of the kept model
are reset for every job: its `task_dict`, and its `clean()`, which lmms-eval calls at the
end of a run and which would delete the model's modules.
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
from .weight_swap import SwapFailed, SwapState, apart_from_weights

__all__ = ["main"]


class _Kept:
    def __init__(self) -> None:
        self.key: tuple[str, ...] | None = None
        # The identity of the model it holds, as the job that loaded it (or swapped its
        # weights in) gave it; None: not known.
        self.identity: str | None = None
        self.model: Any = None
        # What the kept model offers another checkpoint of its model (None: it names no
        # weights folder).
        self.weights: SwapState | None = None

    def drop(self) -> None:
        model = self.model
        if self.weights is not None:
            self.weights.release()
        self.key, self.identity, self.model, self.weights = None, None, None, None
        if model is not None:
            # lmms-eval's own clean() deletes the model's modules: their memory goes even if
            # something of the last run still holds the model.
            with contextlib.suppress(Exception):
                type(model).clean(model)
        del model
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def holds(self, key: tuple[str, ...], identity: str | None) -> bool:
        """The kept model is the one the job asks for: the same arguments, and the same
        identity where both are known."""
        if self.model is None or self.key != key:
            return False
        return identity is None or self.identity is None or identity == self.identity

    def swap_for(self, key: tuple[str, ...]) -> tuple[str, str] | None:
        """(weights folder, why it is not swapped in: empty when it may be) for a job that
        asks for another checkpoint of the kept model (another folder, or its own folder
        written again); None where the job asks for another model."""
        if self.model is None or self.key is None:
            return None
        wanted, held = apart_from_weights(key[2]), apart_from_weights(self.key[2])
        if wanted is None or held is None or (self.key[:2], self.key[3:]) != (key[:2], key[3:]):
            return None
        if (wanted[0], wanted[2]) != (held[0], held[2]):
            return None
        if self.weights is None:
            return wanted[1], "the loaded model names no weights folder"
        return wanted[1], self.weights.refusal or ""

    def check(self) -> None:
        """Compare the kept model with its checkpoint, while no job waits on it."""
        if self.weights is not None and self.weights.pending:
            begun = time.monotonic()
            self.weights.verify()
            outcome = self.weights.refusal or "equal: it may take another checkpoint's weights"
            print(
                f"[evalq resident] model checked against its checkpoint in {time.monotonic() - begun:.2f} s: {outcome}",
                flush=True,
            )


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


def _swap_or_load(
    kept: _Kept, key: tuple[str, ...], identity: str | None, cls: Any, arg_string: str, additional_config: Any
) -> Loaded:
    """Give the kept model the weights the job asks for where it can take them in place;
    else drop it, and build and keep the job's."""
    begun = time.monotonic()
    note = None
    rewritten = kept.model is not None and kept.key == key
    candidate = kept.swap_for(key)
    if candidate is not None:
        folder, note = candidate
        if not note and kept.weights is not None:
            try:
                note = kept.weights.swap(folder)
            except SwapFailed as failed:
                note = str(failed)
            if note is None:
                kept.key, kept.identity = key, identity
                return Loaded(reused=False, swapped=True, seconds=round(time.monotonic() - begun, 3))
        if rewritten:
            note = f"the checkpoint at {folder} changed since it was loaded: {note}"
    elif rewritten:
        note = "the files its arguments name changed since it was loaded"
    kept.drop()
    begun = time.monotonic()
    kept.model = cls.create_from_arg_string(arg_string, additional_config)
    kept.key, kept.identity = key, identity
    seconds = round(time.monotonic() - begun, 3)
    apart = apart_from_weights(arg_string)
    if apart is not None:
        kept.weights = SwapState(kept.model, apart[1])
    return Loaded(reused=False, seconds=seconds, note=note or None)


@contextlib.contextmanager
def _keeping(kept: _Kept, control: socket.socket, identity: str | None) -> Iterator[None]:
    def build(cls: Any) -> type:
        def create_from_arg_string(klass: type, arg_string: str, additional_config: Any = None) -> Any:
            key = (
                cls.__module__,
                cls.__qualname__,
                arg_string,
                json.dumps(additional_config, sort_keys=True, default=str),
            )
            if kept.holds(key, identity):
                message = Loaded(reused=True)
            else:
                message = _swap_or_load(kept, key, identity, cls, arg_string, additional_config)
            model = kept.model
            model.task_dict = {}
            model.clean = _light_clean  # lmms-eval's own clean() deletes the model's modules
            if message.reused:
                how = "model reused"
            elif message.swapped:
                how = f"weights swapped in {message.seconds} s"
            else:
                how = f"model loaded in {message.seconds} s" + (f" (full load: {message.note})" if message.note else "")
            print(f"[evalq resident] {how}; {_cuda_memory()}", flush=True)
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
            with _keeping(kept, control, request.identity):
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
        if code == 0:
            # Between jobs: the check a swap needs costs a read of the weights, paid while no
            # job waits (after a failure the worker ends this process instead).
            kept.check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalq.worker.resident_process")
    parser.add_argument("--control-fd", type=int, required=True)
    options = parser.parse_args(argv)
    control = socket.socket(fileno=options.control_fd)
    return serve(control)


if __name__ == "__main__":
    sys.exit(main())

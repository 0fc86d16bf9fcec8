"""What evalq's child processes share: dying with their parent, and running a module as `python -m` would.

Both the embedded nats-server and the worker's evaluations are children that must not
outlive the process that started them; the zygote's children and the resident process run
a module in-process and must end with the exit code `python -m` would have given.
Standard library only: the zygote imports this before it forks jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import runpy
import signal
import sys

__all__ = ["die_with_parent", "exit_code", "run_as_main"]


def die_with_parent() -> None:
    # If the worker is killed (-9), the evaluation must not live on holding a GPU: the
    # job is redelivered to another worker, which starts its own.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_code(done: SystemExit) -> int:
    """The exit code Python gives a process that raised `done`: a message other than a number
    is printed to stderr, and the code is 1."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1


def run_as_main(module: str, argv: list[str]) -> int:
    """Run `module` as `python -m <module> <argv>` would, in this process; its exit code.
    Only `SystemExit` is caught: any other exception is the caller's."""
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return exit_code(done)
    return 0

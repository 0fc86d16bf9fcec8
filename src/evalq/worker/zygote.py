"""The warm evaluator's zygote: lmms-eval imported once, each job forked from it.

Run as `python -m evalq.worker.zygote --control-fd N --include-path DIR` by the worker
(see `warm.py`). It imports lmms-eval, torch and transformers and indexes every task
YAML once, without touching CUDA, then serves requests on a SOCK_SEQPACKET socket:

- `{"op": "run", "module": "lmms_eval", "argv": [...], "cwd": "..."}` with one file
  descriptor attached (the job's output pipe): forks a child that becomes a session and
  process-group leader, points stdout and stderr at the pipe, and runs the module as
  `python -m` would. Replies `{"pid": N}`, then `{"pid": N, "exit": code}` when it ends
  (a negative code is the signal that ended it, as with `subprocess`).
- `{"op": "ping"}`: replies with its pid and whether CUDA has been initialised.

One request at a time: the worker runs one job at a time. The zygote never runs a job
itself, so a job that crashes takes only its own child down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from .runner import die_with_parent

# The largest control message either side reads (a request carries a job's whole argv).
MAX_MESSAGE = 1 << 20


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _about() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "cuda_initialized": _cuda_initialised(),
        "threads": threading.active_count(),
        "imported": sorted(name for name in ("lmms_eval", "torch", "transformers") if name in sys.modules),
    }


def warm(include_path: str | None) -> None:
    """Import what every job imports, and index the task YAMLs once."""
    import lmms_eval.__main__
    import lmms_eval.cli.dispatch  # noqa: F401
    import transformers
    from lmms_eval.tasks import TaskManager

    # Touching these resolves transformers' lazy modules for the common model classes.
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoProcessor"):
        with contextlib.suppress(Exception):
            getattr(transformers, name)

    # Indexing lmms-eval's ~2,000 bundled task YAMLs takes seconds and they never change
    # under a running worker: index them once here, so every forked job reuses the index.
    # Include paths are re-indexed per job (they are small and a user may edit them).
    bundled = os.path.dirname(os.path.abspath(sys.modules["lmms_eval.tasks"].__file__ or "")) + "/"
    original = TaskManager._get_task_and_group
    cache: dict[str, Any] = {}

    def indexed_once(self: Any, task_dir: str) -> Any:
        if task_dir != bundled:
            return original(self, task_dir)
        if task_dir not in cache:
            cache[task_dir] = original(self, task_dir)
        return dict(cache[task_dir])

    TaskManager._get_task_and_group = indexed_once  # type: ignore[method-assign]
    TaskManager("ERROR", include_path=include_path)


def _run_child(request: dict[str, Any], output_fd: int, control: socket.socket, zygote_pid: int) -> None:
    """In the forked child: become a group leader, wire the output, run the module. Never returns."""
    code = 1
    try:
        os.setsid()  # its own session and process group: a cancel ends the whole group
        die_with_parent()
        if os.getppid() != zygote_pid:  # the zygote died before the line above
            os._exit(137)
        control.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        os.chdir(request["cwd"])
        module = request["module"]
        sys.argv = [module, *request["argv"]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            if done.code is None:
                code = 0
            elif isinstance(done.code, int):
                code = done.code
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # never run the zygote's own cleanup in a child


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.send(json.dumps(message).encode())


def serve(control: socket.socket) -> None:
    zygote_pid = os.getpid()
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 1)
        if not data:
            return  # the worker closed its end: it is stopping
        request = json.loads(data)
        op = request.get("op")
        if op != "run" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            _send(control, _about() if op == "ping" else {"error": "expected a run request with one output descriptor"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, fds[0], control, zygote_pid)
        os.close(fds[0])  # the child and its descendants hold the only write ends now
        _send(control, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(control, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalq.worker.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--include-path", default=None)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    begun = time.monotonic()
    try:
        warm(args.include_path)
    except BaseException as exc:
        traceback.print_exc()
        _send(control, {"error": f"could not warm up: {type(exc).__name__}: {exc}"})
        return 1
    if _cuda_initialised():
        # A forked child cannot use CUDA that its parent initialised: refuse to serve.
        _send(control, {"error": "CUDA was initialised while warming up; fork would be unsafe"})
        return 1
    _send(control, {"ready": True, "warm_s": round(time.monotonic() - begun, 3), **_about()})
    serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())

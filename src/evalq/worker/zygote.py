"""The warm evaluator's zygote: lmms-eval imported once, each job forked from it.

Run as `python -m evalq.worker.zygote --control-fd N --include-path DIR` by the worker
(see `warm.py`). It imports lmms-eval, torch and transformers and indexes every task
YAML once, without touching CUDA, then serves the requests of `zygote_protocol` on a
SOCK_SEQPACKET socket:

- `Run`, with one file descriptor attached (the job's output pipe): forks a child that
  becomes a session and process-group leader, points stdout and stderr at the pipe, and
  runs the module as `python -m` would. Replies `Started`, then `Exited` when it ends.
- `Spawn`, with one file descriptor attached: forks a child that lives on (a resident
  model) and replies `Started` at once; the child is reaped when it ends.
- `Ping`: replies `About`, with its pid and whether CUDA has been initialised.
- `TakeInventory`: replies the worker's inventory, from the lmms-eval it has imported.

One request at a time: the worker runs one job at a time. The zygote never runs a job
itself, so a job that crashes takes only its own child down.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import msgspec

from ..children import die_with_parent, run_as_main
from ..schemas import GpuInfo
from .inventory import cuda_gpus, list_lmms_eval
from .zygote_protocol import (
    MAX_MESSAGE,
    About,
    Exited,
    Failure,
    InventoryReply,
    Ping,
    Ready,
    Reply,
    Request,
    Run,
    Spawn,
    Started,
    TakeInventory,
    decode_request,
    encode,
)

# How long the throwaway child that lists GPUs may take (a wedged driver can hang it).
GPU_LISTING_TIMEOUT = 120.0


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _about() -> About:
    return About(
        pid=os.getpid(),
        cuda_initialized=_cuda_initialised(),
        threads=threading.active_count(),
        imported=sorted(name for name in ("lmms_eval", "torch", "transformers") if name in sys.modules),
    )


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


def _child(module: str, argv: list[str], cwd: str, output_fd: int, control: socket.socket, zygote_pid: int) -> None:
    """In a forked child: become a group leader with `output_fd` as its stdout and stderr, and
    run the module as `python -m` would. Never returns."""
    code = 1
    try:
        os.setsid()  # its own session and process group: a cancel ends the whole group
        die_with_parent()
        if os.getppid() != zygote_pid:  # the zygote died before the line above
            os._exit(137)
        control.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        os.chdir(cwd)
        try:
            code = run_as_main(module, argv)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # never run the zygote's own cleanup in a child


def _run_child(request: Run, output_fd: int, control: socket.socket, zygote_pid: int) -> None:
    """A job: its output to the job's pipe."""
    _child(request.module, request.argv, request.cwd, output_fd, control, zygote_pid)


def _spawn_child(request: Spawn, fd: int, control: socket.socket, zygote_pid: int) -> None:
    """A child that lives on (a resident model): its output to its log, `fd` its control socket."""
    out = os.open(request.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    argv = [arg.replace("{fd}", str(fd)) for arg in request.argv]
    _child(request.module, argv, request.cwd, out, control, zygote_pid)


def _reap(spawned: set[int]) -> None:
    """Collect the spawned children that ended (they are not waited for one by one)."""
    for pid in list(spawned):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
        spawned.discard(pid)


def _gpus_in_child(control: socket.socket) -> list[GpuInfo]:
    """The GPUs, listed by a forked child that exits, so the zygote itself stays CUDA-free.

    torch is the source, as in the subprocess path, because its view is the one a job gets:
    CUDA_VISIBLE_DEVICES applies and the indexes match (nvidia-smi lists every GPU of the
    host, and may be missing from a container). Even `torch.cuda.is_available()` initialises
    the CUDA driver, and a child forked after that cannot use CUDA: hence the throwaway child.
    """
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            die_with_parent()
            control.close()
            os.close(read_end)
            data = msgspec.msgpack.encode(cuda_gpus())
            while data:
                data = data[os.write(write_end, data) :]
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)  # never run the zygote's own cleanup in a child
    os.close(write_end)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + GPU_LISTING_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                raise TimeoutError(f"listing GPUs took over {GPU_LISTING_TIMEOUT:.0f} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read_end)
        # After EOF the child is exiting (it held the only write end), so this returns.
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"the child listing GPUs exited with {code}; see the zygote's log")
    return msgspec.msgpack.decode(b"".join(chunks), type=list[GpuInfo])


def _inventory(control: socket.socket, include_path: str | None) -> Reply:
    try:
        # Models and tasks are listed here, reusing the imports and the bundled task index.
        reply: Reply = InventoryReply(inventory=list_lmms_eval(include_path, _gpus_in_child(control)))
    except Exception as exc:
        traceback.print_exc()
        reply = Failure(error=f"could not take the inventory: {type(exc).__name__}: {exc}")
    return reply


def _send(control: socket.socket, message: Reply) -> None:
    control.send(encode(message))


def serve(control: socket.socket, include_path: str | None) -> None:
    zygote_pid = os.getpid()
    spawned: set[int] = set()
    # A spawned child is reaped as soon as it ends, so its pid is gone when its worker looks.
    signal.signal(signal.SIGCHLD, lambda signum, frame: _reap(spawned))
    while True:
        _reap(spawned)
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 1)
        if not data:
            return  # the worker closed its end: it is stopping
        request: Request | None
        try:
            request = decode_request(data)
            refusal = "expected a run request with one output descriptor"
        except msgspec.DecodeError as exc:
            request, refusal = None, f"unreadable request: {exc}"
        if isinstance(request, Spawn) and len(fds) == 1:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _spawn_child(request, fds[0], control, zygote_pid)
            os.close(fds[0])
            spawned.add(pid)
            _send(control, Started(pid=pid))
            continue
        if not isinstance(request, Run) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if isinstance(request, Ping):
                _send(control, _about())
            elif isinstance(request, TakeInventory):
                _send(control, _inventory(control, include_path))
                if _cuda_initialised():
                    # Every later fork would be unsafe: end, and the worker starts a new zygote.
                    print("CUDA was initialised while taking the inventory; exiting", file=sys.stderr)
                    return
            else:
                _send(control, Failure(error=refusal))
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, fds[0], control, zygote_pid)
        os.close(fds[0])  # the child and its descendants hold the only write ends now
        _send(control, Started(pid=pid))
        _, status = os.waitpid(pid, 0)
        _send(control, Exited(pid=pid, code=os.waitstatus_to_exitcode(status)))


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
        _send(control, Failure(error=f"could not warm up: {type(exc).__name__}: {exc}"))
        return 1
    if _cuda_initialised():
        # A forked child cannot use CUDA that its parent initialised: refuse to serve.
        _send(control, Failure(error="CUDA was initialised while warming up; fork would be unsafe"))
        return 1
    _send(control, Ready(warm_s=round(time.monotonic() - begun, 3), about=_about()))
    serve(control, args.include_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

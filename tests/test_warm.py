"""The warm evaluator: jobs forked from a zygote that has imported lmms-eval (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from evalq.schemas import EvaluateRequest
from evalq.worker.argv import lmms_eval_args, scrubbed_env
from evalq.worker.inventory import Inventory, take_inventory
from evalq.worker.results import collect, metrics_of
from evalq.worker.taskpaths import DEMO_TASK, build_include_dir
from evalq.worker.warm import WarmEvaluator, WarmProcess, ZygoteError

from .conftest import REPO

pytestmark = pytest.mark.slow

FAKE_MODULE = "tests.fake_evaluator"
# The repo (for the stand-in module), then the path this run imports evalq from: without
# it a zygote would import whichever evalq is installed, not the one under test.
IMPORTABLE = os.pathsep.join(path for path in (str(REPO), os.environ.get("PYTHONPATH", "")) if path)
Factory = Callable[..., Awaitable[WarmEvaluator]]


@pytest.fixture
async def zygote_factory(tmp_path: Path) -> AsyncIterator[Factory]:
    """Start zygotes (with this repo importable, for the stand-in module); teardown ends them."""
    started: list[WarmEvaluator] = []

    async def make(wait: bool = True, **env: str) -> WarmEvaluator:
        include = build_include_dir(tmp_path / "tasks", [])
        warm = WarmEvaluator(
            include,
            env=scrubbed_env({**os.environ, "PYTHONPATH": IMPORTABLE, **env}),
            log_path=tmp_path / f"zygote-{len(started)}.log",
        )
        started.append(warm)
        if wait:
            await asyncio.wait_for(warm.ready(), 300)
        return warm

    yield make
    for warm in started:
        await warm.close()


def job_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


async def test_jobs_fork_from_a_zygote_that_never_initialises_cuda(zygote_factory: Factory, tmp_path: Path) -> None:
    warm = await zygote_factory()
    about = await warm.ping()
    assert about["imported"] == ["lmms_eval", "torch", "transformers"]
    assert about["cuda_initialized"] is False
    request = EvaluateRequest(model="dummy", tasks=["evalq_demo"])
    for index in range(2):
        output = job_dir(tmp_path, f"job{index}")
        progress: list[object] = []
        job = await warm.launch(
            lmms_eval_args(request, output_path=output, include_path=warm.include_path),
            cwd=output,
            log_path=output / "eval.log",
            on_progress=progress.append,
        )
        assert await asyncio.wait_for(job.wait(), 180) == 0
        results = collect(output).results
        assert results is not None
        assert metrics_of(results)["evalq_demo"]["exact_match"] == pytest.approx(0.6)
        assert progress, "progress is parsed from a forked job's output as from a subprocess"
        assert "exact_match" in (output / "eval.log").read_text()
    after = await warm.ping()
    assert after["pid"] == about["pid"] and after["cuda_initialized"] is False
    assert warm.starts == 1


async def test_a_job_leads_its_own_group_and_its_crash_spares_the_zygote(
    zygote_factory: Factory, tmp_path: Path
) -> None:
    warm = await zygote_factory(FAKE_EVAL_MODE="slow")
    zygote_pid = (await warm.ping())["pid"]

    async def launch(name: str) -> tuple[WarmProcess, Path]:
        output = job_dir(tmp_path, name)
        running = asyncio.Event()
        job = await warm.launch(
            ["--limit=5", f"--output_path={output}"],
            cwd=output,
            log_path=output / "eval.log",
            on_progress=lambda progress: running.set(),
            module=FAKE_MODULE,
        )
        await asyncio.wait_for(running.wait(), 60)
        return job, output

    crashing, output = await launch("crash")
    pid = crashing.pid
    assert pid is not None
    assert psutil.Process(pid).ppid() == zygote_pid
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert f"fake evaluator pid {pid}" in (output / "eval.log").read_text()
    os.killpg(pid, signal.SIGKILL)  # the job dies as a segfault or the OOM killer would end it
    assert await asyncio.wait_for(crashing.wait(), 30) == -signal.SIGKILL
    assert (await warm.ping())["pid"] == zygote_pid

    cancelled, _ = await launch("cancel")
    await cancelled.terminate(5.0)
    assert await asyncio.wait_for(cancelled.wait(), 30) == -signal.SIGTERM
    assert cancelled.pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(cancelled.pid, 0)
    assert (await warm.ping())["pid"] == zygote_pid


async def test_a_dead_zygote_is_started_again(zygote_factory: Factory, tmp_path: Path) -> None:
    warm = await zygote_factory()
    first = warm.pid
    assert first is not None and warm.process is not None
    os.kill(first, signal.SIGKILL)
    await asyncio.wait_for(warm.process.wait(), 30)
    output = job_dir(tmp_path, "after")
    job = await warm.launch(
        ["--limit=3", f"--output_path={output}"], cwd=output, log_path=output / "eval.log", module=FAKE_MODULE
    )
    assert await asyncio.wait_for(job.wait(), 120) == 0
    assert collect(output).results is not None
    assert warm.starts == 2 and warm.pid != first


async def test_a_zygote_that_cannot_warm_up_says_why(zygote_factory: Factory, tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "lmms_eval"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this lmms-eval is broken')\n")
    warm = await zygote_factory(wait=False, PYTHONPATH=f"{broken.parent}{os.pathsep}{IMPORTABLE}")
    with pytest.raises(ZygoteError, match="this lmms-eval is broken"):
        await asyncio.wait_for(warm.ready(), 120)
    assert warm.failures == 1


async def test_the_zygote_takes_the_inventory_without_initialising_cuda(zygote_factory: Factory) -> None:
    warm = await zygote_factory()
    zygote_pid = (await warm.ping())["pid"]
    inventory = await warm.inventory(timeout=300)
    assert isinstance(inventory, Inventory)
    assert inventory.lmms_eval_version == metadata.version("lmms-eval")
    assert DEMO_TASK in inventory.tasks, "the include folder's tasks are listed with the bundled ones"
    assert len(inventory.tasks) > 100, "lmms-eval's bundled tasks are listed"
    assert "dummy" in inventory.models
    after = await warm.ping()
    assert after["pid"] == zygote_pid and after["cuda_initialized"] is False

    # An answer that never came must not be read as the next request's: the zygote goes.
    with pytest.raises(TimeoutError):
        await warm.inventory(timeout=0.001)
    assert (await asyncio.wait_for(warm.ping(), 300))["pid"] != zygote_pid
    assert warm.starts == 2


async def test_take_inventory_falls_back_to_a_subprocess(
    zygote_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken" / "lmms_eval"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this lmms-eval is broken')\n")
    warm = await zygote_factory(wait=False, PYTHONPATH=f"{broken.parent}{os.pathsep}{IMPORTABLE}")
    env = scrubbed_env({**os.environ, "PYTHONPATH": IMPORTABLE})
    inventory = await take_inventory(tmp_path / "tasks", env, warm, timeout=300)
    assert warm.failures == 1, "the zygote was asked first"
    assert inventory is not None
    assert DEMO_TASK in inventory.tasks and "dummy" in inventory.models
    assert inventory.lmms_eval_version == metadata.version("lmms-eval")

    assert "the warm evaluator could not list models and tasks" in caplog.text

    # An lmms-eval that cannot be imported where the subprocess runs: no inventory, and why.
    caplog.clear()
    unimportable = {**env, "PYTHONPATH": f"{broken.parent}{os.pathsep}{IMPORTABLE}"}
    assert await take_inventory(tmp_path / "tasks", unimportable, None, 300) is None
    assert "this lmms-eval is broken" in caplog.text

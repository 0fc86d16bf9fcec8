"""evalq's benchmarks, side by side with lmms-eval's own HTTP server, in one run.

    python bench/run.py            # full sizes; writes bench/RESULTS.md
    python bench/run.py --quick    # small sizes, to check the harness (CI runs this)

Everything runs on 127.0.0.1. The anchor is lmms-eval's server (`lmms_eval.entrypoints`)
started from the same virtual environment. Only ratios measured in this run are
meaningful: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
JOB = {"model": "dummy", "tasks": ["evalq_demo"], "limit": 4}
# lmms-eval's server only finds results in <output>/<model>/, which lmms-eval writes only when
# model_args has a pretrained-like key; the dummy model ignores it, so both systems get it.
TINY_JOB = {**JOB, "model_args": {"pretrained": "dummy"}}
STAND_IN = str(REPO / "tests" / "fake_evaluator.sh")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Procs:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            self.stop(proc)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout} s")
        await asyncio.sleep(0.1)  # polling a readiness probe, bounded by the deadline


async def load(call: Callable[[int], Awaitable[Any]], total: int, concurrency: int) -> dict[str, float]:
    """Run `total` calls with `concurrency` in flight; jobs/s and latency percentiles (ms)."""
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with slots:
            start = time.perf_counter()
            await call(index)
            latencies.append((time.perf_counter() - start) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - began
    return {"rate": total / elapsed, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


class EvalqSide:
    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix

    async def __aenter__(self) -> EvalqSide:
        self.nc = await nats.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def submit(self, index: int) -> str:
        reply = await self.nc.request(f"{self.prefix}.submit", json.dumps(JOB).encode(), timeout=60)
        body = json.loads(reply.data)
        if "error" in body:
            raise RuntimeError(body)
        return str(body["job_id"])

    async def status(self, job_id: str) -> None:
        reply = await self.nc.request(f"{self.prefix}.status", json.dumps({"job_id": job_id}).encode(), timeout=60)
        assert json.loads(reply.data)["job_id"] == job_id

    async def healthy(self) -> bool:
        try:
            await self.nc.request(f"{self.prefix}.health", b"", timeout=1)
            return True
        except Exception:
            return False


class RawSide(EvalqSide):
    async def submit(self, index: int) -> str:
        reply = await self.nc.request("raw.submit", json.dumps(JOB).encode(), timeout=60)
        return str(json.loads(reply.data)["seq"])


class AnchorSide:
    def __init__(self, port: int, concurrency: int = 64) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def __aenter__(self) -> AnchorSide:
        self.http = httpx.AsyncClient(base_url=self.base, limits=self.limits, timeout=60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def submit(self, index: int) -> str:
        reply = await self.http.post("/evaluate", json=JOB)
        reply.raise_for_status()
        return str(reply.json()["job_id"])

    async def status(self, job_id: str) -> None:
        reply = await self.http.get(f"/jobs/{job_id}")
        reply.raise_for_status()

    async def healthy(self) -> bool:
        try:
            return (await self.http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


class Bench:
    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick = quick
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.sections: list[str] = []
        self.env = {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    # --- processes ----------------------------------------------------------------------

    def nats_server(self, name: str) -> str:
        from evalq.embedded import EmbeddedServer

        server = EmbeddedServer(self.workdir / name)
        server.start()
        self._servers.append(server)
        return server.url

    def gateway(self, url: str, prefix: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "EVALQ_NATS_URL": url, "EVALQ_PREFIX": prefix, "EVALQ_HOME": str(self.workdir / prefix)}
        return self.procs.start(f"gateway-{prefix}", [PY, "-m", "evalq", "gateway"], env)

    def worker(self, url: str, prefix: str, stand_in: bool, warm: bool = True) -> subprocess.Popen[bytes]:
        env = {**self.env, "EVALQ_NATS_URL": url, "EVALQ_PREFIX": prefix, "EVALQ_HOME": str(self.workdir / prefix)}
        env["EVALQ_ADVERTISE_INVENTORY"] = "false"
        env["EVALQ_WARM_EVALUATOR"] = "true" if warm else "false"
        if stand_in:
            env["EVALQ_EVALUATOR"] = STAND_IN
        return self.procs.start(f"worker-{prefix}", [PY, "-m", "evalq", "worker"], env)

    def anchor(self, hold: bool) -> tuple[subprocess.Popen[bytes], int]:
        from evalq.worker.taskpaths import build_include_dir

        port = free_port()
        include = build_include_dir(self.workdir / f"anchor-tasks-{port}", [])
        argv = [PY, str(HERE / "anchor_server.py"), "--port", str(port), "--include-path", str(include)]
        argv += ["--hold"] if hold else []
        return self.procs.start(f"anchor-{port}", argv, self.env), port

    # --- the benchmarks -------------------------------------------------------------------

    async def submission(self) -> None:
        total = 300 if self.quick else 5000
        url = self.nats_server("nats-submit")
        self.gateway(url, "sub")
        responder = self.procs.start("raw", [PY, str(HERE / "raw_responder.py"), "--url", url], self.env)
        anchor_proc, anchor_port = self.anchor(hold=True)
        rows = []
        async with EvalqSide(url, "sub") as evalq, RawSide(url, "raw") as raw, AnchorSide(anchor_port) as anchor:
            await wait_until(evalq.healthy, 60, "the gateway")
            await wait_until(anchor.healthy, 120, "lmms-eval's server")
            await wait_until(lambda: _raw_ready(raw), 30, "the raw responder")
            for concurrency in (1, 8, 64):
                runs = {
                    name: await load(side.submit, total, concurrency)
                    for name, side in (("evalq", evalq), ("raw", raw), ("anchor", anchor))
                }
                rows.append((concurrency, runs))
        self.procs.stop(anchor_proc)
        self.procs.stop(responder)
        lines = [
            f"## 1. Submission throughput and latency ({total} submissions per cell)",
            "",
            "evalq: `evalq gateway` over the embedded nats-server (file storage), no worker running.",
            "Anchor: lmms-eval's server with its job worker held (`bench/anchor_server.py --hold`), `POST /evaluate` with httpx.",
            "Raw limit: a bare nats-py responder doing one JetStream publish per request, same client as evalq.",
            "",
            "| concurrency | evalq jobs/s | p50 ms | p99 ms | anchor jobs/s | p50 ms | p99 ms | raw jobs/s | evalq/anchor | evalq/raw |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for concurrency, runs in rows:
            e, a, r = runs["evalq"], runs["anchor"], runs["raw"]
            lines.append(
                f"| {concurrency} | {e['rate']:.0f} | {e['p50']:.2f} | {e['p99']:.2f} | {a['rate']:.0f} | {a['p50']:.2f} | "
                f"{a['p99']:.2f} | {r['rate']:.0f} | {e['rate'] / a['rate']:.2f}x | {100 * e['rate'] / r['rate']:.0f}% |"
            )
        self.sections.append("\n".join(lines))

    async def depth(self) -> None:
        depths = (100, 1000) if self.quick else (100, 10_000, 100_000)
        url = self.nats_server("nats-depth")
        gateway = self.gateway(url, "depth")
        anchor_proc, anchor_port = self.anchor(hold=True)
        status_rows, memory = [], {}
        async with EvalqSide(url, "depth") as evalq, AnchorSide(anchor_port) as anchor:
            await wait_until(evalq.healthy, 60, "the gateway")
            await wait_until(anchor.healthy, 120, "lmms-eval's server")
            memory["evalq idle"] = rss_mb(gateway)
            memory["anchor idle"] = rss_mb(anchor_proc)
            queued = 0
            last: dict[str, str] = {}
            for depth in depths:
                for name, side in (("evalq", evalq), ("anchor", anchor)):
                    ids: list[str] = []

                    async def submit(index: int, side: Any = side, ids: list[str] = ids) -> None:
                        ids.append(await side.submit(index))

                    await load(submit, depth - queued, 64)
                    last[name] = ids[-1]
                queued = depth
                probes = 50 if self.quick else 200
                evalq_status = await load(lambda i: evalq.status(last["evalq"]), probes, 1)
                anchor_status = await load(lambda i: anchor.status(last["anchor"]), probes, 1)
                status_rows.append((depth, evalq_status, anchor_status))
            memory["evalq full"] = rss_mb(gateway)
            memory["anchor full"] = rss_mb(anchor_proc)
        self.procs.stop(anchor_proc)
        lines = [
            "## 2. Status query at depth (the last job's status, one query at a time)",
            "",
            "| queued | evalq p50 ms | evalq p99 ms | anchor p50 ms | anchor p99 ms |",
            "|---:|---:|---:|---:|---:|",
        ]
        for depth, e, a in status_rows:
            lines.append(f"| {depth:,} | {e['p50']:.2f} | {e['p99']:.2f} | {a['p50']:.2f} | {a['p99']:.2f} |")
        lines += [
            "",
            f"## 3. Resident memory at {depths[-1]:,} queued jobs",
            "",
            "| process | idle MB | full MB | full/idle |",
            "|---|---:|---:|---:|",
            f"| evalq gateway | {memory['evalq idle']:.0f} | {memory['evalq full']:.0f} | {memory['evalq full'] / memory['evalq idle']:.2f}x |",
            f"| lmms-eval server | {memory['anchor idle']:.0f} | {memory['anchor full']:.0f} | {memory['anchor full'] / memory['anchor idle']:.2f}x |",
        ]
        self.sections.append("\n".join(lines))

    async def per_job(self) -> None:
        jobs = 2 if self.quick else 10
        url = self.nats_server("nats-jobs")
        runners = {"subprocess": "jobs-cold", "warm": "jobs-warm"}
        for runner, prefix in runners.items():
            self.gateway(url, prefix)
            self.worker(url, prefix, stand_in=False, warm=runner == "warm")
        anchor_proc, anchor_port = self.anchor(hold=False)
        walls: dict[str, list[float]] = {"subprocess": [], "warm": [], "anchor": []}
        from evalq import AsyncClient
        from evalq.config import Settings

        async with AnchorSide(anchor_port) as anchor:
            await wait_until(anchor.healthy, 120, "lmms-eval's server")
            for runner, prefix in runners.items():
                async with (
                    EvalqSide(url, prefix) as evalq,
                    AsyncClient(Settings(nats_url=[url], prefix=prefix)) as client,
                ):
                    await wait_until(evalq.healthy, 60, "the gateway")
                    # One untimed job first on every side: it pays one-off start-up (the warm
                    # evaluator's imports, lmms-eval's server's first import of its task index).
                    for index in range(jobs + 1):
                        start = time.perf_counter()
                        await client.submit_and_wait(**TINY_JOB, timeout=300)
                        if index:
                            walls[runner].append(time.perf_counter() - start)
            for index in range(jobs + 1):
                start = time.perf_counter()
                await self._anchor_job(anchor)
                if index:
                    walls["anchor"].append(time.perf_counter() - start)
        self.procs.stop(anchor_proc)
        cold, warm, a = (statistics.median(walls[name]) for name in ("subprocess", "warm", "anchor"))
        self.sections.append(
            "\n".join(
                [
                    f"## 4. Per-job overhead (dummy model, evalq_demo, limit 4; median of {jobs} back to back)",
                    "",
                    "| runner | median s from submit to completed | ratio to anchor |",
                    "|---|---:|---:|",
                    f"| evalq, subprocess runner | {cold:.2f} | {cold / a:.2f}x |",
                    f"| evalq, warm evaluator | {warm:.2f} | {warm / a:.2f}x |",
                    f"| lmms-eval server (polled every 0.1 s) | {a:.2f} | 1.00x |",
                    "",
                    f"The warm evaluator takes {a / warm:.1f}x less time per job than lmms-eval's server "
                    f"and {cold / warm:.1f}x less than evalq's subprocess runner.",
                ]
            )
        )

    async def _anchor_job(self, anchor: AnchorSide) -> None:
        reply = await anchor.http.post("/evaluate", json=TINY_JOB)
        reply.raise_for_status()
        job_id = reply.json()["job_id"]
        while True:
            state = (await anchor.http.get(f"/jobs/{job_id}")).json()["status"]
            if state in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)  # lmms-eval's server can only be polled
        if state != "completed":
            error = (await anchor.http.get(f"/jobs/{job_id}")).json().get("error")
            raise RuntimeError(f"lmms-eval's server failed the job: {str(error)[-2000:]}")

    async def fan_out(self) -> None:
        subscribers, jobs = (10, 100) if self.quick else (50, 1000)
        url = self.nats_server("nats-fanout")
        self.gateway(url, "fan")
        for _ in range(2):
            self.worker(url, "fan", stand_in=True)
        from evalq import AsyncClient
        from evalq.config import Settings
        from evalq.schemas import Completed

        settings = Settings(nats_url=[url], prefix="fan")
        delays: list[float] = []
        done = asyncio.Event()
        finished = 0

        async def follow(client: AsyncClient) -> None:
            nonlocal finished
            async for event in client.events():
                sent = datetime.datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp()
                delays.append((time.time() - sent) * 1000)
                if isinstance(event, Completed):
                    finished += 1
                    if finished >= subscribers * jobs:
                        done.set()

        clients = [await AsyncClient(settings).connect() for _ in range(subscribers)]
        async with EvalqSide(url, "fan") as evalq:
            await wait_until(evalq.healthy, 60, "the gateway")
            tasks = [asyncio.create_task(follow(c)) for c in clients]
            await asyncio.sleep(1.0)  # let every ordered consumer be created before the load
            await load(evalq.submit, jobs, 16)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 300)
            for task in tasks:
                task.cancel()
        for client in clients:
            await client.close()
        self.sections.append(
            "\n".join(
                [
                    f"## 5. Event fan-out ({subscribers} subscribers following all events, {jobs} jobs through 2 stand-in workers)",
                    "",
                    "| events delivered | p50 ms | p99 ms |",
                    "|---:|---:|---:|",
                    f"| {len(delays):,} | {percentile(delays, 0.5):.1f} | {percentile(delays, 0.99):.1f} |",
                    "",
                    "lmms-eval's server has no events to compare with: its clients poll `GET /jobs/{id}`.",
                ]
            )
        )

    async def profile(self) -> None:
        """Where a submission's CPU goes: per process, then inside the gateway (pyinstrument)."""
        total = 500 if self.quick else 5000
        url = self.nats_server("nats-profile")
        server = psutil.Process(self._servers[-1].pid)
        me = psutil.Process()
        plain = self.gateway(url, "prof")
        responder = self.procs.start("raw-profile", [PY, str(HERE / "raw_responder.py"), "--url", url], self.env)
        rows: dict[str, tuple[dict[str, float], list[float]]] = {}
        async with EvalqSide(url, "prof") as evalq, RawSide(url, "raw") as raw:
            await wait_until(evalq.healthy, 60, "the gateway")
            await wait_until(lambda: _raw_ready(raw), 30, "the raw responder")
            for name, side, proc in (("evalq gateway", evalq, plain), ("raw responder", raw, responder)):
                watched = (psutil.Process(proc.pid), server, me)
                before = [cpu_seconds(p) for p in watched]
                result = await load(side.submit, total, 64)
                spent = [cpu_seconds(p) - b for p, b in zip(watched, before, strict=True)]
                rows[name] = (result, [1e6 * s / total for s in spent])
        self.procs.stop(plain)
        self.procs.stop(responder)

        report = self.workdir / "gateway-profile.json"
        env = {**self.env, "EVALQ_NATS_URL": url, "EVALQ_PREFIX": "prof2", "EVALQ_HOME": str(self.workdir / "prof2")}
        profiled = self.procs.start("gateway-profiled", [PY, str(HERE / "profiled_gateway.py"), str(report)], env)
        async with EvalqSide(url, "prof2") as evalq:
            await wait_until(evalq.healthy, 60, "the profiled gateway")
            await load(evalq.submit, total, 64)
        self.procs.stop(profiled)  # SIGTERM: it writes its report as it exits
        summary = json.loads(report.read_text())
        sampled = sum(summary["by_package"].values()) or 1.0
        lines = [
            f"## 6. Profile: where a submission's CPU goes ({total} submissions at concurrency 64)",
            "",
            "CPU time (user + system) each process spent per request, measured with psutil around the load.",
            "",
            "| service | jobs/s | service CPU µs | nats-server CPU µs | client CPU µs |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, (result, per) in rows.items():
            lines.append(f"| {name} | {result['rate']:.0f} | {per[0]:.0f} | {per[1]:.0f} | {per[2]:.0f} |")
        lines += [
            "",
            "The gateway's own CPU by package (pyinstrument self time, a separate run; `bench/profiled_gateway.py`):",
            "",
            "| package | share |",
            "|---|---:|",
        ]
        for package, seconds in list(summary["by_package"].items())[:10]:
            lines.append(f"| {package} | {100 * seconds / sampled:.0f}% |")
        lines += ["", "Hottest functions (self time):", "", "| function | share |", "|---|---:|"]
        for function, seconds in list(summary["top_functions"].items())[:12]:
            lines.append(f"| `{function}` | {100 * seconds / sampled:.1f}% |")
        self.sections.append("\n".join(lines))

    async def run(self, parts: list[str]) -> str:
        self._servers: list[Any] = []
        try:
            for part in parts:
                print(f"bench: {part}", flush=True)
                await getattr(self, part)()
        finally:
            self.procs.stop_all()
            for server in self._servers:
                server.stop()
        header = [
            "# evalq benchmarks",
            f"Measured {datetime.date.today().isoformat()} with `python bench/run.py{' --quick' if self.quick else ''}` on "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. Every row of a table "
            "comes from the same run on the same machine; compare ratios, not absolute times.",
        ]
        return "\n\n".join(header + self.sections) + "\n"


async def _raw_ready(raw: RawSide) -> bool:
    try:
        await raw.nc.request("raw.submit", b"{}", timeout=1)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evalq-bench-") as path:
        yield Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that the harness works")
    parser.add_argument("--only", nargs="*", default=["submission", "depth", "per_job", "fan_out", "profile"])
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    with workdir() as path:
        report = asyncio.run(Bench(args.quick, path).run(args.only))
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()

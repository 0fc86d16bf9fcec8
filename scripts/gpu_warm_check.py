"""GPU check of the warm evaluator: forked jobs use CUDA, the zygote never initialises it.

    python scripts/gpu_warm_check.py TINY_MODEL_DIR [DEVICE]

Starts a zygote, runs the tiny model on DEVICE twice in forked children, and asks the
zygote after each whether CUDA was initialised in it. Prints one line per step and exits 1
if a job fails or the zygote touched CUDA.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from evalq.schemas import EvaluateRequest
from evalq.worker.argv import lmms_eval_args, scrubbed_env
from evalq.worker.results import collect, metrics_of
from evalq.worker.taskpaths import build_include_dir
from evalq.worker.warm import WarmEvaluator


async def main(model: str, device: str) -> int:
    root = Path(tempfile.mkdtemp(prefix="evalq-warm-gpu-"))
    include = build_include_dir(root / "tasks", [])
    request = EvaluateRequest(
        model="huggingface",
        model_args={"pretrained": model, "trust_remote_code": True, "device_map": device},
        device=device,
        tasks=["evalq_demo"],
        limit=8,
    )
    ok = True
    async with WarmEvaluator(include, env=scrubbed_env(os.environ), log_path=root / "zygote.log") as warm:
        began = time.monotonic()
        await warm.ready()
        about = await warm.ping()
        print(f"zygote ready in {time.monotonic() - began:.1f} s: {about}")
        ok &= about["cuda_initialized"] is False
        for index in range(2):
            output = root / f"job{index}"
            output.mkdir()
            began = time.monotonic()
            args = lmms_eval_args(request, output_path=output, include_path=include)
            job = await warm.launch(args, cwd=output, log_path=output / "eval.log")
            code = await job.wait()
            results = collect(output).results
            metrics = metrics_of(results) if results else None
            print(f"job {index} on {device}: exit {code}, {time.monotonic() - began:.1f} s, metrics {metrics}")
            if metrics is None:
                print((output / "eval.log").read_text()[-3000:])
            ok &= metrics is not None
            about = await warm.ping()
            print(f"zygote after job {index}: {about}")
            ok &= about["cuda_initialized"] is False
    print("warm evaluator on GPU:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cuda:0")))

"""Train a tiny model with `EvalqCallback`; `evalq track` logs each evaluation to TensorBoard.

The callback submits every saved checkpoint from `on_save` and training goes on; the
tracker, a durable consumer on the events stream, writes each evaluation's metrics to
TensorBoard at the checkpoint's step. This script starts the tracker itself and stops it
once it has logged this run's evaluations; in real use it runs on its own for good.

    evalq up                                    # in another terminal
    evalq setup --model-root "$PWD/out"         # the pool may load checkpoints under out/
    python examples/train_with_evalq.py --output out --logdir runs --steps 40 --save-steps 10
    tensorboard --logdir runs                   # eval/evalq_demo/exact_match at steps 10..40

`--model dummy` (the default) stands in for a real evaluation: pass `--model huggingface`
(and a model with a tokenizer) to evaluate the checkpoints for real.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from evalq.integrations import EvalqCallback


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("out"))
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--model", default="dummy")
    parser.add_argument("--tasks", default="evalq_demo")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--run", default="tiny-gpt2")
    args = parser.parse_args(argv)

    # The tracker starts first, with a consumer of its own that begins now: it sees every
    # evaluation this run makes. `--json` lines say which jobs it has logged.
    command = ["evalq", "track", "--tensorboard", str(args.logdir), "--name", args.run, "--from-now", "--json"]
    tracker = subprocess.Popen(
        [sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert tracker.stderr is not None
        for line in tracker.stderr:  # its consumer exists once it says so
            sys.stderr.write(line)
            if line.startswith("tracking completed jobs"):
                break
        else:
            raise SystemExit(f"`{' '.join(command)}` ended early")
        threading.Thread(target=lambda: sys.stderr.writelines(tracker.stderr or []), daemon=True).start()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
        )
        ids = torch.randint(0, 64, (16, 16))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(args.output),
                max_steps=args.steps,
                save_steps=args.save_steps,
                per_device_train_batch_size=4,
                use_cpu=True,
                report_to=[],
                disable_tqdm=True,
            ),
            train_dataset=[{"input_ids": row, "labels": row} for row in ids],
        )
        callback = EvalqCallback(
            tasks=args.tasks.split(","),
            model=args.model,
            limit=args.limit,
            run=args.run,
            wait_on_train_end=True,
            wait_timeout=600,
        ).attach(trainer)
        trainer.train()

        # The completed ones: a failed evaluation has no metrics to log.
        wanted = {
            item.accepted.job_id for item in callback.submitted if item.accepted and item.step in callback.metrics
        }
        assert tracker.stdout is not None
        for line in tracker.stdout:
            outcome = json.loads(line)
            if outcome["job_id"] in wanted:
                wanted.discard(outcome["job_id"])
                print(f"step {outcome['step']}: logged to TensorBoard under {args.logdir / args.run}")
            if not wanted:
                break
    finally:
        if tracker.poll() is None:
            os.kill(tracker.pid, signal.SIGTERM)
        tracker.wait(30)
    for step, metrics in sorted(callback.metrics.items()):
        print(f"step {step}: {metrics}")
    for step, error in sorted(callback.failures.items()):
        print(f"step {step}: {error}")
    return callback.metrics


if __name__ == "__main__":
    main()

"""`EvalqCallback`: a tiny randomly initialised model trained a few steps on CPU submits each
checkpoint to a real queue without blocking, and its metrics reach the trainer's loggers."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from evalq import AsyncClient
from evalq.config import Settings
from evalq.policy import PoolPolicy, store_policy
from evalq.topology import Topology

from .conftest import REPO, run_command, settings_env
from .jobs import FAKE

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")


def tiny_trainer(output: Path, steps: int, save_steps: int, **extra: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        save_steps=save_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        use_cpu=True,
        report_to=["tensorboard"],
        disable_tqdm=True,
        **extra,
    )
    return Trainer(model=model, args=args, train_dataset=data)


class Timed:
    """Measures how long each on_save took: what the training loop waited."""

    def __init__(self) -> None:
        self.saves: list[float] = []

    def wrap(self, callback: Any) -> Any:
        inner = callback.on_save

        def on_save(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                self.saves.append(time.monotonic() - started)

        callback.on_save = on_save
        return callback


async def test_callback_evaluates_each_checkpoint_and_logs_at_its_step(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from evalq.integrations import EvalqCallback

    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory(evaluator=FAKE)
    trainer = tiny_trainer(tmp_path / "out", steps=6, save_steps=2)
    timed = Timed()
    callback = EvalqCallback(
        tasks=["evalq_demo"],
        model="dummy",
        every_n_steps=4,
        limit=2,
        model_args={"score": 0.5},
        run="tiny",
        wait_on_train_end=True,
        wait_timeout=60,
        settings=settings,
    )
    timed.wrap(callback).attach(trainer)

    await asyncio.to_thread(trainer.train)

    assert [item.step for item in callback.submitted] == [4]  # steps 2 and 6 are not multiples of 4
    (item,) = callback.submitted
    assert item.accepted is not None
    info = await client.get_job(item.accepted.job_id)
    assert info.status == "completed"
    assert info.labels == {"step": "4", "run": "tiny", "saved_at": info.labels.get("saved_at")}
    assert info.labels["saved_at"] <= info.created_at  # saved, then submitted: both RFC 3339 UTC, in ms
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert info.request is not None and info.request.model_args == {"score": 0.5, "pretrained": str(checkpoint)}
    assert (checkpoint / "model.safetensors").is_file()
    assert callback.metrics == {4: {"evalq_demo": {"exact_match": 0.5}}}
    assert len(timed.saves) == 3 and max(timed.saves) < 0.5

    # The trainer's TensorBoard logger has the metric at the checkpoint's step.
    points = []
    for folder in {p.parent for p in (tmp_path / "out" / "runs").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if "eval/evalq_demo/exact_match" in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars("eval/evalq_demo/exact_match")]
    assert points == [(4, pytest.approx(0.5))]


async def test_callback_never_blocks_training_when_the_queue_is_away(settings: Settings, tmp_path: Path) -> None:
    from evalq.integrations import EvalqCallback

    away = settings.with_(nats_url=["nats://127.0.0.1:9"], connect_timeout=0.5)
    trainer = tiny_trainer(tmp_path / "out", steps=4, save_steps=2)
    timed = Timed()
    callback = EvalqCallback(tasks=["evalq_demo"], model="dummy", settings=away, submit_retry_s=1.0)
    trainer.add_callback(timed.wrap(callback))

    await asyncio.to_thread(trainer.train)

    assert len(timed.saves) == 2 and max(timed.saves) < 0.5
    assert [item.step for item in callback.submitted] == [2, 4]
    assert all(item.accepted is None and item.error for item in callback.submitted)


async def test_a_comma_in_the_output_folder_is_refused_not_read_as_model_arguments(
    settings: Settings, gateway: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    from types import SimpleNamespace

    from evalq.integrations import EvalqCallback

    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    callback = EvalqCallback(tasks=["evalq_demo"], model="dummy", settings=settings, submit_retry_s=5.0)
    args = SimpleNamespace(output_dir=str(tmp_path / "out,trust_remote_code=True"), run_name="r1")
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)
    # The Trainer's own calls, without training: the gateway answers on this test's loop.
    await asyncio.to_thread(callback.on_save, args, state, None)
    await asyncio.to_thread(callback.on_train_end, args, state, None)

    (item,) = callback.submitted
    assert item.accepted is None and item.error is not None and item.error.startswith("422:"), item.error
    # The jobs bucket itself, not the history's index, which follows it.
    bucket = await nc.jetstream().key_value(topology.jobs_bucket)
    with pytest.raises(NoKeysError):
        await bucket.keys()


async def test_training_example_logs_each_checkpoint_to_tensorboard(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory(evaluator=FAKE)
    argv = [sys.executable, str(REPO / "examples" / "train_with_evalq.py"), "--output", str(tmp_path / "out")]
    argv += ["--logdir", str(tmp_path / "runs"), "--steps", "6", "--save-steps", "3", "--limit", "2"]
    code, out, err = await run_command(argv, settings_env(settings), timeout=180)
    assert code == 0, err
    assert "step 3: logged to TensorBoard" in out and "step 6: logged to TensorBoard" in out

    acc = EventAccumulator(str(tmp_path / "runs" / "tiny-gpt2"))
    acc.Reload()
    # One event file per job, read in file-name (job id) order: TensorBoard plots by step.
    points = sorted(acc.Scalars("eval/evalq_demo/exact_match"), key=lambda e: e.step)
    assert [e.step for e in points] == [3, 6] and [e.value for e in points] == pytest.approx([0.6, 0.6])

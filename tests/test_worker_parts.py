"""Pure parts of the worker: argv, environment, progress parsing, results, task folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evalq.schemas import EvaluateRequest, decode, encode
from evalq.worker.argv import evaluator_command, lmms_eval_args, scrubbed_env
from evalq.worker.progress import OWN_MARK, ProgressParser, own_end, own_line
from evalq.worker.results import collect, metrics_of, tail
from evalq.worker.taskpaths import build_include_dir

from .jobs import JOB


def request(**fields: object) -> EvaluateRequest:
    return decode(encode({**JOB, **fields}), EvaluateRequest)


def fresh_argv(
    req: EvaluateRequest, output_path: str, include_path: str | None = None, evaluator: list[str] | None = None
) -> list[str]:
    """The command line of a fresh evaluation process, put together as the worker does."""
    command = evaluator_command(req, evaluator or (), python="py")
    return command + lmms_eval_args(req, output_path=output_path, include_path=include_path)


def test_argv_maps_every_field() -> None:
    argv = fresh_argv(
        request(
            model_args={"pretrained": "/m", "trust_remote_code": True},
            num_fewshot=2,
            batch_size="auto:4",
            device="cuda:0",
            limit=8,
            gen_kwargs={"temperature": 0, "max_new_tokens": 16},
            predict_only=True,
        ),
        output_path="/out",
        include_path="/inc",
    )
    assert argv == [
        "py",
        "-m",
        "lmms_eval",
        "--model=dummy",
        "--tasks=evalq_demo",
        "--model_args=pretrained=/m,trust_remote_code=True",
        "--num_fewshot=2",
        "--batch_size=auto:4",
        "--device=cuda:0",
        "--limit=8",
        "--gen_kwargs=temperature=0,max_new_tokens=16",
        "--log_samples",
        "--predict_only",
        "--output_path=/out",
        "--include_path=/inc",
    ]


def test_argv_without_samples_and_full_fraction() -> None:
    argv = lmms_eval_args(request(log_samples=False, limit=1.0), output_path="/o")
    assert "--log_samples" not in argv
    assert not any(a.startswith("--limit") for a in argv)
    assert "--limit=0.5" in lmms_eval_args(request(limit=0.5), output_path="/o")


def test_multi_gpu_goes_through_accelerate() -> None:
    argv = fresh_argv(request(num_gpus=4), output_path="/o")
    assert argv[:7] == ["py", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=4", "-m", "lmms_eval"]
    assert argv[7:] == lmms_eval_args(request(num_gpus=4), output_path="/o")


def test_a_configured_evaluator_replaces_the_launcher() -> None:
    # Even for several GPUs: whoever configures the evaluator owns how it launches.
    argv = fresh_argv(request(num_gpus=4), output_path="/o", evaluator=["/bin/stand-in", "--quiet"])
    assert argv[:3] == ["/bin/stand-in", "--quiet", "--model=dummy"]


@pytest.mark.parametrize(
    "fields",
    [
        {"model_args": "pretrained=--output_path /etc"},
        {"model_args": {"pretrained": "$(rm -rf /); `id` | tee"}},
        {"gen_kwargs": "until=--include_path"},
        {"model": "--help"},
        {"tasks": ["-x", "--limit"]},
        {"device": "cuda"},
    ],
)
def test_hostile_values_stay_single_values(fields: dict[str, object]) -> None:
    # The warm evaluator receives these flags alone, so they are checked without a launcher.
    args = lmms_eval_args(request(**fields), output_path="/out")
    flags = [a.split("=", 1)[0] for a in args]
    # Every element is one `--flag=value`; no value became a flag or a second argument.
    assert all((a.startswith("--") and "=" in a) or a in ("--log_samples", "--predict_only") for a in args)
    assert flags.count("--output_path") == 1
    assert args[-1] == "--output_path=/out"


def test_environment_is_scrubbed() -> None:
    env = scrubbed_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "SLURM_JOB_ID": "9",
            "MASTER_PORT": "1",
            "HOME": "/h",
            "CUDA_VISIBLE_DEVICES": "1",
        }
    )
    assert env["HOME"] == "/h" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert not {"RANK", "WORLD_SIZE", "SLURM_JOB_ID", "MASTER_PORT"} & set(env)


def test_progress_from_tqdm_output() -> None:
    parser = ProgressParser()
    chunk = b"\x1b[32mModel Responding:  45%|\xe2\x96\x88\xe2\x96\x88   | 9/20 [00:01<00:02]\rModel Responding:  5"
    seen = list(parser.feed(chunk))
    assert [(p.phase, p.done, p.total, p.percent) for p in seen] == [("Model Responding", 9, 20, 45.0)]
    seen = list(parser.feed(b"0%|#####     | 10/20 [00:02<00:02]\n  0%|          | 0/4 [00:00<?, ?it/s]\n"))
    assert [(p.phase, p.done) for p in seen] == [("Model Responding", 10), ("running", 0)]
    assert list(parser.feed(b"2026-11-27 INFO | no bar here\n")) == []


def test_evalqs_own_progress_line_hides_the_chunks_bars_until_its_end() -> None:
    parser = ProgressParser()

    def seen(text: str) -> list[tuple[str, int, int]]:
        return [(p.phase, p.done, p.total) for p in parser.feed(text)]

    assert seen("Building contexts: 100%|####| 40/40 [00:00<00:00]\n") == [("Building contexts", 40, 40)]
    assert own_line("Model Responding", 320, 800).startswith(f"{OWN_MARK} Model Responding:  40%|")
    assert seen(own_line("Model Responding", 320, 800) + "\n") == [("Model Responding", 320, 800)]
    # The model's own bar for one chunk: ignored, however far it says it got.
    chunk_bar = "\rModel Responding:  50%|#####     | 16/32 [00:01<00:01]\rModel Responding: 100%|####| 32/32\n"
    assert seen(chunk_bar) == []
    # A line drawn right after a bar that did not end its line still counts, in colour too.
    assert seen(f"Model Responding: 100%|####| 32/32\x1b[0m{own_line('Model Responding', 352, 800)}\n") == [
        ("Model Responding", 352, 800)
    ]
    assert seen(f"{own_line('Model Responding', 800, 800)}\n{own_end()}\n") == [("Model Responding", 800, 800)]
    assert seen("Postprocessing:  25%|##        | 10/40 [00:00<00:01]\n") == [("Postprocessing", 10, 40)]


def test_results_are_read_from_the_newest_file(tmp_path: Path) -> None:
    out = tmp_path / "out" / "model__x"
    out.mkdir(parents=True)
    data = {"results": {"evalq_demo": {"alias": "evalq_demo", "exact_match,none": 0.6, "acc,strict": 1}}}
    (out / "20260101_000000_results.json").write_text(json.dumps(data))
    (out / "20260101_000000_samples_evalq_demo.jsonl").write_text("{}\n")
    files = collect(tmp_path / "out")
    assert files.results is not None and files.results.name.endswith("_results.json")
    assert [p.name for p in files.samples] == ["20260101_000000_samples_evalq_demo.jsonl"]
    assert metrics_of(files.results) == {"evalq_demo": {"exact_match": 0.6, "acc,strict": 1}}
    assert collect(tmp_path / "missing").results is None


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x_results.json").write_text('{"results": {}}')
    (outside / "secret_samples_x.jsonl").write_text("secret")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "linked-dir")
    os.symlink(outside / "x_results.json", out / "y_results.json")
    files = collect(out)
    assert files.results is None and files.samples == []


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "eval.log"
    log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(100)) + b"bar 1/2\rbar 2/2\n")
    assert tail(log, 3).splitlines() == ["line 99", "bar 1/2", "bar 2/2"]


def test_include_dir_has_the_demo_and_configured_tasks(tmp_path: Path) -> None:
    mine = tmp_path / "my_tasks" / "nested"
    mine.mkdir(parents=True)
    (mine / "mytask.yaml").write_text("task: mytask\n")
    include = build_include_dir(tmp_path / "inc", [str(tmp_path / "my_tasks")])
    demo_yaml = (include / "evalq_demo" / "evalq_demo.yaml").read_text()
    assert str(include / "evalq_demo" / "evalq_demo.jsonl") in demo_yaml
    lines = (include / "evalq_demo" / "evalq_demo.jsonl").read_text().splitlines()
    answers = [json.loads(line)["answer"] for line in lines]
    assert len(answers) == 20 and answers.count("A") == 12
    linked = include / "00_my_tasks" / "nested" / "mytask.yaml"
    assert linked.is_symlink() and linked.read_text() == "task: mytask\n"
    assert not (include / "00_my_tasks" / "nested").is_symlink()
    with pytest.raises(FileNotFoundError):
        build_include_dir(tmp_path / "inc2", [str(tmp_path / "nope")])

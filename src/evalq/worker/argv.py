"""The lmms-eval command line for one job, built from the validated request.

Every value is passed as one `--flag=value` argv element, never through a shell, so no
field can add a flag or a command: a value that starts with `-` stays a value.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.parse
from collections.abc import Mapping, Sequence

from ..schemas import EvaluateRequest, format_args

__all__ = ["evaluator_command", "lmms_eval_args", "scrubbed_env"]

# Variables that would make lmms-eval (torch.distributed, accelerate) think it is one rank
# of someone else's job; a worker may itself run under SLURM or torchrun.
_SCRUB_EXACT = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
}
_SCRUB_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "ACCELERATE_")
# evalq's settings (the connection's among them: user, password, token, creds and NKey
# files, TLS key, a URL with userinfo, and EVALQ_CONFIG, whose file may hold any of them)
# and the NATS clients' own. An evaluation runs code evalq does not vet (a task's Python, a
# model's remote code); with these it could connect as its worker and rewrite any job's
# record. It needs none of them: it reaches its worker only through the pipe and socket
# it is handed.
_CREDENTIAL_PREFIXES = ("EVALQ_", "NATS_")
_SECRET_SUFFIXES = ("PASSWORD", "TOKEN", "SECRET", "SEED")
# A secret is looked for in other variables' values only from this length: a short one
# (`1`) would take every variable that happens to contain it (`HF_HUB_OFFLINE=1`).
_MIN_SECRET = 8


def evaluator_command(
    request: EvaluateRequest,
    evaluator: Sequence[str] = (),
    *,
    python: str = sys.executable,
    module: str = "lmms_eval",
    several: bool | None = None,
) -> list[str]:
    """What runs the evaluation: the configured evaluator, accelerate for several GPUs, or
    Python; `module` is lmms-eval, or the step of a sharded job that wraps it."""
    if evaluator:
        return list(evaluator)
    if request.num_gpus > 1 if several is None else several:
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={request.num_gpus}",
            "-m",
            module,
        ]
    return [python, "-m", module]


def lmms_eval_args(
    request: EvaluateRequest,
    *,
    output_path: str | os.PathLike[str],
    include_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """lmms-eval's own flags for the job, one `--flag=value` element each."""
    argv = [f"--model={request.model}", f"--tasks={','.join(request.tasks)}"]
    model_args = format_args(request.model_args)
    if model_args:
        argv.append(f"--model_args={model_args}")
    if request.num_fewshot is not None:
        argv.append(f"--num_fewshot={request.num_fewshot}")
    if request.batch_size is not None:
        argv.append(f"--batch_size={request.batch_size}")
    if request.device is not None:
        argv.append(f"--device={request.device}")
    limit = request.limit
    # A fraction of 1.0 means everything; lmms-eval would read `1.0` as one document.
    if limit is not None and not (isinstance(limit, float) and limit >= 1.0):
        argv.append(f"--limit={limit}")
    gen_kwargs = format_args(request.gen_kwargs)
    if gen_kwargs:
        argv.append(f"--gen_kwargs={gen_kwargs}")
    if request.seed is not None:
        argv.append(f"--seed={request.seed}")
    if request.log_samples or request.predict_only:
        argv.append("--log_samples")
    if request.predict_only:
        argv.append("--predict_only")
    argv.append(f"--output_path={os.fspath(output_path)}")
    if include_path is not None:
        argv.append(f"--include_path={os.fspath(include_path)}")
    return argv


def _secrets(credentials: Mapping[str, str]) -> set[str]:
    """The secret values among `credentials`: passwords and tokens, and those in URLs' userinfo."""
    found: set[str] = set()
    for key, value in credentials.items():
        if key.endswith(_SECRET_SUFFIXES):
            found.add(value)
        for url in value.split(","):
            with contextlib.suppress(ValueError):
                parts = urllib.parse.urlsplit(url.strip())
                if not parts.netloc or "@" not in parts.netloc:
                    continue
                userinfo = parts.netloc.rsplit("@", 1)[0]
                # `user:password@`, or a token alone (`token@`).
                secret = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
                found.update({secret, urllib.parse.unquote(secret)})
    return {secret for secret in found if len(secret) >= _MIN_SECRET}


def scrubbed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process below a worker: without the variables that would make
    it a rank of another job, without any evalq or NATS variable, and without any variable
    that holds one of their secrets under another name. Applying it twice changes nothing."""
    credentials = {key: value for key, value in environ.items() if key.startswith(_CREDENTIAL_PREFIXES)}
    secrets = _secrets(credentials)
    env = {
        key: value
        for key, value in environ.items()
        if key not in credentials
        and key not in _SCRUB_EXACT
        and not key.startswith(_SCRUB_PREFIXES)
        and not any(secret in value for secret in secrets)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env

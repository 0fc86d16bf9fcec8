"""The one `--include_path` folder a worker gives lmms-eval.

lmms-eval takes a single include path and does not descend into symlinked folders. So
the worker builds a folder of real directories whose files link to the configured task
folders, plus the packaged tasks (`evalq_demo`, and `evalq_shard_demo` for sharding),
each written with the absolute path of its data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["DEMO_TASK", "PACKAGED_TASKS", "SHARD_DEMO_TASK", "build_include_dir"]

DEMO_TASK = "evalq_demo"
SHARD_DEMO_TASK = "evalq_shard_demo"
PACKAGED_TASKS = (DEMO_TASK, SHARD_DEMO_TASK)


def build_include_dir(target: Path, task_paths: Sequence[str]) -> Path:
    if target.exists():
        shutil.rmtree(target)
    for name in PACKAGED_TASKS:
        folder = target / name
        folder.mkdir(parents=True)
        source = Path(str(resources.files("evalq") / "tasks" / name))
        data_file = folder / f"{name}.jsonl"
        shutil.copyfile(source / f"{name}.jsonl", data_file)
        shutil.copyfile(source / "utils.py", folder / "utils.py")
        template = (source / f"{name}.yaml.in").read_text()
        (folder / f"{name}.yaml").write_text(template.replace("@DATA_FILE@", str(data_file)))

    for index, raw in enumerate(task_paths):
        folder = Path(raw).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"task folder not found: {raw}")
        mirror = target / f"{index:02d}_{folder.name}"
        for directory, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
            here = mirror / Path(directory).relative_to(folder)
            here.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.symlink(Path(directory, name), here / name)
    return target

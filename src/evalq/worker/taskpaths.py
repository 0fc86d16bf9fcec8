"""The one `--include_path` folder a worker gives lmms-eval.

lmms-eval takes a single include path and does not descend into symlinked folders. So
the worker builds a folder of real directories whose files link to the configured task
folders, plus the packaged `evalq_demo` task, written with the absolute path of its data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["DEMO_TASK", "build_include_dir"]

DEMO_TASK = "evalq_demo"


def _demo_source() -> Path:
    return Path(str(resources.files("evalq") / "tasks" / DEMO_TASK))


def build_include_dir(target: Path, task_paths: Sequence[str]) -> Path:
    if target.exists():
        shutil.rmtree(target)
    demo = target / DEMO_TASK
    demo.mkdir(parents=True)
    source = _demo_source()
    data_file = demo / f"{DEMO_TASK}.jsonl"
    shutil.copyfile(source / f"{DEMO_TASK}.jsonl", data_file)
    shutil.copyfile(source / "utils.py", demo / "utils.py")
    template = (source / f"{DEMO_TASK}.yaml.in").read_text()
    (demo / f"{DEMO_TASK}.yaml").write_text(template.replace("@DATA_FILE@", str(data_file)))

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

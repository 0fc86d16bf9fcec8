"""Weights swapped into a resident model: another checkpoint of the same model read into the
loaded module's own tensors, in place of building the model again.

In a training run each job names a new checkpoint folder of one model. Building the model
costs a whole load (seconds for a small model on a CPU, minutes for a large one on a GPU),
while its new weights are one read of its safetensors files. A resident process that holds
a model loaded from one folder takes another folder's weights in place when nothing but the
weights differs, and checks that before it copies anything (`SwapState.swap`):

- the new folder's `config.json` equals the loaded one's apart from path-only keys, and
  every other file a load may read (generation config, tokenizer, processor, chat
  template, code) has the same content;
- its weights are safetensors (`model.safetensors`, or the shards that
  `model.safetensors.index.json` lists) with the loaded checkpoint's tensor names, shapes
  and dtypes;
- each tensor is a parameter or persistent buffer of the module (by exact name, or with the
  model's base prefix added or removed for all of them alike), and every parameter and
  persistent buffer is one of them or shares its storage with one (a tied weight);
- the module holds nothing a plain copy cannot give: no quantization, no adapters, no
  tensor left on the meta device; and after its full load it was found, tensor by tensor
  and bit for bit, equal to its own checkpoint cast to each tensor's dtype
  (`SwapState.verify`, run between jobs through the weight files held open since the load,
  so that a folder deleted meanwhile still counts; a file written again in place meanwhile
  refuses). A loader that changes weights as it loads them (merges an adapter, converts or
  scales them) fails that check, and its model never takes a swap.

The new checkpoint may be in the loaded one's own folder, written again since the load (a
trainer that saves to `latest/`): the comparisons are with the loaded checkpoint as it was
recorded when it was loaded (`Checkpoint`), not with the folder as it is now.

A swap copies each tensor with `copy_` under `no_grad`, on the tensor's own device, with the
one cast a load makes; then the strings that recorded the old path (the config's
`_name_or_path`, the tokenizer's and processor's `name_or_path`, the wrapper's own) name
the new one, as a fresh load would. A refusal says why, and the caller loads afresh.

torch and safetensors are imported only inside a resident process's calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WEIGHTS_KEYS", "Checkpoint", "SwapFailed", "SwapState", "Tensor", "apart_from_weights", "read_checkpoint"]

# The `model_args` keys by which lmms-eval 0.7.3's models that build a torch module name the
# folder of its weights. `model` is left out: the models that take it are API clients and
# inference engines, whose weights are not a module in this process.
WEIGHTS_KEYS = ("pretrained", "model_path")

# Keys of a saved config that record where it was read from, not what it says.
_PATH_ONLY = frozenset({"_name_or_path", "name_or_path", "_commit_hash"})
# Files of a checkpoint folder that no load reads as a model file: weights (compared by
# their headers instead) and a trainer's own records, which differ at every step.
_NOT_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NOT_MODEL_FILES = frozenset(
    {"trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "latest", "README.md"}
)
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_MAX_HEADER = 100 << 20
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class _Refused(Exception):
    """Why these weights cannot be swapped in; the text is the caller's note."""


def apart_from_weights(arg_string: str) -> tuple[str, str, tuple[str, ...]] | None:
    """`model_args` as (weights key, its value, every other `k=v` in order): two argument
    strings that differ only in the value are one model's checkpoints. None where it names
    no weights folder, or is not plain `k=v,k=v` (values hold no `,` or `=`)."""
    pieces = [piece for piece in arg_string.split(",") if piece] if arg_string else []
    found: tuple[str, str] | None = None
    rest: list[str] = []
    for piece in pieces:
        key, eq, value = piece.partition("=")
        if not eq:
            return None
        if key in WEIGHTS_KEYS:
            if found is not None:
                return None
            found = (key, value)
        else:
            rest.append(piece)
    if found is None or not found[1]:
        return None
    return found[0], found[1], tuple(rest)


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors checkpoint, as its header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds, as far as a swap compares it; kept for the loaded one,
    which a training run may delete while its model is still in use."""

    location: str
    folder: Path
    # config.json without its path-only keys.
    config: dict[str, Any]
    # Every other file a load may read: its name and a digest of its content.
    files: dict[str, str]
    # From the safetensors headers; None where the weights are not safetensors.
    tensors: dict[str, Tensor] | None


def _digest(path: Path) -> str:
    """The content's digest; a JSON config's without its path-only keys."""
    if path.name.endswith("config.json"):
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                kept = {k: v for k, v in data.items() if k not in _PATH_ONLY}
                return "json:" + hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors one safetensors file holds, each checked to lie whole inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise _Refused(f"{path.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise _Refused(f"{path.name} is not a safetensors file")
        header = json.loads(handle.read(length))
    data = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        kind = _DTYPES.get(entry.get("dtype"))
        if kind is None:
            raise _Refused(f"tensor {name} has the dtype {entry.get('dtype')}, which a swap does not copy")
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        count = 1
        for n in shape:
            count *= n
        if not 0 <= begin <= end <= data or end - begin != count * kind[1]:
            raise _Refused(f"{path.name} is truncated or damaged at tensor {name}")
        tensors[name] = (kind[0], shape)
    return tensors


def _tensors(folder: Path) -> dict[str, Tensor] | None:
    """The checkpoint's tensors, read from its headers in the file a load would choose."""
    if (folder / _SINGLE).is_file():
        return {name: Tensor(_SINGLE, *info) for name, info in _header(folder / _SINGLE).items()}
    if not (folder / _INDEX).is_file():
        return None
    weight_map = json.loads((folder / _INDEX).read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise _Refused(f"{_INDEX} has no weight_map")
    tensors: dict[str, Tensor] = {}
    for file in sorted(set(weight_map.values())):
        if "/" in file or file.startswith("."):
            raise _Refused(f"{_INDEX} names a shard outside the folder: {file}")
        for name, info in _header(folder / file).items():
            if weight_map.get(name) != file or name in tensors:
                raise _Refused(f"{_INDEX} does not list tensor {name} in {file}, which holds it")
            tensors[name] = Tensor(file, *info)
    if unlisted := sorted(set(weight_map) - set(tensors)):
        raise _Refused(f"{_INDEX} lists tensor {unlisted[0]}, which no shard holds")
    return tensors


def read_checkpoint(location: str) -> Checkpoint | str:
    """The checkpoint a weights location names (relative to the current folder, as the
    model's loader reads it); a string says why it offers nothing to compare."""
    folder = Path(location)
    if not folder.is_dir():
        return f"{location} is not a local folder"
    try:
        for name in _ADAPTER_FILES:
            if (folder / name).exists():
                raise _Refused(f"{location} holds an adapter ({name})")
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise _Refused(f"{location}/config.json is not an object")
        files = {
            entry.name: _digest(folder / entry.name)
            for entry in os.scandir(folder)
            if entry.is_file()
            and entry.name != "config.json"
            and entry.name not in _NOT_MODEL_FILES
            and not entry.name.endswith(_NOT_MODEL_SUFFIXES)
        }
        return Checkpoint(
            location=location,
            folder=folder.resolve(),
            config={k: v for k, v in config.items() if k not in _PATH_ONLY},
            files=files,
            tensors=_tensors(folder),
        )
    except _Refused as refused:
        return str(refused)
    except Exception as exc:  # whatever a folder holds, a job that reads it goes on
        return f"cannot read the checkpoint {location}: {exc!r}"


def _differences(loaded: Checkpoint, new: Checkpoint) -> None:
    """Refuse a checkpoint that differs from the loaded one in anything but its weights."""
    changed = sorted(k for k in loaded.config.keys() | new.config.keys() if loaded.config.get(k) != new.config.get(k))
    if changed:
        raise _Refused(f"config.json differs in {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}")
    for name in sorted(loaded.files.keys() | new.files.keys()):
        if name not in new.files:
            raise _Refused(f"{name} of the loaded checkpoint is not in {new.location}")
        if name not in loaded.files:
            raise _Refused(f"{name} is new in {new.location}")
        if loaded.files[name] != new.files[name]:
            raise _Refused(f"{name} differs")
    if new.tensors is None:
        raise _Refused(f"the weights of {new.location} are not safetensors")
    if loaded.tensors is None:
        raise _Refused("the loaded checkpoint's weights were not safetensors")
    for name in sorted(loaded.tensors.keys() | new.tensors.keys()):
        if name not in new.tensors:
            raise _Refused(f"missing tensor {name}")
        if name not in loaded.tensors:
            raise _Refused(f"extra tensor {name}, not in the loaded checkpoint")
        before, after = loaded.tensors[name], new.tensors[name]
        if after.dtype != before.dtype:
            raise _Refused(f"dtype of {name} is {after.dtype}, loaded {before.dtype}")
        if after.shape != before.shape:
            raise _Refused(f"shape of {name} is {list(after.shape)}, loaded {list(before.shape)}")


def _torch() -> Any:
    return importlib.import_module("torch")


def _module(lm: Any) -> Any:
    """The torch module an lmms-eval model keeps (unwrapped from accelerate where it is)."""
    torch = _torch()
    for attr in ("model", "_model"):
        with contextlib.suppress(Exception):
            value = getattr(lm, attr, None)
            if isinstance(value, torch.nn.Module):
                return value
    raise _Refused("the model keeps no torch module to take weights")


# (checkpoint name, its header's description, the tensor it is copied into), by file.
Copies = dict[str, list[tuple[str, Tensor, Any]]]


def _plan(module: Any, checkpoint: Checkpoint) -> Copies:
    """Which tensor of the module each checkpoint tensor goes into; refuses any mismatch."""
    if getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None:
        raise _Refused("the model is quantized")
    if getattr(module, "peft_config", None) or getattr(module, "_hf_peft_config_loaded", False):
        raise _Refused("the model has adapters")
    assert checkpoint.tensors is not None
    state = module.state_dict(keep_vars=True)
    if meta := sorted(name for name, tensor in state.items() if tensor.is_meta):
        raise _Refused(f"{meta[0]} is offloaded (on the meta device)")
    names = sorted(checkpoint.tensors)
    prefix = getattr(module, "base_model_prefix", "") or ""
    # One mapping for all names, as a load applies one: the names as they are, or with the
    # base model's prefix added or removed.
    mappings: list[Callable[[str], str]] = [str]
    if prefix:
        head = f"{prefix}."
        # A name without the prefix maps to none of the module's when it is removed.
        mappings += [(head + "{}").format, lambda n: n[len(head) :] if n.startswith(head) else f"\0{n}"]
    mapping = next((m for m in mappings if all(m(n) in state for n in names)), None)
    if mapping is None:
        extra = next(n for n in names if n not in state)
        raise _Refused(f"extra tensor {extra}, not in the model")
    covered: dict[tuple[Any, ...], str] = {}
    copies: Copies = {}
    for name in names:
        target, info = state[mapping(name)], checkpoint.tensors[name]
        if tuple(target.shape) != info.shape:
            raise _Refused(f"shape of {name} is {list(info.shape)}, the model's {list(target.shape)}")
        if target.dtype.is_floating_point != _is_float(info.dtype):
            raise _Refused(f"dtype of {name} is {info.dtype}, the model's {str(target.dtype).removeprefix('torch.')}")
        if (storage := _storage(target)) in covered:
            raise _Refused(f"{covered[storage]} and {name} are one tensor in the model, two in the checkpoint")
        covered[storage] = name
        copies.setdefault(info.file, []).append((name, info, target))
    mapped = {mapping(n) for n in names}
    for name, tensor in state.items():
        if name not in mapped and _storage(tensor) not in covered:
            raise _Refused(f"missing tensor {name}")
    return copies


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _storage(tensor: Any) -> tuple[Any, ...]:
    """What two names of one tied tensor share."""
    if tensor.numel() == 0:
        return (id(tensor),)
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _same_bits(a: Any, b: Any) -> bool:
    torch = _torch()

    if a.dtype.is_floating_point:
        kind = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        return bool(torch.equal(a.view(kind), b.view(kind)))
    return bool(torch.equal(a, b))


def _read(folder: Path, copies: Copies, held: dict[str, int] | None = None) -> Iterator[tuple[str, Any, Any]]:
    """(name, the module's tensor, the checkpoint's) for every copy, one tensor at a time;
    a file in `held` is read through that open descriptor."""
    from safetensors import safe_open

    for file, entries in copies.items():
        path = f"/proc/self/fd/{held[file]}" if held and file in held else os.fspath(folder / file)
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name, info, target in entries:
                stored = handle.get_tensor(name)
                if tuple(stored.shape) != info.shape or str(stored.dtype) != f"torch.{info.dtype}":
                    # The file changed since its header was read: a copy_ would cast or
                    # broadcast where a load would not.
                    raise OSError(f"{file} changed while it was read (tensor {name})")
                yield name, target, stored


def _rename(lm: Any, module: Any, old: str, new: str) -> None:
    """Where the model recorded the path it was loaded from, the new one, as a fresh load
    of it would: the wrapper, the module, its configs, the tokenizer and the processor."""
    seen: set[int] = set()
    todo = [lm, module]
    while todo:
        item = todo.pop()
        if id(item) in seen or not hasattr(item, "__dict__"):
            continue
        seen.add(id(item))
        for attr, value in list(vars(item).items()):
            if isinstance(value, str) and value == old:
                setattr(item, attr, new)
            elif isinstance(value, dict) and value.get("name_or_path") == old and attr == "init_kwargs":
                value["name_or_path"] = new
            elif type(value).__module__.startswith("transformers") and not _is_module(value):
                todo.append(value)  # configs, generation config, tokenizer, processor and their parts
        if item is module:
            todo += [getattr(module, "config", None), getattr(module, "generation_config", None)]


def _stamp(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_size, stat.st_mtime_ns


def _is_module(value: Any) -> bool:
    return isinstance(value, _torch().nn.Module)


class SwapState:
    """What a loaded model offers the next checkpoint of its model: the checkpoint it holds,
    once its module is found equal to it; else why it offers nothing (`refusal`)."""

    def __init__(self, lm: Any, location: str) -> None:
        self.lm = lm
        self.location = location
        self.checkpoint: Checkpoint | None = None
        self.refusal: str | None = None
        self.verified = False
        # A fresh load's mode, which a swap leaves the module in.
        self.training = False
        read = read_checkpoint(location)
        if isinstance(read, str):
            self.refusal = f"the loaded checkpoint: {read}"
        elif read.tensors is None:
            self.refusal = "the loaded checkpoint's weights were not safetensors"
        else:
            self.checkpoint = read
        # The weight files stay open until the module is compared with them: a training run
        # may delete the folder (keeping its last few checkpoints) while the job runs.
        # A file written again in place (not replaced) changes under its descriptor too: its
        # size and modification time as opened tell.
        self._held: dict[str, int] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        if self.checkpoint is not None and self.checkpoint.tensors is not None:
            try:
                for file in sorted({t.file for t in self.checkpoint.tensors.values()}):
                    self._held[file] = os.open(self.checkpoint.folder / file, os.O_RDONLY)
                    self._stamps[file] = _stamp(self._held[file])
            except OSError as exc:
                self.release()
                self.refusal = f"the loaded checkpoint: cannot open its weights: {exc}"
        with contextlib.suppress(Exception):
            self.training = bool(_module(lm).training)

    def release(self) -> None:
        """Close the weight files it holds open."""
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held = {}

    @property
    def pending(self) -> bool:
        """It has a checkpoint whose comparison with the module has not been made yet."""
        return self.refusal is None and not self.verified

    def verify(self) -> None:
        """Compare the module with its checkpoint, tensor by tensor, bit for bit: a swap is a
        load only if the load put nothing but these tensors, cast, into the module."""
        if not self.pending:
            return
        torch = _torch()
        assert self.checkpoint is not None
        try:
            module = _module(self.lm)
            copies = _plan(module, self.checkpoint)
            for file, fd in self._held.items():
                if _stamp(fd) != self._stamps[file]:
                    raise _Refused(f"{file} of its checkpoint was written again before it was compared")
            with torch.no_grad():
                for name, target, stored in _read(self.checkpoint.folder, copies, self._held):
                    if not _same_bits(target, stored.to(device=target.device, dtype=target.dtype)):
                        raise _Refused(f"its {name} differs from its checkpoint's (changed on loading)")
            self.verified = True
        except _Refused as refused:
            self.refusal = f"the loaded model takes no weights: {refused}"
        except Exception as exc:
            self.refusal = f"the loaded model could not be compared with its checkpoint: {exc!r}"
        finally:
            self.release()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def swap(self, location: str) -> str | None:
        """Copy the checkpoint at `location` into the module; None once done, else why not,
        and then nothing was copied. `SwapFailed`: the copy began and failed."""
        self.verify()
        if self.refusal is not None:
            return self.refusal
        assert self.checkpoint is not None
        new = read_checkpoint(location)
        if isinstance(new, str):
            return new
        try:
            _differences(self.checkpoint, new)
            module = _module(self.lm)
            copies = _plan(module, new)
        except _Refused as refused:
            return str(refused)
        torch = _torch()
        try:
            with torch.no_grad():
                for _name, target, stored in _read(new.folder, copies):
                    target.copy_(stored)
        except Exception as exc:
            raise SwapFailed(f"copying the weights of {location} failed: {exc!r}") from exc
        module.train(self.training)
        for parameter in module.parameters():
            parameter.grad = None
        _rename(self.lm, module, self.location, location)
        self.checkpoint, self.location = new, location
        return None


class SwapFailed(Exception):
    """The copy began and did not end: the model holds parts of two checkpoints, and must be
    dropped."""

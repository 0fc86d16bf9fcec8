"""Weights swapped into a loaded model: the rules that decide it, on small modules and on
lmms-eval's own `huggingface` model with tiny checkpoints; the worker's side is in
tests/test_resident.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from evalq.schemas import EvaluateRequest
from evalq.worker import weight_swap
from evalq.worker.resident import resident_key, weights_key
from evalq.worker.weight_swap import SwapFailed, SwapState, apart_from_weights, read_checkpoint


def test_model_args_apart_from_the_weights_folder() -> None:
    assert apart_from_weights("pretrained=/ck/1,device_map=cpu,trust_remote_code=True") == (
        "pretrained",
        "/ck/1",
        ("device_map=cpu", "trust_remote_code=True"),
    )
    assert apart_from_weights("device_map=cpu,model_path=/ck/2") == ("model_path", "/ck/2", ("device_map=cpu",))
    # No weights folder, two of them, an empty one, or not `k=v`: nothing to swap.
    assert apart_from_weights("model=gpt-4o,max_tokens=5") is None
    assert apart_from_weights("pretrained=/a,model_path=/b") is None
    assert apart_from_weights("pretrained=") is None
    assert apart_from_weights("pretrained=/a,flag") is None
    assert apart_from_weights("") is None


def test_jobs_for_two_checkpoints_of_one_model_share_a_weights_key_and_nothing_else_does() -> None:
    def request(**model_args: object) -> EvaluateRequest:
        return EvaluateRequest(model="huggingface", tasks=["t"], model_args=model_args, device="cpu")

    one = request(pretrained="/ck/1", device_map="cpu")
    two = request(pretrained="/ck/2", device_map="cpu")
    assert resident_key(one) != resident_key(two)
    assert weights_key(one) == weights_key(two) is not None
    assert weights_key(one) != weights_key(request(pretrained="/ck/2", device_map="auto"))
    assert weights_key(one) != weights_key(request(model_path="/ck/2", device_map="cpu"))
    assert weights_key(request(device_map="cpu")) is None


# --- small modules ---------------------------------------------------------------------


class _Net:
    """What lmms-eval's model keeps: its torch module as `model`."""

    def __init__(self, module: Any, location: str) -> None:
        self.model = module
        self.pretrained = location


def _module(*, tied: bool = False) -> Any:
    import torch

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.register_buffer("scale", torch.ones(4))
            self.register_buffer("cache", torch.zeros(4), persistent=False)

    class Outer(torch.nn.Module):
        base_model_prefix = "inner"

        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()
            self.head = torch.nn.Linear(4, 10, bias=False)
            if tied:
                self.head.weight = self.inner.embed.weight

    return Outer().eval()


def _save(folder: Path, tensors: dict[str, Any], *, config: dict[str, Any] | None = None) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"hidden": 4, "_name_or_path": str(folder)}))
    (folder / "tokenizer.json").write_text('{"vocab": 10}')
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return str(folder)


def _weights(seed: int, *, tied: bool = False, drop: str | None = None) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    module = _module(tied=tied)
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if k != drop}
    if tied:
        del state["head.weight"]
    return state


def _loaded(path: str, *, tied: bool = False) -> tuple[_Net, SwapState]:
    import torch

    module = _module(tied=tied)
    with torch.no_grad():
        module.load_state_dict(_weights(0, tied=tied), strict=not tied)
    net = _Net(module, path)
    state = SwapState(net, path)
    state.verify()
    return net, state


def _snapshot(net: _Net) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in net.model.state_dict().items()}


def _unchanged(net: _Net, before: dict[str, Any]) -> bool:
    import torch

    return all(torch.equal(before[k], v) for k, v in net.model.state_dict().items())


def test_a_checkpoint_with_the_same_tensors_is_copied_in_and_the_path_renamed(tmp_path: Path) -> None:
    import torch

    first = _save(tmp_path / "a", _weights(0))
    second = _save(tmp_path / "b", _weights(1))
    net, state = _loaded(first)
    assert state.refusal is None and state.verified
    assert state.swap(second) is None
    for name, tensor in _weights(1).items():
        assert torch.equal(net.model.state_dict()[name], tensor), name
    assert net.pretrained == second and state.location == second
    assert not net.model.training


def test_tied_weights_need_one_tensor_and_the_base_prefix_is_mapped_once_for_all(tmp_path: Path) -> None:
    import torch

    # A base model's checkpoint: its names lack the `inner.` prefix that the module's have,
    # and the head, tied to the embedding, is not in it.
    def base(seed: int) -> dict[str, Any]:
        return {k.removeprefix("inner."): v for k, v in _weights(seed, tied=True).items()}

    first = _save(tmp_path / "a", base(0))
    second = _save(tmp_path / "b", base(1))
    net, state = _loaded(first, tied=True)
    assert state.refusal is None
    assert state.swap(second) is None
    assert torch.equal(net.model.head.weight, base(1)["embed.weight"])
    assert net.model.head.weight.data_ptr() == net.model.inner.embed.weight.data_ptr()
    # Both names of the tied tensor in a checkpoint: which one a load keeps is its own
    # business, so that is refused.
    both = {**base(2), "head.weight": torch.zeros(10, 4)}
    note = state.swap(_save(tmp_path / "c", both))
    assert note is not None and "extra tensor head.weight" in note, note
    # And a model loaded from such a checkpoint takes no swap.
    both_names = _weights(0, tied=True) | {"head.weight": _weights(0, tied=True)["inner.embed.weight"]}
    _net, state = _loaded(_save(tmp_path / "d", both_names), tied=True)
    assert state.refusal == (
        "the loaded model takes no weights: head.weight and inner.embed.weight are one tensor in the model, "
        "two in the checkpoint"
    )


def test_a_full_models_checkpoint_goes_into_its_base_model_with_the_prefix_removed(tmp_path: Path) -> None:
    import torch

    def full(seed: int) -> dict[str, Any]:
        return {k: v for k, v in _weights(seed).items() if k.startswith("inner.")}

    first = _save(tmp_path / "a", full(0))
    second = _save(tmp_path / "b", full(1))
    base = _module().inner
    base.base_model_prefix = "inner"
    with torch.no_grad():
        base.load_state_dict({k.removeprefix("inner."): v for k, v in full(0).items()})
    net = _Net(base, first)
    state = SwapState(net, first)
    assert state.swap(second) is None
    assert torch.equal(base.embed.weight, full(1)["inner.embed.weight"])
    # A name the prefix cannot be removed from matches nothing.
    with_head = SwapState(net, _save(tmp_path / "c", {**full(1), "head.weight": torch.zeros(10, 4)}))
    with_head.verify()
    assert with_head.refusal == "the loaded model takes no weights: extra tensor head.weight, not in the model"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("missing", "missing tensor inner.scale"),
        ("dtype", "dtype of head.weight is float16, loaded float32"),
        ("config", "config.json differs in hidden"),
        ("tokenizer", "tokenizer.json differs"),
        ("shape", "shape of inner.norm.bias is [5], loaded [4]"),
        ("bin", "are not safetensors"),
        ("truncated", "truncated or damaged"),
        ("absent", "is not a local folder"),
    ],
)
def test_a_checkpoint_that_differs_in_more_than_its_weights_is_refused_with_nothing_copied(
    tmp_path: Path, change: str, reason: str
) -> None:
    import torch

    first = _save(tmp_path / "a", _weights(0))
    weights = _weights(1, drop="inner.scale" if change == "missing" else None)
    if change == "dtype":
        weights["head.weight"] = weights["head.weight"].half()
    if change == "shape":
        weights["inner.norm.bias"] = torch.zeros(5)
    config = {"hidden": 8} if change == "config" else None
    second = _save(tmp_path / "b", weights, config=config)
    if change == "tokenizer":
        (tmp_path / "b" / "tokenizer.json").write_text('{"vocab": 11}')
    if change == "bin":
        (tmp_path / "b" / "model.safetensors").rename(tmp_path / "b" / "pytorch_model.bin")
    if change == "truncated":
        data = (tmp_path / "b" / "model.safetensors").read_bytes()
        (tmp_path / "b" / "model.safetensors").write_bytes(data[:-8])
    if change == "absent":
        shutil.rmtree(tmp_path / "b")
    net, state = _loaded(first)
    before = _snapshot(net)
    note = state.swap(second)
    assert note is not None and reason in note, note
    assert _unchanged(net, before)
    assert net.pretrained == first


def test_a_model_that_its_loader_changed_never_takes_a_swap(tmp_path: Path) -> None:
    import torch

    first = _save(tmp_path / "a", _weights(0))
    second = _save(tmp_path / "b", _weights(1))
    module = _module()
    with torch.no_grad():
        module.load_state_dict(_weights(0))
        module.head.weight.mul_(2)  # as a loader that merges or scales weights would
    net = _Net(module, first)
    state = SwapState(net, first)
    assert state.pending
    note = state.swap(second)  # compared with its checkpoint first, when not yet
    assert note is not None and "its head.weight differs from its checkpoint's" in note, note


def test_the_loaded_checkpoint_deleted_during_the_job_is_still_compared_and_the_swap_made(tmp_path: Path) -> None:
    import torch

    first = _save(tmp_path / "a", _weights(0))
    second = _save(tmp_path / "b", _weights(1))
    module = _module()
    with torch.no_grad():
        module.load_state_dict(_weights(0))
    net = _Net(module, first)
    state = SwapState(net, first)
    shutil.rmtree(first)  # as a trainer keeping its last checkpoints does
    state.verify()
    assert state.refusal is None
    assert state.swap(second) is None


def test_a_weights_file_replaced_between_its_check_and_its_copy_fails_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    first = _save(tmp_path / "a", _weights(0))
    second = _save(tmp_path / "b", _weights(1))
    _net, state = _loaded(first)
    real = weight_swap.read_checkpoint

    def read_then_replace(location: str) -> Any:
        checkpoint = real(location)
        save_file({k: v.half() for k, v in _weights(2).items()}, Path(location) / "model.safetensors")
        return checkpoint

    monkeypatch.setattr(weight_swap, "read_checkpoint", read_then_replace)
    with pytest.raises(SwapFailed, match="changed while it was read"):
        state.swap(second)


def test_a_module_with_a_tensor_the_checkpoint_lacks_is_refused(tmp_path: Path) -> None:
    # Saved without a persistent buffer: a load would leave it as initialised, a swap cannot know.
    first = _save(tmp_path / "a", _weights(0, drop="inner.scale"))
    _net, state = _loaded(first)
    assert state.refusal == "the loaded model takes no weights: missing tensor inner.scale"


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    first = _save(tmp_path / "a", _weights(0))
    folder = tmp_path / "b"
    _save(folder, _weights(0))
    (folder / "model.safetensors").unlink()
    weights = _weights(1)
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, part in halves.items():
        save_file({k: weights[k].contiguous() for k in part}, folder / file)
    index = {"weight_map": {k: file for file, part in halves.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = read_checkpoint(str(folder))
    assert not isinstance(checkpoint, str) and checkpoint.tensors is not None
    assert {t.file for t in checkpoint.tensors.values()} == set(halves)
    _net, state = _loaded(first)
    assert state.swap(str(folder)) is None
    # An index that names a tensor no shard holds is refused.
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_checkpoint(str(folder)) == "model.safetensors.index.json lists tensor ghost, which no shard holds"


# --- lmms-eval's huggingface model ------------------------------------------------------


def _huggingface(path: Path) -> Any:
    from lmms_eval.models.chat.huggingface import Huggingface

    return Huggingface(pretrained=str(path), device="cpu", device_map="cpu", trust_remote_code=True)


@pytest.mark.slow
def test_lmms_evals_model_after_a_swap_equals_a_fresh_load_bit_for_bit(tmp_path: Path) -> None:
    import torch

    from .tiny_model import build_tiny_model

    first = build_tiny_model(tmp_path / "step-1", seed=0)
    second = build_tiny_model(tmp_path / "step-2", seed=1)
    lm = _huggingface(first)
    state = SwapState(lm, str(first))
    state.verify()
    assert state.refusal is None
    assert state.swap(str(second)) is None
    fresh = _huggingface(second)
    swapped, loaded = lm.model.state_dict(), fresh.model.state_dict()
    assert swapped.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert swapped[name].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(swapped[name].view(torch.int16), tensor.view(torch.int16)), name
    assert lm.model.config._name_or_path == fresh.model.config._name_or_path == str(second)
    assert lm.tokenizer.name_or_path == lm.processor.name_or_path == str(second)
    assert not lm.model.training
    assert [p.requires_grad for p in lm.model.parameters()] == [p.requires_grad for p in fresh.model.parameters()]

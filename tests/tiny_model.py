"""Build a tiny, randomly initialised causal LM on disk, with no download.

lmms-eval's `huggingface` chat model picks its model class by comparing `model_type`
with keys that are config classes, so a text model falls back to `AutoModel` (which has
no LM head). Mapping `auto_map.AutoModel` to a causal-LM class in config.json makes that
fallback load the right class; it needs `trust_remote_code=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_model(path: Path, seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4) -> Path:
    """The model; `hidden` and `layers` make it as large as a benchmark needs (1024 and 20
    give about 1.3 GB of float32 weights)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    corpus = [
        "Which number is the smallest? Answer with the option's letter. A B C D",
        "user: assistant: the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
    ]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2 if hidden <= 64 else hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    data = json.loads((path / "config.json").read_text())
    data["auto_map"] = {"AutoModel": "modeling_tiny.TinyForCausalLM"}
    (path / "config.json").write_text(json.dumps(data, indent=2))
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))

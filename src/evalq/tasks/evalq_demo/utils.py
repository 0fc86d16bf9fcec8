"""Prompt helpers for the evalq_demo task (a text-only multiple-choice quiz)."""

LETTERS = "ABCD"


def doc_to_visual(doc):
    return []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, doc["options"]))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    return [{"role": "user", "content": [{"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)}]}]


def doc_to_target(doc):
    return doc["answer"]

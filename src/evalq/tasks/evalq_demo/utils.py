"""Prompt helpers for the evalq_demo task (a text-only multiple-choice quiz)."""

from __future__ import annotations

from typing import Any

LETTERS = "ABCD"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return []


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, doc["options"], strict=False))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def doc_to_messages(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> list[Any]:
    return [{"role": "user", "content": [{"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)}]}]


def doc_to_target(doc: dict[str, Any]) -> str:
    return str(doc["answer"])

"""Prompt helpers and scoring for the evalq_shard_demo task (240 multiple-choice sums)."""

from __future__ import annotations

import re
from typing import Any

LETTERS = "ABCD"
_LETTER = re.compile(r"\b([ABCD])\b")


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


def _letter(response: str) -> str:
    found = _LETTER.search(response.strip().upper())
    return found.group(1) if found else ""


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    predicted = _letter(results[0] if results else "")
    gold = str(doc["answer"])
    return {"exact_match": float(predicted == gold), "macro_f1": (gold, predicted)}


def macro_f1(items: list[Any]) -> float:
    """The F1 of each answer letter, averaged over the four letters."""
    scores = []
    for letter in LETTERS:
        hits = sum(1 for gold, predicted in items if gold == letter and predicted == letter)
        said = sum(1 for _, predicted in items if predicted == letter)
        true = sum(1 for gold, _ in items if gold == letter)
        precision = hits / said if said else 0.0
        recall = hits / true if true else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)

"""Samples as the dashboard shows them, and the per-document flips between two jobs.

Pure: the dashboard reads the two jobs' logged samples (lmms-eval's
`<job>/samples/<stamp>_samples_<task>.jsonl`) and this module pairs them by `doc_id`. For a
0/1 metric the pairs that changed are the evidence a gate's paired test weighs (McNemar's
exact test, `stats.mcnemar_exact`), so the page shows those documents themselves: input,
both outputs and the target, side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from .gates import samples_task
from .stats import mcnemar_exact

__all__ = ["FlipsRefused", "first_text", "flips", "sample_view", "samples_files"]


class FlipsRefused(ValueError):
    """The metric cannot be paired as 0/1 scores: the message says why."""


def first_text(value: Any) -> str:
    """The text of lmms-eval's logged `input` / `resps`: a string, or the first string nested in lists."""
    while isinstance(value, list) and value:
        value = value[0]
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def sample_view(sample: dict[str, Any], metric_names: set[str]) -> dict[str, Any]:
    """One line of lmms-eval's `*_samples_<task>.jsonl` as the samples browser shows it.

    Images are passed on only as `data:image/...` URIs: a page on an air-gapped cluster
    cannot fetch URLs, and one it could would tell another host who looks at which sample.
    """
    output = sample.get("filtered_resps", sample.get("resps"))
    media = sample.get("input_media") or []
    images = [m for m in media if isinstance(m, str) and m.startswith("data:image/")][:4]
    metrics = {
        key: value
        for key, value in sample.items()
        if (key in metric_names or key.split(",")[0] in metric_names)
        and isinstance(value, (int, float, str))
        and not isinstance(value, bool)
    }
    return {
        "doc_id": sample.get("doc_id"),
        "input": first_text(sample.get("input", sample.get("arguments"))),
        "images": images,
        "output": first_text(output),
        "target": first_text(sample.get("target")),
        "metrics": metrics,
    }


def samples_files(job_id: str, artifacts: Iterable[str], task: str) -> list[str]:
    """The job's samples files of `task` (`samples/<stamp>_samples_<task>.jsonl`), relative to its folder.

    A task's name may itself hold `_samples_`: the file's task is what follows the last one.
    """
    prefix = f"{job_id}/samples/"
    return [name[len(job_id) + 1 :] for name in artifacts if name.startswith(prefix) and samples_task(name) == task]


def _by_doc(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["doc_id"]: row for row in rows if isinstance(row.get("doc_id"), int)}


def _score(row: dict[str, Any], metric: str) -> float | None:
    """The document's score under `metric` (lmms-eval's key or its name before the filter):
    a sample line carries it by name (`exact_match`), a results key has the filter too."""
    for key in (metric, metric.split(",")[0]):
        value = row.get(key)
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def flips(
    rows_a: Iterable[dict[str, Any]],
    rows_b: Iterable[dict[str, Any]],
    metric: str,
    metric_names: set[str],
    limit: int,
) -> dict[str, Any]:
    """The documents both jobs scored under a 0/1 `metric`, paired by `doc_id`: those right in
    `a` and wrong in `b` (`lost`), and the reverse (`gained`), at most `limit` of each listed,
    with the counts and McNemar's exact p-value of the discordant pairs."""
    a, b = _by_doc(rows_a), _by_doc(rows_b)
    lost: list[int] = []
    gained: list[int] = []
    pairs = both_right = 0
    for doc_id in sorted(a.keys() & b.keys()):
        first, second = _score(a[doc_id], metric), _score(b[doc_id], metric)
        if first is None or second is None:
            continue
        for value in (first, second):
            if value not in (0.0, 1.0):
                raise FlipsRefused(
                    f"`{metric}` is not a 0/1 score (document {doc_id} has {value:g}): right and wrong need 0 or 1"
                )
        pairs += 1
        if first and second:
            both_right += 1
        elif first:
            lost.append(doc_id)
        elif second:
            gained.append(doc_id)

    if not pairs:
        raise FlipsRefused(f"no document that both jobs logged carries a `{metric}` score")

    def shown(doc_ids: list[int]) -> list[dict[str, Any]]:
        listed = []
        for doc_id in doc_ids[:limit]:
            left, right = sample_view(a[doc_id], metric_names), sample_view(b[doc_id], metric_names)
            listed.append(
                {
                    "doc_id": doc_id,
                    "input": left["input"] or right["input"],
                    "images": left["images"] or right["images"],
                    "target": left["target"] or right["target"],
                    "output_a": left["output"],
                    "output_b": right["output"],
                }
            )
        return listed

    return {
        "metric": metric,
        "pairs": pairs,
        "both_right": both_right,
        "both_wrong": pairs - both_right - len(lost) - len(gained),
        "right_to_wrong": len(lost),
        "wrong_to_right": len(gained),
        "p_value": mcnemar_exact(len(lost), len(gained)),
        "lost": shown(lost),
        "gained": shown(gained),
        "truncated": len(lost) > limit or len(gained) > limit,
    }

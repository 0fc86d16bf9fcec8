"""Regression gates, pure: a job's verdict under a policy, against a baseline job.

Each rule checks one metric: an absolute bound on its value, and a largest drop against the
baseline's value. A drop beyond the allowance breaches only when a paired test over the
documents both jobs scored finds it at the policy's level (McNemar's exact test for 0/1
scores, the paired t-test otherwise); fewer paired documents than `min_pairs` is not
evidence, whatever the drop. The verdict: NO-GO when a critical rule breaches; INCONCLUSIVE
when a critical rule lacks evidence or its metric, or a supporting rule breaches; GO
otherwise. Advisory rules are reported only. docs/DESIGN.md, "Gates".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .schemas import GatePolicy, GateRule, JobSummary, RuleOutcome, RuleStatus, Verdict, VerdictName, now
from .stats import mcnemar_exact, paired_t

__all__ = ["Scores", "judge", "parse_samples", "pick_baseline", "resolve_metric", "samples_task", "verdict_of"]

# The worst status of a rule's checks is its status.
_SEVERITY: dict[RuleStatus, int] = {"PASS": 0, "INSUFFICIENT_EVIDENCE": 1, "MISSING": 2, "BREACH": 3}


@dataclass(frozen=True)
class Scores:
    """What a gate reads of one job: its metrics (lmms-eval's `results` section) and its
    per-document scores (task -> doc_id -> lmms-eval's logged sample)."""

    job_id: str
    metrics: dict[str, dict[str, Any]]
    samples: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)


def samples_task(name: str) -> str | None:
    """The task of lmms-eval's `<job>/samples/<stamp>_samples_<task>.jsonl` (a task's name may
    itself hold `_samples_`: the file's task follows the last one); None for another file."""
    base = name.rsplit("/", 1)[-1]
    if "/samples/" not in f"/{name}" or not base.endswith(".jsonl") or "_samples_" not in base:
        return None
    return base[: -len(".jsonl")].rsplit("_samples_", 1)[1]


def parse_samples(lines: Iterable[str]) -> dict[int, dict[str, Any]]:
    """One `*_samples_<task>.jsonl` file by `doc_id`; lines that are not a sample are skipped."""
    rows: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("doc_id"), int):
            rows[row["doc_id"]] = row
    return rows


def resolve_metric(metrics: dict[str, dict[str, Any]], ref: str) -> tuple[str, float] | None:
    """`task/metric` in a results section: lmms-eval's key (`exact_match,none`) or its name,
    the `none` filter first. None when the task or a numeric value is missing."""
    task, _, name = ref.partition("/")
    section = metrics.get(task) or {}
    keys = [name] if "," in name else [f"{name},none", *sorted(k for k in section if k.split(",")[0] == name)]
    for key in keys:
        value = _number(section.get(key))
        if value is not None:
            return key, value
    return None


def _number(value: Any) -> float | None:
    """A finite int or float (not a bool) as a float; None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _sample_value(row: dict[str, Any], key: str) -> float | None:
    for name in (key, key.split(",")[0]):
        value = _number(row.get(name))
        if value is not None:
            return value
    return None


def _pairs(candidate: Scores, baseline: Scores, task: str, key: str) -> list[tuple[float, float]]:
    """(baseline, candidate) scores of each document both jobs scored."""
    mine, theirs = candidate.samples.get(task) or {}, baseline.samples.get(task) or {}
    pairs = []
    for doc_id in sorted(mine.keys() & theirs.keys()):
        a, b = _sample_value(theirs[doc_id], key), _sample_value(mine[doc_id], key)
        if a is not None and b is not None:
            pairs.append((a, b))
    return pairs


def _test(pairs: Sequence[tuple[float, float]]) -> tuple[str, float]:
    if all(a in (0.0, 1.0) and b in (0.0, 1.0) for a, b in pairs):
        lost = sum(1 for a, b in pairs if a == 1.0 and b == 0.0)
        gained = sum(1 for a, b in pairs if a == 0.0 and b == 1.0)
        return "mcnemar", mcnemar_exact(lost, gained)
    return "paired-t", paired_t([b - a for a, b in pairs])


def _judge_rule(rule: GateRule, policy: GatePolicy, candidate: Scores, baseline: Scores | None) -> RuleOutcome:
    found = resolve_metric(candidate.metrics, rule.metric)
    if found is None:
        return RuleOutcome(metric=rule.metric, tier=rule.tier, status="MISSING", reason="the job has no such metric")
    key, value = found
    task = rule.metric.partition("/")[0]
    name = f"{task}/{key}"
    checks: list[tuple[RuleStatus, str]] = []
    if rule.at_least is not None and value < rule.at_least:
        checks.append(("BREACH", f"{value:.4g} < {rule.at_least:g}"))
    if rule.at_most is not None and value > rule.at_most:
        checks.append(("BREACH", f"{value:.4g} > {rule.at_most:g}"))
    outcome: dict[str, Any] = {"value": value}
    if rule.max_drop is not None or rule.max_relative_drop is not None:
        checks.append(_judge_drop(rule, policy, candidate, baseline, task, key, value, outcome))
    status: RuleStatus = "PASS"
    reason = "within every bound"
    if checks:
        status, reason = max(checks, key=lambda c: _SEVERITY[c[0]])
    if status == "PASS" and len(checks) > 1:
        reason = "; ".join(why for _, why in checks)
    return RuleOutcome(metric=name, tier=rule.tier, status=status, reason=reason, **outcome)


def _judge_drop(
    rule: GateRule,
    policy: GatePolicy,
    candidate: Scores,
    baseline: Scores | None,
    task: str,
    key: str,
    value: float,
    outcome: dict[str, Any],
) -> tuple[RuleStatus, str]:
    if baseline is None:
        return "MISSING", "no baseline job"
    theirs = resolve_metric(baseline.metrics, f"{task}/{key}")
    if theirs is None:
        return "MISSING", f"the baseline {baseline.job_id} has no such metric"
    base = theirs[1]
    delta = value - base
    drop = -delta if rule.higher_is_better else delta
    allowances = [rule.max_drop] if rule.max_drop is not None else []
    if rule.max_relative_drop is not None:
        allowances.append(rule.max_relative_drop * abs(base))
    allowed = min(allowances)
    pairs = _pairs(candidate, baseline, task, key)
    outcome.update(baseline_value=base, delta=delta, pairs=len(pairs))
    if len(pairs) < policy.min_pairs:
        return "INSUFFICIENT_EVIDENCE", f"{len(pairs)} documents scored by both jobs, fewer than {policy.min_pairs}"
    test, p = _test(pairs)
    outcome.update(test=test, p_value=p)
    if drop <= allowed:
        return "PASS", f"drop {drop:.4g} within {allowed:.4g}"
    if p < policy.alpha:
        return "BREACH", f"drop {drop:.4g} beyond {allowed:.4g} ({test} p={p:.3g} < {policy.alpha:g})"
    return "INSUFFICIENT_EVIDENCE", f"drop {drop:.4g} beyond {allowed:.4g}, not significant ({test} p={p:.3g})"


def verdict_of(outcomes: Sequence[RuleOutcome]) -> VerdictName:
    critical = [o.status for o in outcomes if o.tier == "critical"]
    if "BREACH" in critical:
        return "NO-GO"
    if any(s != "PASS" for s in critical) or any(o.tier == "supporting" and o.status == "BREACH" for o in outcomes):
        return "INCONCLUSIVE"
    return "GO"


def judge(policy: GatePolicy, candidate: Scores, baseline: Scores | None, *, name: str) -> Verdict:
    """The verdict on `candidate` under `policy` (stored as `name`) against `baseline`."""
    outcomes = [_judge_rule(rule, policy, candidate, baseline) for rule in policy.rules]
    return Verdict(
        verdict=verdict_of(outcomes),
        policy=name,
        baseline=baseline.job_id if baseline else None,
        rules=outcomes,
        at=now(),
    )


def _step(labels: dict[str, str], label: str) -> float | None:
    try:
        return float(labels[label])
    except (KeyError, ValueError):
        return None


def pick_baseline(policy: GatePolicy, job: JobSummary, history: Iterable[JobSummary]) -> JobSummary | None:
    """The baseline `policy` names for `job`: the latest earlier step of the same run
    (`previous`), the one with the best value of the first rule's metric (`best`), or None
    for a job id (the caller reads that job) or no baseline. Earlier: a lower step label, or
    without steps an earlier submission; the same run: the same pool, model and run labels."""
    if policy.baseline not in ("previous", "best"):
        return None
    run = {label: job.labels.get(label) for label in policy.run_labels}
    mine = _step(job.labels, policy.step_label)
    earlier = []
    for other in history:
        if other.job_id == job.job_id or other.status != "completed" or other.pool != job.pool:
            continue
        if other.team != job.team:
            continue  # another team's job is no evidence this team may read
        if other.model != job.model or any(other.labels.get(k) != v for k, v in run.items()):
            continue
        theirs = _step(other.labels, policy.step_label)
        before = theirs < mine if mine is not None and theirs is not None else other.created_at < job.created_at
        if before:
            earlier.append((theirs if theirs is not None else -math.inf, other.created_at, other))
    if not earlier:
        return None
    if policy.baseline == "previous":
        return max(earlier, key=lambda e: (e[0], e[1]))[2]
    rule = policy.rules[0]

    def score(entry: tuple[float, str, JobSummary]) -> float:
        found = resolve_metric(entry[2].metrics, rule.metric)
        if found is None:
            return -math.inf
        return found[1] if rule.higher_is_better else -found[1]

    return max(earlier, key=lambda e: (score(e), e[0], e[1]))[2]

"""Regression gates, pure: the paired tests against scipy, each rule's status, the verdict,
the baseline a policy names, and a policy's refusals."""

from __future__ import annotations

import random

import msgspec
import pytest
from scipy import stats as scipy_stats

from evalq.gates import Scores, judge, parse_samples, pick_baseline, resolve_metric
from evalq.schemas import GatePolicy, GateRule, JobSummary, decode
from evalq.stats import mcnemar_exact, paired_t


@pytest.mark.parametrize(
    ("b", "c"),
    [
        (0, 0),
        (1, 0),
        (5, 5),
        (19, 106),
        (106, 19),
        (300, 340),
        (990, 1010),
        (2000, 2101),
        (20000, 20500),
        (60000, 59000),
    ],
)
def test_mcnemar_matches_scipys_binomial_test(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-9, rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 7, 30, 240, 5000])
def test_paired_t_matches_scipy(n: int) -> None:
    rng = random.Random(n)
    for shift in (0.0, 0.05, 0.3, 2.0):
        diffs = [rng.gauss(shift, 1.0) for _ in range(n)]
        assert paired_t(diffs) == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue, abs=1e-9)


def test_paired_t_of_constant_differences() -> None:
    assert paired_t([0.0, 0.0, 0.0]) == 1.0
    assert paired_t([0.5, 0.5, 0.5]) == 0.0
    assert paired_t([1.0]) == 1.0


def scores(job_id: str, answers: list[int], *, task: str = "t") -> Scores:
    """A job that scored `answers` (0/1 per document)."""
    mean = sum(answers) / len(answers) if answers else 0.0
    samples = {i: {"doc_id": i, "exact_match": float(a)} for i, a in enumerate(answers)}
    return Scores(
        job_id, {task: {"alias": task, "exact_match,none": mean, "exact_match_stderr,none": 0.1}}, {task: samples}
    )


def policy(**rule: object) -> GatePolicy:
    return GatePolicy(rules=[GateRule(metric="t/exact_match", **rule)])  # type: ignore[arg-type]


def test_a_significant_drop_beyond_the_allowance_is_no_go() -> None:
    base = scores("base", [1] * 80 + [0] * 20)
    worse = scores("worse", [1] * 50 + [0] * 50)
    v = judge(policy(max_drop=0.05), worse, base, name="p")
    (rule,) = v.rules
    assert (v.verdict, rule.status, rule.test, rule.pairs) == ("NO-GO", "BREACH", "mcnemar", 100)
    assert rule.delta == pytest.approx(-0.3) and rule.baseline_value == pytest.approx(0.8)
    assert rule.p_value == pytest.approx(mcnemar_exact(30, 0))
    assert v.baseline == "base"


def test_the_same_scores_are_go_and_a_small_drop_within_the_allowance_passes() -> None:
    base = scores("base", [1, 0] * 50)
    assert judge(policy(max_drop=0.0), base, base, name="p").verdict == "GO"
    slightly = scores("c", [1, 0] * 49 + [0, 0])
    assert judge(policy(max_drop=0.02), slightly, base, name="p").verdict == "GO"


def test_too_few_pairs_or_an_insignificant_drop_is_inconclusive_never_pass() -> None:
    base, worse = scores("base", [1] * 10), scores("worse", [0] * 10)
    v = judge(policy(max_drop=0.0), worse, base, name="p")
    assert (v.verdict, v.rules[0].status) == ("INCONCLUSIVE", "INSUFFICIENT_EVIDENCE")
    assert "fewer than 30" in v.rules[0].reason
    # 40 pairs, a drop of 0.05 beyond an allowance of 0: McNemar p = 0.25, not significant.
    base, worse = scores("base", [1] * 20 + [0] * 20), scores("worse", [1] * 18 + [0] * 22)
    v = judge(policy(max_drop=0.0), worse, base, name="p")
    assert (v.verdict, v.rules[0].status) == ("INCONCLUSIVE", "INSUFFICIENT_EVIDENCE")


def test_non_binary_scores_use_the_paired_t_test() -> None:
    rng = random.Random(1)
    base_values = [rng.random() for _ in range(60)]
    base = Scores(
        "b",
        {"t": {"f1,none": sum(base_values) / 60}},
        {"t": {i: {"doc_id": i, "f1": v} for i, v in enumerate(base_values)}},
    )
    lower = [v - 0.2 for v in base_values]
    worse = Scores(
        "w", {"t": {"f1,none": sum(lower) / 60}}, {"t": {i: {"doc_id": i, "f1": v} for i, v in enumerate(lower)}}
    )
    v = judge(GatePolicy(rules=[GateRule(metric="t/f1", max_relative_drop=0.1)]), worse, base, name="p")
    assert (v.verdict, v.rules[0].test) == ("NO-GO", "paired-t")


def test_absolute_bounds_tiers_and_missing_metrics() -> None:
    job = scores("j", [1] * 40 + [0] * 60)
    rules = [
        GateRule(metric="t/exact_match", at_least=0.5, tier="advisory"),
        GateRule(metric="t/exact_match", at_most=0.3, tier="supporting"),
        GateRule(metric="t/missing", at_least=0.1, tier="advisory"),
    ]
    v = judge(GatePolicy(rules=rules, baseline=None), job, None, name="p")
    assert [r.status for r in v.rules] == ["BREACH", "BREACH", "MISSING"]
    assert v.verdict == "INCONCLUSIVE"  # a supporting breach; the advisory ones are reported only
    critical = GatePolicy(rules=[GateRule(metric="t/exact_match", at_least=0.5)], baseline=None)
    assert judge(critical, job, None, name="p").verdict == "NO-GO"
    dropping = GatePolicy(rules=[GateRule(metric="t/exact_match", max_drop=0.1)])
    v = judge(dropping, job, None, name="p")
    assert (v.verdict, v.rules[0].status, v.rules[0].reason) == ("INCONCLUSIVE", "MISSING", "no baseline job")


def test_metric_names_resolve_to_lmms_eval_keys() -> None:
    section = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "f1,strict": 0.25, "flag,none": True}}
    assert resolve_metric(section, "t/acc") == ("acc,none", 0.5)
    assert resolve_metric(section, "t/f1") == ("f1,strict", 0.25)
    assert resolve_metric(section, "t/f1,strict") == ("f1,strict", 0.25)
    assert resolve_metric(section, "t/flag") is None and resolve_metric(section, "u/acc") is None


def test_samples_are_read_by_doc_id() -> None:
    rows = parse_samples(['{"doc_id": 3, "acc": 1}', "not json", '{"doc_id": "x"}', '{"doc_id": 0, "acc": 0}'])
    assert sorted(rows) == [0, 3]


def summary(job_id: str, created: str, step: str | None, value: float, **fields: object) -> JobSummary:
    fields.setdefault("labels", {"run": "r1", **({"step": step} if step is not None else {})})
    fields.setdefault("status", "completed")
    return JobSummary(
        job_id=job_id,
        created_at=created,
        model="m",
        metrics={"t": {"exact_match,none": value}},
        **fields,  # type: ignore[arg-type]
    )


def test_the_baseline_is_the_previous_or_best_earlier_step_of_the_same_run() -> None:
    history = [
        summary("s100", "2026-01-01T00:00:01Z", "100", 0.7),
        summary("s200", "2026-01-01T00:00:02Z", "200", 0.5),
        summary("s400", "2026-01-01T00:00:04Z", "400", 0.9),  # a later step, submitted earlier
        summary("other", "2026-01-01T00:00:02Z", "250", 0.99, labels={"run": "r2", "step": "250"}),
        summary("failed", "2026-01-01T00:00:02Z", "260", 0.99, status="failed"),
        summary("theirs", "2026-01-01T00:00:02Z", "290", 0.99, team="another"),  # same labels, other team
    ]
    job = summary("s300", "2026-01-01T00:00:03Z", "300", 0.6)
    previous = policy(max_drop=0.1)
    assert (chosen := pick_baseline(previous, job, history)) is not None and chosen.job_id == "s200"
    best = GatePolicy(rules=previous.rules, baseline="best")
    assert (chosen := pick_baseline(best, job, history)) is not None and chosen.job_id == "s100"
    first = summary("s50", "2026-01-01T00:00:00Z", "50", 0.1)
    assert pick_baseline(previous, first, history) is None


def test_a_policy_refuses_rules_without_a_bound_and_bad_values_with_a_path() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"at least one of .* - at `\$.rules\[0\]`"):
        decode(b'{"rules": [{"metric": "t/acc"}]}', GatePolicy)
    with pytest.raises(msgspec.ValidationError, match=r"\$.rules\[0\].max_relative_drop"):
        decode(b'{"rules": [{"metric": "t/acc", "max_relative_drop": 2}]}', GatePolicy)
    with pytest.raises(msgspec.ValidationError, match=r"\$.rules\[0\].metric"):
        decode(b'{"rules": [{"metric": "acc", "at_least": 1}]}', GatePolicy)
    with pytest.raises(msgspec.ValidationError, match=r"\$.baseline"):
        decode(b'{"rules": [{"metric": "t/acc", "at_least": 1}], "baseline": "latest"}', GatePolicy)

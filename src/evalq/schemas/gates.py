"""The wire types of regression gates: a policy's rules, each rule's outcome, a job's verdict,
and the body of the `gate` endpoint (docs/DESIGN.md, "Gates")."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from ..fields import JobId, Name
from .wire import Wire

__all__ = [
    "GATE_OPS",
    "GateCheck",
    "GateGet",
    "GateList",
    "GateName",
    "GateOp",
    "GatePolicy",
    "GateRule",
    "GateSet",
    "GatesReply",
    "RuleOutcome",
    "RuleStatus",
    "Tier",
    "Verdict",
    "VerdictName",
]

Tier = Literal["critical", "supporting", "advisory"]
RuleStatus = Literal["PASS", "BREACH", "INSUFFICIENT_EVIDENCE", "MISSING"]
VerdictName = Literal["GO", "NO-GO", "INCONCLUSIVE"]
# A stored policy's name: one key token of the gates bucket (`<team>.<name>`).
GateName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9_\-]+\Z")]
# `task/metric`: lmms-eval's key (`exact_match,none`) or its name before the `,filter`.
GateMetric = Annotated[str, Meta(min_length=3, max_length=256, pattern=r"\A[^/\s]+/[^/\s]+\Z")]
# "previous" (the latest earlier step of the same run), "best" (the best earlier step of it),
# or one job's id.
Baseline = Annotated[str, Meta(min_length=1, max_length=36, pattern=r"\A(previous|best|[0-9a-f-]{36})\Z")]


class GateRule(Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One metric's rule: an absolute bound, a largest drop against the baseline, or both."""

    metric: GateMetric
    at_least: float | None = None
    at_most: float | None = None
    # Against the baseline, in the metric's units, or as a fraction of the baseline's value.
    max_drop: Annotated[float, Meta(ge=0)] | None = None
    max_relative_drop: Annotated[float, Meta(ge=0, le=1)] | None = None
    # A drop is a fall of a higher-is-better metric, a rise of a lower-is-better one.
    higher_is_better: bool = True
    # critical: a breach is NO-GO; supporting: a breach is INCONCLUSIVE; advisory: reported only.
    tier: Tier = "critical"

    def __post_init__(self) -> None:
        bounds = (self.at_least, self.at_most, self.max_drop, self.max_relative_drop)
        if all(bound is None for bound in bounds):
            raise ValueError("Expected at least one of at_least, at_most, max_drop, max_relative_drop - at `$`")


class GatePolicy(Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rules: Annotated[list[GateRule], Meta(min_length=1, max_length=256)]
    baseline: Baseline | None = "previous"
    # The labels that name one training run (all must match), and the one that orders its steps.
    run_labels: Annotated[list[Name], Meta(max_length=16)] = msgspec.field(default_factory=lambda: ["run"])
    step_label: Name = "step"
    # A drop beyond a rule's allowance breaches only when a paired test finds it at this level.
    alpha: Annotated[float, Meta(gt=0, lt=1)] = 0.05
    # Fewer documents scored by both jobs than this: the rule lacks evidence.
    min_pairs: Annotated[int, Meta(ge=1, le=10_000_000)] = 30


class RuleOutcome(Wire, frozen=True, kw_only=True):
    metric: str
    tier: Tier
    status: RuleStatus
    value: float | None = None
    baseline_value: float | None = None
    delta: float | None = None  # value - baseline_value
    pairs: int = 0  # documents both jobs scored
    test: Literal["mcnemar", "paired-t"] | None = None
    p_value: float | None = None
    reason: str = ""


class Verdict(Wire, frozen=True, kw_only=True):
    """A job's verdict under a policy: GO, NO-GO or INCONCLUSIVE, and each rule's outcome."""

    verdict: VerdictName
    policy: str
    baseline: str | None = None  # the baseline job's id
    rules: list[RuleOutcome] = []
    at: str = ""


# --- the `gate` endpoint: a tagged union on "op" -----------------------------------------


class _GateBase(Struct, frozen=True, kw_only=True, tag_field="op", forbid_unknown_fields=True):
    pass


class GateSet(_GateBase, frozen=True, kw_only=True, tag="set"):
    name: GateName
    policy: GatePolicy


class GateGet(_GateBase, frozen=True, kw_only=True, tag="get"):
    name: GateName


class GateList(_GateBase, frozen=True, kw_only=True, tag="list"):
    pass


class GateCheck(_GateBase, frozen=True, kw_only=True, tag="check"):
    """A verdict on demand: the job's stored one unless a policy or baseline is named."""

    job_id: JobId
    policy: GateName | None = None
    baseline: Baseline | None = None


GateOp = Union[GateSet, GateGet, GateList, GateCheck]
GATE_OPS = ("set", "get", "list", "check")


class GatesReply(Wire, frozen=True, kw_only=True):
    """`set`, `get` and `list`: the stored policies by name."""

    policies: dict[str, GatePolicy]

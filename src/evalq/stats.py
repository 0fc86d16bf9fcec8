"""The paired tests a gate decides with, pure: McNemar's exact test for 0/1 scores, and
Student's paired t-test for any other scores. No dependency: a worker-less client install
computes the same p-values as the gateway."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mcnemar_exact", "paired_t"]

_EXACT_UP_TO = 2000


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test for `b` documents right only in the baseline
    and `c` right only in the candidate: the binomial(b + c, 1/2) tail, doubled."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    if n <= _EXACT_UP_TO:
        tail = sum(math.comb(n, i) for i in range(k + 1))
        # Exact integers until this one division, which Python rounds correctly.
        return min(1.0, 2 * tail / (1 << n))
    # The same tail as a regularized incomplete beta: P(X <= k) = I_1/2(n - k, k + 1). The
    # integers' cost grows with n squared (seconds at 10,000 discordant documents).
    return min(1.0, 2 * _betainc(n - k, k + 1, 0.5))


def paired_t(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean of `diffs` is 0."""
    n = len(diffs)
    if n < 2:
        return 1.0
    mean = math.fsum(diffs) / n
    variance = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    if variance == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / math.sqrt(variance / n)
    df = n - 1
    return min(1.0, _betainc(df / 2, 0.5, df / (df + t * t)))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below this point; the symmetry covers the rest.
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by Lentz's method."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h

"""Intervals over seeds: the mean of paired differences (or of one quantity) with a Student-t interval.

A seed fixes the data, the order's items and the initialization, so two methods run with the same seed
form a pair, and the seed's own effect cancels in their difference. With n seeds the interval is
mean +- t(0.975, n - 1) * sd / sqrt(n). It holds its coverage at 5 to 20 seeds when the differences are
roughly normal (tests/test_study.py checks it by simulation); a percentile bootstrap does not: on
2,000 simulated sets of 10 normal differences, its nominal 95% interval covered the mean in 89%.
"""

from __future__ import annotations

import math
import statistics
from functools import cache


def t_pdf(x: float, df: int) -> float:
    """Student's t density with df degrees of freedom."""
    return math.exp(
        math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - (df + 1) / 2 * math.log1p(x * x / df)
    ) / math.sqrt(df * math.pi)


def t_cdf(t: float, df: int, steps: int = 4000) -> float:
    """P(T <= t): 1/2 plus the density integrated from 0 to t (Simpson's rule; error far below 1e-9 here)."""
    h = t / steps
    inner = sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + h / 3 * (t_pdf(0.0, df) + inner + t_pdf(t, df))


@cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t, p in (0.5, 1): bisection on t_cdf."""
    low, high = 0.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` with its Student-t interval."""
    if len(values) < 2:
        raise ValueError(f"an interval needs at least 2 values, got {len(values)}")
    mean = statistics.mean(values)
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a - b over paired seeds: a[i] and b[i] come from the same seed."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs two lists of the same length, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], confidence)


def prediction_interval(
    values: list[float], confidence: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float]:
    """Where one more draw (a new seed, or the same seed on another machine) falls with this confidence:
    mean +- t(n - 1) * sd * sqrt(1 + 1/n), the seeds taken as normal, cut to the values the quantity can
    take (`bounds`: a score cannot leave [0, 100]). Used for the ranges the documents quote, which must
    hold for a newcomer's run, not only for the study's seeds."""
    n, mean, sd = len(values), statistics.mean(values), statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd * math.sqrt(1 + 1 / n)
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])

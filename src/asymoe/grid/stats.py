"""Statistics over seeds: mean, sample std, Student-t confidence interval, Welch's two-sample interval.

For a group with n finished seeds x_1..x_n (n >= 2): s = sqrt(sum (x_i - mean)^2 / (n - 1)) and
the 95% interval of the mean is mean ± t_{0.975, n-1} · s / sqrt(n).

A group g is compared with the grid's reference group r by Welch's unequal-variance t interval
for the difference of means: d = mean_g - mean_r, se = sqrt(s_g²/n_g + s_r²/n_r), degrees of
freedom from the Welch–Satterthwaite equation
    df = se⁴ / ((s_g²/n_g)² / (n_g - 1) + (s_r²/n_r)² / (n_r - 1)),
interval d ± t_{0.975, df} · se; the difference is *beyond noise* when that interval excludes 0.
The two-sided p-value of the same test is 2·P(T_df > |d| / se).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95
# How tables and charts mark a difference whose interval excludes 0.
NOISE_MARK = "*"


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (df may be fractional)."""
    return float(student_t.ppf(probability, df))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def confidence_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean; None for fewer than two values."""
    mean, std = mean_std(values)
    if std is None:
        return None
    half = t_quantile(0.5 + level / 2, len(values) - 1) * std / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class Difference:
    """`mean(group) - mean(reference)` with Welch's interval."""

    diff: float
    low: float
    high: float
    df: float
    p_value: float

    @property
    def beyond_noise(self) -> bool:
        return self.low > 0 or self.high < 0


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom from two sample variances and sizes."""
    a, b = var_a / n_a, var_b / n_b
    return (a + b) ** 2 / (a**2 / (n_a - 1) + b**2 / (n_b - 1))


def welch_difference(group: list[float], reference: list[float], level: float = LEVEL) -> Difference | None:
    """Welch's interval for mean(group) - mean(reference).

    None when either side has fewer than two values, or when both have zero spread (the test
    is undefined: identical seeds say nothing about noise).
    """
    if len(group) < 2 or len(reference) < 2:
        return None
    (mean_g, std_g), (mean_r, std_r) = mean_std(group), mean_std(reference)
    var_g, var_r = std_g**2, std_r**2
    se = math.sqrt(var_g / len(group) + var_r / len(reference))
    if se == 0:
        return None
    df = welch_df(var_g, len(group), var_r, len(reference))
    diff = mean_g - mean_r
    half = t_quantile(0.5 + level / 2, df) * se
    p_value = float(2 * student_t.sf(abs(diff) / se, df))
    return Difference(diff, diff - half, diff + half, df, p_value)

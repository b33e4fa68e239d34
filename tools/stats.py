"""Statistics for a record claim: mean, sample standard deviation, and the one-sided one-sample Student t-test
that a set of seeds improves on the current SOTA val_loss by at least 0.005 nats (the challenge's bar, to be
shown at p < 0.01). The t distribution is computed here, from the regularized incomplete beta function, so the
record tooling needs nothing beyond the standard library (no scipy).

    python3 tools/stats.py --sota-val-loss 1.8822 1.8741 1.8752 1.8736
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

MIN_GAIN_NATS = 0.005  # a record must beat the SOTA val_loss by at least this much ...
ALPHA = 0.01  # ... at this significance level


def mean(xs: list[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return math.fsum(xs) / len(xs)


def sample_std(xs: list[float]) -> float | None:
    """Standard deviation with Bessel's correction (divisor n-1), the estimate the t-test uses; None for a
    single value, where it is undefined."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method; it converges fast for
    x < (a+1)/(a+b+2), which the caller guarantees by symmetry."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        # two terms per m: the even coefficient d_{2m}, then the odd one d_{2m+1}
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float, one_minus_x: float | None = None) -> float:
    """I_x(a, b). one_minus_x may be passed when 1-x is known more exactly than by subtraction (x near 1)."""
    y = 1.0 - x if one_minus_x is None else one_minus_x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)  # the log of whichever of x, 1-x is the more exact
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    log_front = a * log_x + b * log_y + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom: the one-sided p-value of a statistic t.
    Uses P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2), with 1-x = t^2/(df+t^2) computed directly."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    two_sided = regularized_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return 0.5 * two_sided if t >= 0 else 1.0 - 0.5 * two_sided


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return student_t_sf(-t, df)


@dataclass
class ImprovementTest:
    """The outcome of improvement_test; t and p are None when the test cannot be run (a single seed)."""

    n: int
    mean: float
    std: float | None
    sota: float
    threshold: float
    t: float | None
    df: int | None
    p: float | None
    note: str

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA

    def statement(self) -> str:
        """The test in words and its result, for a record README."""
        lines = [
            f"One-sided one-sample t-test, df=n-1" + (f"={self.df}" if self.df else "") + ", "
            f"H0: mean(val_loss) >= SOTA - {MIN_GAIN_NATS} "
            f"= {self.sota:.6f} - {MIN_GAIN_NATS} = {self.threshold:.6f}; H1: mean(val_loss) < {self.threshold:.6f}.",
            f"t = (SOTA - {MIN_GAIN_NATS} - mean) / (s / sqrt(n)), p = P(T_(n-1) >= t).",
            f"n = {self.n}, mean = {self.mean:.6f}, s = " + ("undefined" if self.std is None else f"{self.std:.6f}")
            + f", improvement over SOTA = {self.sota - self.mean:.6f} nats.",
        ]
        if self.p is None:
            lines.append(f"No test possible: {self.note}")
        else:
            verdict = "significant" if self.significant else "not significant"
            lines.append(f"t = {self.t:.4f}, p = {self.p:.3g}: {verdict} at p < {ALPHA}"
                         + (f" ({self.note})" if self.note else "") + ".")
        return "\n".join(lines)


def improvement_test(val_losses: list[float], sota: float, min_gain: float = MIN_GAIN_NATS) -> ImprovementTest:
    """Test H0: mean >= sota - min_gain against H1: mean < sota - min_gain (one-sided, df = n-1)."""
    n, m, s, threshold = len(val_losses), mean(val_losses), sample_std(val_losses), sota - min_gain
    if n < 2:
        return ImprovementTest(n, m, s, sota, threshold, None, None, None,
                               "one seed gives no estimate of the variance; run at least 2 (usually 3) seeds.")
    if s == 0:
        # every seed scored the same: the statistic is +-infinite and the p-value degenerate (0 or 1)
        t = math.inf if m < threshold else -math.inf if m > threshold else math.nan
        p = 0.0 if m < threshold else 1.0
        return ImprovementTest(n, m, s, sota, threshold, t, n - 1, p,
                               "all seeds scored the same, s = 0, so p is exactly 0 or 1")
    t = (threshold - m) / (s / math.sqrt(n))
    return ImprovementTest(n, m, s, sota, threshold, t, n - 1, student_t_sf(t, n - 1), "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sota-val-loss", type=float, required=True, help="the current record's val_loss")
    ap.add_argument("val_losses", type=float, nargs="+", help="val_loss of each seed")
    args = ap.parse_args(argv)
    print(improvement_test(args.val_losses, args.sota_val_loss).statement())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

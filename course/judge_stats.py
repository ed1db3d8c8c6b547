"""The statistics of scores you can trust: bootstrap intervals and how far two judges agree.

Everything is computed here with numpy, so that each step can be read; the tests check every
number against SciPy's and scikit-learn's on data whose answer is known (identical judges agree
perfectly, a shuffled judge about not at all).

* ``bootstrap_ci``: a percentile bootstrap interval of any statistic of one or more paired
  samples (the items are resampled together), from a fixed seed, so reruns agree.
* ``pearson``, ``spearman`` (Pearson on average ranks), ``kendall_tau_b`` (with ties),
  ``weighted_kappa`` (Cohen's kappa with linear or quadratic weights, for small integer
  rubrics), ``mean_abs_diff``.
* ``agreement``: all of them for two judges' scores of the same entries, each correlation with
  its interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 123


def bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic(*samples)``.

    The samples are paired (same length): each resample draws item indices with replacement
    and takes the same items from every sample. Resamples where the statistic is undefined
    (nan, e.g. a correlation of constant scores) are left out; none defined gives (nan, nan).
    """
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    values = np.array([statistic(*(a[idx] for a in arrays)) for idx in draws], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


def mean_with_ci(values: Sequence[float], **kwargs) -> dict:
    """{"mean": ..., "ci95": [low, high]} of ``values`` (None for no values)."""
    if not len(values):
        return {"mean": None, "ci95": None}
    low, high = bootstrap_ci(np.mean, values, **kwargs)
    return {"mean": float(np.mean(values)), "ci95": [low, high]}


def mean_and_spread(values: Sequence[float | None]) -> dict:
    """Mean, standard deviation (n - 1; None below two values) and count of the known values
    (None and nan left out): how a metric varies across seeds."""
    known = [float(v) for v in values if v is not None and np.isfinite(v)]
    return {
        "mean": float(np.mean(known)) if known else None,
        "std": float(np.std(known, ddof=1)) if len(known) > 1 else None,
        "n_seeds": len(known),
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; nan when either sample is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / denominator, -1.0, 1.0))


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=ranks)
    return sums[group] / counts[group]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) pairs, corrected for ties in either sample."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    untied_x, untied_y = np.count_nonzero(sx), np.count_nonzero(sy)
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float((sx * sy).sum() / np.sqrt(float(untied_x) * float(untied_y)))


def weighted_kappa(
    a: Sequence[int], b: Sequence[int], labels: Sequence[int], weights: str = "quadratic"
) -> float:
    """Cohen's kappa of two raters over the ordered ``labels``, disagreements weighted by
    their distance (``"linear"``) or its square (``"quadratic"``); nan when chance agreement
    is perfect (both raters always give one and the same label)."""
    index = {label: k for k, label in enumerate(labels)}
    k = len(labels)
    observed = np.zeros((k, k))
    np.add.at(observed, ([index[v] for v in a], [index[v] for v in b]), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    distance = np.abs(np.subtract.outer(np.arange(k), np.arange(k))).astype(float)
    w = distance if weights == "linear" else distance**2
    chance = (w * expected).sum()
    if chance == 0:
        return float("nan")
    return float(1 - (w * observed).sum() / chance)


def mean_abs_diff(x: Sequence[float], y: Sequence[float]) -> float:
    """The mean absolute difference between paired scores."""
    return float(np.mean(np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float))))


CORRELATIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "pearson": pearson,
    "spearman": spearman,
    "kendall": kendall_tau_b,
}


def agreement(
    a: Sequence[float], b: Sequence[float], labels: Sequence[int] | None = None, **kwargs
) -> dict:
    """How far two judges' paired scores agree: each correlation with its bootstrap interval
    (``{"value", "ci95"}``), the mean absolute difference with its interval, and, for a rubric
    of ``labels`` (e.g. 1..5), the quadratic-weighted Cohen's kappa with its interval."""
    result: dict = {"n": len(a)}
    statistics = dict(CORRELATIONS, mean_abs_diff=mean_abs_diff)
    if labels is not None:
        statistics["weighted_kappa"] = lambda x, y: weighted_kappa(x, y, labels)
    for name, statistic in statistics.items():
        value = statistic(a, b) if len(a) > 1 else float("nan")
        low, high = bootstrap_ci(statistic, a, b, **kwargs) if len(a) > 1 else (None, None)
        result[name] = {"value": _finite(value), "ci95": [_finite(low), _finite(high)]}
    return result


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)

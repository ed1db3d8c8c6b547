"""judge_stats: every statistic equals SciPy's / scikit-learn's, and known answers come out."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from course import judge_stats as js


def _scores(seed: int, n: int = 110, low: int = 1, high: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, n)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_and_kappa_equal_scipy_and_sklearn_on_tied_scores(seed: int) -> None:
    a = _scores(seed)
    b = np.clip(a + np.random.default_rng(seed + 50).integers(-1, 2, len(a)), 1, 5)
    assert js.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert js.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert js.kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    for weights in ("linear", "quadratic"):
        expected = cohen_kappa_score(a, b, weights=weights, labels=[1, 2, 3, 4, 5])
        assert js.weighted_kappa(a, b, range(1, 6), weights) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(js.average_ranks(a), stats.rankdata(a))


def test_continuous_scores_equal_scipy() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(size=60)
    b = a + rng.normal(size=60)
    assert js.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert js.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert js.kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_identical_judges_agree_perfectly_and_a_shuffled_judge_about_not_at_all() -> None:
    a = _scores(1, n=1000)
    same = js.agreement(a, a, labels=range(1, 6), n_resamples=100)
    for name in ("pearson", "spearman", "kendall", "weighted_kappa"):
        assert same[name]["value"] == pytest.approx(1.0)
        assert same[name]["ci95"] == pytest.approx([1.0, 1.0])
    assert same["mean_abs_diff"]["value"] == 0
    shuffled = np.random.default_rng(2).permutation(a)
    other = js.agreement(shuffled, a, labels=range(1, 6), n_resamples=100)
    for name in ("pearson", "spearman", "kendall", "weighted_kappa"):
        assert abs(other[name]["value"]) < 0.08, name
        low, high = other[name]["ci95"]
        assert low < 0 < high, name  # the interval covers "no agreement"


def test_reversed_judge_gives_minus_one() -> None:
    a = np.arange(20)
    assert js.pearson(a, -a) == pytest.approx(-1)
    assert js.kendall_tau_b(a, -a) == pytest.approx(-1)


def test_bootstrap_interval_is_reproducible_and_matches_scipy_percentile_bootstrap() -> None:
    values = _scores(3, n=110, low=0, high=100)
    first = js.bootstrap_ci(np.mean, values)
    assert first == js.bootstrap_ci(np.mean, values)  # a fixed seed: reruns agree
    assert first[0] < values.mean() < first[1]
    scipy_ci = stats.bootstrap(
        (values,), np.mean, n_resamples=4000, method="percentile", random_state=0
    ).confidence_interval
    # two different random draws of the same interval: they agree to within a point
    assert first[0] == pytest.approx(scipy_ci.low, abs=1.0)
    assert first[1] == pytest.approx(scipy_ci.high, abs=1.0)
    # the interval is about mean +- 1.96 standard errors
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert (first[1] - first[0]) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_undefined_statistics_are_none_not_errors() -> None:
    constant = [3] * 10
    result = js.agreement(constant, constant, labels=range(1, 6))
    assert result["pearson"]["value"] is None and result["weighted_kappa"]["value"] is None
    assert result["mean_abs_diff"]["value"] == 0
    assert js.mean_with_ci([]) == {"mean": None, "ci95": None}
    assert js.agreement([4], [4])["pearson"] == {"value": None, "ci95": [None, None]}


def test_mean_and_spread_across_seeds_equals_the_statistics_module() -> None:
    import statistics

    values = [0.41, 0.55, 0.47]
    spread = js.mean_and_spread([*values, None, float("nan")])
    assert spread["mean"] == pytest.approx(statistics.mean(values))
    assert spread["std"] == pytest.approx(statistics.stdev(values))
    assert spread["n_seeds"] == 3
    assert js.mean_and_spread([0.5]) == {"mean": 0.5, "std": None, "n_seeds": 1}

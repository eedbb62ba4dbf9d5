"""The statistics of the reports: the Wilcoxon signed-rank p-value (exact, against SciPy) and the bootstrap interval
of a mean paired difference."""

from __future__ import annotations

import random

import pytest

from pituning.errors import ConfigError
from pituning.report import bootstrap_interval, paired_statistics, wilcoxon_p


def test_wilcoxon_matches_scipy_exactly() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        diffs = [
            rng.choice([-3.5, -2.0, -1.0, 0.0, 1.0, 2.5, 4.0, 6.0]) * rng.random() for _ in range(rng.randint(1, 14))
        ]
        if not any(diffs):
            continue
        expected = stats.wilcoxon(diffs, zero_method="wilcox", method="exact").pvalue
        assert wilcoxon_p(diffs) == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked > 250


def test_wilcoxon_with_ties_and_zeros() -> None:
    assert wilcoxon_p([]) == 1.0 and wilcoxon_p([0.0, 0.0]) == 1.0
    # five positive differences: the smallest two-sided p is 2 / 2**5
    assert wilcoxon_p([1.0, 1.0, 2.0, 2.0, 3.0]) == pytest.approx(2 / 32)
    assert wilcoxon_p([1.0, -1.0, 2.0, -2.0]) == pytest.approx(1.0)  # balanced: no evidence


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_pairs() -> None:
    rng = random.Random(1)
    few = [rng.gauss(1.0, 2.0) for _ in range(6)]
    many = [rng.gauss(1.0, 2.0) for _ in range(200)]
    low, high = bootstrap_interval(few)
    assert low <= sum(few) / len(few) <= high
    low_many, high_many = bootstrap_interval(many)
    assert high_many - low_many < high - low and low_many < 1.0 < high_many + 0.5
    assert bootstrap_interval([2.0]) == (2.0, 2.0)
    assert bootstrap_interval(few, seed=3) == bootstrap_interval(few, seed=3)
    with pytest.raises(ConfigError, match="at least one"):
        bootstrap_interval([])


def test_paired_statistics_in_points() -> None:
    d = paired_statistics([0.75, 0.625, 0.5], [0.5, 0.5, 0.5])
    assert d["mean"] == pytest.approx(12.5) and d["n"] == 3 and d["wins"] == 2
    assert d["ci_low"] <= d["mean"] <= d["ci_high"] and 0.0 < d["p"] <= 1.0 and d["level"] == 0.95


def test_the_quality_benchmarks_spearman_matches_scipy_with_ties() -> None:
    """benchmarks/quality/run.py ranks predictors by torchmetrics' Spearman: tie-averaged ranks, as SciPy's; a
    constant side is no measured correlation (nan)."""
    import importlib.util
    import math
    import sys
    from pathlib import Path

    stats = pytest.importorskip("scipy.stats")
    spec = importlib.util.spec_from_file_location(
        "quality_run", Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run.py"
    )
    assert spec is not None and spec.loader is not None
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality_run"] = quality  # its dataclasses look their module up
    try:
        spec.loader.exec_module(quality)
    finally:
        del sys.modules["quality_run"]
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(3, 10)
        x = [rng.choice([0.1, 0.2, rng.random()]) for _ in range(n)]
        y = [rng.choice([0.5, rng.random()]) for _ in range(n)]
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert quality.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-5)
    assert math.isnan(quality.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))

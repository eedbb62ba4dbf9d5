"""Reporting: expert quality, paired differences, the machine a result was measured on, and a suite's markdown.

Plain Python and torch (no Lightning), shared by ``pituning run``, the benchmarks and the examples.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pituning.errors import ConfigError

__all__ = [
    "METHOD_TITLES",
    "ExpertQuality",
    "bootstrap_interval",
    "comparison",
    "expert_quality",
    "machine",
    "paired_difference",
    "paired_statistics",
    "quality_table",
    "suite_markdown",
    "summarise",
    "wilcoxon_p",
]

METHOD_TITLES = {
    "alone": "expert alone",
    "best_source_init": "best source as init",
    "uniform_average": "uniform top-k average",
    "pi": "π-Tuning",
}
"""Table titles of a suite's methods."""


@dataclass(frozen=True)
class ExpertQuality:
    """A trained expert on its own task's test set."""

    acc: float
    """Accuracy."""
    majority_share: float
    """Share of the test set given the expert's most predicted class."""
    true_majority_share: float
    """Share of the test set's most frequent class (always predicting it scores this accuracy)."""

    @property
    def collapsed(self) -> bool:
        """No better than always predicting the majority class (half a point of slack): the expert learned the class
        prior and nothing else, so interpolating it only moves the target towards that prior."""
        return self.acc <= self.true_majority_share + 0.005

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "collapsed": self.collapsed}


def expert_quality(predicted: torch.Tensor, labels: torch.Tensor) -> ExpertQuality:
    """Quality of class predictions against labels (1-D integer tensors of one length; labels ``< 0`` are ignored).

    >>> q = expert_quality(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    >>> q.acc, q.majority_share, q.true_majority_share, q.collapsed
    (0.75, 1.0, 0.75, True)
    """
    if predicted.shape != labels.shape or predicted.dim() != 1:
        raise ConfigError(f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)}: give two 1-D tensors "
                          "of one length.")  # fmt: skip
    keep = labels >= 0
    predicted, labels = predicted[keep], labels[keep]
    if labels.numel() == 0:
        raise ConfigError("No labelled example to judge the expert on: give a test set with labels.")
    n = labels.numel()
    return ExpertQuality(
        acc=float((predicted == labels).sum()) / n,
        majority_share=float(predicted.unique(return_counts=True)[1].max()) / n,
        true_majority_share=float(labels.unique(return_counts=True)[1].max()) / n,
    )


def quality_table(quality: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table (one line per row) of :meth:`ExpertQuality.to_dict` results by expert name.

    >>> print("\\n".join(quality_table({"cars": expert_quality(torch.tensor([1, 1]), torch.tensor([1, 0])).to_dict()})))
    | source | accuracy | most predicted class share | majority class share | collapsed |
    | --- | --- | --- | --- | --- |
    | cars | 0.5000 | 1.00 | 0.50 | **yes** |
    """
    lines = [
        "| source | accuracy | most predicted class share | majority class share | collapsed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, q in quality.items():
        checked = ExpertQuality(q["acc"], q["majority_share"], q["true_majority_share"])
        lines.append(
            f"| {name} | {checked.acc:.4f} | {checked.majority_share:.2f} | {checked.true_majority_share:.2f} | "
            + ("**yes**" if checked.collapsed else "no")
            + " |"
        )
    return lines


def paired_difference(ours: list[float], theirs: list[float], *, scale: float = 100.0) -> dict[str, Any]:
    """Paired difference ``ours - theirs`` times ``scale`` (100: points of accuracy; 1: accuracy): mean, sample std
    (0 for one pair), how many pairs ``ours`` wins, and ``n``.

    >>> d = paired_difference([0.75, 0.625], [0.5, 0.625])
    >>> d["mean"], round(d["std"], 2), d["wins"], d["n"]
    (12.5, 17.68, 1, 2)
    """
    if len(ours) != len(theirs) or not ours:
        raise ConfigError(f"Paired results need two equally long, non-empty lists; got {len(ours)} and {len(theirs)}.")
    diffs = [scale * (a - b) for a, b in zip(ours, theirs, strict=True)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"mean": statistics.fmean(diffs), "std": std, "wins": sum(d > 0 for d in diffs), "n": len(diffs)}


def bootstrap_interval(
    diffs: Sequence[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``: ``resamples`` resamples with replacement (seeded), the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means. One value gives ``(value, value)``.

    >>> bootstrap_interval([1.0, 2.0, 3.0, 4.0])
    (1.5, 3.5)
    """
    if not diffs:
        raise ConfigError("A bootstrap interval needs at least one paired difference.")
    values = torch.tensor(list(diffs), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(values), (resamples, len(values)), generator=gen)
    means = values[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that the paired differences are centred on zero.

    Zeros are dropped (Wilcoxon's convention) and tied magnitudes get their average rank; the p-value is exact (the
    null distribution of the positive rank sum enumerated over every sign assignment, by dynamic programming on doubled
    ranks), so it is valid for the few pairs a benchmark has. No difference left gives 1.

    >>> round(wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]), 4)
    0.0625
    >>> wilcoxon_p([0.0, 0.0])
    1.0
    """
    nonzero = [d for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nonzero[i]))
    doubled = [0] * n  # 2 x the average rank: integers even with ties
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(nonzero[order[j + 1]]) == abs(nonzero[order[i]]):
            j += 1
        for m in range(i, j + 1):
            doubled[order[m]] = i + j + 2  # ranks i+1 .. j+1, averaged, doubled
        i = j + 1
    total = sum(doubled)
    counts = [0] * (total + 1)  # counts[w]: sign assignments whose positive doubled-rank sum is w
    counts[0] = 1
    for r in doubled:
        for w in range(total, r - 1, -1):
            counts[w] += counts[w - r]
    observed = sum(r for r, d in zip(doubled, nonzero, strict=True) if d > 0)
    all_ = 2**n
    below = sum(counts[: observed + 1]) / all_
    above = sum(counts[observed:]) / all_
    return min(1.0, 2 * min(below, above))


def paired_statistics(
    ours: list[float], theirs: list[float], *, scale: float = 100.0, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """:func:`paired_difference` with how sure it is: a ``level`` bootstrap interval of the mean difference
    (``ci_low``, ``ci_high``) and the Wilcoxon signed-rank p-value (``p``)."""
    summary = paired_difference(ours, theirs, scale=scale)
    diffs = [scale * (a - b) for a, b in zip(ours, theirs, strict=True)]
    low, high = bootstrap_interval(diffs, level=level, seed=seed)
    return {**summary, "ci_low": low, "ci_high": high, "level": level, "p": wilcoxon_p(diffs)}


def machine() -> dict[str, Any]:
    """Where a result was measured: platform, CPU model and count, GPU (when there is one), Python, torch and pituning
    versions."""
    from pituning import __version__

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pituning": __version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean accuracy per method and π-Tuning's paired difference from every other method over ``rows``."""
    return {
        "mean": {m: statistics.fmean(r[m] for r in rows) if rows else None for m in methods},
        "paired": {
            m: paired_statistics([r["pi"] for r in rows], [r[m] for r in rows]) for m in methods if m != "pi" and rows
        },
    }


def suite_markdown(
    quality: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> list[str]:
    """The lines of a suite's ``results.md``: the source check, one row per target and seed, the means and the paired
    differences."""
    summary = summarise(rows, methods)
    lines = [
        "Source experts on their own test sets (collapsed: no better than always predicting the majority class):",
        "",
        *quality_table(quality),
        "",
        "| target | seed | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " | sources (mean weight) |",
        "| --- | --- |" + " --- |" * (len(methods) + 1),
    ]
    for r in rows:
        weights = ", ".join(f"{n} {r['mean_weights'].get(n, float('nan')):.2f}" for n in r["sources"])
        lines.append(
            f"| {r['target']} | {r['seed']} | " + " | ".join(f"{r[m]:.4f}" for m in methods) + f" | {weights} |"
        )
    if rows:
        lines.append("| **mean** | | " + " | ".join(f"{summary['mean'][m]:.4f}" for m in methods) + " | |")
        lines += ["", "π-Tuning minus each method, paired over the same target, seed, shots and epochs (points):", ""]
        for m, d in summary["paired"].items():
            lines.append(
                f"- {METHOD_TITLES.get(m, m)}: {d['mean']:+.2f} ± {d['std']:.2f}, 95% interval "
                f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}], Wilcoxon p {d['p']:.3f} (π ahead in {d['wins']} of "
                f"{d['n']})"
            )
    return lines


def comparison(accuracy: Mapping[str, float], weights: Mapping[str, float]) -> str:
    """Lines comparing methods' accuracies, then the mean interpolation weights of π-Tuning's pool.

    >>> print(comparison({"LoRA alone": 0.5, "π-Tuning (k=1)": 0.75}, {"cars": 0.6, "cars_s0": 0.4}))
      LoRA alone                   0.5000
      π-Tuning (k=1)               0.7500
      mean interpolation weights: cars 0.60, cars_s0 0.40
    """
    lines = [f"  {name:<28} {acc:.4f}" for name, acc in accuracy.items()]
    lines.append("  mean interpolation weights: " + ", ".join(f"{n} {w:.2f}" for n, w in weights.items()))
    return "\n".join(lines)

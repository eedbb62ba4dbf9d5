"""Does similarity predict transfer? Each predictor's ranking of the candidate sources against their measured transfer,
with the field's ranking measures: weighted Kendall τ, Regret@1 / @3 and NDCG@3.

Reads the transfer studies of the quality benchmark (``benchmarks/results/transfer_<suite>.json``: per target and
seed, every candidate source's real transfer, fine-tuned from it and zero-shot, and each predictor's score) and
writes ``benchmarks/results/predictors.{md,json}``::

    python benchmarks/recycling/predictors.py

- weighted Kendall τ (SciPy's ``weightedtau``, hyperbolic weights): rank agreement that counts disagreements among
  the top sources most, in [-1, 1];
- Regret@k: the best measured transfer minus the best among the predictor's top k, in accuracy points (0: the
  predictor's top k hold the best source);
- NDCG@3: discounted gain of the predictor's top 3, gains = measured transfer minus the worst candidate's, normalised by
  the ideal order (1: the best three in order).
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SUITES = ("text", "vision", "vision_language")
NEEDS = {
    "fisher_probe": "each source's training data (its Fisher at a shared probe)",
    "fisher_own": "each source's training data (its Fisher at its own expert)",
    "few_shot_loss": "each source's weights and stored head: the target's shots read through that head where it fits "
    "the target (the library's default source-free ranking, `rank_sources`), else through a refitted one",
    "few_shot_loss_refit": "each source's weights only (a linear head refitted on the shots, held-out folds)",
    "fisher_at_source": "each source's weights only (the target's Fisher at the source vs at the target's expert)",
}
"""What each predictor needs besides the target's shots: the last two are source-free."""
SOURCE_FREE = ("few_shot_loss_refit", "fisher_at_source")


def regret(predicted: dict[str, float], measured: dict[str, float], k: int) -> float:
    """Best measured transfer minus the best among the predictor's top ``k`` (accuracy points)."""
    top = sorted(predicted, key=lambda s: -predicted[s])[:k]
    return 100.0 * (max(measured.values()) - max(measured[s] for s in top))


def ndcg(predicted: dict[str, float], measured: dict[str, float], k: int) -> float:
    """NDCG@k with gains ``measured - min(measured)``."""
    low = min(measured.values())
    gains = {s: measured[s] - low for s in measured}

    def dcg(order: list[str]) -> float:
        return sum(gains[s] / math.log2(i + 2) for i, s in enumerate(order[:k]))

    ideal = dcg(sorted(measured, key=lambda s: -measured[s]))
    return dcg(sorted(predicted, key=lambda s: -predicted[s])) / ideal if ideal > 0 else 1.0


def weighted_tau(predicted: dict[str, float], measured: dict[str, float]) -> float:
    from scipy.stats import weightedtau

    names = sorted(measured)
    return float(weightedtau([predicted[s] for s in names], [measured[s] for s in names]).statistic)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std of the defined values (a constant ranking has no τ: NaN, left out)."""
    defined = [float(x) for x in values if x == x]
    if not defined:
        return float("nan"), float("nan")
    return statistics.fmean(defined), statistics.pstdev(defined)


def main(results: Path = RESULTS) -> int:
    """Read ``results``/transfer_<suite>.json, write ``results``/predictors.{md,json}; 1 when nothing was ranked."""
    rows: list[dict[str, Any]] = []
    reproduced: dict[str, dict[str, float]] = {}  # suite -> predictor -> largest difference from the committed scores
    for suite in SUITES:
        path = results / f"transfer_{suite}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for run, found in data["runs"].items():
            for predictor, diff in found.get("reproduced", {}).items():
                worst = reproduced.setdefault(suite, {})
                worst[predictor] = max(worst.get(predictor, 0.0), diff)
            for measure in ("fine_tuned", "zero_shot"):
                measured = found.get(measure) or {}
                if len(measured) < 3:
                    continue
                for predictor, scores in found["predictors"].items():
                    common = {s: scores[s] for s in measured if s in scores}
                    if len(common) < 3:
                        continue
                    sub = {s: measured[s] for s in common}
                    rows.append(
                        {
                            "suite": suite,
                            "run": run,
                            "measure": measure,
                            "predictor": predictor,
                            "weighted_tau": weighted_tau(common, sub),
                            "regret1": regret(common, sub, 1),
                            "regret3": regret(common, sub, 3),
                            "ndcg3": ndcg(common, sub, 3),
                            "sources": len(common),
                        }
                    )
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = f"{row['suite']}|{row['predictor']}|{row['measure']}"
        summary.setdefault(key, {"runs": 0, **{m: [] for m in ("weighted_tau", "regret1", "regret3", "ndcg3")}})
        summary[key]["runs"] += 1
        for m in ("weighted_tau", "regret1", "regret3", "ndcg3"):
            summary[key][m].append(row[m])
    table = {k: {m: _mean_std(v[m]) for m in v if m != "runs"} for k, v in summary.items()}
    out = {
        "command": "python benchmarks/recycling/predictors.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [
            f"benchmarks/results/transfer_{s}.json" for s in SUITES if (results / f"transfer_{s}.json").exists()
        ],
        "rows": rows,
        "reproduced": reproduced,
        "summary": {k: {**table[k], "runs": summary[k]["runs"]} for k in table},
    }
    (results / "predictors.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# Does similarity predict transfer? Ranking measures",
        "",
        f"Command: `{out['command']}`  ",
        f"Date: {out['date']}  ",
        f"Inputs: {', '.join(out['inputs'])} (per target and seed, every candidate source's measured transfer and each "
        "predictor's score, from the quality benchmark's transfer study).",
        "",
        "Mean ± std over runs. Weighted Kendall τ: agreement of the predictor's ranking with the measured transfer, "
        "disagreements near the top weighing most. Regret@k: best measured transfer minus the best among the "
        "predictor's top k (points). NDCG@3: 1 is the best three in order.",
        "",
        "| suite | predictor | transfer | weighted τ | Regret@1 | Regret@3 | NDCG@3 | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(table):
        suite, predictor, measure = key.split("|")
        t = table[key]
        lines.append(
            f"| {suite} | {predictor} | {measure} | {t['weighted_tau'][0]:+.2f} ± {t['weighted_tau'][1]:.2f} | "
            f"{t['regret1'][0]:.2f} ± {t['regret1'][1]:.2f} | {t['regret3'][0]:.2f} ± {t['regret3'][1]:.2f} | "
            f"{t['ndcg3'][0]:.2f} ± {t['ndcg3'][1]:.2f} | {summary[key]['runs']} |"
        )
    found = sorted({k.split("|")[1] for k in table})
    lines += ["", "What each predictor needs besides the target's shots:", ""]
    lines += [f"- `{p}`: {NEEDS.get(p, 'see the transfer study')}" for p in found]
    if reproduced:
        lines += [
            "",
            "The scores come from the transfer studies' last run; where that run kept an earlier run's measured "
            "transfers and scored the predictors again (`--rescore`), the largest difference from the earlier scores, "
            "per suite and predictor (0: reproduced exactly; the scores are similarities in [0, 1] or negative "
            "losses): "
            + "; ".join(
                f"{s}: " + ", ".join(f"{p} {d:.1e}" for p, d in sorted(v.items())) for s, v in reproduced.items()
            )
            + ".",
        ]
    missing = [s for s in SUITES if not any(k.startswith(f"{s}|") and k.split("|")[1] in SOURCE_FREE for k in table)]
    if missing:
        lines += [
            "",
            f"Source-free predictors not measured yet on: {', '.join(missing)} (`python benchmarks/quality/run.py "
            "--suite <suite> --transfer --rescore` scores them against the committed transfers).",
        ]
    (results / "predictors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

"""Which way of reusing experts wins: every registered method on a benchmark suite, 16-shot, with paired confidence.

Each suite is the quality benchmark's (same backbone, sources, data and budgets), run through ``pituning run``'s
pipeline with every method of :data:`pituning.methods.METHODS` beside the target expert alone and π-Tuning. A target
never draws from the source of its own domain. Seeds run one at a time over every target (seed-major), so an
interrupted campaign has covered every target before it adds seeds; every part is cached, so the same command resumes
where it stopped. The results file is written after every (target, seed) pair and is itself the campaign's memory: a
later session, on a machine without the caches, keeps the rows measured under the same recipe (a fingerprint of the
backbone, sources, budgets and options; each method's values also need that method's options unchanged) and measures
only what is missing, a method added since included::

    python benchmarks/recycling/run.py --suite text                   # 4 targets x 5 seeds, every method
    python benchmarks/recycling/run.py --suite text --report-only     # tables from what is measured so far
    python benchmarks/recycling/run.py --suite text --smoke           # a few steps of everything (CI)
    python benchmarks/recycling/run.py --suite text_unrelated         # the same targets, sources of other labels

Results: ``benchmarks/results/recycling_<suite>.{json,md}`` (+ ``.png``): accuracy per method (mean ± std over
targets and seeds), paired differences against π-Tuning and against the best other method with 95% bootstrap
intervals and Wilcoxon p-values, wins, date, machine, and each session's command, time and load average.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))

import run as quality  # noqa: E402  (the quality benchmark's suites)

from pituning.config import SuiteConfig, TaskSpec  # noqa: E402
from pituning.methods import METHODS  # noqa: E402
from pituning.pipeline import plain, quiet  # noqa: E402
from pituning.report import machine, paired_statistics  # noqa: E402

TARGETS = {
    "text": ["jetblue", "southwestair", "apple", "united"],
    "vision": ["fm_target", "dg_target", "fm_tops", "dg_curly"],
    "vision_language": ["fmc_target", "fmc_target2", "emoji_animals", "fmc_tops"],
}
"""Four targets per suite: the quality suite's, then sources taken as targets (their own source left out of the pool:
fm_tops keeps fm_outer, which shares the pullover; dg_curly keeps dg_loop, which shares the 5; fmc_tops has no source
of its classes left)."""


def unrelated_text_suite(root: Path, smoke: bool) -> quality.Suite:
    """The text suite's targets (tweet sentiment) with sources that share none of their labels: tweets of other
    domains labelled by topic, airline, length or hashtag (``benchmarks/quality/data.py``'s ``unrelated_tweets``).
    Sentiment is in no source, so this is where reusing them can hurt the target."""
    suite = quality.text_suite(root, smoke)
    sources = [
        TaskSpec(name, str(path), {"label_names": names, "max_train_examples": 40 if smoke else 1200})
        for name, (path, names) in quality.suite_data.unrelated_tweets(root).items()
    ]
    folder = quality.suite_data.tweets(root)
    targets = [TaskSpec(t, str(folder / f"{t}.jsonl")) for t in TARGETS["text"][: 1 if smoke else None]]
    notes = (
        "Tweet sentiment targets (jetblue, southwestair, apple, united; 16 tweets per class, 10 epochs) with four "
        "sources on tweets of other domains whose labels are not sentiment: topic (cars, coachella, claritin, "
        "deflategate), carrier (americanair, usairways, virginamerica), length (word-count tercile) and hashtag (has "
        "one or not); 400 tweets per class, at most 1,200 per source, 3 epochs. Otherwise as the text suite."
    )
    return replace(suite, config=replace(suite.config, sources=sources), targets=targets, notes=notes)


SUITES = {
    "text": quality.text_suite,
    "vision": quality.vision_suite,
    "vision_language": quality.vision_language_suite,
    "text_unrelated": unrelated_text_suite,
}
SEEDS = [0, 1, 2, 3, 4]


def build(suite_name: str, work: Path, smoke: bool, seeds: list[int], methods: list[str]) -> SuiteConfig:
    """The suite's :class:`SuiteConfig` with its targets (named ``t_<domain>``, excluding their own domain's source),
    every method, and the quality benchmark's target budget."""
    suite = SUITES[suite_name](work / "data", smoke)
    cfg = suite.config
    wanted = TARGETS.get(suite_name) if not smoke else None
    known = {t.name: t for t in [*suite.targets, *cfg.sources]}
    chosen = [known[n] for n in wanted] if wanted else suite.targets
    sources = {s.name for s in cfg.sources}
    targets = [
        TaskSpec(
            f"t_{t.name}",
            t.dataset,
            {k: v for k, v in {**t.options, "batch_size": suite.target_batch}.items() if k != "max_train_examples"},
            exclude=[t.name] if t.name in sources else [],
        )
        for t in chosen
    ]
    options = {"lorahub": {"budget": 4 if smoke else 40}, "full_finetune": {"lr": suite.full_ft_lr}}
    return replace(
        cfg,
        targets=targets,
        seeds=seeds,
        methods=methods,
        method_options=options,
        target_epochs=suite.target_epochs["few"],
        embed_examples=32 if smoke else 128,
        output=str(work / suite_name),
        interpolation=replace(cfg.interpolation, **suite.pi),
    )


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def recipe(cfg: SuiteConfig, work: Path) -> str:
    """A fingerprint of everything that decides every measurement (backbone, sources, targets, budgets, options),
    with the work folder left out: rows measured under the same recipe in an earlier session are comparable. Each
    method's own options are not in it: changing them discards that method's values only (:func:`previous`)."""
    fields = {k: v for k, v in plain(cfg).items() if k not in ("output", "seeds", "methods", "method_options")}
    text = json.dumps(fields, sort_keys=True).replace(str(work), "<work>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def previous(out: Path, fingerprint: str, cfg: SuiteConfig) -> dict[str, Any]:
    """The committed results of earlier sessions (``out``.json) when they were measured under the same recipe, else
    nothing: the campaign outlives its caches, which a new machine does not have. A method whose options changed
    since (``cfg.method_options``) loses its values, to be measured again."""
    try:
        data = json.loads(out.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("recipe") != fingerprint:
        return {}
    then, now = data.get("method_options", {}), plain(cfg.method_options)
    changed = {m for m in {*then, *now} if then.get(m, {}) != now.get(m, {})}
    data["rows"] = [{k: v for k, v in row.items() if k not in changed} for row in data.get("rows", [])]
    return data


def measured_rows(cfg: SuiteConfig, earlier: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured (target, seed): the earlier sessions' values, overridden by this session's caches. A run
    over fewer targets or seeds than the committed rows (``--seeds 0``) keeps the others as they were."""
    runs = json.loads((Path(cfg.output) / "runs.json").read_text()) if (Path(cfg.output) / "runs.json").exists() else {}
    kept = {(r["target"], r["seed"]): r for r in earlier.get("rows", [])}
    targets, seeds = covered(cfg, earlier)
    rows: list[dict[str, Any]] = []
    for target in targets:
        for seed in seeds:
            name = f"{target}_s{seed}"
            row = dict(kept.get((target, seed), {"target": target, "seed": seed}))
            base = runs.get(name, {}).get("result")
            if base is not None:
                again = {m: base[m] for m in ("alone", "pi") if m in row and row[m] != base[m]}
                if again:  # measured anew for a method added since: the recipe should reproduce it exactly
                    print(f"warning: {name} measured {again} now, {[row[m] for m in again]} in the committed rows")
                row.update(alone=base["alone"], pi=base["pi"])
            for method in cfg.methods:
                measured = runs.get(f"{name}:{method}", {}).get("result")
                if measured is not None:
                    row[method] = measured["acc"]
            if "pi" in row:
                rows.append(row)
    return rows


def covered(cfg: SuiteConfig, earlier: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The targets and seeds of this run and of the committed rows, in that order (seeds sorted)."""
    targets = [t.name for t in cfg.targets]
    targets += [t for t in dict.fromkeys(r["target"] for r in earlier.get("rows", [])) if t not in targets]
    seeds = sorted({*cfg.seeds, *(r["seed"] for r in earlier.get("rows", []))})
    return targets, seeds


def method_list(cfg: SuiteConfig, earlier: dict[str, Any]) -> list[str]:
    """The methods of the tables: the target expert alone, π-Tuning, then the methods of this run and of the
    committed results in the registry's order (a run of a few methods, ``--methods ties``, keeps the others')."""
    wanted = {*cfg.methods, *(m for m in earlier.get("methods", []) if m not in ("alone", "pi"))}
    return ["alone", "pi", *[m for m in METHODS if m in wanted], *sorted(wanted - set(METHODS))]


def report(
    cfg: SuiteConfig, suite_name: str, out: Path, fingerprint: str, session: dict[str, Any] | None
) -> dict[str, Any]:
    """Tables from every measured target and seed (earlier sessions' committed rows and this session's caches),
    written to ``out`` (.json, .md, .png). ``session``: this run's command, start, seconds, load and note, added to
    the list of the sessions that measured the rows (``None`` for a report that measured nothing)."""
    earlier = previous(out, fingerprint, cfg)
    sessions = [s for s in earlier.get("sessions", []) if not session or s["started"] != session["started"]]
    sessions += [session] if session else []
    rows = measured_rows(cfg, earlier)
    methods = method_list(cfg, earlier)
    targets, seeds = covered(cfg, earlier)
    stats = compare(rows, methods)
    results = {
        "suite": suite_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": load_average(),
        "recipe": fingerprint,
        "method_options": plain(cfg.method_options),
        "seconds": round(sum(s["seconds"] for s in sessions), 1),
        "sessions": sessions,
        "targets": targets,
        "seeds": seeds,
        "methods": methods,
        "planned_pairs": len(targets) * len(seeds),
        "rows": rows,
        **stats,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(_markdown(results, cfg))
    _plot(results, out.with_suffix(".png"))
    write_goals(out.parent)
    return results


def best_of(rows: list[dict[str, Any]], candidates: list[str]) -> str | None:
    """The candidate with the highest mean accuracy among those measured on the most pairs, compared on the pairs
    that hold all of them (a method measured on two pairs cannot be "best" over one measured on twenty)."""
    count = {m: sum(m in r for r in rows) for m in candidates}
    most = max(count.values(), default=0)
    if not most:
        return None
    widest = [m for m in candidates if count[m] == most]
    common = [r for r in rows if all(m in r for m in widest)]
    return max(widest, key=lambda m: statistics.fmean(r[m] for r in common))


def compare(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Each method's accuracy over the pairs that hold it (``pairs_of``, ``mean``: mean and std), its paired
    difference from π-Tuning and from the best other method over the pairs that hold both, and the pair counts:
    ``pairs``, the (target, seed) pairs measured (π-Tuning and the target expert alone), ``complete_pairs``, those
    holding every method. A campaign may run a few methods on every pair and every method on a few; no table is cut
    down to the pairs that hold every method."""

    pairs_of = {m: sum(m in r for r in rows) for m in methods}
    mean = {
        m: (statistics.fmean(v), statistics.pstdev(v)) if (v := [r[m] for r in rows if m in r]) else None
        for m in methods
    }
    others = [m for m in methods if m != "pi" and pairs_of[m]]
    best = best_of(rows, others)
    return {
        "pairs": len(rows),
        "complete_pairs": sum(all(m in r for m in methods) for r in rows),
        "pairs_of": pairs_of,
        "mean": mean,
        "best_other": best,
        "pi_minus": {m: d for m in others if (d := _paired(rows, "pi", m))},
        "minus_best_other": {m: d for m in methods if m != best and best and (d := _paired(rows, m, best))},
    }


def _markdown(res: dict[str, Any], cfg: SuiteConfig) -> str:
    lines = [
        f"# Reusing experts: {res['suite']} suite, 16-shot",
        "",
        f"Date: {res['date']}  ",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cpus']} cores, torch {res['machine']['torch']}  ",
        f"Targets: {', '.join(res['targets'])}; seeds {res['seeds']}; k={cfg.k}; {cfg.shots} shots per class; "
        f"{cfg.target_epochs} target epochs for every method that trains.  ",
        f"Recipe fingerprint: `{res['recipe']}` (rows of earlier sessions are kept only under the same one).  ",
        f"Method options: `{json.dumps(res['method_options'], sort_keys=True)}` (a method's values are kept only under "
        "the same options).  ",
        f"Measured (target, seed) pairs: **{res['pairs']} of {res['planned_pairs']} planned**, every method on "
        f"{res['complete_pairs']} of them (each method's count in its row; a mean is over that method's pairs, a "
        "difference over the pairs that hold both methods).",
        "",
        f"Measured in {len(res['sessions'])} session(s), {res['seconds'] / 3600:.1f} hours of wall time on the machine "
        "above in all:",
        "",
    ]
    for s in res["sessions"]:
        lines.append(
            f"- {s['started']}: `{s['command']}`, {s['seconds'] / 60:.0f} min, load average at its last write "
            f"{s['load_average']}" + (f". {s['note']}" if s["note"] else "")
        )
    lines.append("")
    if not res["pairs"]:
        return "\n".join([*lines, "Nothing measured yet.", ""])
    lines += [
        "| method | pairs | accuracy (mean ± std) | π-Tuning minus it (points) | 95% interval | Wilcoxon p | π wins |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    order = _order(res)
    for m in order:
        mu, sd = res["mean"][m]
        d = res["pi_minus"].get(m)
        cells = (
            [
                f"{d['mean']:+.2f}",
                f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]",
                f"{d['p']:.3f}",
                f"{d['wins']}/{d['n']}",
            ]
            if d
            else ["", "", "", ""]
        )
        lines.append(f"| {m} | {res['pairs_of'][m]} | {mu:.4f} ± {sd:.4f} | " + " | ".join(cells) + " |")
    best = res["best_other"]
    lines += ["", f"Best method other than π-Tuning: **{best}**. Each method minus it (points):", ""]
    lines += ["| method | mean | 95% interval | Wilcoxon p | wins |", "| --- | --- | --- | --- | --- |"]
    for m in order:
        d = res["minus_best_other"].get(m)
        if d:
            lines.append(
                f"| {m} | {d['mean']:+.2f} | [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] | {d['p']:.3f} | "
                f"{d['wins']}/{d['n']} |"
            )
    lines += ["", "Per target and seed:", "", "| target | seed | " + " | ".join(res["methods"]) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(res["methods"]))
    for r in res["rows"]:
        lines.append(
            f"| {r['target']} | {r['seed']} | "
            + " | ".join(f"{r[m]:.4f}" if m in r else "" for m in res["methods"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def _order(res: dict[str, Any]) -> list[str]:
    """The measured methods, those on the most pairs first, each group by mean accuracy, best first."""
    measured = [m for m in res["methods"] if res["mean"].get(m)]
    return sorted(measured, key=lambda m: (-res["pairs_of"][m], -res["mean"][m][0]))


def _plot(res: dict[str, Any], path: Path) -> None:
    """Methods x accuracy, with the 95% interval of each method's mean (bootstrap over pairs)."""
    if not res["pairs"]:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from pituning.report import bootstrap_interval

    order = _order(res)[::-1]
    means = [res["mean"][m][0] for m in order]
    lows, highs = zip(*(bootstrap_interval([r[m] for r in res["rows"] if m in r]) for m in order), strict=True)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(order) + 1.2), constrained_layout=True)
    ax.errorbar(
        means,
        range(len(order)),
        xerr=[
            [m - lo for m, lo in zip(means, lows, strict=True)],
            [hi - m for m, hi in zip(means, highs, strict=True)],
        ],
        fmt="o",
        color="black",
        ecolor="gray",
        capsize=3,
    )
    ax.set_yticks(range(len(order)), [f"{m} ({res['pairs_of'][m]})" for m in order])
    ax.set_xlabel("test accuracy (mean over each method's target-seed pairs, in brackets; 95% bootstrap interval)")
    ax.set_title(f"{res['suite']} suite, 16-shot")
    fig.savefig(path, dpi=120)
    plt.close(fig)


VARIANTS_AND_CONTROLS = ("random_pool", "random_parameters", "random_pool_without_target", "pi_without_target")
"""Not "other methods" for the goal: π-Tuning's variants (``pi_*``) and the controls."""
GOAL_POINTS = 3.0
"""The goal's margin, in accuracy points."""


def _paired(rows: list[dict[str, Any]], ours: str, theirs: str) -> dict[str, Any] | None:
    """``ours`` minus ``theirs`` (:func:`paired_statistics`), over the rows holding both (``None`` where none does)."""
    both = [r for r in rows if ours in r and theirs in r]
    return paired_statistics([r[ours] for r in both], [r[theirs] for r in both]) if both else None


def _check(rows: list[dict[str, Any]], ours: str, theirs: str, points: float) -> dict[str, Any] | None:
    """``ours`` minus ``theirs``, paired over the rows holding both, and whether it is at least ``points`` with its
    95% interval above zero (``None`` where no row holds both)."""
    stats = _paired(rows, ours, theirs)
    if stats is None:
        return None
    return {"ours": ours, "theirs": theirs, **stats, "met": stats["mean"] >= points and stats["ci_low"] > 0}


def write_goals(folder: Path) -> dict[str, Any]:
    """The goal, checked on every suite's results in ``folder`` (``recycling_<suite>.json``), to
    ``recycling_goals.{json,md}``: π-Tuning at least 3 points above the best other method with its 95% interval above
    zero; the selected pool without the target expert at least 3 points above a random pool without it; π-Tuning never
    significantly below the target expert alone (its interval's upper end not below zero)."""
    suites = {}
    for path in sorted(folder.glob("recycling_*.json")):
        res = json.loads(path.read_text())
        if path.stem == "recycling_goals" or "rows" not in res:
            continue
        rows = [r for r in res["rows"] if "pi" in r]
        others = [m for m in res["methods"] if m != "pi" and not m.startswith("pi_") and m not in VARIANTS_AND_CONTROLS]
        best = best_of(rows, others)  # among the methods measured on the most pairs, on the pairs holding them all
        alone = _check(rows, "pi", "alone", 0.0)
        suites[res["suite"]] = {
            "pairs": res["pairs"],
            "planned_pairs": res["planned_pairs"],
            "rows": len(rows),
            "pi_minus_best_other": _check(rows, "pi", best, GOAL_POINTS) if best else None,
            "selected_minus_random_pool": _check(rows, "pi_without_target", "random_pool_without_target", GOAL_POINTS),
            "pi_minus_alone": alone and {**alone, "met": alone["ci_high"] >= 0},
        }
    goals = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "goal_points": GOAL_POINTS,
        "suites": suites,
    }
    (folder / "recycling_goals.json").write_text(json.dumps(goals, indent=1))
    (folder / "recycling_goals.md").write_text(_goals_markdown(goals))
    return goals


def _goals_markdown(goals: dict[str, Any]) -> str:
    def cell(check: dict[str, Any] | None, label: bool = False) -> str:
        if check is None:
            return "not measured"
        pairs = f"{check['n']} pair" + ("s" if check["n"] != 1 else "")
        text = f"{check['mean']:+.2f} [{check['ci_low']:+.2f}, {check['ci_high']:+.2f}] ({pairs})"
        return (f"{check['theirs']}: " if label else "") + text + (" **met**" if check["met"] else " **not met**")

    lines = [
        "# Reusing experts: the goal, checked",
        "",
        f"Date: {goals['date']}. Written by `python benchmarks/recycling/run.py` from every "
        "`recycling_<suite>.json` beside it, after each measured pair. Paired differences in accuracy points, mean "
        "and 95% bootstrap interval, over the (target, seed) pairs that hold both methods. The goals: π-Tuning (the "
        f"library default) at least {goals['goal_points']:.0f} points above the best other method (π-Tuning's "
        "variants and the controls are not other methods), interval above zero; the selected pool at least "
        f"{goals['goal_points']:.0f} points above a random pool when the target expert is left out; π-Tuning never "
        "significantly below the target expert alone (the interval's upper end at or above zero).",
        "",
        "| suite | pairs (measured / planned) | π minus the best other method | selected minus random pool, no "
        "target expert | π minus the target expert alone |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, g in goals["suites"].items():
        lines.append(
            f"| {name} | {g['pairs']} / {g['planned_pairs']} | {cell(g['pi_minus_best_other'], label=True)} | "
            f"{cell(g['selected_minus_random_pool'])} | {cell(g['pi_minus_alone'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="text")
    parser.add_argument("--smoke", action="store_true", help="Tiny versions of everything (CI).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"Default {SEEDS} (smoke: [0]).")
    parser.add_argument("--methods", nargs="+", default=None, help="Default: every registered method.")
    parser.add_argument("--work", default=str(REPO / "outputs" / "recycling"), help="Data, banks and caches.")
    parser.add_argument("--out", default=None, help="Results file stem (default benchmarks/results/recycling_<suite>).")
    parser.add_argument(
        "--report-only", action="store_true", help="Write the tables from what is cached; train nothing."
    )
    parser.add_argument("--note", default="", help="A line for the results (how the CPU budget was spent).")
    args = parser.parse_args(argv)
    quiet()
    from pituning.suite import run_suite

    seeds = args.seeds or ([0] if args.smoke else SEEDS)
    work = Path(args.work) / ("smoke" if args.smoke else "full")
    cfg = build(args.suite, work, args.smoke, seeds, [])
    supported = [m for m in METHODS if cfg.task_type in METHODS[m].task_types]  # those refitting a head: not matching
    cfg = replace(cfg, methods=args.methods or supported)
    stem = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"recycling_{args.suite}"
    command = "python benchmarks/recycling/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fingerprint = recipe(cfg, work)
    start = time.perf_counter()

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def write(measuring: bool = True) -> dict[str, Any]:
        session = {
            "command": command,
            "started": started,
            "seconds": round(time.perf_counter() - start, 1),
            "load_average": load_average(),
            "note": args.note,
        }
        return report(cfg, args.suite, stem, fingerprint, session if measuring else None)

    measured = False
    if not args.report_only:
        for seed in seeds:  # seed-major: every target at this seed before the next seed
            for target in cfg.targets:
                rows = {(r["target"], r["seed"]): r for r in measured_rows(cfg, previous(stem, fingerprint, cfg))}
                row = rows.get((target.name, seed), {})
                missing = [m for m in cfg.methods if m not in row]
                if "pi" in row and not missing:
                    continue
                # a committed row that lacks a method (one added since) gets that method only: the target expert
                # alone and π-Tuning, which it starts from, are measured again on a machine without the caches
                run_suite(replace(cfg, seeds=[seed], targets=[target], methods=missing if "pi" in row else cfg.methods))
                measured = True
                write()  # after every pair: an interrupted campaign loses at most the pair it was on
    results = write(measuring=measured)
    print(stem.with_suffix(".md").read_text())
    return 0 if results["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())

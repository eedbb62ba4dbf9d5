"""A whole π-Tuning suite from one config: source experts, embeddings, task graph, then per target and seed the
target expert alone, π-Tuning and the suite's other methods, evaluated on a fixed test set.

Used by ``pituning run --config suite.yaml``; every stage writes its artifact (bank entries, embeddings, graph,
results), so a suite can be inspected and resumed. :func:`run_suite` composes the stage functions of
:mod:`pituning.pipeline` and the reporting of :mod:`pituning.report`; the names below are re-exported from there.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pituning.config import SuiteConfig, TaskSpec
from pituning.errors import ConfigError, ExpertError
from pituning.methods import check_methods
from pituning.pipeline import (
    ResumeCache,
    check_inputs,
    evaluate_quality,
    make_probe,
    rank_zero,
    run_target,
    train_source,
)
from pituning.report import ExpertQuality, expert_quality, machine, paired_difference, quality_table, suite_markdown
from pituning.report import summarise as _summarise

__all__ = [
    "ExpertQuality",
    "SuiteConfig",
    "TaskSpec",
    "evaluate_quality",
    "expert_quality",
    "machine",
    "make_probe",
    "paired_difference",
    "quality_table",
    "run_suite",
]


def _usable(cfg: SuiteConfig, quality: dict[str, dict[str, Any]], say: Any) -> list[str]:
    """The candidate sources after the collapsed-source policy (warn, exclude or stop)."""
    for name, found in quality.items():
        if not found["collapsed"]:
            continue
        message = (
            f"source {name} is no better than always predicting its majority class (test accuracy "
            f"{found['acc']:.4f}, majority class share {found['true_majority_share']:.4f})"
        )
        if cfg.collapsed_sources == "error":
            raise ExpertError(
                f"{message}. Train it longer or on more data (source_epochs, data.max_train_examples), or set "
                "collapsed_sources: warn or exclude."
            )
        say(f"WARNING {message}" + ("; left out of the candidates" if cfg.collapsed_sources == "exclude" else ""))
    return [n for n in quality if not (cfg.collapsed_sources == "exclude" and quality[n]["collapsed"])]


def _library(cfg: SuiteConfig, bank: Any, say: Any) -> list[str]:
    """The library's experts, copied into the suite's bank (rank zero; an entry already there is kept): the candidate
    sources that come without their data."""
    if cfg.library is None:
        return []
    from pituning.bank import ExpertBank
    from pituning.pipeline import rank_zero_first

    library = ExpertBank(cfg.library, create=False)
    names = [e.name for e in library.list()]
    if not names:
        raise ConfigError(f"The library {cfg.library} holds no expert; import PEFT adapters into it first.")

    def copy() -> None:
        for name in names:
            if name not in bank:
                bank.add(library.get(name))

    rank_zero_first(copy)
    say(f"library: {len(names)} expert(s) from {cfg.library}")
    return names


def _each(items: list[Any], stage: str, say: Any, run: Any) -> list[Any]:
    """``run`` over ``items``, saying after each how many are done and about how long the rest will take: the mean
    time of the items that ran (those read from the cache, in under 0.2 s, left out); no estimate until one ran."""
    out, took = [], []
    for i, item in enumerate(items):
        begun = time.perf_counter()
        out.append(run(item))
        took.append(time.perf_counter() - begun)
        left = len(items) - i - 1
        if left:
            ran = [t for t in took if t >= 0.2]
            eta = f", about {_duration(sum(ran) / len(ran) * left)} left" if ran else ""
            say(f"{stage}: {i + 1} of {len(items)} done{eta}")
    return out


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Run the suite; returns (and writes to ``output``) the results. The config was checked when it was built; its
    methods, data, backbone and output are checked (:func:`~pituning.pipeline.check_inputs`) before anything loads."""
    from pituning.bank import ExpertBank
    from pituning.graph import TaskGraph

    check_methods(cfg)
    check_inputs(cfg)  # every input, before anything loads or trains
    root, start = Path(cfg.output), time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    bank = ExpertBank(root / "bank")

    def say(text: str) -> None:
        if rank_zero():
            print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    probe = (
        make_probe(cfg.backbone, cfg.expert, bank, backbone_task=cfg.backbone_task)
        if cfg.probe == "random"
        else cfg.probe
    )
    sources_cache, runs_cache = ResumeCache(root / "sources.json"), ResumeCache(root / "runs.json")
    done = dict(
        zip(
            [t.name for t in cfg.sources],
            _each(cfg.sources, "sources", say, lambda t: train_source(cfg, root, t, probe, sources_cache, say)),
            strict=True,
        )
    )
    quality = {name: result["quality"] for name, result in done.items()}
    candidates = _usable(cfg, quality, say) + _library(cfg, bank, say)
    if cfg.k > len(candidates):
        raise ConfigError(
            f"k={cfg.k} but only {len(candidates)} source(s) are usable (collapsed ones excluded, library included); "
            "lower k or train the sources longer."
        )
    rows = _each(
        [(task, seed) for task in cfg.targets for seed in cfg.seeds],
        "targets x seeds",
        say,
        lambda pair: run_target(cfg, root, pair[0], pair[1], candidates, probe, runs_cache, say, sources_cache.data),
    )
    names = [t.name for t in cfg.sources] + [f"{t.name}_s{s}" for t in cfg.targets for s in cfg.seeds]
    graph = TaskGraph.from_bank(bank, names)
    if not rank_zero():  # the other ranks are done: rank zero writes the graph and the results
        return {"rows": rows, "sources": quality}
    files = graph.save(root / "graph")
    try:
        files.update(graph.plot(root / "graph"))
    except ConfigError as err:  # matplotlib missing: the JSON/CSV are there
        say(str(err))
    methods = ["alone", *[m for m in cfg.methods if rows and m in rows[0]], "pi"]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": asdict(cfg),
        "sources": quality,
        "rows": rows,
        **_summarise(rows, methods),
        "graph": files,
        "seconds": time.perf_counter() - start,
    }
    from pituning.storage import write_file_atomic

    lines = suite_markdown(quality, rows, methods)
    write_file_atomic(root / "results.json", json.dumps(results, indent=1, default=str).encode())
    write_file_atomic(root / "results.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    say(f"done: bank, graph and results in {root.resolve()}")
    return results

"""A whole π-Tuning suite from one config: source experts, embeddings, task graph, then per target and seed the
target expert alone and π-Tuning, evaluated on a fixed test set.

Used by ``pituning run --config suite.yaml``; every stage writes its artifact (bank entries, embeddings, graph,
results), so a suite can be inspected and resumed.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.errors import ConfigError, ExpertError

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

log = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """One task of a suite."""

    name: str
    """Task and expert name (letters, digits, ``_``, ``-``)."""
    dataset: str
    """Dataset file, directory or name (the DataModule's ``dataset``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra DataModule options for this task only (``classes``, ``text_column`` ...)."""


@dataclass
class SuiteConfig:
    """A π-Tuning suite: sources, targets, expert kind, k, shots and seeds."""

    backbone: str
    """Hub name or local directory of the frozen backbone."""
    data_class: str
    """DataModule class: ``pituning.data.TextClassificationDataModule`` or another :class:`TaskDataModule`."""
    sources: list[TaskSpec]
    """Source tasks (full data, capped by ``data.max_train_examples``)."""
    targets: list[TaskSpec]
    """Target tasks (``shots`` per class)."""
    data: dict[str, Any] = field(default_factory=dict)
    """DataModule options shared by every task (``tokenizer``, ``batch_size``, ``max_length`` ...)."""
    expert: dict[str, Any] = field(default_factory=lambda: {"kind": "lora", "r": 8, "alpha": 16})
    """Expert config with its ``kind``."""
    k: int = 3
    """Sources interpolated per target."""
    shots: int = 16
    """Training examples per class of each target."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (shots and initialisation); the test set is fixed per target."""
    output: str = "outputs/run"
    """Output folder: the bank, the graph, the results."""
    module: dict[str, Any] = field(default_factory=dict)
    """ExpertTrainingModule options (``lr``, ``weight_decay`` ...)."""
    interpolation: dict[str, Any] = field(default_factory=dict)
    """InterpolationModule options (``mode``, ``logits_lr``, ``weights_only_steps`` ...)."""
    source_epochs: int = 3
    """Epochs of source expert training."""
    target_epochs: int = 10
    """Epochs of target training (alone and π-Tuning get the same)."""
    probe: str | None = "random"
    """Where Fisher embeddings are taken: ``random`` (one shared random expert), ``null`` (each task's own expert),
    or a bank expert name."""
    estimator: str = "per_sample"
    """Fisher estimator."""
    embed_examples: int | None = None
    """Training examples of a source in its Fisher pass (a random subset of its training split; ``None``: all it was
    trained on). The per-sample Fisher costs about one forward and backward per example, and a few hundred examples
    give a stable embedding."""
    precision: str = "32-true"
    """Lightning precision (``bf16-mixed`` ...)."""
    accelerator: str = "auto"
    """Lightning accelerator."""
    baselines: list[str] = field(default_factory=lambda: ["best_source_init", "uniform_average"])
    """Extra baselines on the same shots and epochs: ``best_source_init`` (the top-ranked source expert and its
    head, fine-tuned) and ``uniform_average`` (the parameter average of the top-k sources, fine-tuned)."""
    devices: Any = 1
    """Lightning devices."""
    collapsed_sources: Literal["warn", "exclude", "error"] = "warn"
    """What to do with a source expert that is no better than always predicting its majority class (checked on its
    own test set right after training): ``warn`` (use it, flag it in the log and the results), ``exclude`` (leave it
    out of every target's candidates) or ``error`` (stop with an ``ExpertError``)."""


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


def quality_table(quality: dict[str, dict[str, Any]]) -> list[str]:
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


def evaluate_quality(module: Any, dataloader: Any) -> ExpertQuality:
    """:func:`expert_quality` of a trained :class:`~pituning.modules.ExpertTrainingModule` over ``dataloader`` (its
    task's test set), on the module's device, in eval mode (restored afterwards). When the module was fit by a
    Trainer, its precision applies as in ``Trainer.test`` (``bf16-true`` inputs are cast, ``bf16-mixed`` autocasts)."""
    import contextlib

    try:
        trainer = module.trainer
    except (AttributeError, RuntimeError):  # a plain module, or one no Trainer fit
        trainer = None
    plugin = getattr(trainer, "precision_plugin", None)
    context = plugin.test_step_context() if plugin is not None else contextlib.nullcontext()
    was_training = module.training
    module.eval()
    predicted, labels = [], []
    try:
        with torch.no_grad(), context:
            for batch in dataloader:
                batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if plugin is not None:
                    batch = plugin.convert_input(batch)
                predicted.append(module.predict_classes(batch).cpu())
                labels.append(module.class_labels(batch).cpu())
    finally:
        module.train(was_training)
    if not predicted:
        raise ConfigError("The test dataloader is empty: the expert's quality cannot be checked.")
    return expert_quality(torch.cat(predicted), torch.cat(labels))


def make_probe(backbone: str, config: dict[str, Any], bank: ExpertBank, *, name: str = "probe", seed: int = 0) -> str:
    """Store a shared probe expert: ``config``'s kind with every parameter ``N(0, 0.1)`` (non-zero, so every tensor
    has a Fisher), used to embed every task at one common point, as Task2Vec does with its probe network.

    A probe already in the bank is reused when it was made from the same backbone, config and seed, and replaced
    otherwise (a stale probe would not fit the experts of the new config)."""
    from pituning.backbones import load_backbone
    from pituning.experts.base import config_from_dict
    from pituning.model import ExpertModel

    wanted = config_from_dict(config)
    if name in bank:
        stored = bank.get(name)
        same_config = len({json.dumps(c.to_dict(), sort_keys=True) for c in (stored.config, wanted)}) == 1
        same_origin = stored.backbone.source == str(backbone) and stored.provenance.get("probe_seed") == seed
        if same_config and same_origin:
            return name
    model = ExpertModel(load_backbone(backbone))
    model.add_expert(name, wanted)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    probe = Expert.from_model(model, name, TaskInfo(name, modality="other"), provenance={"probe_seed": seed})
    bank.add(probe, overwrite=True)
    return name


def paired_difference(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """Paired difference ``ours - theirs`` in points (accuracy x 100): mean, sample std (0 for one pair), how many
    pairs ``ours`` wins, and ``n``.

    >>> d = paired_difference([0.75, 0.625], [0.5, 0.625])
    >>> d["mean"], round(d["std"], 2), d["wins"], d["n"]
    (12.5, 17.68, 1, 2)
    """
    if len(ours) != len(theirs) or not ours:
        raise ConfigError(f"Paired results need two equally long, non-empty lists; got {len(ours)} and {len(theirs)}.")
    diffs = [100.0 * (a - b) for a, b in zip(ours, theirs, strict=True)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"mean": statistics.fmean(diffs), "std": std, "wins": sum(d > 0 for d in diffs), "n": len(diffs)}


def machine() -> dict[str, Any]:
    """Where a result was measured: platform, CPU model and count, GPU (when there is one), Python, torch and pituning
    versions."""
    import os
    import platform

    import pituning

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pituning": pituning.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    import platform
    import re

    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so a stored recipe compares equal."""
    return json.loads(json.dumps(value, default=str))


def _rank_zero() -> bool:
    """Global rank zero, or a single process. Under DDP's subprocess launcher every rank runs the whole suite; Lightning
    reads each one's rank from the environment it starts them with."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _rank_zero_first(write: Callable[[], Any]) -> None:
    """Run a bank write on rank zero only, then hold every rank until it is done (when a process group is up)."""
    if _rank_zero():
        write()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _loggers(root: Path, name: str) -> list[Any]:
    """CSV logs always; TensorBoard too when ``tensorboard`` is installed."""
    import importlib.util

    import lightning.pytorch as pl

    loggers: list[Any] = [pl.loggers.CSVLogger(str(root / "logs"), name=name)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(pl.loggers.TensorBoardLogger(str(root / "tensorboard"), name=name))
    return loggers


def _trainer(cfg: SuiteConfig, root: Path, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,  # type: ignore[arg-type]
        logger=_loggers(root, kwargs.pop("name", "stage")),
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


def _datamodule(cfg: SuiteConfig, task: TaskSpec, **extra: Any) -> Any:
    import importlib

    module_name, _, class_name = cfg.data_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"data_class {cfg.data_class!r} cannot be imported ({err}).") from err
    return cls(dataset=task.dataset, task_name=task.name, **{**cfg.data, **task.options, **extra})


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Run the suite; returns (and writes to ``output``) the results."""
    import lightning.pytorch as pl

    from pituning.graph import TaskGraph
    from pituning.modules import ExpertTrainingModule, InterpolationModule, TaskEmbeddingModule

    if cfg.k > len(cfg.sources):
        raise ConfigError(f"k={cfg.k} but the suite has only {len(cfg.sources)} source task(s); lower k.")
    if cfg.embed_examples is not None and cfg.embed_examples < 1:
        raise ConfigError(
            f"embed_examples must be at least 1 (or null for every training example), got {cfg.embed_examples}."
        )
    if cfg.collapsed_sources not in ("warn", "exclude", "error"):
        raise ConfigError(f"collapsed_sources must be warn, exclude or error, got {cfg.collapsed_sources!r}.")
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    bank = ExpertBank(root / "bank")
    location = str(root / "bank")
    start = time.perf_counter()

    def say(text: str) -> None:
        if _rank_zero():
            print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    probe = cfg.probe
    if probe == "random":
        probe = make_probe(cfg.backbone, cfg.expert, bank)

    def embed(name: str, datamodule: Any) -> int:
        """Embed task ``name``; returns how many examples its Fisher saw."""
        module = TaskEmbeddingModule(cfg.backbone, location, name, probe=probe, estimator=cfg.estimator)
        trainer = _trainer(cfg, root, name=f"embed-{name}", inference_mode=False)
        trainer.predict(module, datamodule=datamodule)
        return module.examples

    done_file = root / "sources.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    quality: dict[str, dict[str, Any]] = {}
    for task in cfg.sources:
        recipe = {
            "backbone": cfg.backbone, "task": asdict(task), "data": cfg.data, "expert": cfg.expert,
            "module": cfg.module, "epochs": cfg.source_epochs, "probe": probe, "estimator": cfg.estimator,
            "embed_examples": cfg.embed_examples,
        }  # fmt: skip
        recipe = _plain(recipe)
        stored = done.get(task.name, {})
        if (
            {k: v for k, v in stored.items() if k not in ("quality", "embedded_examples")} == recipe
            and "quality" in stored
            and task.name in bank
            and bank.entry(task.name).has_embedding
        ):
            say(f"source {task.name}: in the bank already, from the same recipe")
            quality[task.name] = stored["quality"]
        else:
            say(f"source {task.name}: training the expert")
            pl.seed_everything(0, verbose=False)
            datamodule = _datamodule(cfg, task)
            module = ExpertTrainingModule(cfg.backbone, cfg.expert, task.name, location, overwrite=True, **cfg.module)
            _trainer(cfg, root, name=f"source-{task.name}", max_epochs=cfg.source_epochs).fit(module, datamodule)
            checked = evaluate_quality(module, datamodule.test_dataloader())
            quality[task.name] = checked.to_dict()
            say(
                f"source {task.name}: test accuracy {checked.acc:.4f}, most predicted class on "
                f"{checked.majority_share:.0%} of the test set (majority class {checked.true_majority_share:.0%})"
            )
            trained_on = task.options.get("max_train_examples", cfg.data.get("max_train_examples"))
            cap = [c for c in (trained_on, cfg.embed_examples) if c is not None]
            seen = embed(task.name, _datamodule(cfg, task, max_train_examples=min(cap)) if cap else datamodule)
            say(f"source {task.name}: embedded (Fisher over {seen} examples)")
            done[task.name] = {**recipe, "quality": quality[task.name], "embedded_examples": seen}
            if _rank_zero():  # under DDP every rank runs this loop (Lightning re-runs the command on each)
                done_file.write_text(json.dumps(done, indent=1, default=str))
        found = quality[task.name]
        if found["collapsed"]:
            message = (
                f"source {task.name} is no better than always predicting its majority class (test accuracy "
                f"{found['acc']:.4f}, majority class share {found['true_majority_share']:.4f})"
            )
            if cfg.collapsed_sources == "error":
                raise ExpertError(
                    f"{message}. Train it longer or on more data (source_epochs, data.max_train_examples), or set "
                    "collapsed_sources: warn or exclude."
                )
            say(f"WARNING {message}" + ("; left out of the candidates" if cfg.collapsed_sources == "exclude" else ""))
            if _rank_zero():
                log.warning(message)
    candidates = [
        s.name for s in cfg.sources if not (cfg.collapsed_sources == "exclude" and quality[s.name]["collapsed"])
    ]
    if cfg.k > len(candidates):
        raise ConfigError(
            f"k={cfg.k} but only {len(candidates)} source(s) are usable after excluding collapsed ones; lower k or "
            "train the sources longer."
        )

    rows: list[dict[str, Any]] = []
    runs_file = root / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    for task in cfg.targets:
        for seed in cfg.seeds:
            name = f"{task.name}_s{seed}"
            # everything a target's row depends on, the sources it may draw from included
            run_recipe = {
                "task": asdict(task), "seed": seed, "shots": cfg.shots, "data": cfg.data, "expert": cfg.expert,
                "module": cfg.module, "interpolation": cfg.interpolation, "epochs": cfg.target_epochs, "k": cfg.k,
                "baselines": cfg.baselines, "precision": cfg.precision, "probe": probe, "estimator": cfg.estimator,
                "sources": {c: done.get(c) for c in candidates},
            }  # fmt: skip
            run_recipe = _plain(run_recipe)
            if runs.get(name, {}).get("recipe") == run_recipe and f"{name}_pi" in bank:
                say(f"target {name}: measured already, from the same recipe")
                rows.append(runs[name]["row"])
                continue
            datamodule = _datamodule(cfg, task, shots_per_class=cfg.shots, seed=seed)
            say(f"target {name}: expert alone ({cfg.shots} shots per class)")
            pl.seed_everything(seed, verbose=False)
            alone = ExpertTrainingModule(cfg.backbone, cfg.expert, name, location, overwrite=True, **cfg.module)
            trainer = _trainer(cfg, root, name=f"alone-{name}", max_epochs=cfg.target_epochs)
            trainer.fit(alone, datamodule)
            alone_acc = trainer.test(alone, datamodule, verbose=False)[0]["test_acc"]
            embed(name, datamodule)
            say(f"target {name}: π-Tuning with k={cfg.k}")
            pl.seed_everything(seed, verbose=False)
            options = {**cfg.module, **cfg.interpolation}
            pi = InterpolationModule(
                cfg.backbone,
                location,
                name,
                k=cfg.k,
                candidates=candidates,
                overwrite=True,
                **options,
            )
            trainer = _trainer(cfg, root, name=f"pi-{name}", max_epochs=cfg.target_epochs)
            trainer.fit(pi, datamodule)
            pi_acc = trainer.test(pi, datamodule, verbose=False)[0]["test_acc"]
            ranked = [n for n, _ in pi.selected]
            extra: dict[str, float] = {}
            for baseline in cfg.baselines:
                if not ranked:
                    break
                if baseline == "best_source_init":
                    start_from = ranked[0]
                elif baseline == "uniform_average":
                    start_from = f"{name}_avg"
                    _rank_zero_first(functools.partial(bank.average, ranked, name=start_from, overwrite=True))
                else:
                    raise ConfigError(f"Unknown baseline {baseline!r}; use best_source_init or uniform_average.")
                say(f"target {name}: baseline {baseline} (from {start_from})")
                pl.seed_everything(seed, verbose=False)
                module = ExpertTrainingModule(
                    cfg.backbone, cfg.expert, f"{name}_{baseline}", location, init_from=start_from, overwrite=True,
                    **cfg.module,
                )  # fmt: skip
                trainer = _trainer(cfg, root, name=f"{baseline}-{name}", max_epochs=cfg.target_epochs)
                trainer.fit(module, datamodule)
                extra[baseline] = float(trainer.test(module, datamodule, verbose=False)[0]["test_acc"])
            rows.append(
                {
                    "target": task.name,
                    "seed": seed,
                    "alone": float(alone_acc),
                    **extra,
                    "pi": float(pi_acc),
                    "sources": [n for n, _ in pi.selected],
                    "similarities": dict(pi.selected),
                    "mean_weights": pi.mean_weights() if pi.stored is None else pi.stored.provenance["mean_weights"],
                }
            )
            say(f"target {name}: alone {alone_acc:.4f}, π-Tuning {pi_acc:.4f}")
            runs[name] = {"recipe": run_recipe, "row": _plain(rows[-1])}
            if _rank_zero():  # a rerun (after a crash, or with more seeds) skips the targets measured already
                runs_file.write_text(json.dumps(runs, indent=1, default=str))

    graph = TaskGraph.from_bank(
        bank, [t.name for t in cfg.sources] + [f"{t.name}_s{s}" for t in cfg.targets for s in cfg.seeds]
    )
    if not _rank_zero():  # the other ranks are done: rank zero writes the graph and the results
        return {"rows": rows, "sources": quality}
    files = graph.save(root / "graph")
    try:
        files.update(graph.plot(root / "graph"))
    except ConfigError as err:  # matplotlib missing: the JSON/CSV are there
        say(str(err))
    methods = ["alone", *[b for b in cfg.baselines if rows and b in rows[0]], "pi"]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": asdict(cfg),
        "sources": quality,
        "rows": rows,
        "mean": {m: statistics.fmean(r[m] for r in rows) if rows else None for m in methods},
        "paired": {
            m: paired_difference([r["pi"] for r in rows], [r[m] for r in rows]) for m in methods if m != "pi" and rows
        },
        "graph": files,
        "seconds": time.perf_counter() - start,
    }
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    titles = {"alone": "expert alone", "best_source_init": "best source as init",
              "uniform_average": "uniform top-k average", "pi": "π-Tuning"}  # fmt: skip
    lines = [
        "Source experts on their own test sets (collapsed: no better than always predicting the majority class):",
        "",
        *quality_table(quality),
        "",
        "| target | seed | " + " | ".join(titles[m] for m in methods) + " | sources (mean weight) |",
        "| --- | --- |" + " --- |" * (len(methods) + 1),
    ]
    for r in rows:
        weights = ", ".join(f"{n} {r['mean_weights'].get(n, float('nan')):.2f}" for n in r["sources"])
        lines.append(
            f"| {r['target']} | {r['seed']} | " + " | ".join(f"{r[m]:.4f}" for m in methods) + f" | {weights} |"
        )
    if rows:
        lines.append("| **mean** | | " + " | ".join(f"{results['mean'][m]:.4f}" for m in methods) + " | |")
        lines += ["", "π-Tuning minus each method, paired over the same target, seed, shots and epochs (points):", ""]
        for m, d in results["paired"].items():
            lines.append(f"- {titles[m]}: {d['mean']:+.2f} ± {d['std']:.2f} (π ahead in {d['wins']} of {d['n']})")
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    say(f"done: bank, graph and results in {root.resolve()}")
    return results

"""A whole π-Tuning suite from one config: source experts, embeddings, task graph, then per target and seed the
target expert alone and π-Tuning, evaluated on a fixed test set.

Used by ``pituning run --config suite.yaml``; every stage writes its artifact (bank entries, embeddings, graph,
results), so a suite can be inspected and resumed.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.errors import ConfigError

__all__ = ["SuiteConfig", "TaskSpec", "make_probe", "run_suite"]

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
    precision: str = "32-true"
    """Lightning precision (``bf16-mixed`` ...)."""
    accelerator: str = "auto"
    """Lightning accelerator."""
    baselines: list[str] = field(default_factory=lambda: ["best_source_init", "uniform_average"])
    """Extra baselines on the same shots and epochs: ``best_source_init`` (the top-ranked source expert and its
    head, fine-tuned) and ``uniform_average`` (the parameter average of the top-k sources, fine-tuned)."""
    devices: Any = 1
    """Lightning devices."""


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
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    bank = ExpertBank(root / "bank")
    location = str(root / "bank")
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    probe = cfg.probe
    if probe == "random":
        probe = make_probe(cfg.backbone, cfg.expert, bank)

    def embed(name: str, datamodule: Any) -> None:
        module = TaskEmbeddingModule(cfg.backbone, location, name, probe=probe, estimator=cfg.estimator)
        trainer = _trainer(cfg, root, name=f"embed-{name}", inference_mode=False)
        trainer.predict(module, datamodule=datamodule)

    done_file = root / "sources.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for task in cfg.sources:
        recipe = {
            "backbone": cfg.backbone, "task": asdict(task), "data": cfg.data, "expert": cfg.expert,
            "module": cfg.module, "epochs": cfg.source_epochs, "probe": probe, "estimator": cfg.estimator,
        }  # fmt: skip
        if done.get(task.name) == recipe and task.name in bank and bank.entry(task.name).has_embedding:
            say(f"source {task.name}: in the bank already, from the same recipe")
            continue
        say(f"source {task.name}: training the expert")
        pl.seed_everything(0, verbose=False)
        datamodule = _datamodule(cfg, task)
        module = ExpertTrainingModule(cfg.backbone, cfg.expert, task.name, location, overwrite=True, **cfg.module)
        _trainer(cfg, root, name=f"source-{task.name}", max_epochs=cfg.source_epochs).fit(module, datamodule)
        say(f"source {task.name}: embedding")
        embed(task.name, datamodule)
        done[task.name] = json.loads(json.dumps(recipe, default=str))
        done_file.write_text(json.dumps(done, indent=1, default=str))

    rows: list[dict[str, Any]] = []
    for task in cfg.targets:
        for seed in cfg.seeds:
            name = f"{task.name}_s{seed}"
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
                candidates=[s.name for s in cfg.sources],
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
                    bank.average(ranked, name=start_from, overwrite=True)
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

    graph = TaskGraph.from_bank(
        bank, [t.name for t in cfg.sources] + [f"{t.name}_s{s}" for t in cfg.targets for s in cfg.seeds]
    )
    files = graph.save(root / "graph")
    try:
        files.update(graph.plot(root / "graph"))
    except ConfigError as err:  # matplotlib missing: the JSON/CSV are there
        say(str(err))
    methods = ["alone", *[b for b in cfg.baselines if rows and b in rows[0]], "pi"]
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "rows": rows,
        "mean": {m: statistics.fmean(r[m] for r in rows) if rows else None for m in methods},
        "graph": files,
        "seconds": time.perf_counter() - start,
    }
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    titles = {"alone": "expert alone", "best_source_init": "best source as init",
              "uniform_average": "uniform top-k average", "pi": "π-Tuning"}  # fmt: skip
    lines = [
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
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    say(f"done: bank, graph and results in {root.resolve()}")
    return results

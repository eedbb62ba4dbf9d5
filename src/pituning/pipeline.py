"""The pipeline's stage functions: make a trainer and a DataModule, train and check a source, embed a task, train a
target, interpolate, run a baseline, and a resume cache. ``pituning run`` (:func:`pituning.suite.run_suite`), the
benchmarks and the examples compose these instead of writing their own.

Every function takes the typed :class:`~pituning.config.SuiteConfig` (or its parts), so an option is validated once,
where the config is built.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.config import InterpolationConfig, SuiteConfig, TaskSpec
from pituning.errors import ConfigError
from pituning.report import ExpertQuality, expert_quality

__all__ = [
    "Clock",
    "ResumeCache",
    "TrainerFactory",
    "alone_then_pi",
    "check_inputs",
    "embed_task",
    "evaluate_quality",
    "fit_test",
    "interpolate",
    "make_datamodule",
    "make_probe",
    "make_trainer",
    "measure_accuracy",
    "plain",
    "plain_trainer",
    "quiet",
    "rank_zero",
    "rank_zero_first",
    "run_baseline",
    "run_target",
    "save_graph",
    "stage_kwargs",
    "train_and_embed_sources",
    "train_expert",
    "train_source",
    "write_results",
]

log = logging.getLogger(__name__)

TrainerFactory = Callable[..., Any]
"""Makes a Lightning ``Trainer`` from keyword settings (``max_epochs`` ...): :func:`plain_trainer`, or a stage's
default, :func:`make_trainer` with the suite's settings and loggers."""


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths and dataclasses plain), so a stored recipe
    compares equal to a fresh one."""
    return json.loads(json.dumps(value, default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v)))


def rank_zero() -> bool:
    """Global rank zero, or a single process. Under DDP's subprocess launcher every rank runs the whole pipeline;
    Lightning reads each one's rank from the environment it starts them with."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def rank_zero_first(write: Callable[[], Any]) -> None:
    """Run a write (to the bank, a results file) on rank zero only, then hold every rank until it is done (when a
    process group is up)."""
    if rank_zero():
        write()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class ResumeCache:
    """A JSON file of results keyed by name, each stored with the recipe that produced it.

    A result is reused only when its recipe is unchanged; the file is written atomically (rank zero only), and a
    damaged or unreadable file means "recompute", never a crash.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
            self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.data = {}

    def get(self, name: str, recipe: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored result of ``name`` if its recipe equals ``recipe`` (compared as JSON), else ``None``."""
        entry = self.data.get(name)
        if isinstance(entry, dict) and entry.get("recipe") == plain(recipe) and isinstance(entry.get("result"), dict):
            return dict(entry["result"])
        return None

    def put(self, name: str, recipe: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Store ``result`` of ``name`` under ``recipe`` and write the file (rank zero only)."""
        from pituning.storage import write_file_atomic

        self.data[name] = {"recipe": plain(recipe), "result": plain(result)}
        if rank_zero():
            write_file_atomic(self.path, json.dumps(self.data, indent=1, default=str).encode())


def _loggers(root: Path, name: str) -> list[Any]:
    """CSV logs always; TensorBoard too when ``tensorboard`` is installed."""
    import importlib.util

    import lightning.pytorch as pl

    loggers: list[Any] = [pl.loggers.CSVLogger(str(root / "logs"), name=name)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(pl.loggers.TensorBoardLogger(str(root / "tensorboard"), name=name))
    return loggers


def make_trainer(cfg: SuiteConfig, root: str | Path, name: str, **kwargs: Any) -> Any:
    """A Lightning ``Trainer`` with the suite's accelerator, devices, precision and progress bar, logging to
    ``root/logs/name`` (no checkpoints: every stage ends in a bank entry); ``kwargs`` override any setting."""
    import lightning.pytorch as pl

    options: dict[str, Any] = {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "precision": cfg.precision,
        "logger": _loggers(Path(root), name),
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": cfg.progress_bar,
    }
    return pl.Trainer(**{**options, **kwargs})


def data_class(cfg: SuiteConfig) -> type:
    """The suite's DataModule class (a :class:`ConfigError` if it cannot be imported)."""
    import importlib

    module_name, _, class_name = cfg.data_class.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"data_class {cfg.data_class!r} cannot be imported ({err}).") from err


def make_datamodule(cfg: SuiteConfig, task: TaskSpec, **extra: Any) -> Any:
    """Task ``task``'s DataModule: the suite's shared ``data`` options, the task's own, then ``extra``."""
    return data_class(cfg)(dataset=task.dataset, task_name=task.name, **{**cfg.data, **task.options, **extra})


def data_options(cls: type) -> list[str]:
    """The keyword options a class takes (a DataModule, a stage module): its own and those its ``**kwargs`` pass to
    its bases."""
    import inspect

    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def check_inputs(cfg: SuiteConfig) -> None:
    """Check everything a suite reads and writes before anything loads or trains, and report every problem at once
    (a :class:`ConfigError`): the DataModule options (a misspelt one with a suggestion), every task's data (it reads,
    has its columns, two classes or more, enough examples for the shots after the validation and test splits), the
    backbone (a local directory, a package, a cached or reachable hub name) and the output folder (writable)."""
    from pituning.backbones import check_backbone_name
    from pituning.config import did_you_mean
    from pituning.errors import PiTuningError
    from pituning.storage import check_writable

    cls = data_class(cfg)
    known = data_options(cls)
    problems: list[str] = []
    for where, options in [("data", cfg.data), *((f"task {t.name}", t.options) for t in [*cfg.sources, *cfg.targets])]:
        bad = sorted(set(options) - set(known) - {"dataset", "task_name"})
        if bad:
            problems.append(f"{where}: unknown {cls.__name__} option(s) {did_you_mean(bad, known)}")
    if problems:  # the DataModules below could not even be built
        raise ConfigError("The suite's options have problems; nothing was run:\n  - " + "\n  - ".join(problems))
    checks: list[tuple[str, TaskSpec, dict[str, Any]]] = [(f"source {t.name}", t, {}) for t in cfg.sources]
    checks += [(f"target {t.name}", t, {"shots": cfg.shots, "seed": cfg.seeds[0]}) for t in cfg.targets]
    for where, task, extra in checks:
        try:
            make_datamodule(cfg, task, **extra).setup("fit")
        except PiTuningError as err:
            problems.append(f"{where}: {err}")
    for what, check in (
        ("backbone", lambda: check_backbone_name(cfg.backbone)),
        ("output", lambda: check_writable(cfg.output, "output")),
    ):
        try:
            check()
        except PiTuningError as err:
            problems.append(f"{what}: {err}")
    if problems:
        raise ConfigError(
            f"The suite's inputs have {len(problems)} problem(s); nothing was trained:\n  - " + "\n  - ".join(problems)
        )


def stage_kwargs(cfg: SuiteConfig) -> dict[str, Any]:
    """Keyword arguments every stage module of the suite takes: the backbone's head, dtype and attention, and the
    task type."""
    return {
        "backbone_task": cfg.backbone_task,
        "task_type": cfg.task_type,
        "backbone_dtype": cfg.backbone_dtype,
        "attn_implementation": cfg.attn_implementation,
    }


def _optim_recipe(cfg: SuiteConfig) -> dict[str, Any]:
    """The training options as a resume recipe records them (the backbone's dtype and attention included, as
    before they moved to the suite's top level, so a run resumes across the move)."""
    return {**asdict(cfg.optim), "backbone_dtype": cfg.backbone_dtype, "attn_implementation": cfg.attn_implementation}


def _factory(cfg: SuiteConfig, root: str | Path, log_name: str, trainer: TrainerFactory | None) -> TrainerFactory:
    """``trainer``, or :func:`make_trainer` with the suite's settings, logging under ``log_name``."""
    return trainer if trainer is not None else functools.partial(make_trainer, cfg, root, log_name)


def train_expert(
    cfg: SuiteConfig,
    root: str | Path,
    name: str,
    datamodule: Any,
    epochs: int,
    *,
    log_name: str,
    trainer: TrainerFactory | None = None,
    fresh_head: bool = False,
    **module: Any,
) -> Any:
    """Train expert ``name`` (and its head) on ``datamodule`` and store it in the suite's bank; returns the module.

    ``module`` adds ExpertTrainingModule options (``init_from`` for a baseline that starts from a stored expert,
    ``optim`` to train with other options than the suite's).
    ``trainer`` makes the Trainer (default: :func:`make_trainer`); ``fresh_head`` starts a fresh head even where
    ``init_from`` stores one (a source's head for other classes than the target's).
    """
    from pituning.modules import ExpertTrainingModule

    location = str(Path(root) / "bank")
    options = {"optim": cfg.optim, **stage_kwargs(cfg), **module}
    trained = ExpertTrainingModule(cfg.backbone, location, name, cfg.expert, overwrite=True, **options)
    if fresh_head:
        add_experts = trained.add_experts

        def without_head(experts: Any) -> None:
            add_experts(experts)  # the expert (from init_from) goes in; its stored head is dropped

        trained.add_experts = without_head  # type: ignore[method-assign]
    _factory(cfg, root, log_name, trainer)(max_epochs=epochs).fit(trained, datamodule)
    return trained


def embed_task(
    cfg: SuiteConfig,
    root: str | Path,
    name: str,
    datamodule: Any,
    probe: str | None,
    *,
    trainer: TrainerFactory | None = None,
) -> int:
    """Store task ``name``'s Fisher embedding (at ``probe``, or at its own expert); returns how many examples it saw.

    Every task type embeds: the module reads the suite's ``task_type`` and ``backbone_task``. ``trainer`` makes the
    Trainer (default: :func:`make_trainer`; ``limit_predict_batches`` in it caps the Fisher pass).
    """
    from pituning.modules import TaskEmbeddingModule

    module = TaskEmbeddingModule(
        cfg.backbone, str(Path(root) / "bank"), name, probe=probe, estimator=cfg.estimator, **stage_kwargs(cfg)
    )
    _factory(cfg, root, f"embed-{name}", trainer)(inference_mode=False).predict(module, datamodule=datamodule)
    return int(module.examples)


def interpolate(
    cfg: SuiteConfig,
    root: str | Path,
    name: str,
    datamodule: Any,
    candidates: list[str],
    *,
    sources: list[str] | None = None,
    interpolation: InterpolationConfig | None = None,
    output_name: str | None = None,
    log_name: str | None = None,
    trainer: TrainerFactory | None = None,
) -> tuple[Any, float]:
    """π-Tuning on target ``name``: the suite's ``k`` best sources among ``candidates`` and a target expert,
    interpolated, collapsed and stored as ``<name>_pi``; returns the module and its test accuracy.

    A variant or a control gives ``sources`` (the pool, instead of ranking ``candidates``), ``interpolation`` (instead
    of the suite's), ``output_name``, ``log_name`` (default ``pi-<name>``) and ``trainer`` (as in
    :func:`train_expert`)."""
    from pituning.modules import InterpolationModule

    pool: dict[str, Any] = (
        {"k": cfg.k, "candidates": candidates} if sources is None else {"k": len(sources), "sources": sources}
    )
    pi = InterpolationModule(
        cfg.backbone,
        str(Path(root) / "bank"),
        name,
        **pool,
        interpolation=interpolation or cfg.interpolation,
        optim=cfg.optim,
        output_name=output_name,
        overwrite=True,
        **stage_kwargs(cfg),
    )
    fitted = _factory(cfg, root, log_name or f"pi-{name}", trainer)(max_epochs=cfg.target_epochs)
    fitted.fit(pi, datamodule)
    return pi, float(fitted.test(pi, datamodule, verbose=False)[0]["test_acc"])


def run_baseline(
    cfg: SuiteConfig,
    root: str | Path,
    name: str,
    seed: int,
    baseline: str,
    ranked: list[str],
    datamodule: Any,
    *,
    trainer: TrainerFactory | None = None,
    fresh_head: bool = False,
) -> float:
    """Baseline ``baseline`` on target ``name`` from the ranked sources: ``best_source_init`` fine-tunes the
    top-ranked source (and its head), ``uniform_average`` the parameter average of ``ranked``; returns the test
    accuracy. ``trainer`` and ``fresh_head`` as in :func:`train_expert`."""
    import lightning.pytorch as pl

    bank = ExpertBank(Path(root) / "bank")
    if baseline == "best_source_init":
        start_from = ranked[0]
    elif baseline == "uniform_average":
        start_from = f"{name}_avg"
        rank_zero_first(functools.partial(bank.average, ranked, name=start_from, overwrite=True))
    else:
        raise ConfigError(f"Unknown baseline {baseline!r}; use best_source_init or uniform_average.")
    pl.seed_everything(seed, verbose=False)
    module = train_expert(
        cfg,
        root,
        f"{name}_{baseline}",
        datamodule,
        cfg.target_epochs,
        log_name=f"{baseline}-{name}",
        trainer=trainer,
        fresh_head=fresh_head,
        init_from=start_from,
    )
    return float(module.trainer.test(module, datamodule, verbose=False)[0]["test_acc"])


def train_source(
    cfg: SuiteConfig,
    root: str | Path,
    task: TaskSpec,
    probe: str | None,
    cache: ResumeCache,
    say: Callable[[str], None],
    *,
    trainer: TrainerFactory | None = None,
) -> dict[str, Any]:
    """Train, check and embed source ``task`` unless the bank holds it from the same recipe; returns
    ``{"quality": ExpertQuality.to_dict(), "embedded_examples": n}``. ``trainer`` makes every Trainer (default:
    :func:`make_trainer`)."""
    import lightning.pytorch as pl

    recipe = {
        "backbone": cfg.backbone, "backbone_task": cfg.backbone_task, "task_type": cfg.task_type, "task": asdict(task),
        "data": cfg.data, "expert": cfg.expert, "module": _optim_recipe(cfg), "epochs": cfg.source_epochs,
        "probe": probe, "estimator": cfg.estimator, "embed_examples": cfg.embed_examples,
    }  # fmt: skip
    bank = ExpertBank(Path(root) / "bank")
    stored = cache.get(task.name, recipe)
    if stored is not None and task.name in bank and bank.entry(task.name).has_embedding:
        say(f"source {task.name}: in the bank already, from the same recipe")
        return stored
    say(f"source {task.name}: training the expert")
    pl.seed_everything(0, verbose=False)
    datamodule = make_datamodule(cfg, task)
    module = train_expert(
        cfg, root, task.name, datamodule, cfg.source_epochs, log_name=f"source-{task.name}", trainer=trainer
    )
    checked = evaluate_quality(module, datamodule.test_dataloader())
    say(
        f"source {task.name}: test accuracy {checked.acc:.4f}, most predicted class on "
        f"{checked.majority_share:.0%} of the test set (majority class {checked.true_majority_share:.0%})"
    )
    trained_on = task.options.get("max_train_examples", cfg.data.get("max_train_examples"))
    cap = [c for c in (trained_on, cfg.embed_examples) if c is not None]
    capped = make_datamodule(cfg, task, max_train_examples=min(cap)) if cap else datamodule
    seen = embed_task(cfg, root, task.name, capped, probe, trainer=trainer)
    say(f"source {task.name}: embedded (Fisher over {seen} examples)")
    result = {"quality": checked.to_dict(), "embedded_examples": seen}
    cache.put(task.name, recipe, result)
    return result


def run_target(
    cfg: SuiteConfig,
    root: str | Path,
    task: TaskSpec,
    seed: int,
    candidates: list[str],
    probe: str | None,
    cache: ResumeCache,
    say: Callable[[str], None],
    sources: Mapping[str, Any],
) -> dict[str, Any]:
    """One target and seed: the target expert alone, its embedding, π-Tuning and the suite's ``methods`` on the same
    shots and epochs; returns the row of results (``row[method]`` the accuracy, ``row["methods"][method]`` what each
    method used). Each part is cached with its own recipe: a rerun skips what was measured, and adding a method to a
    suite runs only that method."""
    import lightning.pytorch as pl

    from pituning.methods import METHODS, MethodRun

    candidates = [c for c in candidates if c not in task.exclude]
    if len(candidates) < cfg.k:
        raise ConfigError(
            f"Target {task.name!r} has {len(candidates)} candidate source(s) after excluding {task.exclude}; k={cfg.k}."
        )
    name = f"{task.name}_s{seed}"
    recipe = {  # everything a target's row depends on, the sources it may draw from included
        "task": asdict(task), "seed": seed, "shots": cfg.shots, "data": cfg.data, "expert": cfg.expert,
        "module": _optim_recipe(cfg), "interpolation": asdict(cfg.interpolation), "epochs": cfg.target_epochs,
        "k": cfg.k, "precision": cfg.precision, "probe": probe, "estimator": cfg.estimator,
        "task_type": cfg.task_type, "backbone_task": cfg.backbone_task,
        "sources": {c: sources.get(c) for c in candidates},
    }  # fmt: skip
    datamodule = make_datamodule(cfg, task, shots=cfg.shots, seed=seed)
    row = cache.get(name, recipe)
    if row is not None and f"{name}_pi" in ExpertBank(Path(root) / "bank"):
        say(f"target {name}: expert alone and π-Tuning measured already, from the same recipe")
    else:
        say(f"target {name}: expert alone ({cfg.shots} shots per class)")
        pl.seed_everything(seed, verbose=False)
        alone = train_expert(cfg, root, name, datamodule, cfg.target_epochs, log_name=f"alone-{name}")
        alone_acc = float(alone.trainer.test(alone, datamodule, verbose=False)[0]["test_acc"])
        embed_task(cfg, root, name, datamodule, probe)
        say(f"target {name}: π-Tuning with k={cfg.k}")
        pl.seed_everything(seed, verbose=False)
        pi, pi_acc = interpolate(cfg, root, name, datamodule, candidates)
        row = {
            "target": task.name,
            "seed": seed,
            "alone": alone_acc,
            "pi": pi_acc,
            "sources": [n for n, _ in pi.selected],
            "similarities": dict(pi.selected),
            "mean_weights": pi.mean_weights() if pi.stored is None else pi.stored.provenance["mean_weights"],
        }
        say(f"target {name}: alone {alone_acc:.4f}, π-Tuning {pi_acc:.4f}")
        cache.put(name, recipe, row)
    row["methods"] = {}
    run = MethodRun(cfg, Path(root), task, seed, datamodule, list(candidates), list(row["sources"]), say)
    for method in cfg.methods if row["sources"] else []:
        method_recipe = {**recipe, "method": method, "options": cfg.method_options.get(method, {})}
        measured = cache.get(f"{name}:{method}", method_recipe)
        if measured is None:
            say(f"target {name}: {method}")
            result = METHODS[method].run(run)
            measured = {"acc": result.acc, "provenance": result.provenance}
            cache.put(f"{name}:{method}", method_recipe, measured)
            say(f"target {name}: {method} {result.acc:.4f}")
        row[method] = measured["acc"]
        row["methods"][method] = measured["provenance"]
    return plain(row)  # type: ignore[no-any-return]


def evaluate_quality(module: Any, dataloader: Any) -> ExpertQuality:
    """:func:`~pituning.report.expert_quality` of a trained :class:`~pituning.modules.ExpertTrainingModule` over
    ``dataloader`` (its task's test set), on the module's device, in eval mode (restored afterwards). When the module
    was fit by a Trainer, its precision applies as in ``Trainer.test`` (``bf16-true`` inputs are cast, ``bf16-mixed``
    autocasts)."""
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


def make_probe(
    backbone: str,
    config: dict[str, Any],
    bank: ExpertBank,
    *,
    name: str = "probe",
    seed: int = 0,
    backbone_task: str = "base",
) -> str:
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
    model = ExpertModel(load_backbone(backbone, task=backbone_task))
    model.add_expert(name, wanted)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    probe = Expert.from_model(model, name, TaskInfo(name, modality="other"), provenance={"probe_seed": seed})
    bank.add(probe, overwrite=True)
    return name


def quiet(*, offline: bool = True) -> None:
    """Keep a script's output to its own progress lines: no Hugging Face progress bars, Lightning's and transformers'
    logs at error level (no accelerator lines, no tips), and no warnings about what is meant (few workers, eval-mode
    backbones, a logging interval longer than a tiny epoch). ``offline``: never call the Hugging Face hub (scripts
    whose models are all local; the ``pituning`` command leaves it to :func:`~pituning.backbones.pretrained_path`).

    Imports Lightning, transformers and datasets.
    """
    import os
    import warnings

    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on the Hugging Face hub
    import datasets
    import lightning.pytorch  # noqa: F401  (sets its loggers' level on import: import first, then quieten)
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*batching rule.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # a deprecation inside Lightning
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # few-shot epochs are short
    # ExpertModel keeps a frozen backbone's batch norms in eval mode on purpose (their statistics are backbone
    # state); Lightning warns about any module in eval mode at the start of training
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")


def plain_trainer(*, restore_best: str | None = None, **kwargs: Any) -> Any:
    """A single-CPU Lightning ``Trainer`` with no loggers, checkpoints, progress bar or model summary, and no
    validation during fit (every method is tested on the test split at the end); ``kwargs`` override any setting.

    Args:
        restore_best: ``val_loss`` or ``val_acc`` (any name ending in ``loss`` is minimised): validate every epoch
            and keep the weights of the best one (:class:`~pituning.modules.RestoreBest`).
        **kwargs: Further ``Trainer`` settings (``max_epochs``, ``inference_mode`` ...).
    """
    import lightning.pytorch as pl

    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    if restore_best is not None:
        from pituning.modules import RestoreBest

        mode = "min" if restore_best.endswith("loss") else "max"
        options.update(limit_val_batches=1.0, callbacks=[RestoreBest(restore_best, mode)])
    return pl.Trainer(**{**options, **kwargs})


def measure_accuracy(module: Any, datamodule: Any, trainer: TrainerFactory = plain_trainer) -> float:
    """Test accuracy (``test_acc``) of a trained module on ``datamodule``'s test split, with a fresh Trainer."""
    return float(trainer().test(module, datamodule, verbose=False)[0]["test_acc"])


def fit_test(
    module: Any, datamodule: Any, epochs: int, *, trainer: TrainerFactory = plain_trainer, **options: Any
) -> float:
    """Fit ``module`` for ``epochs`` and return its test accuracy, with one Trainer (``options`` go to ``trainer``:
    ``restore_best`` keeps the best validation epoch with :func:`plain_trainer`)."""
    fitted = trainer(max_epochs=epochs, **options)
    fitted.fit(module, datamodule)
    return float(fitted.test(module, datamodule, verbose=False)[0]["test_acc"])


def save_graph(graph: Any, folder: str | Path, say: Callable[[str], None], *, k: int = 2) -> dict[str, str]:
    """Write a :class:`~pituning.graph.TaskGraph` to ``folder`` (JSON and CSV) and its plot (edges to the ``k`` most
    similar tasks) when matplotlib is installed; returns the files written, and ``say``s why a plot is missing."""
    files: dict[str, str] = graph.save(folder)
    try:
        files.update(graph.plot(folder, k=k))
    except ConfigError as err:  # matplotlib is optional: the JSON and CSV are written anyway
        say(f"no graph plot: {err}")
    return files


# ---------------------------------------------------------------------------------------------- stage by stage
# The three stages with the LightningModules themselves and plain Trainers, for scripts that build their own
# DataModules (the examples): what `run_suite` does from a SuiteConfig, one step at a time.


def train_and_embed_sources(
    backbone: str,
    bank: str,
    expert: Mapping[str, Any],
    sources: Mapping[str, Callable[[], Any]],
    embed: Callable[[str], None],
    *,
    epochs: int,
    module_options: Mapping[str, Any],
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Stage 1 and 2 for every source: train its expert (seed 0) on ``sources[name]()``, check it on its own test set
    (:func:`evaluate_quality`: an expert that predicts its majority class for everything transfers nothing but that
    prior), then ``embed(name)``. Returns each source's :class:`~pituning.report.ExpertQuality` as a dict."""
    import lightning.pytorch as pl

    from pituning.modules import ExpertTrainingModule

    quality: dict[str, dict[str, Any]] = {}
    for name, make_data in sources.items():
        pl.seed_everything(0, verbose=False)
        datamodule = make_data()
        module = ExpertTrainingModule(backbone, bank, name, dict(expert), **module_options)
        plain_trainer(max_epochs=epochs).fit(module, datamodule)
        checked = evaluate_quality(module, datamodule.test_dataloader())
        quality[name] = checked.to_dict()
        embed(name)
        collapsed = "; COLLAPSED onto its majority class (train it longer or on more examples)"
        say(
            f"source {name}: test accuracy {checked.acc:.3f} (majority class {checked.true_majority_share:.3f})"
            + (collapsed if checked.collapsed else "")
            + ", embedded"
        )
    return quality


@dataclass(frozen=True)
class TargetRun:
    """What :func:`alone_then_pi` measured on one target."""

    alone: float
    """Test accuracy of the target's expert alone."""
    pi: float
    """Test accuracy of π-Tuning (the collapsed expert)."""
    ranked: list[tuple[str, float]]
    """Every source with its similarity to the target, most similar first."""
    graph: Any
    """The :class:`~pituning.graph.TaskGraph` of the sources and the target."""
    selected: list[tuple[str, float]]
    """The sources π-Tuning interpolated, with their scores."""
    weights: Any
    """The mean interpolation weights stored with the collapsed expert."""
    collapsed: str
    """The collapsed expert's name in the bank."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready part: similarities, the pool, the weights and the collapsed expert's name."""
        return {
            "similarity_to_target": dict(self.ranked),
            "selected_sources": self.selected,
            "mean_interpolation_weights": self.weights,
            "collapsed_expert": self.collapsed,
        }


def alone_then_pi(
    backbone: str,
    bank: str,
    expert: Mapping[str, Any],
    target: str,
    target_data: Any,
    sources: list[str],
    embed_target: Callable[[], None],
    *,
    k: int,
    seed: int,
    epochs: int,
    module_options: Mapping[str, Any],
    say: Callable[[str], None],
    **interpolation: Any,
) -> TargetRun:
    """The few-shot target, stage by stage: its expert alone on ``target_data`` (whose expert, through
    ``embed_target()``, also gives the target's embedding), the sources ranked by the task graph, then π-Tuning
    (:class:`~pituning.modules.InterpolationModule` over ``sources`` with ``interpolation`` options) on the same
    shots, epochs and seed."""
    import lightning.pytorch as pl

    from pituning.graph import TaskGraph
    from pituning.modules import ExpertTrainingModule, InterpolationModule

    pl.seed_everything(seed, verbose=False)
    alone = ExpertTrainingModule(backbone, bank, target, dict(expert), **module_options)
    acc_alone = fit_test(alone, target_data, epochs)
    embed_target()
    say(f"target {target}: expert alone, test accuracy {acc_alone:.3f}")

    graph = TaskGraph.from_bank(ExpertBank(bank), [*sources, target])
    ranked = graph.top_k(target, len(sources))
    say("similarity to the target: " + ", ".join(f"{n} {s:.3f}" for n, s in ranked))

    pl.seed_everything(seed, verbose=False)
    pi = InterpolationModule(backbone, bank, target, k=k, candidates=sources, **interpolation, **module_options)
    acc_pi = fit_test(pi, target_data, epochs)  # tests the collapsed expert: one plain expert, the interpolation
    assert pi.stored is not None
    say(f"π-Tuning, pool {pi.pool}: test accuracy {acc_pi:.3f}")
    return TargetRun(
        acc_alone, acc_pi, ranked, graph, pi.selected, pi.stored.provenance["mean_weights"], pi.stored.name
    )


class Clock:
    """A script's stopwatch: :meth:`say` prints a progress line after the seconds since the clock was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds since the clock was made."""
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        """Print ``[  12.3s] text`` and flush (progress lines stay in order with a subprocess's output)."""
        print(f"[{self.seconds:6.1f}s] {text}", flush=True)


def write_results(out: Path, args: Any, clock: Clock, results: Mapping[str, Any]) -> dict[str, Any]:
    """Write a script's ``results`` to ``out/results.json`` with its arguments (``argparse`` namespace) and run time
    (``clock``), say where, and return what was written."""
    written = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **results,
        "runtime_s": round(clock.seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n")
    print(f"\nruntime {written['runtime_s']} s; bank, graph and results.json in {out.resolve()}")
    return written

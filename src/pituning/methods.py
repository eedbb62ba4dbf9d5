"""Every way to reuse an expert library on a target, behind one registry.

A method takes one target run (:class:`MethodRun`: the suite, the target's few-shot DataModule, the candidate
sources and the ``k`` that π-Tuning ranked first) and returns its test accuracy and its provenance
(:class:`MethodResult`). ``pituning run`` runs the suite's ``methods: [...]`` beside the target expert alone and
π-Tuning, on the same shots and epochs, and reports them side by side with paired differences; from Python,
``METHODS[name].run(run)``. :func:`register_method` adds one (a duplicate name is an error).

The built-in methods (docs/recycling.md describes each, with its reference and options):

- references that reuse nothing: ``linear_probe`` (a linear head fitted on the shots over the frozen backbone) and
  ``full_finetune`` (every backbone weight and a fresh head trained on the shots);
- fine-tuned from a start: ``best_source_init`` (the top-ranked source), ``uniform_average`` (the sources'
  parameter average), and the merges ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``, ``concat``, ``svd`` of the top-``k`` sources (``finetune: false`` evaluates the merge with a
  head refitted on the shots instead);
- gradient-free: ``lorahub`` (mixture weights searched on the shots' cross-validated loss) and ``arrow`` (per-token
  routing by the experts' top singular vectors), each with a head refitted on the shots;
- π-Tuning's variants: ``pi_linear`` (learned coefficients starting at the target expert), ``pi_layer_weights`` and
  ``pi_task_weights`` (weights shared per block or for the whole model), ``pi_guard`` (falls back on the target expert
  when the sources hurt);
- controls: ``random_pool`` (π-Tuning on ``k`` random sources), ``random_parameters`` (π-Tuning on random experts
  matched in shape and norm to the selected ones), ``pi_without_target`` (the selected sources alone) and
  ``random_pool_without_target`` (``k`` random sources alone: does the selection matter without the target expert?).

Where a method reuses a stored head, the head is checked on the target's shots first (:func:`choose_head`): a head
whose classes are not the target's (it scores at or below chance through its expert) is refitted on the shots, and
every result says which head it used.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pituning.bank import ExpertBank
from pituning.config import METHOD_NAMES, InterpolationConfig, SuiteConfig, TaskSpec, did_you_mean
from pituning.errors import ConfigError
from pituning.pipeline import TrainerFactory, interpolate, make_trainer, rank_zero_first, train_expert

__all__ = [
    "MERGES",
    "METHODS",
    "Method",
    "MethodResult",
    "MethodRun",
    "check_methods",
    "choose_head",
    "register_method",
]

MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "concat", "svd")
"""The merge methods (``task_arithmetic`` is the library's ``linear`` merge)."""


@dataclass
class MethodRun:
    """One target run a method reuses the library on."""

    cfg: SuiteConfig
    """The suite (backbone, expert, optim, interpolation, ``k``, epochs, ``method_options``)."""
    root: Path
    """The suite's output folder (the bank is ``root / "bank"``)."""
    task: TaskSpec
    """The target task."""
    seed: int
    """The seed of the shots and the initialisation."""
    datamodule: Any
    """The target's few-shot DataModule (the same shots for every method)."""
    candidates: list[str]
    """Every usable source."""
    ranked: list[str]
    """The ``k`` sources the suite's predictor ranked first, best first (π-Tuning's pool)."""
    say: Callable[[str], None] = print
    """Progress lines."""
    trainer: TrainerFactory | None = None
    """Makes each Trainer (default: the suite's :func:`~pituning.pipeline.make_trainer`)."""

    @property
    def name(self) -> str:
        """The run's name: ``<target>_s<seed>`` (the target expert's bank entry)."""
        return f"{self.task.name}_s{self.seed}"

    @property
    def bank(self) -> ExpertBank:
        """The suite's bank."""
        return ExpertBank(self.root / "bank")

    def options(self, method: str) -> dict[str, Any]:
        """The suite's ``method_options`` for ``method`` (a copy)."""
        return dict(self.cfg.method_options.get(method, {}))


@dataclass(frozen=True)
class MethodResult:
    """A method's test accuracy on the target and what it did."""

    acc: float
    """Test accuracy."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What it used: sources, weights, options, and which head (``source``, ``refit`` or ``fresh``) and why."""


@dataclass(frozen=True)
class Method:
    """A registered way of reusing the library."""

    name: str
    """Its name in ``methods: [...]``."""
    run: Callable[[MethodRun], MethodResult]
    """Runs it on one target run."""
    description: str
    """One line for reports and ``--help``."""
    options: tuple[str, ...] = ()
    """The ``method_options`` it reads (checked before anything runs)."""
    task_types: tuple[str, ...] = ("classification", "matching", "text_to_text")
    """The task types it supports (checked before anything runs)."""


METHODS: dict[str, Method] = {}
"""Method name -> :class:`Method`, in registration order."""


def register_method(
    name: str,
    run: Callable[[MethodRun], MethodResult],
    *,
    description: str,
    options: Sequence[str] = (),
    task_types: Sequence[str] = ("classification", "matching", "text_to_text"),
) -> Method:
    """Register a method under ``name`` (a :class:`ConfigError` if the name is taken or reserved)."""
    if name in METHODS or name in ("alone", "pi"):
        raise ConfigError(f"A method named {name!r} is registered already; choose another name.")
    method = Method(name, run, description, tuple(options), tuple(task_types))
    METHODS[name] = method
    if name not in METHOD_NAMES:  # a suite naming it is then accepted when its config is built
        METHOD_NAMES.append(name)
    return method


def check_methods(cfg: SuiteConfig) -> None:
    """Check the suite's ``methods`` and ``method_options`` against the registry, before anything loads."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(
            f"Unknown method(s) {did_you_mean(unknown, list(METHODS))}; registered: {list(METHODS)} (the target "
            "expert alone and π-Tuning always run)."
        )
    unsupported = [m for m in cfg.methods if cfg.task_type not in METHODS[m].task_types]
    if unsupported:
        raise ConfigError(
            f"Method(s) {unsupported} do not support task_type {cfg.task_type!r} (they refit a linear head on the "
            "shots); leave them out of methods:."
        )
    for method, options in cfg.method_options.items():
        if method not in METHODS:
            raise ConfigError(f"method_options names {did_you_mean([method], list(METHODS))}, which is no method.")
        bad = sorted(set(options) - set(METHODS[method].options))
        if bad:
            raise ConfigError(
                f"Unknown method_options.{method} option(s) {did_you_mean(bad, METHODS[method].options)}; valid: "
                f"{list(METHODS[method].options)}."
            )


# ---------------------------------------------------------------------------------------------------------- heads
def _task_model(run: MethodRun) -> Any:
    """A fresh task model for the target: the suite's backbone (in its ``backbone_dtype``, as the stages load it), no
    expert yet, the target's classes."""
    from pituning.backbones import load_backbone
    from pituning.heads import TaskModel
    from pituning.model import ExpertModel
    from pituning.modules.base import BACKBONE_DTYPES

    cfg, dm = run.cfg, run.datamodule
    dm.setup("fit")
    kwargs: dict[str, Any] = {"task": cfg.backbone_task, "dtype": BACKBONE_DTYPES[cfg.backbone_dtype]}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    experts = ExpertModel(load_backbone(cfg.backbone, **kwargs))
    candidates = dm.candidates() if cfg.task_type == "matching" else None
    return TaskModel(experts, cfg.task_type, dm.num_classes, candidates=candidates).eval()


def _shots(run: MethodRun) -> list[dict[str, torch.Tensor]]:
    return list(run.datamodule.embedding_dataloader())


def choose_head(run: MethodRun, expert: str) -> Any:
    """Which head to start from with stored expert ``expert`` on the target (a
    :class:`~pituning.recycling.heads.HeadChoice`): its own head when, read through the expert, it scores above
    chance on the target's shots; else one refitted on the shots (or a fresh one where no linear head can be
    refitted)."""
    from pituning.recycling.heads import reuse_head

    model = _task_model(run)
    stored = run.bank.load_into(model.experts, expert)
    return reuse_head(model, stored.head, _shots(run))


def _finetune(run: MethodRun, start: str, label: str, provenance: dict[str, Any]) -> MethodResult:
    """Fine-tune from stored expert ``start`` on the shots (the suite's target epochs), with the head
    :func:`choose_head` picks; returns the test accuracy and ``provenance`` with the head used."""
    import lightning.pytorch as pl

    choice = choose_head(run, start)
    bank = run.bank
    if choice.kind == "refit":  # start from the expert with the refitted head
        refit = dataclasses.replace(bank.get(start), name=f"{start}_refit", head=choice.state)
        rank_zero_first(functools.partial(bank.add, refit, overwrite=True))
        start = refit.name
    run.say(f"target {run.name}: {label} from {start} ({choice.kind} head)")
    pl.seed_everything(run.seed, verbose=False)
    module = train_expert(
        run.cfg,
        run.root,
        f"{run.name}_{label}",
        run.datamodule,
        run.cfg.target_epochs,
        log_name=f"{label}-{run.name}",
        trainer=run.trainer,
        fresh_head=choice.kind == "fresh",
        init_from=start,
    )
    acc = float(module.trainer.test(module, run.datamodule, verbose=False)[0]["test_acc"])
    return MethodResult(acc, {**provenance, "start": start, "head": choice.kind, "head_reason": choice.reason})


def _refit_and_test(run: MethodRun, model: Any, label: str, provenance: dict[str, Any]) -> MethodResult:
    """Fit a linear head on the shots through ``model``'s current experts and measure test accuracy (gradient-free
    methods)."""
    from pituning.recycling.heads import fit_linear_head, head_features

    features, labels = head_features(model, _shots(run))
    model.head.load_state_dict(fit_linear_head(features, labels, run.datamodule.num_classes))
    correct = total = 0
    with torch.no_grad():
        for batch in run.datamodule.test_dataloader():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            correct += int((model(**inputs).argmax(dim=-1) == batch["labels"]).sum())
            total += int(batch["labels"].shape[0])
    if not total:
        raise ConfigError(f"{label}: the target's test split is empty.")
    return MethodResult(correct / total, {**provenance, "head": "refit", "head_reason": "fitted on the shots"})


def _gradient_free_only(run: MethodRun, method: str) -> None:
    if run.cfg.task_type != "classification":
        raise ConfigError(
            f"{method} refits a linear head on the shots, so it needs task_type classification; this suite is "
            f"{run.cfg.task_type}. Leave {method} out of methods:."
        )


# ---------------------------------------------------------------------------------------------------------- methods
def _best_source_init(run: MethodRun) -> MethodResult:
    return _finetune(run, run.ranked[0], "best_source_init", {"sources": run.ranked[:1]})


def _linear_probe(run: MethodRun) -> MethodResult:
    """A linear head fitted on the shots over the frozen backbone's features: no expert, no source."""
    _gradient_free_only(run, "linear_probe")
    return _refit_and_test(run, _task_model(run), "linear_probe", {"sources": []})


def _full_finetune(run: MethodRun) -> MethodResult:
    """Every backbone weight and a fresh head trained on the shots for the suite's target epochs: no expert, no
    source (``lr``: the backbone's learning rate, default 5e-5; the head trains at the suite's ``head_lr``)."""
    import lightning.pytorch as pl

    from pituning.modules import FullFineTuningModule

    cfg = run.cfg
    lr = run.options("full_finetune").get("lr", 5e-5)
    run.say(f"target {run.name}: full_finetune (every backbone weight, lr {lr})")
    pl.seed_everything(run.seed, verbose=False)
    module = FullFineTuningModule(
        cfg.backbone,
        lr=lr,
        optim=cfg.optim,
        backbone_task=cfg.backbone_task,
        task_type=cfg.task_type,
        attn_implementation=cfg.attn_implementation,
    )
    settings: dict[str, Any] = {"max_epochs": cfg.target_epochs}
    if cfg.precision == "bf16-true":  # the backbone's own weights train: kept in float32, computed in bf16
        settings["precision"] = "bf16-mixed"
    factory = run.trainer or functools.partial(make_trainer, cfg, run.root, f"full_finetune-{run.name}")
    trainer = factory(**settings)
    trainer.fit(module, run.datamodule)
    acc = float(trainer.test(module, run.datamodule, verbose=False)[0]["test_acc"])
    return MethodResult(acc, {"sources": [], "lr": lr, "head": "fresh", "precision": str(trainer.precision)})


def _merge(method: str, run: MethodRun) -> MethodResult:
    opts = run.options(method)
    finetune = bool(opts.pop("finetune", True))
    weights = opts.pop("weights", None)
    sources = run.ranked
    if weights is None:  # the sources' mean; task arithmetic's sum is ``weights: [1, 1, ...]``
        weights = [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"method_options.{method}.weights needs k = {len(sources)} weights, got {weights}.")
    merged_name = f"{run.name}_{method}_merged"
    bank = run.bank
    if method == "uniform_average":  # the parameter average (A and B averaged like any parameter)
        library_method, options = "average", {}
        rank_zero_first(functools.partial(bank.average, sources, weights, name=merged_name, overwrite=True))
    else:
        library_method = "linear" if method == "task_arithmetic" else method
        defaults = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
        options = {**defaults, "seed": run.seed, **opts}
        rank_zero_first(
            functools.partial(
                bank.merge, sources, weights, method=library_method, name=merged_name, overwrite=True, **options
            )
        )
    provenance = {"sources": sources, "weights": weights, "merge": library_method, **options, "finetune": finetune}
    if finetune:
        return _finetune(run, merged_name, method, provenance)
    _gradient_free_only(run, method)
    model = _task_model(run)
    bank.load_into(model.experts, merged_name)
    return _refit_and_test(run, model, method, provenance)


def _lorahub(run: MethodRun) -> MethodResult:
    """LoraHub: one weight per source, searched without gradients on the shots' cross-validated loss (a linear head
    refitted on held-out folds, so the search cannot reward features that merely memorise), then merged."""
    from pituning.recycling.heads import cross_validated_loss, head_features
    from pituning.recycling.search import merged_loss_objective, search_weights

    _gradient_free_only(run, "lorahub")
    opts = {"budget": 40, "lower": -1.5, "upper": 1.5, "l1": 0.05, "optimizer": "NGOpt", **run.options("lorahub")}
    model, bank, shots = _task_model(run), run.bank, _shots(run)
    experts = [bank.get(name) for name in run.ranked]
    num_classes = run.datamodule.num_classes

    with merged_loss_objective(model, experts, shots, slot="lorahub") as objective:
        model.experts.set_active(["lorahub"])  # the merge the objective writes is what the features are read through

        def loss(weights: list[float]) -> float:
            objective.write(weights)
            return cross_validated_loss(*head_features(model, shots), num_classes)[0]

        def progress(step: int, budget: int, best: float) -> None:
            if step == budget or step % 10 == 0:
                run.say(f"target {run.name}: lorahub search {step}/{budget}, best {best:.4f}")

        found = search_weights(loss, len(experts), seed=run.seed, progress=progress, **opts)
        objective.write(found.weights)
        provenance = {"sources": run.ranked, "weights": found.weights, "search_loss": found.loss, **opts}
        return _refit_and_test(run, model, "lorahub", provenance)


def _arrow(run: MethodRun) -> MethodResult:
    """Arrow: each token routed, per layer, to the top-k experts by the experts' top singular vectors; no training;
    a head refitted on the shots reads the routed features."""
    from pituning.recycling.arrow import attach_arrow

    _gradient_free_only(run, "arrow")
    opts = {"top_k": 2, "temperature": 1.0, **run.options("arrow")}
    pool = run.options("arrow").get("pool", "candidates")
    names = run.candidates if pool == "candidates" else run.ranked
    model, bank = _task_model(run), run.bank
    experts = [bank.get(name) for name in names]
    kwargs = {k: v for k, v in opts.items() if k in ("top_k", "temperature")}
    with attach_arrow(model.experts, experts, **kwargs) as routing:
        result = _refit_and_test(run, model, "arrow", {"sources": names, **kwargs, "pool": pool})
        usage = routing.expert_usage()
    return MethodResult(result.acc, {**result.provenance, "usage": usage})


def _pi_variant(
    variant: Mapping[str, Any], label: str, run: MethodRun, sources: list[str] | None = None
) -> MethodResult:
    """π-Tuning with the suite's interpolation options changed by ``variant`` (and, for controls, other sources)."""
    import lightning.pytorch as pl

    cfg = run.cfg
    interpolation = dataclasses.replace(cfg.interpolation, **{**variant, **run.options(label)})
    pool = sources if sources is not None else run.ranked
    pl.seed_everything(run.seed, verbose=False)
    run.say(f"target {run.name}: {label} over {pool}")
    module, acc = interpolate(
        cfg,
        run.root,
        run.name,
        run.datamodule,
        run.candidates,
        sources=pool,
        interpolation=interpolation,
        output_name=f"{run.name}_{label}",
        log_name=f"{label}-{run.name}",
        trainer=run.trainer,
    )
    stored = module.stored
    provenance: dict[str, Any] = {"sources": pool, "interpolation": dataclasses.asdict(interpolation)}
    if stored is not None:
        provenance["mean_weights"] = stored.provenance["mean_weights"]
        if "guard" in stored.provenance:
            provenance["guard"] = stored.provenance["guard"]
    return MethodResult(acc, provenance)


def _random_pool(variant: Mapping[str, Any], label: str, run: MethodRun) -> MethodResult:
    from pituning.recycling.controls import random_pool

    others = [c for c in run.candidates if c != run.task.name]
    pool = random_pool(others, len(run.ranked), run.seed)
    return _pi_variant(variant, label, run, pool)


def _random_parameters(run: MethodRun) -> MethodResult:
    from pituning.recycling.controls import random_parameter_expert

    bank = run.bank
    names = []
    for i, source in enumerate(run.ranked):
        name = f"{run.name}_random{i}"
        fake = random_parameter_expert(bank.get(source), seed=1000 * run.seed + i, name=name)
        rank_zero_first(functools.partial(bank.add, fake, overwrite=True))
        names.append(name)
    result = _pi_variant({}, "random_parameters", run, names)
    return MethodResult(result.acc, {**result.provenance, "matched_to": run.ranked})


_INTERPOLATION_OPTIONS = tuple(f.name for f in dataclasses.fields(InterpolationConfig))
_MERGE_OPTIONS = ("weights", "density", "seed", "rank", "lora_space", "majority_sign", "finetune")

register_method(
    "best_source_init",
    _best_source_init,
    description="the top-ranked source expert (and its head, if it fits), fine-tuned",
)
register_method(
    "uniform_average",
    functools.partial(_merge, "uniform_average"),
    description="the parameter average of the top-k sources, fine-tuned",
    options=("weights", "finetune"),
)
register_method(
    "linear_probe",
    _linear_probe,
    description="no expert: a linear head fitted on the shots over the frozen backbone",
    task_types=("classification",),
)
register_method(
    "full_finetune",
    _full_finetune,
    description="no expert: every backbone weight and a fresh head trained on the shots",
    options=("lr",),
)
for _name, _what in {
    "task_arithmetic": "the weighted sum of the top-k sources' updates (task arithmetic)",
    "ties": "TIES: trimmed to a density, sign elected, disjoint mean",
    "dare_linear": "DARE: random drop at a density with rescaling, then summed",
    "dare_ties": "DARE, then TIES' sign election",
    "magnitude_prune": "trimmed to a density by magnitude, then summed",
    "concat": "the exact weighted sum, kept as one expert of summed rank",
    "svd": "the weighted sum truncated to a rank by SVD",
}.items():
    register_method(_name, functools.partial(_merge, _name), description=f"{_what}, fine-tuned", options=_MERGE_OPTIONS)
register_method(
    "lorahub",
    _lorahub,
    description="LoraHub: mixture weights searched without gradients on the shots, then merged",
    options=("budget", "lower", "upper", "l1", "optimizer", "init"),
    task_types=("classification",),
)
register_method(
    "arrow",
    _arrow,
    description="Arrow: per-token routing to the top-k experts by their top singular vectors",
    options=("top_k", "temperature", "pool"),
    task_types=("classification",),
)
for _name, _variant, _what in (
    ("pi_linear", {"mixing": "linear"}, "π-Tuning with learned coefficients that start at the target expert"),
    ("pi_layer_weights", {"share": "layer"}, "π-Tuning with one set of weights per block"),
    ("pi_task_weights", {"share": "task"}, "π-Tuning with one set of weights for the whole model"),
    ("pi_guard", {"guard": True}, "π-Tuning that falls back on the target expert when the sources hurt"),
    ("pi_without_target", {"include_target": False}, "control: π-Tuning over the selected sources alone"),
):
    register_method(
        _name,
        functools.partial(_pi_variant, _variant, _name),
        description=_what,
        options=_INTERPOLATION_OPTIONS,
    )
register_method(
    "random_pool",
    functools.partial(_random_pool, {}, "random_pool"),
    description="control: π-Tuning over k random sources (seeded)",
    options=_INTERPOLATION_OPTIONS,
)
register_method(
    "random_parameters",
    _random_parameters,
    description="control: π-Tuning over random experts matched in shape and norm to the selected sources",
    options=_INTERPOLATION_OPTIONS,
)
register_method(
    "random_pool_without_target",
    functools.partial(_random_pool, {"include_target": False}, "random_pool_without_target"),
    description="control: π-Tuning over k random sources alone (seeded; pi_without_target's counterpart)",
    options=_INTERPOLATION_OPTIONS,
)

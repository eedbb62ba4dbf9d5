"""Typed configs of the pipeline: frozen dataclasses, one docstring per field, checked in ``__post_init__``.

An option is validated once, where its config is built (a YAML file through jsonargparse, or Python), and travels as
a typed field from there: a misspelt or misplaced option (a ``k`` under ``interpolation:``) is an error before any
backbone loads, not after every source expert trained. The stages' LightningModules take the same configs
(``optim``, ``interpolation``), so a stage YAML and a suite YAML spell every option the same way.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pituning.errors import ConfigError

__all__ = [
    "BACKBONE_DTYPES",
    "BASELINES",
    "METHOD_NAMES",
    "SUITE_SET_DATA_OPTIONS",
    "EmbeddingConfig",
    "InterpolationConfig",
    "OptimConfig",
    "SuiteConfig",
    "TaskSpec",
    "TaskType",
    "check_choice",
    "did_you_mean",
    "fold_flat_options",
    "typed_config",
]

_C = TypeVar("_C")

TaskType = Literal["classification", "matching", "text_to_text"]
"""What a task's head does: classify one input, match an input to a candidate text, or generate the label text."""

BACKBONE_DTYPES = ("float32", "bfloat16", None)
"""Storage dtypes of a frozen backbone (``None``: as stored)."""

SUITE_SET_DATA_OPTIONS = ("dataset", "task_name", "shots", "shots_per_class", "seed")
"""DataModule options a suite sets itself, per task: never in a suite's shared ``data`` or a task's ``options``."""


def check_choice(value: Any, option: str, choices: tuple[Any, ...]) -> None:
    """Raise :class:`ConfigError` naming ``option`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{option} must be one of {list(choices)}, got {value!r}.")


def _positive(value: float, option: str, *, zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{option} must be {'>= 0' if zero else '> 0'}, got {value!r}.")


def _fraction(value: float, option: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{option} must be in [0, 1), got {value!r}.")


@dataclass(frozen=True)
class OptimConfig:
    """How an expert (and its head) is trained: ``optim:`` of a suite and of the ``train-expert``, ``evaluate`` and
    ``interpolate`` stages (``ExpertTrainingModule(optim=...)``)."""

    lr: float = 1e-3
    """Learning rate of the expert (AdamW, linear warm-up then linear decay)."""
    head_lr: float | None = None
    """Learning rate of the task head (default: ``lr``)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases, norms or interpolation logits)."""
    warmup_ratio: float = 0.06
    """Share of the steps spent warming the learning rate up, in [0, 1)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy, in [0, 1)."""
    dropout: float = 0.0
    """Dropout before the task head, in [0, 1)."""

    def __post_init__(self) -> None:
        _positive(self.lr, "optim.lr")
        if self.head_lr is not None:
            _positive(self.head_lr, "optim.head_lr")
        _positive(self.weight_decay, "optim.weight_decay", zero=True)
        _fraction(self.warmup_ratio, "optim.warmup_ratio")
        _fraction(self.label_smoothing, "optim.label_smoothing")
        _fraction(self.dropout, "optim.dropout")


@dataclass(frozen=True)
class InterpolationConfig:
    """How the pool is interpolated on a target: ``interpolation:`` of a suite and of the ``interpolate`` stage
    (``InterpolationModule(interpolation=...)``). The number of sources is ``k``, never an interpolation option."""

    mode: Literal["experts_and_weights", "weights_only"] = "experts_and_weights"
    """Train the logits and every pool expert (the paper), or the logits only."""
    target_init: Literal["fresh", "trained"] = "fresh"
    """The target's expert in the pool: a fresh one, or the stored (already trained) one."""
    logits_lr: float = 5e-2
    """Learning rate of the interpolation logits (0 keeps them at their start)."""
    source_lr: float | None = None
    """Learning rate of the source experts in the pool (default: the expert ``lr``, which the target expert keeps):
    lower keeps more of what the sources learned on their full data; ``0`` freezes them (they still mix)."""
    weights_only_steps: int = 0
    """Optimiser steps at the start during which only the logits (and the head) train."""
    rescale: Literal["unit_mean", "none"] = "unit_mean"
    """Fisher rescaling before the similarity that ranks the sources."""
    predictor: Literal["fisher", "few_shot_loss"] = "fisher"
    """How sources are ranked: Fisher similarity, or each source's loss on the target's shots."""
    head_init: Literal["target", "best_source", "sources", "fresh"] = "target"
    """Where the head starts: ``target`` (the target expert's stored head), ``best_source`` (the top-ranked
    source's, when its classes are the target's), ``sources`` (the selected sources' heads averaged with the sources'
    share of ``init_weights``; needs heads of one shape) or ``fresh``."""
    init_weights: tuple[float, ...] | None = None
    """Initial mixture weights: the sources in rank order, then the target (k + 1 values; k without the target).
    Under ``softmax``, positive and normalised (default equal); under ``linear``, the coefficients themselves (default
    zero for every source and one for the target)."""
    logits_data: Literal["train", "holdout"] = "train"
    """``train`` (the logits learn on the training batches, like the experts) or ``holdout`` (on the DataModule's
    validation split, one batch per step: give the DataModule ``holdout_shots`` so that split is a held-out slice of
    the shots the experts never see)."""
    mixing: Literal["softmax", "linear"] = "softmax"
    """How the logits become weights: ``softmax`` (summing to one, equal at the start: the paper's) or ``linear``
    (the logits are the weights, any sign: a learned merge that starts at the target expert alone, every source's
    coefficient zero; the adaptive merge of the 2026 recycling study)."""
    share: Literal["module", "layer", "task"] = "module"
    """Which insertion points share one set of weights: ``module`` (each its own), ``layer`` (one set per block) or
    ``task`` (one set for the whole model)."""
    include_target: bool = True
    """Keep the target's own expert in the pool; ``false`` interpolates the sources alone (a control)."""
    guard: bool = False
    """Guard against negative transfer: at the end of fit, keep the mixture only if its loss (on the validation split
    when the DataModule has one, else on the training shots) is no worse than the target expert's alone inside the
    pool; otherwise fall back to the target expert (needs ``include_target``)."""

    def __post_init__(self) -> None:
        check_choice(self.mode, "interpolation.mode", ("experts_and_weights", "weights_only"))
        check_choice(self.target_init, "interpolation.target_init", ("fresh", "trained"))
        check_choice(self.rescale, "interpolation.rescale", ("unit_mean", "none"))
        check_choice(self.predictor, "interpolation.predictor", ("fisher", "few_shot_loss"))
        check_choice(self.head_init, "interpolation.head_init", ("target", "best_source", "sources", "fresh"))
        check_choice(self.logits_data, "interpolation.logits_data", ("train", "holdout"))
        check_choice(self.mixing, "interpolation.mixing", ("softmax", "linear"))
        check_choice(self.share, "interpolation.share", ("module", "layer", "task"))
        if self.guard and not self.include_target:
            raise ConfigError("interpolation.guard falls back on the target expert: it needs include_target: true.")
        _positive(self.logits_lr, "interpolation.logits_lr", zero=True)
        if self.source_lr is not None:
            _positive(self.source_lr, "interpolation.source_lr", zero=True)
        if not isinstance(self.weights_only_steps, int) or self.weights_only_steps < 0:
            raise ConfigError(
                f"interpolation.weights_only_steps must be an integer >= 0, got {self.weights_only_steps}."
            )
        if self.init_weights is not None:
            object.__setattr__(self, "init_weights", tuple(float(w) for w in self.init_weights))
            if self.mixing == "softmax" and min(self.init_weights) <= 0:  # type: ignore[arg-type]
                raise ConfigError(
                    f"interpolation.init_weights must all be > 0 under softmax mixing, got {list(self.init_weights)}."
                )


@dataclass(frozen=True)
class EmbeddingConfig:
    """Where and how task embeddings (diagonal Fisher) are taken."""

    probe: str | None = "random"
    """``random`` (one shared random expert), ``None`` (each task's own expert) or a bank expert name."""
    estimator: Literal["per_sample", "loop", "batch", "sampled"] = "per_sample"
    """Fisher estimator."""
    examples: int | None = None
    """Training examples of a source's Fisher pass (``None``: every example it was trained on)."""

    def __post_init__(self) -> None:
        check_choice(self.estimator, "estimator", ("per_sample", "loop", "batch", "sampled"))
        if self.examples is not None and (not isinstance(self.examples, int) or self.examples < 1):
            raise ConfigError(
                f"embed_examples must be at least 1 (or null for every training example), got {self.examples}."
            )


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite."""

    name: str
    """Task and expert name (letters, digits, ``_``, ``-``)."""
    dataset: str
    """Dataset file, directory or name (the DataModule's ``dataset``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra DataModule options for this task only (``classes``, ``text_column`` ...)."""
    exclude: list[str] = field(default_factory=list)
    """Sources this target never draws from (for example the source trained on the target's own domain)."""

    def __post_init__(self) -> None:
        from pituning.experts.base import validate_name

        validate_name(self.name)
        set_here = sorted(set(self.options) & set(SUITE_SET_DATA_OPTIONS))
        if set_here:
            raise ConfigError(
                f"Task {self.name!r}: options {set_here} are set by the suite for each task (the dataset, the name, "
                "and the suite's shots and seeds for targets); remove them from the task's options."
            )


BASELINES = ("best_source_init", "uniform_average")
"""The methods a suite runs beside π-Tuning by default."""

METHOD_NAMES: list[str] = [
    *BASELINES,
    *("linear_probe", "full_finetune"),
    *("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "concat", "svd", "lorahub", "arrow"),
    *("pi_linear", "pi_layer_weights", "pi_task_weights", "pi_guard", "pi_without_target"),
    *("random_pool", "random_parameters", "random_pool_without_target"),
]
"""The names a suite's ``methods`` may use, checked when the config is built: the built-in reuse methods of
:mod:`pituning.methods`, and every name its ``register_method`` adds."""


def typed_config(value: Any, cls: type[_C], option: str) -> _C:
    """``value`` (``None``, a mapping of ``cls``'s fields, or a ``cls``) as a ``cls``; a misspelt key is a
    :class:`ConfigError` naming ``option`` with a suggestion and the valid keys."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{option} must be a mapping of {cls.__name__} options, got {value!r}.")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(known))
    if unknown:
        where = (
            " It is a suite option: move it to the top level." if "k" in unknown and option == "interpolation" else ""
        )
        raise ConfigError(f"Unknown {option} option(s) {did_you_mean(unknown, known)}; valid options: {known}.{where}")
    return cls(**value)


def did_you_mean(unknown: Sequence[str], known: Sequence[str]) -> str:
    """``'lrr' (did you mean 'lr'?), 'x'``: each unknown name with the closest known one, where one is close."""
    import difflib

    return ", ".join(
        f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, list(known), 1)) else repr(u)
        for u in unknown
    )


def fold_flat_options(value: Any, cls: type[_C], option: str, flat: Mapping[str, Any], owner: str) -> _C:
    """``value`` as a ``cls``, with ``flat`` (options given one by one, the spelling before the typed configs) folded
    in under a :class:`DeprecationWarning`; an option given both ways, or one that is no field, is a
    :class:`ConfigError`."""
    config = typed_config(value, cls, option)
    if not flat:
        return config
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ConfigError(f"{owner} got unknown option(s) {did_you_mean(unknown, known)}.")
    if value is not None:
        raise ConfigError(f"{owner}: give {sorted(flat)} inside {option}=..., not beside it.")
    warnings.warn(
        f"{owner}({', '.join(f'{k}=...' for k in flat)}) is deprecated and will be removed in the next release; pass "
        f"{option}={cls.__name__}({', '.join(f'{k}=...' for k in flat)}) (YAML: {option}: {{{', '.join(flat)}}}).",
        DeprecationWarning,
        stacklevel=4,
    )
    return dataclasses.replace(config, **flat)  # type: ignore[type-var]


@dataclass(frozen=True)
class SuiteConfig:
    """A π-Tuning suite: sources, targets, expert kind, k, shots and seeds. Every field is checked when it is built,
    before any backbone loads."""

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
    optim: OptimConfig = field(default_factory=OptimConfig)
    """How experts and heads are trained (``lr``, ``weight_decay`` ...), in every stage."""
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    """How the pool is interpolated (``mode``, ``logits_lr``, ``weights_only_steps`` ...)."""
    task_type: TaskType = "classification"
    """What every task's head does: ``classification``, ``matching`` (dual encoders) or ``text_to_text`` (T5)."""
    backbone_task: str = "base"
    """Which head of the backbone checkpoint to load (``base``; ``seq2seq-lm`` for text-to-text)."""
    backbone_dtype: Literal["float32", "bfloat16"] | None = None
    """Storage dtype of the frozen backbone (``bfloat16`` halves its memory; experts stay fp32)."""
    attn_implementation: str | None = None
    """Attention implementation of a Hugging Face backbone (``eager``, ``sdpa`` ...)."""
    source_epochs: int = 3
    """Epochs of source expert training."""
    target_epochs: int = 10
    """Epochs of target training (alone, baselines and π-Tuning get the same)."""
    probe: str | None = "random"
    """Where Fisher embeddings are taken: ``random`` (one shared random expert), ``null`` (each task's own expert),
    or a bank expert name."""
    estimator: Literal["per_sample", "loop", "batch", "sampled"] = "per_sample"
    """Fisher estimator."""
    embed_examples: int | None = None
    """Training examples of a source in its Fisher pass (a random subset of its training split; ``None``: all it was
    trained on). The per-sample Fisher costs about one forward and backward per example, and a few hundred examples
    give a stable embedding."""
    precision: str = "32-true"
    """Lightning precision (``bf16-mixed`` ...)."""
    accelerator: str = "auto"
    """Lightning accelerator."""
    progress_bar: bool = False
    """Lightning's progress bar in every fit, test and Fisher pass. Off by default: the suite prints one line per
    stage, with how many are done and the time left."""
    methods: list[str] = field(default_factory=lambda: ["best_source_init", "uniform_average"])
    """Other ways of reusing the sources, run beside the target expert alone and π-Tuning on the same shots and
    epochs and reported side by side: the references ``linear_probe`` and ``full_finetune`` (no expert),
    ``best_source_init``, ``uniform_average``, the merges (``task_arithmetic``,
    ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``concat``, ``svd``), ``lorahub``, ``arrow``,
    π-Tuning's variants (``pi_linear``, ``pi_layer_weights``, ``pi_task_weights``, ``pi_guard``) and the controls
    (``random_pool``, ``random_parameters``, ``pi_without_target``, ``random_pool_without_target``); see
    docs/recycling.md."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options per method, e.g. ``{ties: {density: 0.3}, lorahub: {budget: 60}}``."""
    baselines: list[str] | None = None
    """Deprecated spelling of ``methods`` (it will be removed in the next release)."""
    devices: Any = 1
    """Lightning devices."""
    collapsed_sources: Literal["warn", "exclude", "error"] = "warn"
    """What to do with a source expert that is no better than always predicting its majority class (checked on its
    own test set right after training): ``warn`` (use it, flag it in the log and the results), ``exclude`` (leave it
    out of every target's candidates) or ``error`` (stop with an ``ExpertError``)."""
    library: str | None = None
    """A bank (directory or URL) of experts without their data, such as imported PEFT adapters: every entry joins the
    candidate sources (copied into the suite's bank) and is ranked on each target's shots
    (``interpolation.predictor: few_shot_loss``); ``sources`` may then be empty."""
    module: dict[str, Any] | None = None
    """Deprecated spelling of ``optim`` (it will be removed in the next release)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the plain forms (dicts from Python or JSON) once, here
        optim: Any = self.optim
        if self.module is not None:
            if optim != OptimConfig():
                raise ConfigError("Give the training options once, under optim: (module: is its old spelling).")
            warnings.warn(
                "The suite option module: is deprecated and will be removed in the next release; rename it optim:.",
                DeprecationWarning,
                stacklevel=3,
            )
            optim = dict(self.module)
            set_(self, "module", None)
        if isinstance(optim, Mapping) and {"backbone_dtype", "attn_implementation"} & set(optim):
            optim = dict(optim)
            for moved in ("backbone_dtype", "attn_implementation"):
                if moved in optim:
                    warnings.warn(
                        f"optim.{moved} is deprecated and will be removed in the next release; it is a backbone "
                        f"option now: set {moved} at the top level of the suite.",
                        DeprecationWarning,
                        stacklevel=3,
                    )
                    set_(self, moved, optim.pop(moved))
        set_(self, "optim", typed_config(optim, OptimConfig, "optim"))
        check_choice(self.backbone_dtype, "backbone_dtype", BACKBONE_DTYPES)
        set_(self, "interpolation", typed_config(self.interpolation, InterpolationConfig, "interpolation"))
        set_(self, "sources", [typed_config(t, TaskSpec, "sources[]") for t in self.sources])
        set_(self, "targets", [typed_config(t, TaskSpec, "targets[]") for t in self.targets])
        self.embedding  # noqa: B018 - checks estimator and embed_examples
        check_choice(self.collapsed_sources, "collapsed_sources", ("warn", "exclude", "error"))
        check_choice(self.task_type, "task_type", ("classification", "matching", "text_to_text"))
        option = "methods"
        if self.baselines is not None:
            option = "baselines (the old spelling of methods)"
            warnings.warn(
                "The suite option baselines: is deprecated and will be removed in the next release; rename it "
                "methods:.",
                DeprecationWarning,
                stacklevel=3,
            )
            set_(self, "methods", list(self.baselines))
            set_(self, "baselines", None)
        if not isinstance(self.methods, list) or not all(isinstance(m, str) for m in self.methods):
            raise ConfigError(f"{option} must be a list of method names, got {self.methods!r}.")
        unknown = [m for m in self.methods if m not in METHOD_NAMES and m not in ("alone", "pi")]
        if unknown:
            raise ConfigError(
                f"Unknown {option} {did_you_mean(unknown, METHOD_NAMES)}; known: {METHOD_NAMES} (the target expert "
                "alone and π-Tuning always run)."
            )
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if twice or {"alone", "pi"} & set(self.methods):
            raise ConfigError(
                f"methods lists {sorted(set(twice) | ({'alone', 'pi'} & set(self.methods)))} more than once (the "
                "target expert alone and π-Tuning always run); list each other method once."
            )
        if not isinstance(self.method_options, Mapping) or not all(
            isinstance(v, Mapping) for v in self.method_options.values()
        ):
            raise ConfigError(f"method_options must map method names to option mappings, got {self.method_options!r}.")
        names = [t.name for t in self.sources] + [t.name for t in self.targets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"Task names must be unique across sources and targets; {twice} appear twice.")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be an integer >= 1 (the sources interpolated per target), got {self.k!r}.")
        known = {t.name for t in self.sources}
        for target in self.targets:
            unknown = sorted(set(target.exclude) - known)
            if unknown and self.library is None:
                raise ConfigError(
                    f"Target {target.name!r} excludes {unknown}, which are no sources of this suite; sources: "
                    f"{sorted(known)}."
                )
        if self.library is None and self.k > len(self.sources):
            raise ConfigError(f"k={self.k} but the suite has only {len(self.sources)} source task(s); lower k.")
        if self.library is not None and self.interpolation.predictor != "few_shot_loss":
            raise ConfigError(
                "A library's experts come without their training data, so they have no task embedding to rank by: set "
                "interpolation: {predictor: few_shot_loss} (each candidate scored on the target's shots)."
            )
        if not isinstance(self.shots, int) or self.shots < 1:
            raise ConfigError(f"shots must be an integer >= 1 (examples per class of each target), got {self.shots!r}.")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed, e.g. [0, 1, 2].")
        for option in ("source_epochs", "target_epochs"):
            if not isinstance(getattr(self, option), int) or getattr(self, option) < 1:
                raise ConfigError(f"{option} must be an integer >= 1, got {getattr(self, option)!r}.")
        set_here = sorted(set(self.data) & set(SUITE_SET_DATA_OPTIONS))
        if set_here:
            raise ConfigError(
                f"data options {set_here} are set by the suite for each task (use the top-level shots and seeds, "
                "and each task's name and dataset); remove them from data:."
            )
        if "kind" not in self.expert:
            raise ConfigError(f"expert needs its kind (lora, adapter, prefix ...), got {self.expert!r}.")

    @property
    def embedding(self) -> EmbeddingConfig:
        """The embedding options as one config."""
        return EmbeddingConfig(self.probe, self.estimator, self.embed_examples)

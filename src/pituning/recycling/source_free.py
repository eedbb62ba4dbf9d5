"""Source-free ranking: rank candidate source experts for a target from the target's labelled shots alone.

Experts imported from PEFT adapter directories (:meth:`~pituning.bank.ExpertBank.import_peft`) come without their
training data, so they have no task embedding of their own to compare (docs/concepts.md, stage 2), and usually
without a task head. The predictors here need only the target's few labelled shots and each source's weights:

- ``few_shot_loss``: how well the target's classes are predicted through the source expert, as the negative mean
  cross-entropy on the shots (higher is better). With the source's own head when it fits the target's classes
  (:func:`~pituning.recycling.heads.reuse_head`: right shape *and* above chance on the shots); otherwise with a
  linear head fitted on the frozen features the task model's head receives, scored by k-fold cross-validation, so
  that every shot is scored by a head that never saw it (a linear head over ``d >= N`` features fits any labelling
  of ``N`` shots, so an in-sample loss would measure memorisation, not transfer). A reused source head was not
  fitted on the shots either, so both losses are held-out losses.
- ``fisher_at_source``: the diagonal Fisher of the target's shots taken at each source expert's parameters,
  compared with the target's Fisher taken at a reference point (the target's own expert, or a probe) by the
  library's task similarity (:func:`pituning.graph.task_similarity`). See :func:`fisher_at_source` for what it
  measures.

:func:`rank_sources` is the entry point; :func:`score_sources` returns the full report (which head each source used,
which candidates could not be scored and why). Plain torch; the model runs in eval mode, features and losses under
``no_grad``; the Fisher's gradients come from ``torch.func`` and never touch ``.grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.backbones import Backbone
from pituning.bank import ExpertBank
from pituning.errors import BankError, ConfigError, PiTuningError
from pituning.fisher import ESTIMATORS, check_fisher, fisher_sum, log_likelihood
from pituning.graph import RESCALE, Similarity, task_similarity
from pituning.heads import TASK_TYPES, TaskModel
from pituning.model import ExpertModel
from pituning.recycling.heads import (
    BASELINES,
    HeadChoice,
    _fits,
    _linear,
    _logits,
    _target_classes,
    cross_validated_loss,
    fit_linear_head,
    head_features,
    reuse_head,
)

__all__ = [
    "HEAD_MODES",
    "ON_UNSCORED",
    "PREDICTORS",
    "SourceRanking",
    "few_shot_loss",
    "fisher_at_source",
    "rank_sources",
    "score_sources",
    "shot_fisher",
]

#: The source-free predictors.
PREDICTORS = ("few_shot_loss", "fisher_at_source")
#: How each source's head is chosen: ``auto`` (:func:`~pituning.recycling.heads.reuse_head`'s policy), ``source``
#: (the stored head, no check; a source without a fitting head is not scored) or ``refit`` (a linear head fitted on
#: the shots for every source: the same footing for all, a measure of the features alone).
HEAD_MODES = ("auto", "source", "refit")
#: What :func:`rank_sources` does when a candidate cannot be scored: ``raise`` or ``warn`` (log and rank the rest).
ON_UNSCORED = ("raise", "warn")

_SLOT = "source_free_candidate"  # the temporary name each candidate is loaded under
_LAYOUT_FIX = (
    "fisher_at_source compares experts of the reference's layout (kind, rank, modules): give a reference of this "
    "layout, or use predictor='few_shot_loss', which ranks any layout."
)
_PREFIX = "experts.backbone."
log = logging.getLogger(__name__)


@dataclass
class SourceRanking:
    """The scores of every candidate, the head each one used, and the candidates that could not be scored."""

    predictor: str
    """``few_shot_loss`` or ``fisher_at_source``."""
    ranked: list[tuple[str, float]]
    """``(candidate, score)`` best first (ties by name); higher is better for both predictors."""
    heads: dict[str, HeadChoice] = field(default_factory=dict)
    """Candidate -> the head it was scored with, and why."""
    unscored: dict[str, str] = field(default_factory=dict)
    """Candidate -> why it could not be scored (unknown entry, another backbone, a layout unlike the reference's,
    an all-zero Fisher ...)."""
    accuracy: dict[str, float] = field(default_factory=dict)
    """``few_shot_loss`` on class targets: candidate -> accuracy on the shots (held-out for a refitted head)."""
    reference_head: HeadChoice | None = None
    """``fisher_at_source`` with a bank entry as reference: the head its Fisher was taken with."""


# ---------------------------------------------------------------------------------------------------------- predictors
def _few_shot(
    model: TaskModel,
    batches: Sequence[Mapping[str, Tensor]],
    head: HeadChoice,
    *,
    folds: int,
    steps: int,
    l2: float,
    features: tuple[Tensor, Tensor] | None = None,
) -> tuple[float, float | None]:
    """``(score, accuracy)`` of the active expert with ``head`` (accuracy ``None`` for text-to-text)."""
    if head.kind == "refit":
        if features is None:
            features = head_features(model, batches)
        loss, accuracy = cross_validated_loss(
            features[0], features[1], _target_classes(model), folds=folds, steps=steps, l2=l2
        )
        return -loss, accuracy
    logits = _logits(model, head.state, batches)
    device = logits.device
    labels = torch.cat([b["labels"].to(device) for b in batches])
    if model.task_type == "text_to_text":
        return float(log_likelihood(logits, labels).mean()), None
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]:
        raise ConfigError(
            f"The shots' labels span {int(labels.min())}..{int(labels.max())}, but the head scores {logits.shape[-1]} "
            "classes; build the task model with the target's number of classes."
        )
    accuracy = float((logits.argmax(dim=-1) == labels).float().mean())
    return -float(F.cross_entropy(logits, labels)), accuracy


def few_shot_loss(
    model: TaskModel,
    batches: Sequence[Mapping[str, Tensor]],
    head: HeadChoice,
    *,
    folds: int = 5,
    steps: int = 100,
    l2: float = 1e-2,
) -> float:
    """The ``few_shot_loss`` score of the active expert: negative mean cross-entropy on the target's shots.

    With ``head.kind == "refit"`` the score is cross-validated (:func:`~pituning.recycling.heads.cross_validated_loss`:
    ``folds`` stratified folds, each shot scored by a linear head fitted on the others); with a ``source`` or
    ``fresh`` head it is the loss of that head on every shot (a head that never saw them). ``text_to_text``: the
    mean over shots of the summed token log-likelihood (``-100`` labels ignored).

    Args:
        model: the target's task model with the source expert active.
        batches: the target's labelled shots, dicts of input tensors plus ``labels`` (``(n,)``, or ``(n, T)`` tokens).
        head: the head to score with (:func:`~pituning.recycling.heads.reuse_head`).
        folds: cross-validation folds of a refitted head (``folds = N`` is leave-one-out).
        steps: L-BFGS iterations of a refitted head.
        l2: weight penalty of a refitted head.

    Returns:
        The score; higher is better.
    """
    if not batches:
        raise ConfigError("No shots: give at least one batch of the target's labelled examples.")
    return _few_shot(model, batches, head, folds=folds, steps=steps, l2=l2)[0]


def shot_fisher(
    model: TaskModel,
    expert: str,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    estimator: str = "per_sample",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher of the target's shots with respect to expert ``expert``'s parameters, at their values.

    ``F = mean over shots of (d log p(y|x) / d theta)^2`` (:func:`pituning.fisher.fisher_sum`), with ``p`` the task
    model with its current head. Keyed as bank task embeddings are (``<module>.pi_lora.lora_A`` ...), so a stored
    embedding of the target can serve as a reference.

    Args:
        model: the target's task model, with ``expert`` active and the head to take the Fisher with loaded.
        expert: the expert whose parameters are differentiated.
        batches: the target's labelled shots.
        estimator: ``per_sample``, ``loop``, ``batch`` or ``sampled`` (:data:`pituning.fisher.ESTIMATORS`).
        generator: random source of ``sampled`` labels.

    Returns:
        ``{tensor name: Fisher}``, fp32 on the CPU, each of the parameter's shape.

    Raises:
        ConfigError: ``expert`` is not active in the model.
        FisherError: the Fisher is all zero or non-finite in every tensor.
    """
    if expert not in model.experts.active:
        raise ConfigError(
            f"Expert {expert!r} is not active (active: {model.experts.active}); activate it before taking the Fisher "
            "at it, or every gradient is zero."
        )
    suffix = f".{expert}"
    params = {n: p for n, p in model.named_parameters() if ".pi_" in n and n.endswith(suffix)}
    param = next(iter(params.values()), None)
    device = param.device if param is not None else torch.device("cpu")
    moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
    fisher = fisher_sum(model, params, moved, estimator=estimator, generator=generator).mean()
    out = {n.removeprefix(_PREFIX)[: -len(suffix)]: v.detach().float().cpu() for n, v in fisher.items()}
    check_fisher(out, f"the shots at expert {expert!r}")
    return out


def _layout_problem(reference: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> str:
    if set(reference) != set(fisher):
        extra = sorted(set(reference) ^ set(fisher))
        return f"its layout is not the reference's ({len(extra)} tensor(s) differ, e.g. {extra[:2]})"
    for key, value in reference.items():
        if tuple(value.shape) != tuple(fisher[key].shape):
            mine, theirs = tuple(fisher[key].shape), tuple(value.shape)
            return f"its layout is not the reference's: {key} has shape {mine}, the reference's {theirs}"
    return ""


def fisher_at_source(
    model: TaskModel,
    expert: str,
    batches: Sequence[Mapping[str, Tensor]],
    reference: Mapping[str, Tensor],
    *,
    estimator: str = "per_sample",
    rescale: str = "unit_mean",
    generator: torch.Generator | None = None,
) -> Similarity:
    """Similarity of the target's Fisher at a source expert to the target's Fisher at a reference point.

    What it measures: the *same data* (the target's shots) at *two points* of the expert's parameter space, the
    source expert ``theta_s`` and the reference ``theta_r`` (the target's own expert, or a probe)::

        F_s = E_shots[(d log p(y|x; theta_s) / d theta)^2],    F_r = the same at theta_r
        score = task_similarity(F_r, F_s)        # per tensor, unit-mean rescaled, symmetric normalised cosine

    It is Task2Vec's similarity with the roles swapped: Task2Vec fixes the point (a probe) and varies the data; here
    the data are fixed and the point varies. A score near 1 says the target's shots load the same parameter
    coordinates, in the same proportions, at the source as at the reference: the source sits where the target's
    loss has the curvature pattern it has at the target's own solution. Rescaling removes the overall scale, so it
    says nothing about the size of the loss (``few_shot_loss`` does), and it is defined only between experts of the
    reference's layout (same kind, rank and modules).

    Args:
        model: the target's task model with ``expert`` (the source) active and the head to take the Fisher with.
        expert: the source expert's name in the model.
        batches: the target's labelled shots.
        reference: the target's Fisher at the reference point (:func:`shot_fisher` there, or the target's stored
            task embedding when it was taken on these shots).
        estimator: the Fisher estimator.
        rescale: ``unit_mean`` (default) or ``none`` (:data:`pituning.graph.RESCALE`).
        generator: random source of ``sampled`` labels.

    Returns:
        The :class:`~pituning.graph.Similarity` (``value`` in ``[0, 1]``, ``nan`` when no tensor was usable).

    Raises:
        ConfigError: the source's layout differs from the reference's (the message names the tensor).
    """
    fisher = shot_fisher(model, expert, batches, estimator=estimator, generator=generator)
    problem = _layout_problem(reference, fisher)
    if problem:
        raise ConfigError(
            f"fisher_at_source cannot compare expert {expert!r} with the reference: {problem}. {_LAYOUT_FIX}"
        )
    return task_similarity(reference, fisher, rescale=rescale)


# ---------------------------------------------------------------------------------------------------------- ranking
def _validate(
    predictor: str,
    task_type: str,
    head: str,
    baseline: str,
    reference: str | Mapping[str, Tensor] | None,
    estimator: str,
    rescale: str,
    folds: int,
    batches: Sequence[Mapping[str, Tensor]],
) -> None:
    if predictor not in PREDICTORS:
        raise ConfigError(f"predictor must be one of {list(PREDICTORS)}, got {predictor!r}.")
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task_type must be one of {list(TASK_TYPES)}, got {task_type!r}.")
    if head not in HEAD_MODES:
        raise ConfigError(f"head must be one of {list(HEAD_MODES)}, got {head!r}.")
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}.")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}.")
    if rescale not in RESCALE:
        raise ConfigError(f"rescale must be one of {list(RESCALE)}, got {rescale!r}.")
    if folds < 2:
        raise ConfigError(f"folds must be >= 2 (cross-validation of refitted heads), got {folds}.")
    if predictor == "fisher_at_source" and reference is None:
        raise ConfigError(
            "predictor='fisher_at_source' needs reference=: the bank entry of the target's own expert (or of a probe) "
            "to take the target's Fisher at, or that Fisher itself ({tensor: Fisher})."
        )
    if task_type == "text_to_text" and head != "auto":
        raise ConfigError(f"head={head!r}: text_to_text has no task head; use head='auto'.")
    if not batches:
        raise ConfigError("No shots: give at least one batch of the target's labelled examples.")
    missing = [i for i, b in enumerate(batches) if "labels" not in b]
    if missing:
        raise ConfigError(f"Shot batch(es) {missing[:3]} have no 'labels'; the ranking needs the target's labels.")


def _num_classes(
    task_type: str, num_classes: int | None, batches: Sequence[Mapping[str, Tensor]], texts: Mapping[str, Tensor] | None
) -> int:
    if task_type == "matching":
        if texts is None:
            raise ConfigError(
                "task_type='matching' needs match_candidates: the tokenised texts of the target's classes."
            )
        return int(texts["input_ids"].shape[0])
    if task_type == "text_to_text":
        return 2  # unused: no class head
    if num_classes is not None:
        return num_classes
    return max(2, 1 + max(int(b["labels"].max()) for b in batches))


def _choose(
    model: TaskModel,
    stored: Mapping[str, Tensor] | None,
    batches: Sequence[Mapping[str, Tensor]],
    features: tuple[Tensor, Tensor] | None,
    mode: str,
    num_classes: int,
    *,
    baseline: str,
    margin: float,
    steps: int,
    l2: float,
) -> HeadChoice:
    if mode == "auto":
        return reuse_head(
            model, stored, batches, baseline=baseline, margin=margin, steps=steps, l2=l2, features=features
        )
    if mode == "refit":
        assert features is not None
        state = fit_linear_head(features[0], features[1], num_classes, steps=steps, l2=l2)
        return HeadChoice("refit", "head='refit': a linear head fitted on the shots, as for every source", state)
    why = _fits(model, stored) if stored is not None else "the source has no stored head"
    if why:
        raise ConfigError(f"head='source' but {why}; use head='auto' (refits where the source head does not fit).")
    assert stored is not None
    return HeadChoice("source", "head='source': the source's stored head, unchecked", dict(stored))


def score_sources(
    model: ExpertModel | Backbone | nn.Module | str | Path,
    bank: ExpertBank,
    candidates: Sequence[str],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    predictor: str = "few_shot_loss",
    task_type: str = "classification",
    num_classes: int | None = None,
    match_candidates: Mapping[str, Tensor] | None = None,
    reference: str | Mapping[str, Tensor] | None = None,
    head: str = "auto",
    baseline: str = "chance",
    margin: float = 0.0,
    folds: int = 5,
    steps: int = 100,
    l2: float = 1e-2,
    estimator: str = "per_sample",
    rescale: str = "unit_mean",
    seed: int = 0,
    allow_backbone_mismatch: bool = False,
) -> SourceRanking:
    """Score every candidate source expert for a target from the target's labelled shots alone; the full report.

    Each candidate is loaded from the bank into the model under a temporary name, alone active; its head is chosen
    (``head``), then it is scored by ``predictor``. A candidate that cannot be scored (unknown, another backbone, a
    layout unlike the reference's, no fitting head with ``head='source'``, an all-zero Fisher) is listed in
    :attr:`SourceRanking.unscored` with the reason; nothing is skipped silently.

    Args:
        model: the backbone with its experts (:class:`~pituning.model.ExpertModel`), or what ``ExpertModel`` loads
            (a backbone name, directory, :class:`~pituning.backbones.Backbone` or module). An ``ExpertModel`` gets
            each candidate under a temporary name and is left with the experts, active set and mode it had (an
            interpolation in progress is refused).
        bank: the bank holding the candidates.
        candidates: bank entries to rank.
        batches: the target's labelled shots: dicts of input tensors plus ``labels`` ``(n,)`` (``(n, T)`` token labels
            for ``text_to_text``).
        predictor: ``few_shot_loss`` or ``fisher_at_source``.
        task_type: the target's task type (:data:`pituning.heads.TASK_TYPES`).
        num_classes: the target's classes (default: the largest label + 1, at least 2).
        match_candidates: ``matching`` only: the tokenised texts of the target's classes ``(C, T)``.
        reference: ``fisher_at_source`` only: a bank entry (the target's own expert, or a probe) at which the target's
            Fisher is taken, with its head chosen as for a source; or that Fisher itself ``{tensor: Fisher}``.
        head: ``auto`` (:func:`~pituning.recycling.heads.reuse_head`), ``source`` or ``refit`` (:data:`HEAD_MODES`).
        baseline: what a reused source head must beat, ``chance`` or ``majority``.
        margin: how far above the baseline.
        folds: cross-validation folds of refitted heads (``few_shot_loss``; ``folds >= N`` is leave-one-out).
        steps: L-BFGS iterations of a refitted head.
        l2: weight penalty of a refitted head.
        estimator: Fisher estimator (``fisher_at_source``).
        rescale: Fisher rescaling (``fisher_at_source``).
        seed: seeds the fresh head of the task model (and ``sampled`` Fisher labels), so scores are reproducible.
        allow_backbone_mismatch: load candidates trained on another backbone anyway (shapes must fit).

    Returns:
        The :class:`SourceRanking`.

    Raises:
        ConfigError: a bad option, no shots, or a reference that cannot be used.
        BankError: ``reference`` names an entry that cannot be loaded.
    """
    _validate(predictor, task_type, head, baseline, reference, estimator, rescale, folds, batches)
    experts = model if isinstance(model, ExpertModel) else ExpertModel(model)
    device = next((p.device for p in experts.parameters()), torch.device("cpu"))
    # loading an expert initialises its tensors before the stored weights land: keep the caller's random state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the fresh head (and anything else random) is the same on every call
        return _score(
            experts,
            bank,
            candidates,
            batches,
            device,
            predictor=predictor,
            task_type=task_type,
            num_classes=num_classes,
            match_candidates=match_candidates,
            reference=reference,
            head=head,
            folds=folds,
            estimator=estimator,
            rescale=rescale,
            seed=seed,
            allow_backbone_mismatch=allow_backbone_mismatch,
            options={"baseline": baseline, "margin": margin, "steps": steps, "l2": l2},
        )


def _score(
    experts: ExpertModel,
    bank: ExpertBank,
    candidates: Sequence[str],
    batches: Sequence[Mapping[str, Tensor]],
    device: torch.device,
    *,
    predictor: str,
    task_type: str,
    num_classes: int | None,
    match_candidates: Mapping[str, Tensor] | None,
    reference: str | Mapping[str, Tensor] | None,
    head: str,
    folds: int,
    estimator: str,
    rescale: str,
    seed: int,
    allow_backbone_mismatch: bool,
    options: dict[str, Any],
) -> SourceRanking:
    """:func:`score_sources` on an :class:`ExpertModel`, inside the caller's forked random state."""
    steps, l2 = options["steps"], options["l2"]
    if _SLOT in experts.experts:
        raise ConfigError(f"The model already has an expert named {_SLOT!r}; it is the ranking's temporary name.")
    if experts.interpolation_parameters():
        raise ConfigError("The model is interpolating experts; rank sources on a model that is not (a fresh one).")
    classes = _num_classes(task_type, num_classes, batches, match_candidates)
    task_model = TaskModel(experts, task_type, classes, candidates=match_candidates).to(device)
    linear = _linear(task_model) is not None
    if head == "refit" and not linear:
        raise ConfigError(
            f"head='refit' fits a linear head over pooled features; task_type={task_type!r} on a "
            f"{experts.info.family!r} backbone has a {type(task_model.head).__name__}. Use head='auto'."
        )
    shots = [{k: v.to(device) for k, v in b.items()} for b in batches]
    fresh = {k: v.detach().clone() for k, v in task_model.head.state_dict().items()}
    was_active, was_training = experts.active, experts.training
    report = SourceRanking(predictor, [])

    def scored(name: str, role: str) -> tuple[HeadChoice, float, float | None, Mapping[str, Tensor] | None]:
        """Load ``name`` into the slot, choose its head, score it (or take its Fisher, for the reference)."""
        stored = bank.load_into(
            experts, name, as_name=_SLOT, activate=False, allow_backbone_mismatch=allow_backbone_mismatch
        )
        experts.set_active([_SLOT])
        task_model.head.load_state_dict(fresh)
        features = head_features(task_model, shots) if linear else None
        choice = _choose(task_model, stored.head, shots, features, head, classes, **options)
        if choice.state is not None:
            task_model.head.load_state_dict({k: v.to(fresh[k]) for k, v in choice.state.items()})
        if predictor == "few_shot_loss":
            score, accuracy = _few_shot(task_model, shots, choice, folds=folds, steps=steps, l2=l2, features=features)
            return choice, score, accuracy, None
        generator = torch.Generator().manual_seed(seed)
        if role == "reference":
            return (
                choice,
                float("nan"),
                None,
                shot_fisher(task_model, _SLOT, shots, estimator=estimator, generator=generator),
            )
        assert isinstance(ref, Mapping)
        fisher = shot_fisher(task_model, _SLOT, shots, estimator=estimator, generator=generator)
        problem = _layout_problem(ref, fisher)
        if problem:
            raise ConfigError(f"{problem}. {_LAYOUT_FIX}")
        sim = task_similarity(ref, fisher, rescale=rescale)
        if sim.value != sim.value:  # nan: no tensor usable on both sides
            raise ConfigError(f"no tensor's Fisher is usable on both sides ({dict(list(sim.skipped.items())[:2])})")
        return choice, sim.value, None, None

    def unload() -> None:
        if _SLOT in experts.experts:
            experts.remove_expert(_SLOT)
        task_model.head.load_state_dict(fresh)

    ref: Mapping[str, Tensor] | None = reference if isinstance(reference, Mapping) else None
    results: list[tuple[str, float]] = []
    try:
        experts.eval()  # dropout off; features and losses run under no_grad, the Fisher uses torch.func
        if isinstance(reference, str):
            try:
                report.reference_head, _, _, ref = scored(reference, "reference")
            except PiTuningError as err:
                raise type(err)(f"The reference {reference!r} cannot be used: {err}") from err
            finally:
                unload()
        for name in candidates:
            try:
                choice, score, accuracy, _ = scored(name, "source")
            except PiTuningError as err:
                report.unscored[name] = f"{type(err).__name__}: {err}"
                continue
            finally:
                unload()
            report.heads[name] = choice
            if accuracy is not None:
                report.accuracy[name] = accuracy
            results.append((name, score))
    finally:
        experts.set_active(was_active)
        experts.train(was_training)
    report.ranked = sorted(results, key=lambda item: (-item[1], item[0]))
    return report


def rank_sources(
    model: ExpertModel | Backbone | nn.Module | str | Path,
    bank: ExpertBank,
    candidates: Sequence[str],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    predictor: str = "few_shot_loss",
    task_type: str = "classification",
    on_unscored: str = "raise",
    num_classes: int | None = None,
    match_candidates: Mapping[str, Tensor] | None = None,
    reference: str | Mapping[str, Tensor] | None = None,
    head: str = "auto",
    baseline: str = "chance",
    margin: float = 0.0,
    folds: int = 5,
    steps: int = 100,
    l2: float = 1e-2,
    estimator: str = "per_sample",
    rescale: str = "unit_mean",
    seed: int = 0,
    allow_backbone_mismatch: bool = False,
) -> list[tuple[str, float]]:
    """Rank candidate source experts for a target from its labelled shots alone, best first.

    Options as :func:`score_sources`, which returns the full report (heads used, unscored candidates); this returns
    only the ranking.

    Args:
        model: the backbone with its experts, or what :class:`~pituning.model.ExpertModel` loads.
        bank: the bank holding the candidates.
        candidates: bank entries to rank.
        batches: the target's labelled shots (dicts of input tensors plus ``labels``).
        predictor: ``few_shot_loss`` (default) or ``fisher_at_source``.
        task_type: the target's task type.
        on_unscored: ``raise`` (default: a :class:`~pituning.errors.BankError` listing every candidate that could not
            be scored and why) or ``warn`` (log them and rank the others).
        num_classes: see :func:`score_sources`.
        match_candidates: see :func:`score_sources`.
        reference: see :func:`score_sources`.
        head: see :func:`score_sources`.
        baseline: see :func:`score_sources`.
        margin: see :func:`score_sources`.
        folds: see :func:`score_sources`.
        steps: see :func:`score_sources`.
        l2: see :func:`score_sources`.
        estimator: see :func:`score_sources`.
        rescale: see :func:`score_sources`.
        seed: see :func:`score_sources`.
        allow_backbone_mismatch: see :func:`score_sources`.

    Returns:
        ``[(candidate, score), ...]`` sorted best first (higher is better for both predictors).

    Example:
        >>> ranked = rank_sources(model, bank, bank.names(), shots)  # doctest: +SKIP
        >>> best, score = ranked[0]  # doctest: +SKIP
    """
    if on_unscored not in ON_UNSCORED:
        raise ConfigError(f"on_unscored must be one of {list(ON_UNSCORED)}, got {on_unscored!r}.")
    report = score_sources(
        model,
        bank,
        candidates,
        batches,
        predictor=predictor,
        task_type=task_type,
        num_classes=num_classes,
        match_candidates=match_candidates,
        reference=reference,
        head=head,
        baseline=baseline,
        margin=margin,
        folds=folds,
        steps=steps,
        l2=l2,
        estimator=estimator,
        rescale=rescale,
        seed=seed,
        allow_backbone_mismatch=allow_backbone_mismatch,
    )
    if report.unscored:
        lines = "; ".join(f"{name}: {why}" for name, why in report.unscored.items())
        message = (
            f"{len(report.unscored)} of {len(candidates)} candidate(s) could not be scored with "
            f"predictor={predictor!r}: {lines}"
        )
        if on_unscored == "raise":
            raise BankError(
                message + ". Drop them from candidates, fix the cause, or pass on_unscored='warn' to rank the others."
            )
        log.warning("%s; ranking the other %d.", message, len(report.ranked))
    return report.ranked

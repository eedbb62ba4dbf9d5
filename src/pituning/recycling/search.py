"""Gradient-free mixture weights: LoraHub-style search over the weights of an expert merge.

LoraHub (Huang et al., 2024, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM)
merges a library of experts with one scalar weight each, ``theta = sum_i w_i theta_i`` (LoRA's ``A`` and ``B`` each
combined linearly), and chooses the weights without gradients: a black-box optimiser (nevergrad) minimises the
few-shot loss of the merge plus an L1 penalty ``l1 * sum_i |w_i|`` that keeps the weights small.

:func:`search_weights` is the search over any objective; :func:`merged_loss_objective` is the objective for a merge
of bank experts evaluated in one live expert slot; :func:`lorahub` runs both and returns the merged expert.
nevergrad is an optional dependency (``pip install 'pituning[search]'``), imported only when a search runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from pituning.bank.records import Expert
from pituning.errors import BackboneMismatchError, ConfigError, ExpertError
from pituning.experts.base import iter_hosts
from pituning.heads import TaskModel
from pituning.tasks import TaskInfo

__all__ = [
    "MergeFn",
    "MergedLossObjective",
    "SearchResult",
    "linear_merge",
    "lorahub",
    "merged_loss_objective",
    "search_weights",
]

MergeFn = Callable[[Sequence[Mapping[str, Tensor]], Sequence[float]], Mapping[str, Tensor]]
"""A state combination ``(states, weights) -> state``: one tensor per key of the first state."""


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`search_weights`."""

    weights: list[float]
    """The best weights found (one per expert)."""
    loss: float
    """The objective at ``weights``, without the L1 penalty."""
    penalised: float
    """``loss + l1 * sum_i |weights_i|``: what the search minimised."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """``(step, penalised loss)`` of every evaluation, steps from 1 (``inf`` where the objective was not finite)."""


def search_weights(
    objective: Callable[[list[float]], float],
    n: int,
    *,
    budget: int = 40,
    lower: float = -1.5,
    upper: float = 1.5,
    l1: float = 0.05,
    seed: int = 0,
    optimizer: str = "NGOpt",
    init: Sequence[float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> SearchResult:
    """Minimise ``objective(w) + l1 * sum_i |w_i|`` over ``w`` in ``[lower, upper]^n`` with a nevergrad optimiser.

    The first evaluation is ``init`` itself (LoraHub's uniform start), so the result is never worse than the start;
    the other ``budget - 1`` points are the optimiser's. The best point evaluated is returned (not the optimiser's
    own recommendation, which may be a point never evaluated). A non-finite objective value counts as ``+inf`` for
    the optimiser. The optimiser draws from a generator seeded with ``seed``, so a rerun returns the same weights.

    Args:
        objective: the loss of the merge with weights ``w`` (a list of ``n`` floats), e.g. from
            :func:`merged_loss_objective`.
        n: the number of weights.
        budget: the number of objective evaluations.
        lower: lower bound of every weight.
        upper: upper bound of every weight.
        l1: weight of the L1 penalty on the weights (``0`` turns it off).
        seed: seed of the optimiser's random generator.
        optimizer: a name in nevergrad's optimizer registry (``NGOpt``, its default choice, as in LoraHub;
            ``OnePlusOne``, ``CMA``, ``TwoPointsDE``, ``RandomSearch`` ...).
        init: the starting weights (default uniform ``1/n``, LoraHub's start).
        progress: called after every evaluation as ``progress(step, budget, best penalised loss so far)``.

    Returns:
        The best weights, their loss with and without the penalty, and the history of the search.

    Raises:
        ConfigError: ``n`` or ``budget`` below 1, ``lower >= upper``, a negative or non-finite ``l1``, ``init`` of
            another length or outside the bounds, an unknown optimizer, or nevergrad not installed.
        ExpertError: the objective was not finite at any point evaluated.

    Example:
        >>> result = search_weights(lambda w: (w[0] - 0.5) ** 2, 1, budget=30, l1=0.0)  # doctest: +SKIP
        >>> round(result.weights[0], 2)  # doctest: +SKIP
        0.5
    """
    start = _check_search(n, budget, lower, upper, l1, init)
    ng = _nevergrad()
    if optimizer not in ng.optimizers.registry:
        raise ConfigError(
            f"Unknown optimizer {optimizer!r}: pass a name of nevergrad's optimizer registry, e.g. 'NGOpt', "
            "'OnePlusOne', 'CMA', 'TwoPointsDE' or 'RandomSearch'."
        )
    import numpy as np

    history: list[tuple[int, float]] = []
    best: tuple[float, float, list[float]] | None = None  # (penalised, loss, weights)
    with warnings.catch_warnings():
        # nevergrad warns about narrow bounds and clips an infinite loss with a warning; scipy's optimisers warn about
        # their own settings: none of it is the caller's to act on
        warnings.filterwarnings("ignore", category=ng.errors.NevergradWarning)
        warnings.filterwarnings("ignore", message=".*COBYLA.*")
        parametrization = ng.p.Array(init=np.asarray(start, dtype=np.float64)).set_bounds(lower, upper)
        parametrization.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.registry[optimizer](parametrization=parametrization, budget=budget)
        opt.suggest(np.asarray(start, dtype=np.float64))
        for step in range(1, budget + 1):
            candidate = opt.ask()
            weights = [float(x) for x in np.asarray(candidate.value).reshape(-1)]
            loss = float(objective(list(weights)))
            penalised = loss + l1 * sum(abs(w) for w in weights) if math.isfinite(loss) else math.inf
            opt.tell(candidate, penalised)
            history.append((step, penalised))
            if math.isfinite(penalised) and (best is None or penalised < best[0]):
                best = (penalised, loss, weights)
            if progress is not None:
                progress(step, budget, best[0] if best is not None else math.inf)
    if best is None:
        raise ExpertError(
            f"The objective was not finite at any of the {budget} weights tried (NaN or inf every time): the merged "
            "experts or the batches hold NaN, or the loss overflows. Check the experts' weights and the batches, or "
            "narrow the bounds (lower, upper)."
        )
    return SearchResult(weights=best[2], loss=best[1], penalised=best[0], history=history)


def _check_search(
    n: int, budget: int, lower: float, upper: float, l1: float, init: Sequence[float] | None
) -> list[float]:
    """Validate the search options; returns the starting weights."""
    if n < 1:
        raise ConfigError(f"search_weights needs n >= 1 weights, got n={n}.")
    if budget < 1:
        raise ConfigError(f"budget must be at least 1 objective evaluation, got {budget}.")
    if not (math.isfinite(lower) and math.isfinite(upper)) or lower >= upper:
        raise ConfigError(f"The bounds need finite lower < upper, got lower={lower}, upper={upper}.")
    if not math.isfinite(l1) or l1 < 0:
        raise ConfigError(f"l1 must be a finite penalty >= 0 (0 turns it off), got {l1}.")
    start = [1.0 / n] * n if init is None else [float(x) for x in init]
    if len(start) != n:
        raise ConfigError(f"init needs one weight per expert: n={n}, got {len(start)} weights.")
    if not all(math.isfinite(x) and lower <= x <= upper for x in start):
        raise ConfigError(
            f"init {start} must lie within the bounds [{lower}, {upper}]: widen the bounds or change init."
        )
    return start


def _nevergrad() -> Any:
    try:
        import nevergrad
    except ImportError as err:
        raise ConfigError(
            "The gradient-free weight search needs nevergrad, an optional dependency: pip install 'pituning[search]' "
            "(or pip install nevergrad)."
        ) from err
    return nevergrad


# ---------------------------------------------------------------------------------------------------- merges
def linear_merge(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i weights[i] * states[i][k]`` for every key (LoraHub's merge: LoRA's ``A`` and ``B`` each combined
    linearly with the same weights; adapters and prefixes likewise), in the dtype and on the device of the first
    state."""
    if not states or len(states) != len(weights):
        raise ConfigError(f"linear_merge needs one weight per state: {len(states)} states, {len(weights)} weights.")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key].to(device=first.device, dtype=first.dtype) for s in states])
        w = torch.tensor(list(weights), dtype=first.dtype, device=first.device)
        out[key] = torch.tensordot(w, stacked, dims=1)
    return out


def _check_experts(experts: Sequence[Expert]) -> None:
    """One kind, one config, the same keys and shapes, and one backbone."""
    if not experts:
        raise ConfigError("A merge needs at least one expert.")
    first = experts[0]
    for other in experts[1:]:
        if other.config.kind != first.config.kind:
            raise ExpertError(
                f"Cannot merge a {first.config.kind} expert ({first.name!r}) and a {other.config.kind} expert "
                f"({other.name!r}): choose experts of one kind."
            )
        if other.config != first.config:
            raise ExpertError(
                f"Cannot merge {first.name!r} and {other.name!r}: their configs differ ({first.config} vs "
                f"{other.config}); a linear merge needs experts of one config (same rank, targets, scaling)."
            )
        shapes = {k: tuple(v.shape) for k, v in first.state.items()}
        if {k: tuple(v.shape) for k, v in other.state.items()} != shapes:
            raise ExpertError(
                f"Cannot merge {first.name!r} and {other.name!r}: they cover different modules or shapes; merge "
                "experts trained with one config on one backbone."
            )
        mine, theirs = first.backbone.fingerprint, other.backbone.fingerprint
        if (mine.structure, mine.weights) != (theirs.structure, theirs.weights):
            raise BackboneMismatchError(
                f"Cannot merge {first.name!r} and {other.name!r}: they belong to different backbones "
                f"({first.backbone.source!r} and {other.backbone.source!r}); merge experts of one backbone."
            )


class MergedLossObjective:
    """The objective :func:`merged_loss_objective` returns: ``objective(weights) -> mean cross-entropy``.

    Holds one live expert slot in the task model; :meth:`close` removes it (also a context manager).
    """

    def __init__(
        self,
        model: TaskModel,
        experts: Sequence[Expert],
        batches: Sequence[Mapping[str, Tensor]],
        slot: str,
        merge: MergeFn | None,
    ) -> None:
        _check_experts(experts)
        if not batches:
            raise ConfigError("merged_loss_objective needs at least one batch of labelled examples.")
        missing = [i for i, b in enumerate(batches) if "labels" not in b]
        if missing:
            raise ConfigError(f"Every batch needs 'labels'; batches {missing[:5]} have none.")
        self.model = model
        self.experts = list(experts)
        self.slot = slot
        self._merge = merge
        self._batches = list(batches)
        host = model.experts
        if slot in host.experts:
            raise ExpertError(
                f"The model already has an expert {slot!r}: pass another slot=... or remove it first "
                f"(model.experts.remove_expert({slot!r}))."
            )
        first = self.experts[0]
        host.load_expert(slot, first.config, first.state, activate=False)
        host_params = {
            f"{module_name}.{h.attr}.{pname}": param
            for module_name, _, h in iter_hosts(host.backbone)
            if slot in h.configs
            for pname, param in h.expert_tensors(slot).items()
        }
        for param in host_params.values():
            param.requires_grad_(False)
        self._params = host_params
        # the sources stacked once on the slot's device: each call is one tensordot per key
        self._stacked = {
            key: torch.stack([e.state[key] for e in self.experts]).to(device=p.device, dtype=torch.float32)
            for key, p in host_params.items()
        }
        self._states = (
            []
            if merge is None
            else [
                {k: e.state[k].to(device=p.device, dtype=torch.float32) for k, p in host_params.items()}
                for e in self.experts
            ]
        )
        self.evaluations = 0
        """How many times the objective ran."""

    def write(self, weights: Sequence[float]) -> None:
        """Write the merge with ``weights`` into the slot's parameters (in place, without gradients)."""
        if len(weights) != len(self.experts):
            raise ConfigError(f"The objective needs one weight per expert: {len(self.experts)}, got {len(weights)}.")
        if self.slot not in self.model.experts.experts:
            raise ExpertError(f"The slot {self.slot!r} was removed (close() was called); build a new objective.")
        with torch.no_grad():
            if self._merge is None:
                for key, param in self._params.items():
                    stacked = self._stacked[key]
                    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
                    param.copy_(torch.tensordot(w, stacked, dims=1).to(param.dtype))
            else:
                merged = self._merge(self._states, [float(x) for x in weights])
                absent = sorted(set(self._params) - set(merged))
                if absent:
                    raise ExpertError(f"The merge function returned no tensor for {absent[:3]}; return every key.")
                for key, param in self._params.items():
                    param.copy_(merged[key].to(device=param.device, dtype=param.dtype))

    def __call__(self, weights: list[float]) -> float:
        self.write(weights)
        self.evaluations += 1
        return mean_cross_entropy(self.model, self._batches, active=[self.slot])

    def close(self) -> None:
        """Remove the slot from the model (idempotent)."""
        if self.slot in self.model.experts.experts:
            self.model.experts.remove_expert(self.slot)

    def __enter__(self) -> MergedLossObjective:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mean_cross_entropy(
    model: TaskModel, batches: Sequence[Mapping[str, Tensor]], *, active: Sequence[str] | None = None
) -> float:
    """Mean cross-entropy of ``model`` over every labelled example of ``batches``, in eval mode without gradients.

    ``active`` experts are made the model's only active experts for the evaluation; the active set and the train /
    eval mode are restored afterwards. Token-level labels (``text_to_text``) count each label that is not ``-100``.
    """
    host = model.experts
    was_active, was_training = host.active, model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    try:
        if active is not None:
            host.set_active(list(active))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                labels = batch["labels"].to(device)
                logits = model(**inputs).float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
                total += float(loss)
                count += int((labels != -100).sum())
    finally:
        if active is not None:
            host.set_active(was_active)
        model.train(was_training)
    if count == 0:
        raise ConfigError("The batches hold no labelled example (every label is -100); pass labelled shots.")
    return total / count


def merged_loss_objective(
    model: TaskModel,
    experts: Sequence[Expert],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    slot: str = "lorahub",
    merge: MergeFn | None = None,
) -> MergedLossObjective:
    """The few-shot loss of a weighted merge of ``experts``, as an objective for :func:`search_weights`.

    One expert slot ``slot`` is added to ``model.experts`` once (inactive between calls); each call writes
    ``sum_i w_i theta_i`` into its parameters in place (no re-injection), makes it the only active expert, and
    returns the mean cross-entropy over ``batches`` in eval mode without gradients (the head is the task model's own:
    the caller sets it). The previously active experts and the train / eval mode are restored after every call.
    Call ``close()`` on the result (or use it as a context manager) to remove the slot.

    Args:
        model: the task model, its head already set.
        experts: experts of one kind, config and backbone (the model's).
        batches: model inputs plus ``labels`` (class indices ``(N,)``, or ``(N, T)`` tokens for ``text_to_text``).
        slot: the name of the live expert slot (must not exist in the model yet).
        merge: another state combination ``(states, weights) -> state`` (default :func:`linear_merge`, LoraHub's).

    Raises:
        ExpertError: experts of different kinds, configs or shapes, or ``slot`` already taken.
        BackboneMismatchError: the experts belong to different backbones.
        ConfigError: no experts, no batches, or a batch without ``labels``.
    """
    return MergedLossObjective(model, experts, batches, slot, merge)


def lorahub(
    model: TaskModel,
    experts: Sequence[Expert],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    name: str = "lorahub",
    task: TaskInfo | None = None,
    slot: str = "lorahub",
    merge: MergeFn | None = None,
    budget: int = 40,
    lower: float = -1.5,
    upper: float = 1.5,
    l1: float = 0.05,
    seed: int = 0,
    optimizer: str = "NGOpt",
    init: Sequence[float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Expert, SearchResult]:
    """LoraHub: search the merge weights of ``experts`` on the few-shot ``batches`` and return the merged expert.

    Huang et al., 2024 (COLM): ``theta = sum_i w_i theta_i`` with ``w`` found by a gradient-free optimiser that
    minimises the few-shot cross-entropy plus ``l1 * sum_i |w_i|`` (see :func:`search_weights` for the search
    options). The model is left as it was (the slot is removed); the returned expert is a plain expert of the
    experts' kind and config, with the task model's head, and is not stored: add it to a bank to keep it.

    Args:
        model: the task model, its head already set (the merged expert keeps this head).
        experts: the expert library, of one kind, config and backbone.
        batches: the few labelled shots (model inputs plus ``labels``).
        name: the merged expert's name.
        task: the merged expert's task (default: the first expert's; pass the target task's).
        slot: the live slot used while searching (see :func:`merged_loss_objective`).
        merge: another state combination (default :func:`linear_merge`).
        budget: objective evaluations (LoraHub: 40).
        lower: lower bound of every weight.
        upper: upper bound of every weight.
        l1: the L1 penalty's weight (LoraHub: 0.05).
        seed: seed of the optimiser.
        optimizer: nevergrad optimizer name (default ``NGOpt``).
        init: starting weights (default uniform ``1/n``).
        progress: ``progress(step, budget, best)`` after every evaluation.

    Returns:
        ``(merged expert, search result)``; the expert's provenance records the method, sources, weights and search
        options, its metrics the searched loss (``lorahub_loss``).

    Example:
        >>> merged, result = lorahub(task_model, bank.select(names), shots, budget=40)  # doctest: +SKIP
        >>> bank.add(merged)  # doctest: +SKIP
    """
    with merged_loss_objective(model, experts, batches, slot=slot, merge=merge) as objective:
        result = search_weights(
            objective,
            len(objective.experts),
            budget=budget,
            lower=lower,
            upper=upper,
            l1=l1,
            seed=seed,
            optimizer=optimizer,
            init=init,
            progress=progress,
        )
    first = experts[0]
    states = [e.state for e in experts]
    merged = (merge or linear_merge)(states, result.weights)
    state = {k: merged[k].detach().float().cpu().clone() for k in first.state}
    expert = Expert(
        name=name,
        config=first.config,
        state=state,
        task=task or first.task,
        backbone=first.backbone,
        metrics={"lorahub_loss": result.loss},
        head={k: v.detach().float().cpu() for k, v in model.head_state_dict().items()} or None,
        provenance={
            "method": "lorahub",
            "sources": [e.name for e in experts],
            "weights": list(result.weights),
            "budget": budget,
            "l1": l1,
            "seed": seed,
            "optimizer": optimizer,
        },
        modules=dict(first.modules),
    )
    return expert, result

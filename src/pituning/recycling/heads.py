"""Which head a reused source expert should use on a target: the source's own, one refitted on the shots, or fresh.

A stored head is reusable on a target only when its classes *are* the target's classes, in the same order. Label
names cannot tell: bare integers (``0``, ``1``) say nothing about meaning, and even equal names may come in another
order. So the check is empirical: the source head, read through the source expert, must score above chance on the
target's labelled shots (:func:`check_head`). :func:`reuse_head` applies that policy and says which head it chose
and why (a :class:`HeadChoice`), so a results table can report which head every run used.

A refitted head is a linear (logistic) head trained on the frozen features the task model's head receives, for a
fixed number of full-batch L-BFGS steps from zero, with an L2 penalty, on standardised features
(:func:`fit_linear_head`): deterministic, no random seed involved, and the same problem every time (it is convex).
:func:`cross_validated_loss` scores such a head on shots it was not fitted on (k-fold), which is what the
source-free ranking (:mod:`pituning.recycling.source_free`) uses.

Plain torch; the task model is put in eval mode and restored; no gradient reaches the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.errors import ConfigError
from pituning.heads import TaskModel

__all__ = [
    "BASELINES",
    "HEAD_CHOICES",
    "HeadCheck",
    "HeadChoice",
    "check_head",
    "cross_validated_loss",
    "fit_linear_head",
    "fold_masks",
    "head_features",
    "reuse_head",
]

#: What :func:`reuse_head` can choose: the source's stored head, a linear head refitted on the shots, or the task
#: model's freshly initialised head.
HEAD_CHOICES = ("source", "refit", "fresh")
#: What a source head must beat to be reused: ``chance`` (``1 / num_classes``) or ``majority`` (the share of the
#: most frequent class among the shots, at least chance).
BASELINES = ("chance", "majority")


@dataclass(frozen=True)
class HeadCheck:
    """How a source head does on the target's labelled shots, read through the source expert."""

    accuracy: float
    """Share of shots the source head classifies correctly."""
    loss: float
    """Mean cross-entropy of the source head on the shots."""
    chance: float
    """``1 / num_classes``: the accuracy of guessing."""
    majority_share: float
    """Share of the most frequent class among the shots (the accuracy of always answering it)."""
    num_classes: int
    """The target's number of classes."""
    num_examples: int
    """Number of shots checked."""

    @property
    def above_chance(self) -> bool:
        """Whether the source head beats guessing."""
        return self.accuracy > self.chance


@dataclass(frozen=True)
class HeadChoice:
    """The head a method should use for one source expert on the target, and why."""

    kind: str
    """``source`` (the source's stored head), ``refit`` (a linear head fitted on the shots) or ``fresh`` (the task
    model's freshly initialised head)."""
    reason: str
    """Why, in one sentence (for reports)."""
    state: dict[str, Tensor] | None = None
    """The head weights to load (the source's, or the refitted ones); ``None`` for ``fresh``."""
    check: HeadCheck | None = None
    """The source head's check on the shots, when it was checked."""


# ---------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) and no gradients for the duration; the training mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _split(batch: Mapping[str, Tensor], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    if "labels" not in batch:
        raise ConfigError(
            f"A shot batch has no 'labels' (keys: {sorted(batch)}); give the target's labelled shots as dicts of "
            "input tensors plus 'labels'."
        )
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"].to(device)


def _check_batches(batches: Sequence[Mapping[str, Tensor]]) -> None:
    if not batches:
        raise ConfigError("No shots: give at least one batch of the target's labelled examples.")


def _linear(model: TaskModel) -> nn.Linear | None:
    """The task model's head when it is one linear layer over the features (classification, pair classification on
    a one-tower backbone), else ``None``."""
    return model.head if isinstance(model.head, nn.Linear) else None


def _target_classes(model: TaskModel) -> int:
    """The target's number of classes, as the task model was built."""
    if model.task_type == "text_to_text":
        raise ConfigError("task_type='text_to_text' has no task head and no classes; there is no head to check.")
    if model.task_type == "matching":
        ids = model.candidate_ids
        assert isinstance(ids, Tensor)
        return int(ids.shape[0])
    classifier = model.head if isinstance(model.head, nn.Linear) else getattr(model.head, "classifier", None)
    assert isinstance(classifier, nn.Linear)
    return int(classifier.out_features)


def _head_classes(model: TaskModel, head_state: Mapping[str, Tensor]) -> int | None:
    """The number of classes of a stored head of ``model``'s kind (``None`` for a matching head: no class dim)."""
    if model.task_type == "matching":
        return None
    weight = head_state.get("weight", head_state.get("classifier.weight"))
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _fits(model: TaskModel, head_state: Mapping[str, Tensor]) -> str:
    """Why ``head_state`` cannot be loaded into ``model``'s head for the target ('' when it can)."""
    own = model.head.state_dict()
    if set(own) != set(head_state):
        return f"the source head holds tensors {sorted(head_state)}, this task model's head {sorted(own)}"
    for key, value in own.items():
        if tuple(head_state[key].shape) != tuple(value.shape):
            theirs = _head_classes(model, head_state)
            if theirs is not None and theirs != _target_classes(model):
                return f"the source head has {theirs} classes, the target {_target_classes(model)}"
            return f"the source head's {key} has shape {tuple(head_state[key].shape)}, this head {tuple(value.shape)}"
    return ""


@contextlib.contextmanager
def _head_loaded(model: TaskModel, head_state: Mapping[str, Tensor] | None) -> Iterator[None]:
    """``head_state`` in the task model's head for the duration (``None``: the head as it is); restored after."""
    if head_state is None:
        yield
        return
    saved = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    model.head.load_state_dict({k: v.to(saved[k].device, saved[k].dtype) for k, v in head_state.items()})
    try:
        yield
    finally:
        model.head.load_state_dict(saved)


def head_features(model: TaskModel, batches: Iterable[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """The frozen features the task model's linear head receives, and the labels, over ``batches``.

    Args:
        model: a ``classification`` or ``pair_classification`` task model with a linear head (one-tower backbones),
            with the expert to read through active.
        batches: dicts of input tensors plus ``labels`` ``(n,)``.

    Returns:
        ``(features (N, d) fp32, labels (N,))`` on the model's device, in batch order.

    Raises:
        ConfigError: the head is not one linear layer (``matching``, ``text_to_text``, a dual encoder's head).
    """
    head = _linear(model)
    if head is None:
        raise ConfigError(
            f"head_features needs a linear head over pooled features; task_type={model.task_type!r} on a "
            f"{model.family!r} backbone has a {type(model.head).__name__}. Use classification or pair_classification "
            "on a one-tower backbone."
        )
    captured: list[Tensor] = []

    def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0].detach().float())

    labels: list[Tensor] = []
    device = _device(model)
    handle = head.register_forward_pre_hook(grab)
    try:
        with _evaluating(model):
            for batch in batches:
                inputs, y = _split(batch, device)
                model(**inputs)
                labels.append(y)
    finally:
        handle.remove()
    if not labels:
        raise ConfigError("No shots: give at least one batch of the target's labelled examples.")
    return torch.cat(captured), torch.cat(labels).long()


def _logits(
    model: TaskModel, head_state: Mapping[str, Tensor] | None, batches: Sequence[Mapping[str, Tensor]]
) -> Tensor:
    """Logits ``(N, C)`` of the task model with ``head_state`` loaded (restored afterwards)."""
    device = _device(model)
    out = []
    with _head_loaded(model, head_state), _evaluating(model):
        for batch in batches:
            inputs, _ = _split(batch, device)
            out.append(model(**inputs).float())
    return torch.cat(out)


def _labels(batches: Sequence[Mapping[str, Tensor]], device: torch.device) -> Tensor:
    return torch.cat([_split(b, device)[1] for b in batches]).long()


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.dim() != 1:
        raise ConfigError(f"Class labels must have shape (N,), got {tuple(labels.shape)}.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ConfigError(
            f"The shots' labels span {low}..{high}, but the target has {num_classes} classes; build the task model "
            "with the target's number of classes (labels 0..num_classes-1)."
        )


def _summary(logits: Tensor, labels: Tensor, num_classes: int) -> HeadCheck:
    counts = torch.bincount(labels, minlength=num_classes)
    return HeadCheck(
        accuracy=float((logits.argmax(dim=-1) == labels).float().mean()),
        loss=float(F.cross_entropy(logits, labels)),
        chance=1.0 / num_classes,
        majority_share=float(counts.max()) / int(labels.shape[0]),
        num_classes=num_classes,
        num_examples=int(labels.shape[0]),
    )


# ---------------------------------------------------------------------------------------------------------- fitting
def _standardise(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-fold mean ``(F, d)`` and std ``(F, d)`` of the rows of ``features`` ``(N, d)`` that ``mask`` ``(F, N)``
    selects (only the training rows: the held-out shots stay unseen)."""
    weights = mask.float() / mask.float().sum(dim=1, keepdim=True)
    mean = weights @ features
    var = weights @ features.square() - mean.square()
    return mean, var.clamp_min(0).sqrt().clamp_min(1e-6)


def _fit_folds(
    features: Tensor, labels: Tensor, mask: Tensor, num_classes: int, steps: int, l2: float
) -> tuple[Tensor, Tensor]:
    """Fit one logistic head per row of ``mask`` ``(F, N)`` on the rows it selects; returns ``(W (F, C, d),
    b (F, C))`` in the units of the raw features."""
    mean, std = _standardise(features, mask)
    z = (features[None] - mean[:, None]) / std[:, None]  # (F, N, d)
    folds, _, dim = z.shape
    weight = torch.zeros(folds, num_classes, dim, device=features.device, requires_grad=True)
    bias = torch.zeros(folds, num_classes, device=features.device, requires_grad=True)
    count = mask.float().sum(dim=1)
    onehot = F.one_hot(labels, num_classes).float()  # (N, C)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("fnd,fcd->fnc", z, weight) + bias[:, None]
        nll = -(torch.log_softmax(logits, dim=-1) * onehot).sum(dim=-1)  # (F, N)
        loss = ((nll * mask).sum(dim=1) / count).sum() + l2 * weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]
    raw = weight.detach() / std[:, None]  # back to raw features: W z + b = (W / std) x + (b - (W / std) mean)
    return raw, bias.detach() - torch.einsum("fcd,fd->fc", raw, mean)


def _check_fit_options(steps: int, l2: float) -> None:
    if steps < 1:
        raise ConfigError(f"steps must be >= 1 (L-BFGS iterations of the refitted head), got {steps}.")
    if l2 < 0:
        raise ConfigError(f"l2 must be >= 0 (the refitted head's weight penalty), got {l2}.")


def fit_linear_head(
    features: Tensor, labels: Tensor, num_classes: int, *, steps: int = 100, l2: float = 1e-2
) -> dict[str, Tensor]:
    """A linear (multinomial logistic) head fitted on frozen features, deterministically.

    The features are standardised (mean and std of the shots), the weights start at zero and ``steps`` L-BFGS
    iterations minimise the mean cross-entropy plus ``l2 * ||W||^2`` (on the standardised scale), full batch. The
    problem is convex and the start fixed, so the result depends on nothing random.

    Args:
        features: ``(N, d)`` the features the head receives (:func:`head_features`).
        labels: ``(N,)`` class indices in ``0 .. num_classes - 1``.
        num_classes: classes of the head.
        steps: L-BFGS iterations.
        l2: weight penalty (keeps the head finite when a few shots are separable).

    Returns:
        ``{"weight": (num_classes, d), "bias": (num_classes,)}`` in the units of the raw features: an ``nn.Linear``
        state dict, loadable into a task model's head.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
        >>> head = fit_linear_head(x, torch.tensor([0, 1, 0, 1]), 2)
        >>> (x @ head["weight"].T + head["bias"]).argmax(dim=-1).tolist()
        [0, 1, 0, 1]
    """
    _check_fit_options(steps, l2)
    features = features.detach().float()
    labels = labels.long().to(features.device)
    _check_labels(labels, num_classes)
    mask = torch.ones(1, features.shape[0], device=features.device)
    weight, bias = _fit_folds(features, labels, mask, num_classes, steps, l2)
    return {"weight": weight[0], "bias": bias[0]}


def fold_masks(labels: Tensor, folds: int) -> Tensor:
    """Stratified, deterministic fold assignment: ``(folds, N)`` boolean, ``True`` where an example is held out.

    Examples are ordered by label (stably) and dealt to the folds in turn, so each fold holds out every class in
    proportion.
    """
    order = torch.sort(labels.cpu(), stable=True).indices
    fold = torch.empty(labels.shape[0], dtype=torch.long)
    fold[order] = torch.arange(labels.shape[0]) % folds
    return (fold[None] == torch.arange(folds)[:, None]).to(labels.device)


def cross_validated_loss(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    folds: int = 5,
    steps: int = 100,
    l2: float = 1e-2,
) -> tuple[float, float]:
    """Held-out loss and accuracy of a refitted linear head: every shot is scored by a head fitted on the other folds.

    On the shots it was fitted on, a linear head over ``d >= N`` features fits any labelling, so an in-sample loss
    would rank experts by how easily their features memorise, not by how well they transfer. Held out, it measures
    how well the expert's features predict the target's classes. All folds are fitted at once (one batched L-BFGS).

    Args:
        features: ``(N, d)`` features the head receives.
        labels: ``(N,)`` class indices.
        num_classes: the target's classes.
        folds: number of folds (stratified by label, deterministic); ``folds = N`` is leave-one-out. Clipped to
            ``N``.
        steps: L-BFGS iterations of each fold's head.
        l2: weight penalty.

    Returns:
        ``(mean held-out cross-entropy, held-out accuracy)``.

    Raises:
        ConfigError: fewer than two shots or folds, labels out of range, bad options.
    """
    _check_fit_options(steps, l2)
    features = features.detach().float()
    labels = labels.long().to(features.device)
    _check_labels(labels, num_classes)
    n = int(labels.shape[0])
    folds = min(folds, n)
    if folds < 2:
        raise ConfigError(
            f"Cross-validation needs at least 2 folds and 2 shots (got folds={folds}, {n} shot(s)); give more shots or "
            "folds >= 2."
        )
    held = fold_masks(labels, folds)  # (F, N)
    weight, bias = _fit_folds(features, labels, (~held).float(), num_classes, steps, l2)
    logits = torch.einsum("nd,fcd->fnc", features, weight) + bias[:, None]  # (F, N, C)
    fold_of = held.float().argmax(dim=0)  # each example's own fold
    own = logits[fold_of, torch.arange(n, device=features.device)]  # (N, C)
    loss = float(F.cross_entropy(own, labels))
    accuracy = float((own.argmax(dim=-1) == labels).float().mean())
    return loss, accuracy


# ---------------------------------------------------------------------------------------------------------- policy
def check_head(
    model: TaskModel, head_state: Mapping[str, Tensor], batches: Sequence[Mapping[str, Tensor]]
) -> HeadCheck:
    """Score a source head on the target's shots, read through the source expert.

    Args:
        model: the target's task model (built with the target's number of classes, or its candidate texts for
            ``matching``) with the source expert active. Its own head is restored afterwards.
        head_state: the source's stored head.
        batches: the target's labelled shots: dicts of input tensors plus ``labels`` ``(n,)``.

    Returns:
        Accuracy and loss of the source head, chance level ``1 / num_classes`` and the majority class's share.

    Raises:
        ConfigError: no shots, labels outside the target's classes, a ``text_to_text`` model (no head), or a head that
            does not fit (another number of classes or width; :func:`reuse_head` reports that instead of raising).
    """
    _check_batches(batches)
    num_classes = _target_classes(model)
    why = _fits(model, head_state)
    if why:
        raise ConfigError(f"The source head does not fit the target's task model: {why}. Refit a head instead.")
    labels = _labels(batches, _device(model))
    _check_labels(labels, num_classes)
    return _summary(_logits(model, head_state, batches), labels, num_classes)


def _check_from_features(
    features: Tensor, labels: Tensor, head_state: Mapping[str, Tensor], num_classes: int
) -> HeadCheck:
    weight, bias = head_state["weight"].to(features), head_state.get("bias")
    logits = F.linear(features, weight, None if bias is None else bias.to(features))
    return _summary(logits, labels, num_classes)


def reuse_head(
    model: TaskModel,
    head_state: Mapping[str, Tensor] | None,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    baseline: str = "chance",
    margin: float = 0.0,
    refit: bool = True,
    steps: int = 100,
    l2: float = 1e-2,
    features: tuple[Tensor, Tensor] | None = None,
) -> HeadChoice:
    """Decide which head a method should use with one source expert on the target, and say why.

    Policy:

    - ``text_to_text``: ``fresh`` (there is no task head; the language model's output layer is the backbone's).
    - ``matching``: ``source`` when the stored head loads (a matching head has no class dimension: a temperature,
      and a dual encoder's projections), else ``fresh``.
    - classification and pair classification: ``source`` when the stored head has the target's classes (shape) and
      its accuracy on the shots (:func:`check_head`) is above ``baseline`` by more than ``margin``; otherwise
      ``refit`` (a linear head fitted on the shots, :func:`fit_linear_head`), or ``fresh`` when ``refit=False`` or the
      head is not one linear layer (a dual encoder's, whose projections cannot be refitted from features alone).

    Label names are not consulted: bare integer labels are no evidence of the same classes, and a head whose classes
    are swapped scores *below* chance, so it is not reused.

    Args:
        model: the target's task model with the source expert active (its head is restored afterwards).
        head_state: the source's stored head, or ``None`` (an imported PEFT adapter has none).
        batches: the target's labelled shots.
        baseline: ``chance`` (``1 / num_classes``) or ``majority`` (the majority class's share, stricter on
            unbalanced shots).
        margin: how far above the baseline the accuracy must be (for example ``0.1`` with very few shots).
        refit: fall back to a refitted linear head (else to the fresh head).
        steps: L-BFGS iterations of a refitted head.
        l2: weight penalty of a refitted head.
        features: the shots' ``(features (N, d), labels (N,))`` when already computed (:func:`head_features`).

    Returns:
        The choice, its reason, the head weights to load (``None`` for ``fresh``) and the source head's check.
    """
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}.")
    _check_batches(batches)
    _check_fit_options(steps, l2)
    if model.task_type == "text_to_text":
        return HeadChoice(
            "fresh", "text_to_text has no task head (the language model's output layer is the backbone's)"
        )
    why = _fits(model, head_state) if head_state is not None else "the source has no stored head"
    if model.task_type == "matching":
        if why:
            return HeadChoice("fresh", f"fresh matching head: {why}")
        assert head_state is not None
        matched = check_head(model, head_state, batches)
        return HeadChoice(
            "source",
            f"a matching head has no class dimension; reused (accuracy {matched.accuracy:.3f} on the shots)",
            {k: v.detach().clone() for k, v in head_state.items()},
            matched,
        )
    num_classes = _target_classes(model)
    linear = _linear(model) is not None
    if linear and features is None:
        features = head_features(model, batches)
    check: HeadCheck | None = None
    if not why:
        assert head_state is not None
        if features is not None:
            labels = features[1]
            _check_labels(labels, num_classes)
            check = _check_from_features(features[0], labels, head_state, num_classes)
        else:
            check = check_head(model, head_state, batches)
        bar = check.chance if baseline == "chance" else max(check.chance, check.majority_share)
        if check.accuracy > bar + margin:
            return HeadChoice(
                "source",
                f"the source head scores {check.accuracy:.3f} on the shots, above {baseline} {bar:.3f}"
                + (f" + margin {margin}" if margin else ""),
                {k: v.detach().clone() for k, v in head_state.items()},
                check,
            )
        why = (
            f"the source head scores {check.accuracy:.3f} on the shots, not above {baseline} {bar:.3f}"
            + (f" + margin {margin}" if margin else "")
            + ": its classes are not the target's (or not in the same order)"
        )
    if refit and features is not None:
        state = fit_linear_head(features[0], features[1], num_classes, steps=steps, l2=l2)
        head = model.head
        assert isinstance(head, nn.Linear)
        state = {k: v.to(head.weight.dtype) for k, v in state.items()}
        return HeadChoice("refit", f"refitted a linear head on the shots: {why}", state, check)
    if refit:
        why += f"; a {type(model.head).__name__} cannot be refitted from features, so the fresh head is used"
    return HeadChoice("fresh", f"fresh head: {why}", None, check)

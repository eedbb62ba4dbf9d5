"""The math of merging experts into one (docs/recycling.md, "Merging experts"), in plain torch.

Two levels, as in torchmetrics' functional/modular split:

- pure tensor functions over the *task tensors* ``tau_i`` of ``k`` experts (one tensor per expert, same shape) and
  their weights ``w`` ``(k,)``: :func:`task_arithmetic`, :func:`magnitude_prune`, :func:`ties_merge`,
  :func:`dare_linear`, :func:`dare_ties`, with their parts :func:`trim_magnitude`, :func:`dare`, :func:`elect_sign`
  and :func:`disjoint_mean`;
- :func:`merge_states`, which merges the state dicts of experts of one kind into the state dict and config of one
  plain expert of that kind (what :func:`pituning.bank.combine.merge_experts` and the bank call).

Adapter and prefix experts merge their parameters directly (the task vector of an expert is its parameter tensor,
since an untrained expert is an identity). LoRA merges in one of three spaces (``lora_space``):

- ``delta`` (default): the task vector is the update ``Delta W_i = s_i B_i A_i`` of each module; the merged update is
  stored back exactly as a LoRA (the concatenation of the ``(A_i, B_i)`` for ``linear``, an exact SVD factorisation of
  the smallest rank for the others; ``rank=`` truncates);
- ``factors``: PEFT's ``add_weighted_adapter`` variant: ``A`` and ``B`` are merged separately with the weights
  ``sign(w_i s_i) sqrt(|w_i s_i|)`` on ``A`` and ``sqrt(|w_i s_i|)`` on ``B`` (same rank, scaling 1);
- ``params``: ``A`` and ``B`` merged separately with the weights ``w_i`` like any parameter, config unchanged.

Every computation runs in fp64 and returns fp32 state tensors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pituning.errors import ConfigError
from pituning.experts.adapter.config import AdapterConfig
from pituning.experts.base import ExpertConfig, expert_kind
from pituning.experts.lora.config import LoraConfig
from pituning.interpolation import lora_concat, svd_factorize

__all__ = [
    "LORA_SPACES",
    "MAJORITY_SIGNS",
    "MERGE_METHODS",
    "PRUNING_METHODS",
    "check_merge_options",
    "dare",
    "dare_linear",
    "dare_ties",
    "disjoint_mean",
    "elect_sign",
    "lora_factorize",
    "magnitude_prune",
    "merge_states",
    "merge_tensors",
    "numerical_rank",
    "task_arithmetic",
    "ties_merge",
    "trim_magnitude",
]

#: Every merge method, in the order of docs/recycling.md.
MERGE_METHODS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "concat", "svd")
#: The methods that trim or drop entries of the task vectors (the only ones that take ``density < 1``).
PRUNING_METHODS: tuple[str, ...] = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: The methods that merge task tensors entry by entry (:func:`merge_tensors`).
ELEMENTWISE_METHODS: tuple[str, ...] = ("linear", *PRUNING_METHODS)
#: Where LoRA experts are merged: the updates ``s B A``, PEFT's separately weighted factors, or the raw parameters.
LORA_SPACES: tuple[str, ...] = ("delta", "factors", "params")
#: How TIES elects the sign of an entry: by total mass (sum) or by frequency (count of signs).
MAJORITY_SIGNS: tuple[str, ...] = ("total", "frequency")

#: Config fields that only shape training or initialisation (or select modules, which the state keys already show):
#: experts merged parameter by parameter may differ in them; the merged expert keeps the first expert's.
_TRAINING_ONLY = frozenset({"target_modules", "dropout", "init_std", "zero_init_up", "include_mlp"})


# --------------------------------------------------------------------------------------------- validation
def check_merge_options(
    method: str,
    *,
    density: float = 1.0,
    seed: int = 0,
    rank: int | None = None,
    lora_space: str = "delta",
    majority_sign: str = "total",
    lora_option: str = "lora_space",
) -> None:
    """Check the options of a merge, independently of the experts.

    Args:
        method: one of :data:`MERGE_METHODS`.
        density: fraction of entries kept by the pruning methods, in ``(0, 1]``; must be 1 for the others.
        seed: seed of the DARE drop masks (an ``int``).
        rank: ``None`` or a positive rank for LoRA results.
        lora_space: one of :data:`LORA_SPACES`.
        majority_sign: one of :data:`MAJORITY_SIGNS`.
        lora_option: the name the caller gives ``lora_space`` (used in messages).

    Raises:
        ConfigError: an option is invalid; the message names it, the allowed values and, for a misspelled method,
            the closest one.
    """
    if not isinstance(method, str) or method not in MERGE_METHODS:
        close = difflib.get_close_matches(str(method), MERGE_METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}.{hint}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(
            f"density must be a number in (0, 1] (the fraction of each task vector kept), got {density!r}."
        )
    if density < 1.0 and method not in PRUNING_METHODS:
        raise ConfigError(
            f"density={density} prunes, which method={method!r} does not do; leave density=1.0 or use one of "
            f"{list(PRUNING_METHODS)}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int (it seeds the DARE drop masks), got {seed!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be None or a positive int (the rank of a merged LoRA), got {rank!r}.")
    if lora_space not in LORA_SPACES:
        raise ConfigError(f"{lora_option} must be one of {list(LORA_SPACES)}, got {lora_space!r}.")
    if majority_sign not in MAJORITY_SIGNS:
        raise ConfigError(
            f"majority_sign must be 'total' (sign of the summed entries) or 'frequency' (the most frequent sign), "
            f"got {majority_sign!r}."
        )


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be a number in (0, 1], got {density!r}.")


def _stack(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """``(stacked (k, ...), weights (k,))`` in fp64, after checking counts, shapes and finiteness."""
    if len(tensors) == 0:
        raise ConfigError("A merge needs at least one task tensor; got none.")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ConfigError(
                f"Task tensors must share one shape to be merged: tensor 0 is {tuple(shape)}, tensor {i} is "
                f"{tuple(t.shape)}."
            )
    w = torch.as_tensor(weights, dtype=torch.float64).to(tensors[0].device).reshape(-1)
    if w.numel() != len(tensors) or not bool(torch.isfinite(w).all()):
        raise ConfigError(f"A merge needs one finite weight per task tensor: {len(tensors)} tensors, weights {w}.")
    return torch.stack([t.double() for t in tensors]), w


def _weighted(stacked: Tensor, w: Tensor) -> Tensor:
    """``w_i * stacked[i]`` for each ``i``: ``(k, ...)``."""
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


# --------------------------------------------------------------------------------------------- tensor functions
def trim_magnitude(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude and zero the others (TIES' "trim").

    At ``density = 1`` the tensor is returned unchanged.

    Example:
        >>> trim_magnitude(torch.tensor([0.5, -2.0, 1.0, 0.1]), 0.5)
        tensor([ 0., -2.,  1.,  0.])
    """
    _check_density(density)
    if density >= 1.0:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=tensor.device)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = True
    return torch.where(keep.view(tensor.shape), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def dare(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop and rescale: keep each entry with probability ``density`` and divide the kept ones by ``density``
    (so the expectation is unchanged).

    The mask is ``torch.bernoulli`` of an fp32 tensor full of ``density``, drawn on the CPU from ``generator`` (default:
    a generator seeded with 0), so a seed reproduces it. At ``density = 1`` nothing is drawn and ``tensor`` is
    returned unchanged.

    Args:
        tensor: a task tensor of any shape.
        density: keep probability in ``(0, 1]``.
        generator: a CPU random generator.

    Returns:
        A tensor of the shape and dtype of ``tensor``.
    """
    _check_density(density)
    if density >= 1.0:
        return tensor
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    mask = torch.bernoulli(torch.full(tuple(tensor.shape), float(density), dtype=torch.float32), generator=gen)
    return tensor * mask.to(device=tensor.device, dtype=tensor.dtype) / density


def elect_sign(stacked: Tensor, majority_sign: str = "total") -> Tensor:
    """The elected sign per entry of ``k`` stacked task tensors ``(k, ...)``: ``+1`` or ``-1`` of shape ``(...)``.

    ``total`` takes the sign of ``sum_i tau_i`` (the larger mass), ``frequency`` the sign held by more experts; a tie
    elects ``+1``.

    Example:
        >>> elect_sign(torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 5.0]]))
        tensor([-1.,  1.])
        >>> elect_sign(torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 5.0]]), "frequency")
        tensor([ 1., -1.])
    """
    if majority_sign == "total":
        mass = stacked.sum(dim=0)
    elif majority_sign == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}.")
    one = torch.ones((), dtype=stacked.dtype, device=stacked.device)
    return torch.where(mass >= 0, one, -one)


def disjoint_mean(stacked: Tensor, agree: Tensor) -> Tensor:
    """Mean over the experts of the entries that ``agree`` (a boolean ``(k, ...)``): ``(...)``; 0 where none agrees.

    Example:
        >>> disjoint_mean(torch.tensor([[2.0, 1.0], [4.0, -1.0]]), torch.tensor([[True, False], [True, False]]))
        tensor([3., 0.])
    """
    count = agree.sum(dim=0).clamp(min=1).to(stacked.dtype)
    return torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0) / count


def task_arithmetic(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """Task arithmetic (Ilharco et al., 2023): ``sum_i w_i tau_i``.

    Args:
        tensors: ``k`` task tensors of one shape ``(...)``.
        weights: ``(k,)`` weights (any sign; not renormalised).

    Returns:
        The merged tensor ``(...)`` in the dtype of ``tensors[0]`` (accumulated in fp64).

    Example:
        >>> task_arithmetic([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])], [0.5, 0.5])
        tensor([2., 0.])
    """
    stacked, w = _stack(tensors, weights)
    return _weighted(stacked, w).sum(0).to(tensors[0].dtype)


def magnitude_prune(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float) -> Tensor:
    """Magnitude pruning: :func:`trim_magnitude` each task tensor to ``density``, then ``sum_i w_i tau_i``.

    Example:
        >>> magnitude_prune([torch.tensor([3.0, 1.0]), torch.tensor([1.0, -2.0])], [1.0, 1.0], 0.5)
        tensor([ 3., -2.])
    """
    _check_density(density)
    return task_arithmetic([trim_magnitude(t, density) for t in tensors], weights)


def _ties(stacked: Tensor, w: Tensor, majority_sign: str) -> Tensor:
    """Elect the sign on the (pruned, unweighted) task tensors, then the disjoint mean of the weighted entries that
    carry it: the convention of PEFT's ``add_weighted_adapter``."""
    sign = elect_sign(stacked, majority_sign)
    agree = stacked.sign() == sign  # zeros (trimmed or dropped) never agree
    return disjoint_mean(_weighted(stacked, w), agree)


def ties_merge(
    tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float, majority_sign: str = "total"
) -> Tensor:
    """TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

    Each task tensor keeps its ``int(density * numel)`` largest-magnitude entries (:func:`trim_magnitude`); each
    entry's sign is elected over the trimmed tensors (:func:`elect_sign`); the result is the mean of ``w_i tau_i``
    over the experts whose trimmed entry has the elected sign (:func:`disjoint_mean`). The weights scale the entries
    before the mean, as PEFT does, so uniform weights ``1/k`` shrink the result by ``k``; use weights 1 for the
    paper's disjoint mean (then scale the result with a single ``lambda`` if wanted).

    Args:
        tensors: ``k`` task tensors of one shape ``(...)``.
        weights: ``(k,)`` weights.
        density: fraction kept per tensor, in ``(0, 1]``; below 1 entries are pruned by design.
        majority_sign: ``total`` or ``frequency`` (:func:`elect_sign`).

    Returns:
        The merged tensor ``(...)`` in the dtype of ``tensors[0]``.

    Example:
        >>> ties_merge([torch.tensor([4.0, -1.0, 2.0]), torch.tensor([2.0, 3.0, -1.0])], [1.0, 1.0], 1.0)
        tensor([3., 3., 2.])
    """
    _check_density(density)
    stacked, w = _stack([trim_magnitude(t, density) for t in tensors], weights)
    return _ties(stacked, w, majority_sign).to(tensors[0].dtype)


def dare_linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    density: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE (Yu et al., 2024) then task arithmetic: :func:`dare` each task tensor (drawn in order from
    ``generator``), then ``sum_i w_i tau_i``. The expectation over the masks is the task-arithmetic merge."""
    _check_density(density)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return task_arithmetic([dare(t, density, gen) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    density: float,
    generator: torch.Generator | None = None,
    majority_sign: str = "total",
) -> Tensor:
    """DARE then TIES' sign election and disjoint mean: :func:`dare` each task tensor (drawn in order from
    ``generator``), then as :func:`ties_merge` without its trim."""
    _check_density(density)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    stacked, w = _stack([dare(t, density, gen) for t in tensors], weights)
    return _ties(stacked, w, majority_sign).to(tensors[0].dtype)


def merge_tensors(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    method: str,
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
    majority_sign: str = "total",
) -> Tensor:
    """Merge ``k`` same-shaped task tensors entry by entry with one of ``linear``, ``ties``, ``dare_linear``,
    ``dare_ties`` or ``magnitude_prune`` (the functions above); ``generator`` feeds the DARE masks."""
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method == "ties":
        return ties_merge(tensors, weights, density, majority_sign)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, generator, majority_sign)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ConfigError(
        f"merge_tensors merges entry by entry with one of {list(ELEMENTWISE_METHODS)}, got {method!r} (concat and "
        "svd are merges of whole experts: use merge_states)."
    )


# --------------------------------------------------------------------------------------------- LoRA factorisation
def numerical_rank(delta: Tensor) -> int:
    """Rank of ``delta`` ``(fan_out, fan_in)`` at fp32 resolution (singular values above
    ``max(shape) * eps_fp32 * s_max``), at least 1."""
    return _rank_of(torch.linalg.svdvals(delta.double()), tuple(delta.shape))


def lora_factorize(delta: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` equal to ``delta`` ``(fan_out, fan_in)``: exact at :func:`numerical_rank` when ``rank``
    is ``None``, else its best rank-``rank`` approximation (zero-padded beyond ``min(fan_out, fan_in)``).

    Returns:
        ``(A, B)`` in fp64, of shapes ``(rank, fan_in)`` and ``(fan_out, rank)``.

    Example:
        >>> a, b = lora_factorize(torch.ones(3, 2))
        >>> a.shape, b.shape, torch.allclose(b @ a, torch.ones(3, 2, dtype=torch.float64))
        (torch.Size([1, 2]), torch.Size([3, 1]), True)
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _split(u, s, vh, _rank_of(s, tuple(delta.shape)) if rank is None else rank)


def _rank_of(s: Tensor, shape: tuple[int, ...]) -> int:
    """The number of singular values ``s`` (descending) above fp32 resolution, at least 1."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A, B) = (sqrt(S) Vh, U sqrt(S))`` on the leading ``rank`` singular values, zero-padded to ``rank``."""
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, vh.shape[1], dtype=s.dtype, device=s.device)
    b = torch.zeros(u.shape[0], rank, dtype=s.dtype, device=s.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


# --------------------------------------------------------------------------------------------- state dicts
def _label(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None else f"expert {i}"


def _relevant(config: ExpertConfig, ignore: frozenset[str] = frozenset()) -> dict[str, object]:
    """The config fields that change what the expert computes (for a parameter-space merge)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _TRAINING_ONLY and f.name not in ignore
    }


def _check_states(
    states: Sequence[Mapping[str, Tensor]], configs: Sequence[ExpertConfig], names: Sequence[str] | None
) -> None:
    """Same count, one kind, one set of state keys (insertion points)."""
    if not states:
        raise ConfigError("A merge needs at least one expert; got none.")
    if len(configs) != len(states) or (names is not None and len(names) != len(states)):
        raise ConfigError(f"A merge needs one config per state dict: {len(states)} states, {len(configs)} configs.")
    first = configs[0]
    for i, (state, config) in enumerate(zip(states, configs, strict=True)):
        if config.kind != first.kind or type(config) is not type(first):
            raise ConfigError(
                f"Cannot merge a {first.kind} expert ({_label(names, 0)}) with a {config.kind} expert "
                f"({_label(names, i)}); merge experts of one kind."
            )
        if set(state) != set(states[0]):
            only_first = sorted(set(states[0]) - set(state))[:3]
            only_this = sorted(set(state) - set(states[0]))[:3]
            raise ConfigError(
                f"Cannot merge {_label(names, 0)} and {_label(names, i)}: they cover different insertion points "
                f"(only in the first: {only_first}; only in the other: {only_this}). Merge experts trained on the same "
                "target modules."
            )
        for key, value in state.items():
            if not bool(torch.isfinite(value).all()):
                raise ConfigError(
                    f"Cannot merge {_label(names, i)}: its tensor {key!r} holds NaN or inf values; fix or retrain it."
                )


def _check_same_params(
    states: Sequence[Mapping[str, Tensor]],
    configs: Sequence[ExpertConfig],
    names: Sequence[str] | None,
    *,
    ignore: frozenset[str] = frozenset(),
    hint: str = "",
) -> None:
    """Experts merged parameter by parameter: same shapes, same config apart from training-only fields."""
    for i in range(1, len(states)):
        bad = [k for k, v in states[0].items() if states[i][k].shape != v.shape]
        if bad or _relevant(configs[i], ignore) != _relevant(configs[0], ignore):
            what = (
                f"tensor {bad[0]!r} has shape {tuple(states[0][bad[0]].shape)} vs {tuple(states[i][bad[0]].shape)}"
                if bad
                else f"configs differ ({_relevant(configs[0], ignore)} vs {_relevant(configs[i], ignore)})"
            )
            raise ConfigError(
                f"Cannot merge the parameters of {_label(names, 0)} and {_label(names, i)}: {what}. Parameters merge "
                f"only between experts of one config and shape{hint}."
            )


def _canonical_keys(state: Mapping[str, Tensor], kind: str, module_order: Sequence[str] | None) -> list[str]:
    """The keys of ``state`` in a fixed order that does not depend on the dict's order: modules in ``module_order``
    (model order) first, then the other modules by name; within a module, the roles in the kind's parameter order."""
    host = expert_kind(kind).host
    roles = list(host.param_names) if host is not None else []
    modules = {m: i for i, m in enumerate(module_order or ())}

    def rank(key: str) -> tuple[int, str, int, str]:
        module, _, role = key.rpartition(".")
        module = module.rpartition(".")[0]  # drop the host attribute
        return (
            modules.get(module, len(modules)),
            module,
            roles.index(role) if role in roles else len(roles),
            role,
        )

    return sorted(state, key=rank)


def _modules(state: Mapping[str, Tensor], roles: Sequence[str]) -> list[str]:
    """The module prefixes (``<module>.<host attr>.``) of a state, in its key order, that hold every role."""
    out: list[str] = []
    for key in state:
        prefix, _, role = key.rpartition(".")
        if role == roles[0] and all(f"{prefix}.{r}" in state for r in roles):
            out.append(prefix + ".")
    return out


def merge_states(
    states: Sequence[Mapping[str, Tensor]],
    configs: Sequence[ExpertConfig],
    weights: Sequence[float],
    *,
    method: str = "linear",
    density: float = 1.0,
    seed: int = 0,
    rank: int | None = None,
    lora_space: str = "delta",
    majority_sign: str = "total",
    names: Sequence[str] | None = None,
    module_order: Sequence[str] | None = None,
    lora_option: str = "lora_space",
) -> tuple[dict[str, Tensor], ExpertConfig]:
    """Merge the state dicts of ``k`` experts of one kind into the state dict and config of one plain expert.

    The methods (docs/recycling.md):

    - ``linear``: task arithmetic, ``sum_i w_i tau_i``;
    - ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: :func:`merge_tensors` per tensor (``density < 1``
      prunes by design; at ``density = 1`` they do not prune);
    - ``concat``: the exact weighted sum of the experts' outputs, represented by concatenation: LoRA ranks add up;
      bottleneck adapters concatenate their bottleneck units (``W_down``, ``b_down`` stacked, ``W_up`` scaled by
      ``w_i s_i / s`` and concatenated, ``b_up`` summed), exact because the activation acts unit by unit. Other
      kinds (prefix: attention normalises over all prefix tokens together) are refused;
    - ``svd`` (LoRA only): the weighted update ``sum_i w_i s_i B_i A_i`` truncated by SVD to ``rank`` (default: the
      largest source rank, PEFT's default).

    LoRA in ``delta`` space: ``linear`` stores the concatenation (rank ``sum_i r_i``, scaling 1; ``rank=`` truncates
    by SVD), the pruning methods merge the updates ``s_i B_i A_i`` and store an exact SVD factorisation at the rank of
    the result (the largest over modules, at most ``min(fan_out, fan_in)``; ``rank=`` truncates). In ``factors``
    space ``A`` and ``B`` merge separately as in PEFT's ``add_weighted_adapter`` (same rank, scaling 1; ``concat``
    puts ``w_i s_i`` on ``A`` as PEFT's ``cat``); in ``params`` space they merge with the weights ``w_i`` and the
    config is kept. ``svd`` works on the updates whatever the space.

    DARE masks are drawn from one ``torch.Generator`` seeded with ``seed``, module by module in ``module_order``
    (then by name), role by role in the kind's parameter order (LoRA: ``A`` then ``B``; in ``delta`` space one update),
    expert by expert; the order of the state dicts' keys does not matter, so a seed reproduces a merge.

    Args:
        states: ``k`` state dicts keyed ``<module>.<host attr>.<role>``, one per expert, with the same keys.
        configs: their configs (one kind).
        weights: ``(k,)`` finite weights (not renormalised).
        method: one of :data:`MERGE_METHODS`.
        density: fraction of entries kept by the pruning methods, in ``(0, 1]``.
        seed: seed of the DARE masks.
        rank: rank of a merged LoRA (``delta`` space and ``svd`` only).
        lora_space: ``delta``, ``factors`` or ``params`` (LoRA only; ignored for other kinds).
        majority_sign: ``total`` or ``frequency`` (TIES' sign election).
        names: the experts' names, for messages.
        module_order: the module names in model order (an :class:`~pituning.bank.Expert`'s ``modules``): the order
            of the DARE draws and of the result's keys; modules it does not list follow by name.
        lora_option: the name the caller gives ``lora_space``, for messages.

    Returns:
        ``(state, config)``: fp32 tensors with the keys of ``states[0]`` (modules in ``module_order``) and the merged
            expert's config.

    Raises:
        ConfigError: invalid options, experts of different kinds, insertion points, shapes or configs, non-finite
            values, or a method the kind cannot represent exactly (``concat`` of prefixes, ``svd`` of non-LoRA).
    """
    check_merge_options(
        method,
        density=density,
        seed=seed,
        rank=rank,
        lora_space=lora_space,
        majority_sign=majority_sign,
        lora_option=lora_option,
    )
    _check_states(states, configs, names)
    keys = _canonical_keys(states[0], configs[0].kind, module_order)
    states = [{k: state[k] for k in keys} for state in states]
    w = [float(x) for x in weights]
    if len(w) != len(states) or not all(math.isfinite(x) for x in w):
        raise ConfigError(
            f"A merge needs one finite weight per expert: {len(states)} experts, weights {list(weights)}."
        )
    gen = torch.Generator().manual_seed(seed)
    first = configs[0]
    if isinstance(first, LoraConfig):
        loras = [c for c in configs if isinstance(c, LoraConfig)]
        return _merge_lora(states, loras, w, method, density, gen, rank, lora_space, majority_sign, names, lora_option)
    if rank is not None:
        raise ConfigError(f"rank={rank} applies to LoRA experts only; these are {first.kind} experts: drop rank=.")
    if method == "svd":
        raise ConfigError(
            f"method='svd' factorises LoRA updates; {first.kind} experts have none. Use 'linear' (or another "
            f"method of {list(ELEMENTWISE_METHODS)})."
        )
    if method == "concat":
        if isinstance(first, AdapterConfig):
            adapters = [c for c in configs if isinstance(c, AdapterConfig)]
            return _concat_adapters(states, adapters, w, names)
        raise ConfigError(
            f"method='concat' is not exact for {first.kind} experts (only for LoRA and bottleneck adapters, whose "
            "outputs add up unit by unit; a prefix's attention normalises over all its tokens together). Use "
            f"'linear' or another method of {list(ELEMENTWISE_METHODS)}."
        )
    _check_same_params(states, configs, names)
    return _merge_params(states, w, method, density, gen, majority_sign), first.replace()


def _merge_params(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | Tensor,
    method: str,
    density: float,
    gen: torch.Generator,
    majority_sign: str,
) -> dict[str, Tensor]:
    """:func:`merge_tensors` per key, in the first state's key order; fp32 out."""
    return {
        key: merge_tensors(
            [s[key].double() for s in states],
            weights,
            method,
            density=density,
            generator=gen,
            majority_sign=majority_sign,
        ).float()
        for key in states[0]
    }


def _concat_adapters(
    states: Sequence[Mapping[str, Tensor]],
    configs: Sequence[AdapterConfig],
    w: Sequence[float],
    names: Sequence[str] | None,
) -> tuple[dict[str, Tensor], ExpertConfig]:
    """One adapter of bottleneck ``sum_i b_i`` whose branch equals ``sum_i w_i`` (branch of adapter ``i``)."""
    first = configs[0]
    for i, config in enumerate(configs[1:], start=1):
        if config.activation != first.activation:
            raise ConfigError(
                f"Cannot concatenate adapters {_label(names, 0)} and {_label(names, i)}: their activations differ "
                f"({first.activation} vs {config.activation}), so the bottleneck units cannot share one activation. "
                "Use method='linear' or adapters of one activation."
            )
    if first.scale == 0:
        raise ConfigError(
            f"Cannot concatenate adapters into {_label(names, 0)}'s scale 0 (its branch is off); merge adapters whose "
            "first has a non-zero scale, or reorder them."
        )
    roles = ("adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias")
    modules = _modules(states[0], roles)
    covered = {m + r for m in modules for r in roles}
    if covered != set(states[0]):
        raise ConfigError(
            f"Cannot concatenate the adapters: tensors {sorted(set(states[0]) - covered)[:3]} are not adapter "
            f"parameters {list(roles)}."
        )
    # the branch of adapter i is s_i (W_up act(...) + b_up): fold w_i s_i / s into W_up and b_up (s: the first scale)
    coef = [wi * c.scale / first.scale for wi, c in zip(w, configs, strict=True)]
    out: dict[str, Tensor] = {}
    for m in modules:
        out[m + "adapter_down_weight"] = torch.cat([s[m + "adapter_down_weight"] for s in states], dim=0).float()
        out[m + "adapter_down_bias"] = torch.cat([s[m + "adapter_down_bias"] for s in states], dim=0).float()
        out[m + "adapter_up_weight"] = torch.cat(
            [c * s[m + "adapter_up_weight"].double() for c, s in zip(coef, states, strict=True)], dim=1
        ).float()
        out[m + "adapter_up_bias"] = task_arithmetic([s[m + "adapter_up_bias"].double() for s in states], coef).float()
    return {k: out[k] for k in states[0]}, first.replace(bottleneck=sum(c.bottleneck for c in configs))


def _merge_lora(
    states: Sequence[Mapping[str, Tensor]],
    configs: Sequence[LoraConfig],
    w: Sequence[float],
    method: str,
    density: float,
    gen: torch.Generator,
    rank: int | None,
    lora_space: str,
    majority_sign: str,
    names: Sequence[str] | None,
    lora_option: str,
) -> tuple[dict[str, Tensor], ExpertConfig]:
    first = configs[0]
    roles = ("lora_A", "lora_B")
    modules = _modules(states[0], roles)
    covered = {m + r for m in modules for r in roles}
    if covered != set(states[0]):
        raise ConfigError(
            f"Cannot merge the LoRA experts: tensors {sorted(set(states[0]) - covered)[:3]} are not LoRA factors "
            "lora_A / lora_B."
        )
    scales = [c.scaling for c in configs]
    for i in range(len(states)):
        for m in modules:
            a, b = states[i][m + "lora_A"], states[i][m + "lora_B"]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] != configs[i].r:
                raise ConfigError(
                    f"LoRA expert {_label(names, i)} at {m[:-1]!r} has factors A {tuple(a.shape)} and B "
                    f"{tuple(b.shape)}, which do not form a rank-{configs[i].r} update B @ A."
                )
            ref_a, ref_b = states[0][m + "lora_A"], states[0][m + "lora_B"]
            if (a.shape[1], b.shape[0]) != (ref_a.shape[1], ref_b.shape[0]):
                raise ConfigError(
                    f"Cannot merge {_label(names, 0)} and {_label(names, i)}: at {m[:-1]!r} their updates have shapes "
                    f"{(ref_b.shape[0], ref_a.shape[1])} and {(b.shape[0], a.shape[1])}."
                )

    def lora(r: int) -> ExpertConfig:
        # the merged LoRA carries the weights and scalings in its factors: scaling alpha / r = 1
        return first.replace(r=r, alpha=float(r))

    def delta(i: int, m: str) -> Tensor:
        return scales[i] * (states[i][m + "lora_B"].double() @ states[i][m + "lora_A"].double())

    if method == "svd" or (method == "linear" and lora_space == "delta" and rank is not None):
        new_rank = rank if rank is not None else max(c.r for c in configs)
        out: dict[str, Tensor] = {}
        for m in modules:
            merged = task_arithmetic([delta(i, m) for i in range(len(states))], w)
            a, b = svd_factorize(merged, new_rank)
            out[m + "lora_A"], out[m + "lora_B"] = a.float(), b.float()
        return out, lora(new_rank)
    if rank is not None and (lora_space != "delta" or method == "concat"):
        raise ConfigError(
            f"rank={rank} applies to LoRA merged in delta space ({lora_option}='delta', methods "
            f"{list(ELEMENTWISE_METHODS)}) or to method='svd'; {method!r} in {lora_space!r} space keeps its rank "
            "(concat: the sum of the ranks). Drop rank= or change the method."
        )
    if method == "concat" or (method == "linear" and lora_space == "delta"):
        # the updates sum exactly as one LoRA of rank sum r_i: A_i stacked, w_i s_i on B_i (on A_i in PEFT's layout)
        coef = (torch.tensor(w, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)).float()
        out = {}
        for m in modules:
            a_list = [s[m + "lora_A"].float() for s in states]
            b_list = [s[m + "lora_B"].float() for s in states]
            if lora_space == "factors":  # PEFT's 'cat': B A = sum_i B_i (c_i A_i)
                a = torch.cat([c * ai for c, ai in zip(coef, a_list, strict=True)], dim=0)
                b = torch.cat(b_list, dim=1)
            else:
                a, b = lora_concat(a_list, b_list, coef)
            out[m + "lora_A"], out[m + "lora_B"] = a, b
        return out, lora(sum(c.r for c in configs))
    if lora_space == "delta":
        merged_deltas = {
            m: merge_tensors(
                [delta(i, m) for i in range(len(states))],
                w,
                method,
                density=density,
                generator=gen,
                majority_sign=majority_sign,
            )
            for m in modules
        }
        # one SVD per module gives both the smallest exact rank (the largest over modules) and the factors
        svds = {m: torch.linalg.svd(d, full_matrices=False) for m, d in merged_deltas.items()}
        new_rank = (
            rank
            if rank is not None
            else max(_rank_of(s, tuple(merged_deltas[m].shape)) for m, (_, s, _) in svds.items())
        )
        out = {}
        for m, (u, s, vh) in svds.items():
            a, b = _split(u, s, vh, new_rank)
            out[m + "lora_A"], out[m + "lora_B"] = a.float(), b.float()
        return out, lora(new_rank)
    if lora_space == "factors":
        _check_same_params(
            states,
            configs,
            names,
            ignore=frozenset({"alpha"}),
            hint=f"; LoRA experts of different ranks merge in ΔW space ({lora_option}='delta')",
        )
        # PEFT's split of w_i s_i over the two factors; the sign goes on A only, so B A carries sign(w_i s_i)
        ws = [wi * si for wi, si in zip(w, scales, strict=True)]
        w_a = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in ws]
        w_b = [math.sqrt(abs(x)) for x in ws]
        out = {}
        for m in modules:
            for role, wr in (("lora_A", w_a), ("lora_B", w_b)):
                out[m + role] = merge_tensors(
                    [s[m + role].double() for s in states],
                    wr,
                    method,
                    density=density,
                    generator=gen,
                    majority_sign=majority_sign,
                ).float()
        return out, lora(first.r)
    _check_same_params(
        states,
        configs,
        names,
        hint=f"; LoRA experts of different ranks or scalings merge in ΔW space ({lora_option}='delta')",
    )
    return _merge_params(states, w, method, density, gen, majority_sign), first.replace()

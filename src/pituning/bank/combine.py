"""Combining experts: merges of several experts into one (:func:`merge_experts`,
:meth:`~pituning.bank.ExpertBank.merge`) and the weighted parameter average (:meth:`~pituning.bank.ExpertBank.average`),
one implementation over the merge math of :mod:`pituning.experts.merging`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pituning.bank.records import Expert
from pituning.bank.store import BankStore
from pituning.errors import BackboneMismatchError, ConfigError
from pituning.experts.base import validate_name
from pituning.experts.merging import MERGE_METHODS, check_merge_options, merge_states
from pituning.tasks import TaskInfo

__all__ = ["MERGE_METHODS", "CombineMixin", "average_heads", "merge_experts"]


class CombineMixin(BankStore):
    """:meth:`merge` and :meth:`average` (part of :class:`~pituning.bank.ExpertBank`)."""

    def merge(
        self,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        method: str,
        name: str,
        density: float = 1.0,
        seed: int = 0,
        rank: int | None = None,
        lora_space: str = "delta",
        majority_sign: str = "total",
        task: TaskInfo | None = None,
        overwrite: bool = False,
        allow_backbone_mismatch: bool = False,
    ) -> Expert:
        """Merge the experts ``names`` into one plain expert ``name`` of their kind and store it.

        The merge is :func:`merge_experts` (methods ``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
        ``magnitude_prune``, ``concat``, ``svd``; see docs/recycling.md); its provenance records the method, sources,
        weights and options.

        Args:
            names: experts of one kind, trained on the same insertion points of one backbone.
            weights: one weight per expert (default uniform ``1/n``); not renormalised.
            method: one of :data:`MERGE_METHODS`.
            name: the new expert's name.
            density: fraction of each task vector kept by ``ties``, ``dare_*`` and ``magnitude_prune`` (``< 1`` prunes
                by design).
            seed: seed of the DARE drop masks (the same seed gives the same merge).
            rank: rank of a merged LoRA (``delta`` space or ``svd``; default exact, or the largest rank for ``svd``).
            lora_space: ``delta`` (merge the updates ``s B A``), ``factors`` (PEFT's ``add_weighted_adapter``) or
                ``params`` (``A`` and ``B`` like any parameter).
            majority_sign: TIES' sign election, ``total`` or ``frequency``.
            task: task of the new expert (default: the first expert's task).
            overwrite: replace an existing entry ``name``.
            allow_backbone_mismatch: merge experts whose backbones differ in weights (same structure); the result is
                stored under the first one's backbone and its provenance lists every backbone.

        Returns:
            The stored expert.

        Raises:
            ConfigError: invalid options or experts that cannot merge (kinds, insertion points, shapes).
            BackboneMismatchError: the experts belong to backbones of different structure, or (unless
                ``allow_backbone_mismatch``) of different weights.
        """
        check_merge_options(
            method, density=density, seed=seed, rank=rank, lora_space=lora_space, majority_sign=majority_sign
        )
        if not names:
            raise ConfigError("merge() needs at least one expert name.")
        merged = merge_experts(
            self.select(names),
            weights,
            method=method,
            density=density,
            seed=seed,
            rank=rank,
            lora_space=lora_space,
            majority_sign=majority_sign,
            name=name,
            task=task,
            allow_backbone_mismatch=allow_backbone_mismatch,
        )
        self.add(merged, overwrite=overwrite)
        return merged

    def average(
        self,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        name: str,
        lora: str = "params",
        task: TaskInfo | None = None,
        overwrite: bool = False,
        allow_backbone_mismatch: bool = False,
    ) -> Expert:
        """Store the weighted parameter average ``sum_i w_i theta_i`` of ``names`` as a new expert ``name``.

        The ``linear`` merge of :meth:`merge`, with the average's own provenance (``average_of``, ``weights``,
        ``lora``). When every expert has a head and the heads have the same shapes (one label set), the new expert's
        head is their average with the same weights; otherwise it has none.

        Args:
            names: experts of one kind, config and backbone.
            weights: one weight per expert (default uniform ``1/n``); not renormalised.
            name: the new expert's name.
            lora: ``params`` averages LoRA's A and B like any parameter (``lora_space="params"``; not PEFT's
                ``add_weighted_adapter``, which is ``lora_space="factors"`` of :meth:`merge`); ``delta`` averages the
                updates ``B A`` exactly, as one LoRA of rank ``sum r_i`` (ranks may then differ).
            task: task of the new expert (default: the first expert's task).
            overwrite: replace an existing entry ``name`` (a re-run's average).
            allow_backbone_mismatch: average experts whose backbones differ in weights (same structure); the result
                is stored under the first one's backbone and its provenance lists every backbone.

        Raises:
            BackboneMismatchError: the experts belong to backbones of different structure, or (unless
                ``allow_backbone_mismatch``) of different weights.
        """
        if not names:
            raise ConfigError("average() needs at least one expert name.")
        if lora not in ("params", "delta"):
            raise ConfigError(f"average(lora=...) must be 'params' or 'delta', got {lora!r}.")
        experts = self.select(names)
        w = _check_sources(experts, weights, "average", allow_backbone_mismatch)
        averaged = _merge(
            experts,
            w,
            name=name,
            task=task,
            options={"method": "linear", "lora_space": lora},
            lora_option="lora",
        )
        averaged.provenance = {
            "average_of": list(names),
            "weights": w,
            "lora": lora,
            **({"backbones": [e.backbone.to_dict() for e in experts]} if allow_backbone_mismatch else {}),
        }
        self.add(averaged, overwrite=overwrite)
        return averaged


def merge_experts(
    experts: Sequence[Expert],
    weights: Sequence[float] | None = None,
    *,
    method: str = "linear",
    density: float = 1.0,
    seed: int = 0,
    rank: int | None = None,
    lora_space: str = "delta",
    majority_sign: str = "total",
    name: str,
    task: TaskInfo | None = None,
    allow_backbone_mismatch: bool = False,
) -> Expert:
    """Merge ``experts`` into one plain :class:`Expert` of their kind, which loads like any expert.

    Methods (docs/recycling.md; the math is :func:`pituning.experts.merging.merge_states`):

    - ``linear``: task arithmetic ``sum_i w_i tau_i`` (Ilharco et al., 2023);
    - ``ties``: trim each task vector to its top ``density`` fraction by magnitude, elect each entry's sign
      (``majority_sign``), mean of the weighted entries that agree (Yadav et al., 2023);
    - ``dare_linear`` / ``dare_ties``: drop entries at random (keep probability ``density``, kept ones divided by
      ``density``, masks from ``seed``), then ``linear`` / TIES' sign election and mean (Yu et al., 2024);
    - ``magnitude_prune``: trim as TIES, then ``linear``;
    - ``concat``: the exact weighted sum of the experts' outputs as one expert (LoRA: ranks add up; bottleneck
      adapters: bottleneck units add up); refused for prefixes, where it is not exact;
    - ``svd`` (LoRA): the weighted update ``sum_i w_i s_i B_i A_i`` truncated to ``rank`` by SVD.

    LoRA merges the updates ``Delta W_i = s_i B_i A_i`` by default (``lora_space="delta"``), stored back exactly as a
    LoRA (``rank=`` truncates); ``factors`` is PEFT's ``add_weighted_adapter`` (``A`` and ``B`` merged separately,
    weights ``sqrt(|w_i s_i|)``); ``params`` merges ``A`` and ``B`` like any parameter. Adapter and prefix experts merge
    their parameters. A single expert at weight 1 comes back unchanged from every method at ``density=1`` (``density <
    1`` prunes by design): bit for bit for adapters, prefixes and LoRA in ``params`` space, otherwise as the same LoRA
    update (to fp32 rounding) with scaling 1. One-hot weights return the chosen expert's function for ``linear``,
    ``concat`` and ``svd`` at full rank.

    The new expert's head is the weighted average of the experts' heads when they all have one of the same shapes
    (:func:`average_heads`), else none. Its provenance lists ``method``, ``sources``, ``weights``, ``density``,
    ``seed``, ``lora_space``, ``rank`` and ``majority_sign`` (and ``backbones`` with ``allow_backbone_mismatch``).

    Args:
        experts: experts of one kind on the same insertion points of one backbone.
        weights: one finite weight per expert (default uniform ``1/n``); not renormalised.
        method: one of :data:`MERGE_METHODS`.
        density: fraction kept by ``ties``, ``dare_*``, ``magnitude_prune``, in ``(0, 1]``.
        seed: seed of the DARE masks.
        rank: rank of a merged LoRA (``delta`` space or ``svd``).
        lora_space: ``delta``, ``factors`` or ``params``.
        majority_sign: ``total`` or ``frequency``.
        name: the new expert's name.
        task: its task (default: the first expert's).
        allow_backbone_mismatch: merge experts of backbones with the same structure but other weights.

    Returns:
        The merged expert (not stored; :meth:`ExpertBank.merge` stores it).

    Raises:
        ConfigError: invalid options or experts that cannot merge.
        BackboneMismatchError: the experts' backbones differ (in weights, unless ``allow_backbone_mismatch``).

    Example:
        ``merge_experts(bank.select(["a", "b"]), [1.0, 1.0], method="ties", density=0.2, name="ab")`` keeps the top
        20% of each update, elects signs and stores the mean of the agreeing entries as one LoRA ``ab``.
    """
    check_merge_options(
        method, density=density, seed=seed, rank=rank, lora_space=lora_space, majority_sign=majority_sign
    )
    validate_name(name)
    w = _check_sources(experts, weights, "merge", allow_backbone_mismatch)
    options: dict[str, Any] = {
        "method": method,
        "density": density,
        "seed": seed,
        "rank": rank,
        "lora_space": lora_space,
        "majority_sign": majority_sign,
    }
    merged = _merge(experts, w, name=name, task=task, options=options, lora_option="lora_space")
    merged.provenance = {
        "method": method,
        "sources": [e.name for e in experts],
        "weights": w,
        "density": float(density),
        "seed": seed,
        "lora_space": lora_space,
        "rank": rank,
        "majority_sign": majority_sign,
        **({"backbones": [e.backbone.to_dict() for e in experts]} if allow_backbone_mismatch else {}),
    }
    return merged


def _check_sources(
    experts: Sequence[Expert], weights: Sequence[float] | None, verb: str, allow_backbone_mismatch: bool
) -> list[float]:
    """The weights as floats (default uniform), after checking them and that the experts share a kind and backbone."""
    if not experts:
        raise ConfigError(f"{verb}() needs at least one expert.")
    w = list(weights) if weights is not None else [1.0 / len(experts)] * len(experts)
    if len(w) != len(experts) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w
    ):
        raise ConfigError(f"{verb}() needs one finite weight per expert: {len(experts)} experts, weights {w}.")
    first = experts[0]
    for other in experts[1:]:
        if other.config.kind != first.config.kind:
            raise ConfigError(
                f"Cannot {verb} a {first.config.kind} and a {other.config.kind} expert ({first.name!r} and "
                f"{other.name!r}); {verb} experts of one kind."
            )
        mine, theirs = first.backbone.fingerprint, other.backbone.fingerprint
        if theirs.structure != mine.structure:
            raise BackboneMismatchError(
                f"Cannot {verb} {first.name!r} and {other.name!r}: they belong to backbones of different "
                f"structure ({first.backbone.source!r} and {other.backbone.source!r})."
            )
        if theirs.weights != mine.weights and not allow_backbone_mismatch:
            raise BackboneMismatchError(
                f"Cannot {verb} {first.name!r} and {other.name!r}: they were trained on different backbone "
                f"weights ({first.backbone.source!r} and {other.backbone.source!r}), so the result would be "
                f"stored under a backbone one of them never saw. Pass allow_backbone_mismatch=True to {verb} them "
                "anyway."
            )
    return [float(x) for x in w]


def _merge(
    experts: Sequence[Expert],
    weights: list[float],
    *,
    name: str,
    task: TaskInfo | None,
    options: Mapping[str, Any],
    lora_option: str,
) -> Expert:
    """The merged :class:`Expert` (state, config and head; the caller sets the provenance)."""
    state, config = merge_states(
        [e.state for e in experts],
        [e.config for e in experts],
        weights,
        names=[e.name for e in experts],
        module_order=list(experts[0].modules),
        lora_option=lora_option,
        **options,
    )
    first = experts[0]
    return Expert(
        name=name,
        config=config,
        state=state,
        task=task or first.task,
        backbone=first.backbone,
        head=average_heads([e.head for e in experts], weights),
        modules=dict(first.modules),
    )


def average_heads(heads: Sequence[Mapping[str, Tensor] | None], weights: Sequence[float]) -> dict[str, Tensor] | None:
    """``sum_i weights[i] * heads[i]`` per tensor (accumulated in fp64, returned fp32); ``None`` when a head is missing
    or the heads differ in shape (other label sets): such heads do not average."""
    if not heads or any(h is None for h in heads):
        return None
    present = [h for h in heads if h is not None]
    shapes = [{k: v.shape for k, v in h.items()} for h in present]
    if any(shape != shapes[0] for shape in shapes):
        return None
    return _weighted_sum(present, weights)


def _weighted_sum(tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i weights[i] * tensors[i][k]`` for every key of the first mapping, accumulated in fp64, returned fp32."""
    return {
        k: sum((float(w) * t[k].double() for w, t in zip(weights, tensors, strict=True)), torch.zeros(())).float()
        for k in tensors[0]
    }

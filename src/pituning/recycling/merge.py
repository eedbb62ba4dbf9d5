"""Merging experts into one plain expert (docs/recycling.md, "Merging experts").

The public home of the merge methods: :func:`merge_experts` over :class:`~pituning.bank.Expert` records
(:meth:`~pituning.bank.ExpertBank.merge` stores one in a bank) and the pure tensor functions it is built on
(:func:`ties_merge`, :func:`dare` ...). The implementation lives below the recycling layer so that the bank can use it:
the math in :mod:`pituning.experts.merging`, the :class:`~pituning.bank.Expert` level in :mod:`pituning.bank.combine`.

Methods (:data:`MERGE_METHODS`): ``linear`` (task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``,
``magnitude_prune``, ``concat`` (exact sum by concatenation) and ``svd`` (LoRA, truncated weighted update).

Example:
    >>> import torch
    >>> ties_merge([torch.tensor([4.0, -1.0, 2.0]), torch.tensor([2.0, 3.0, -1.0])], [1.0, 1.0], density=1.0)
    tensor([3., 3., 2.])
"""

from __future__ import annotations

from pituning.bank.combine import merge_experts
from pituning.experts.merging import (
    LORA_SPACES,
    MAJORITY_SIGNS,
    MERGE_METHODS,
    PRUNING_METHODS,
    check_merge_options,
    dare,
    dare_linear,
    dare_ties,
    disjoint_mean,
    elect_sign,
    lora_factorize,
    magnitude_prune,
    merge_states,
    merge_tensors,
    numerical_rank,
    task_arithmetic,
    ties_merge,
    trim_magnitude,
)

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
    "merge_experts",
    "merge_states",
    "merge_tensors",
    "numerical_rank",
    "task_arithmetic",
    "ties_merge",
    "trim_magnitude",
]

"""Task similarity from Fisher task embeddings (METHOD.md, stage 2), in plain torch.

A task embedding is the diagonal Fisher information of an expert's parameters, kept per parameter tensor:
``{tensor name: F}``. The similarity of tasks ``i`` and ``j`` is Task2Vec's symmetric normalised cosine, per tensor
``k``::

    a = F_i / (F_i + F_j + eps),   b = F_j / (F_i + F_j + eps),   s_k = cos(a, b)

averaged over tensors. Fisher values of few-shot tasks can be orders of magnitude smaller than those of data-rich
tasks, so by default each Fisher is first rescaled to unit mean per tensor (``rescale="unit_mean"``), which makes the
comparison about the *shape* of the Fisher rather than its scale. Tensors whose Fisher is all zero or non-finite are
reported in :class:`Similarity.skipped`, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pituning.errors import ConfigError

__all__ = ["RESCALE", "Similarity", "rescale_fisher", "similarity_to_many", "task_similarity"]

#: Fisher rescaling options.
RESCALE = ("unit_mean", "none")


@dataclass(frozen=True)
class Similarity:
    """A task similarity and the tensors that could not take part."""

    value: float
    """Mean over usable tensors of the symmetric normalised cosine (``nan`` when no tensor is usable)."""
    per_tensor: dict[str, float] = field(default_factory=dict)
    """Similarity of each usable tensor."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Tensor name -> why it was left out (all zero or non-finite on one side)."""


def rescale_fisher(fisher: Tensor, rescale: str = "unit_mean") -> Tensor:
    """Rescale a Fisher tensor (any shape, last dims flattened by the caller) along its last dimension.

    ``unit_mean`` divides by the mean (rows of zeros stay zero); ``none`` returns it unchanged (as float32).
    """
    if rescale not in RESCALE:
        raise ConfigError(f"Unknown Fisher rescaling {rescale!r}; choose one of {list(RESCALE)}.")
    fisher = fisher.float()
    if rescale == "none":
        return fisher
    mean = fisher.mean(dim=-1, keepdim=True)
    return fisher / torch.where(mean > 0, mean, torch.ones_like(mean))


def _usable(fisher: Tensor) -> Tensor:
    """Per row: finite everywhere and not all zero. ``fisher`` is ``(..., d)``."""
    return torch.isfinite(fisher).all(dim=-1) & (fisher.abs().sum(dim=-1) > 0)


def _pair_cosine(fi: Tensor, fj: Tensor, eps: float) -> Tensor:
    """Symmetric normalised cosine along the last dim; broadcasts ``(d,)`` against ``(N, d)``."""
    total = fi + fj + eps
    a, b = fi / total, fj / total
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def task_similarity(
    fisher_i: Mapping[str, Tensor], fisher_j: Mapping[str, Tensor], *, eps: float = 1e-6, rescale: str = "unit_mean"
) -> Similarity:
    """Similarity of two tasks from their Fisher embeddings (same tensor names and shapes).

    Example:
        >>> f = {"w": torch.tensor([1.0, 2.0, 3.0])}
        >>> round(task_similarity(f, f).value, 6)
        1.0
    """
    if set(fisher_i) != set(fisher_j):
        raise ConfigError(
            f"Task embeddings cover different tensors ({sorted(set(fisher_i) ^ set(fisher_j))[:3]} ...); compare "
            "embeddings of experts with the same kind, config and backbone."
        )
    per_tensor: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in sorted(fisher_i):
        fi, fj = fisher_i[name].flatten().float(), fisher_j[name].flatten().float()
        if fi.shape != fj.shape:
            raise ConfigError(f"Task embeddings disagree on the shape of {name!r}: {fi.shape} vs {fj.shape}.")
        reason = _why_unusable(fi, "first") or _why_unusable(fj, "second")
        if reason:
            skipped[name] = reason
            continue
        per_tensor[name] = float(_pair_cosine(rescale_fisher(fi, rescale), rescale_fisher(fj, rescale), eps))
    value = sum(per_tensor.values()) / len(per_tensor) if per_tensor else float("nan")
    return Similarity(value, per_tensor, skipped)


def _why_unusable(fisher: Tensor, side: str) -> str:
    if not torch.isfinite(fisher).all():
        return f"non-finite Fisher in the {side} embedding"
    if not (fisher.abs().sum() > 0):
        return f"all-zero Fisher in the {side} embedding"
    return ""


def similarity_to_many(
    target: Mapping[str, Tensor],
    candidates: Mapping[str, Tensor],
    *,
    eps: float = 1e-6,
    rescale: str = "unit_mean",
) -> tuple[Tensor, Tensor]:
    """Similarity of one task to ``N`` others at once.

    Args:
        target: ``{tensor: F}`` of the target.
        candidates: ``{tensor: (N, d)}`` stacked flattened Fisher of the candidates, same tensor names.
        eps: the normalised cosine's epsilon (applied after rescaling).
        rescale: ``unit_mean`` or ``none``.

    Returns:
        ``(similarity (N,), usable (N, K))``: the mean over usable tensors, and which of the ``K`` tensors (sorted
        names) were usable per candidate; a candidate with no usable tensor gets ``nan``.
    """
    names = sorted(target)
    if set(names) != set(candidates):
        raise ConfigError("Target and candidate embeddings cover different tensors; compare like with like.")
    sims, usable = [], []
    for name in names:
        ft = target[name].flatten().float()
        fc = candidates[name].float()
        ok = _usable(fc) & bool(_usable(ft))
        sims.append(torch.where(ok, _pair_cosine(rescale_fisher(ft, rescale), rescale_fisher(fc, rescale), eps), 0.0))
        usable.append(ok)
    sim, ok_all = torch.stack(sims, dim=1), torch.stack(usable, dim=1)
    count = ok_all.sum(dim=1)
    mean = sim.sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan"))), ok_all

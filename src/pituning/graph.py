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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pituning.errors import ConfigError

__all__ = [
    "RESCALE",
    "Similarity",
    "flatten_embeddings",
    "prepare_rows",
    "rescale_fisher",
    "similarity_rows",
    "similarity_to_many",
    "task_similarity",
]

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


def flatten_embeddings(embeddings: Sequence[Mapping[str, Tensor]]) -> tuple[list[str], list[int], Tensor]:
    """Stack embeddings of one layout into one matrix.

    Returns:
        ``(tensor names (sorted), their sizes, (N, D))`` where each row concatenates one embedding's flattened tensors.
    """
    names = sorted(embeddings[0])
    sizes = [embeddings[0][n].numel() for n in names]
    rows = [torch.cat([e[n].reshape(-1).float() for n in names]) for e in embeddings]
    return names, sizes, torch.stack(rows)


def _segments(sizes: Sequence[int], device: torch.device) -> Tensor:
    """One-hot ``(D, K)`` matrix mapping each column to its tensor (segment sums become one matmul)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return torch.nn.functional.one_hot(ids, len(sizes)).float()


def prepare_rows(flat: Tensor, sizes: Sequence[int], rescale: str = "unit_mean") -> tuple[Tensor, Tensor]:
    """Rescale each tensor segment of each row and mark the usable ones.

    Args:
        flat: ``(N, D)`` stacked flattened Fisher.
        sizes: the segment sizes (sum ``D``).
        rescale: ``unit_mean`` or ``none``.

    Returns:
        ``(rescaled (N, D), usable (N, K))``: a segment is usable when it is finite and not all zero; unusable
        segments are zeroed in the rescaled matrix.
    """
    if rescale not in RESCALE:
        raise ConfigError(f"Unknown Fisher rescaling {rescale!r}; choose one of {list(RESCALE)}.")
    flat = flat.float()
    seg = _segments(sizes, flat.device)
    finite = torch.isfinite(flat)
    clean = torch.where(finite, flat, torch.zeros_like(flat))
    usable = ((~finite).float() @ seg == 0) & (clean.abs() @ seg > 0)
    if rescale == "unit_mean":
        means = (clean @ seg) / torch.tensor(sizes, dtype=torch.float32, device=flat.device)
        means = torch.where(means > 0, means, torch.ones_like(means))
        clean = clean / (means @ seg.t())
    return clean * (usable.float() @ seg.t()), usable


def similarity_rows(
    target: Tensor, target_usable: Tensor, rows: Tensor, rows_usable: Tensor, sizes: Sequence[int], eps: float = 1e-6
) -> Tensor:
    """Symmetric normalised cosine of one prepared target ``(D,)`` against prepared rows ``(N, D)``, mean over the
    segments usable on both sides; ``nan`` where none is.

    With ``T = f_t + F + eps``: ``cos(f_t / T, F / T) = sum(f_t F / T^2) / sqrt(sum(f_t^2 / T^2) sum(F^2 / T^2))``
    per segment, so the whole batch costs a few elementwise passes and three ``(N, D) @ (D, K)`` products.
    """
    seg = _segments(sizes, rows.device)
    k = len(sizes)
    weights = torch.cat([seg * target[:, None], seg * target.square()[:, None], seg], dim=1)  # (D, 3K)
    shifted = target + eps
    sums = torch.empty(rows.shape[0], 3 * k, device=rows.device)
    step = max(16, (1 << 18) // max(1, rows.shape[1]))  # ~1 MB blocks stay in cache: far faster than whole passes
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        inv = torch.add(block, shifted).pow_(-2)  # 1 / T^2
        sums[start : start + step, k : 2 * k] = inv @ weights[:, k : 2 * k]  # sum f_t^2 / T^2
        inv.mul_(block)
        sums[start : start + step, :k] = inv @ weights[:, :k]  # sum f_t F / T^2
        sums[start : start + step, 2 * k :] = inv.mul_(block) @ weights[:, 2 * k :]  # sum F^2 / T^2
    cross, tgt, own = sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :]
    cos = cross / (own * tgt).sqrt().clamp_min(1e-12)
    ok = rows_usable & target_usable[None, :]
    count = ok.sum(dim=1)
    mean = torch.where(ok, cos, torch.zeros_like(cos)).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def similarity_to_many(
    target: Mapping[str, Tensor],
    candidates: Sequence[Mapping[str, Tensor]],
    *,
    eps: float = 1e-6,
    rescale: str = "unit_mean",
) -> Tensor:
    """Similarity of one task to ``N`` others at once (the batched form of :func:`task_similarity`).

    Args:
        target: ``{tensor: F}`` of the target.
        candidates: ``N`` embeddings with the same tensor names and shapes.
        eps: the normalised cosine's epsilon (applied after rescaling).
        rescale: ``unit_mean`` or ``none``.

    Returns:
        ``(N,)`` similarities; ``nan`` for a candidate with no usable tensor.
    """
    if any(set(c) != set(target) for c in candidates):
        raise ConfigError("Target and candidate embeddings cover different tensors; compare like with like.")
    _, sizes, flat = flatten_embeddings([target, *candidates])
    prepared, usable = prepare_rows(flat, sizes, rescale)
    return similarity_rows(prepared[0], usable[0], prepared[1:], usable[1:], sizes, eps)

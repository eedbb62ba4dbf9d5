"""The math of interpolating a pool of experts (docs/concepts.md, stage 3), in plain torch.

Interpolation weights are ``alpha = softmax(w)`` over learnable logits ``w``, one vector per insertion point,
initialised equal. Every expert kind interpolates something linear in its parameters, so the interpolated pool
collapses exactly into one plain expert of the same kind:

- adapter and prefix: the weighted parameter sum ``sum_i alpha_i theta_i``;
- LoRA: the weighted update ``sum_i alpha_i s_i B_i A_i``, kept exact as one LoRA of rank ``sum_i r_i`` by
  concatenating the ``A_i`` and scaling the ``B_i`` (never averaging ``A`` and ``B`` separately, which adds cross
  terms), or factorised to a chosen rank by SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "init_logits",
    "lora_concat",
    "lora_delta",
    "mixing_weights",
    "svd_factorize",
    "weighted_sum",
]


def init_logits(k: int, *, device: torch.device | None = None) -> Tensor:
    """Logits of ``k`` pool members that give equal weights: zeros of shape ``(k,)`` in fp32."""
    return torch.zeros(k, device=device, dtype=torch.float32)


def mixing_weights(logits: Tensor) -> Tensor:
    """``alpha = softmax(logits)``, computed in fp32. Shape ``(k,)``."""
    return torch.softmax(logits.float(), dim=-1)


def weighted_sum(tensors: Sequence[Tensor], alpha: Tensor) -> Tensor:
    """``sum_i alpha_i * tensors[i]`` for same-shaped tensors; ``alpha`` has shape ``(k,)``.

    Example:
        >>> weighted_sum([torch.ones(2), 3 * torch.ones(2)], torch.tensor([0.5, 0.5]))
        tensor([2., 2.])
    """
    if len(tensors) != alpha.numel():
        raise ValueError(f"{len(tensors)} tensors but {alpha.numel()} weights")
    if len(tensors) == 1:
        return tensors[0] * alpha[0].to(tensors[0].dtype)
    stacked = torch.stack(list(tensors))
    return torch.einsum("k,k...->...", alpha.to(stacked.dtype), stacked)


def lora_concat(a: Sequence[Tensor], b: Sequence[Tensor], coef: Tensor) -> tuple[Tensor, Tensor]:
    """One LoRA pair equal to ``sum_i coef_i B_i A_i``.

    Args:
        a: ``A_i`` of shape ``(r_i, fan_in)``.
        b: ``B_i`` of shape ``(fan_out, r_i)``.
        coef: ``(k,)`` coefficients (interpolation weight times each expert's scaling).

    Returns:
        ``(A, B)`` of shapes ``(sum r_i, fan_in)`` and ``(fan_out, sum r_i)`` with ``B @ A = sum_i coef_i B_i A_i``.
    """
    a_cat = torch.cat(list(a), dim=0)
    b_cat = torch.cat([bi * coef[i].to(bi.dtype) for i, bi in enumerate(b)], dim=1)
    return a_cat, b_cat


def lora_delta(a: Sequence[Tensor], b: Sequence[Tensor], coef: Tensor) -> Tensor:
    """The weight update ``sum_i coef_i B_i A_i`` of shape ``(fan_out, fan_in)``."""
    a_cat, b_cat = lora_concat(a, b, coef)
    return b_cat @ a_cat


def svd_factorize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factorise ``delta`` ``(fan_out, fan_in)`` as ``B @ A`` of rank ``rank`` (best approximation in Frobenius norm).

    Exact (to rounding) when ``rank`` is at least the rank of ``delta``. Columns beyond ``min(fan_out, fan_in)`` are
    zero, so any ``rank`` works.

    Returns:
        ``(A, B)`` of shapes ``(rank, fan_in)`` and ``(fan_out, rank)``.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64, device=delta.device)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64, device=delta.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a.to(delta.dtype), b.to(delta.dtype)

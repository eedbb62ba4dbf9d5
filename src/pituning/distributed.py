"""Distributed training helpers that need no Lightning: mean-reducing experts across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pituning.model import ExpertModel

if TYPE_CHECKING:
    from pituning.bank.records import Expert

__all__ = ["sync_experts_"]


def sync_experts_(target: ExpertModel | Expert | Sequence[Expert], names: Sequence[str] | None = None) -> None:
    """Replace expert parameters by their mean over the ranks of ``torch.distributed``'s default group.

    One flat fp32 buffer is all-reduced (a sum) and divided once by the world size, whatever the tensors' dtypes (bf16
    parameters are reduced in fp32). Works with gloo (CPU tensors) and nccl (the buffer goes to the current CUDA
    device). Without an initialised process group it does nothing.

    Args:
        target: an :class:`ExpertModel` (its live parameters of ``names``, default every expert), one
            :class:`Expert` or a list of them (their ``state`` tensors).
        names: with an ExpertModel, which experts to reduce.
    """
    import torch.distributed as dist

    from pituning.bank.records import Expert  # here, not at the top: pituning.bank re-exports this module's function

    if not (dist.is_available() and dist.is_initialized()):
        return
    tensors: list[Tensor]
    if isinstance(target, ExpertModel):
        chosen = list(names) if names is not None else sorted(target.experts)
        tensors = [p.data for n in chosen for _, p in sorted(target.expert_parameters(n).items())]
    elif isinstance(target, Expert):
        tensors = [target.state[k] for k in sorted(target.state)]
    else:
        tensors = [e.state[k] for e in target for k in sorted(e.state)]
    if not tensors:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor).to(tensor.device, tensor.dtype))
            offset += n

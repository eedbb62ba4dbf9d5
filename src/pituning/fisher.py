"""Diagonal Fisher information of expert parameters: the task embedding (docs/concepts.md, stage 2), in plain torch.

``F = E_x E_y [(d log p(y|x) / d theta)^2]``, one value per expert parameter, kept per parameter tensor. Estimators:

- ``per_sample`` (default): the true empirical Fisher, squared per-example gradients, computed for a whole batch
  at once with ``torch.func.vmap(grad(...))``; if a model cannot be traced by vmap it falls back to ``loop``
  (same numbers, slower) and says so once.
- ``loop``: one backward per example (the reference the others are tested against).
- ``batch``: the square of each *batch* gradient, as the authors' released code does; it depends on the batch size.
- ``sampled``: per-sample, with labels drawn from the model's own predictive distribution (Task2Vec's choice).

Accumulation is always in fp32, whatever the model's precision, as a sum and a count (reduced across ranks once,
then divided). Parameters are never updated: gradients come from ``torch.func`` and never touch ``.grad``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pituning.errors import ConfigError, PiTuningError

__all__ = ["ESTIMATORS", "FisherError", "FisherSum", "check_fisher", "fisher_sum", "log_likelihood"]

ESTIMATORS = ("per_sample", "loop", "batch", "sampled")
log = logging.getLogger(__name__)


class FisherError(PiTuningError):
    """The Fisher cannot be computed or is unusable (all zero, non-finite, no examples)."""


def log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example ``log p(y|x)`` in fp32: ``(N, C)`` logits with ``(N,)`` labels, or ``(N, T, V)`` logits with
    ``(N, T)`` token labels (``-100`` ignored, token log-probabilities summed)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logits.dim() == 2:
        return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=-1)


@dataclass
class FisherSum:
    """Sum of squared gradients (fp32) and the number of terms, per parameter name."""

    sums: dict[str, Tensor]
    count: int

    def mean(self) -> dict[str, Tensor]:
        """The Fisher ``sum / count``; raises :class:`FisherError` when there were no terms."""
        if self.count == 0:
            raise FisherError("The Fisher saw no examples; the dataset is empty.")
        return {k: v / self.count for k, v in self.sums.items()}


def _split(batch: Mapping[str, Tensor], label_key: str) -> tuple[dict[str, Tensor], Tensor]:
    if label_key not in batch:
        raise ConfigError(f"The batch has no {label_key!r} entry; the Fisher needs labels (or estimator='sampled').")
    inputs = {k: v for k, v in batch.items() if k != label_key}
    return inputs, batch[label_key]


def _sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    if logits.dim() != 2:
        raise ConfigError("estimator='sampled' needs class logits (N, C); token targets use the empirical Fisher.")
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def fisher_sum(
    module: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Iterable[Mapping[str, Tensor]],
    *,
    estimator: str = "per_sample",
    label_key: str = "labels",
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> FisherSum:
    """Accumulate the Fisher of ``params`` over ``batches``.

    Args:
        module: the task model: ``module(**inputs)`` returns logits, ``(N, C)`` for classification or ``(N, T, V)``
            for token targets.
        params: the parameters to embed (an expert's), named as in ``module.named_parameters()``.
        batches: dicts of tensors with a batch dimension, including ``label_key``.
        estimator: ``per_sample``, ``loop``, ``batch`` or ``sampled``.
        label_key: name of the labels in a batch.
        generator: random source of ``sampled`` labels.
        autocast_dtype: run the forward under CPU/CUDA autocast in this dtype (bf16-mixed); the Fisher stays fp32.

    Returns:
        Sums of squared gradients and the count (examples, or batches for ``batch``).
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"Unknown Fisher estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
    if not params:
        raise ConfigError("No parameters to embed: the expert has none (was it injected?).")
    names = list(params)
    detached = {n: p.detach() for n, p in params.items()}
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0
    was_training = module.training
    module.eval()  # dropout off: the Fisher of the trained expert, deterministic

    def ctx() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if autocast_dtype is None:
            # attention through the math kernel, in every estimator alike: the fused kernels have no batching rule
            # (under vmap they fall back to a slow loop, warning "Please file us an issue"), and on CPU in float64
            # the fused kernel's results differ from the math kernel's and from float32's
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        else:  # the math kernel's backward fails under autocast (mixed dtypes): the fused one, its fallback silenced
            device = next(iter(detached.values())).device.type
            stack.enter_context(torch.autocast(device_type=device, dtype=autocast_dtype))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", ".*have not yet implemented the batching rule.*", UserWarning)
        return stack

    def loglik(values: dict[str, Tensor], inputs: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        with ctx():
            logits = torch.func.functional_call(module, values, (), dict(inputs), strict=False)
        return log_likelihood(logits, labels)

    vmap_ok = estimator in ("per_sample", "sampled")
    try:
        for batch in batches:
            inputs, labels = _split(batch, label_key) if estimator != "sampled" else (dict(batch), None)
            inputs.pop(label_key, None)
            if estimator == "sampled":
                with torch.no_grad(), ctx():
                    logits = module(**inputs)
                labels = _sample_labels(logits, generator)
            assert labels is not None
            n = int(labels.shape[0])
            if estimator == "batch":
                grads = torch.func.grad(lambda v, i=inputs, y=labels: loglik(v, i, y).mean())(detached)
                for name in names:
                    sums[name] += grads[name].float().square()
                count += 1
                continue
            if vmap_ok:
                try:
                    grads = _vmap_grads(loglik, detached, inputs, labels)
                except Exception as err:  # data-dependent control flow in the model: fall back, same numbers
                    vmap_ok = False
                    log.warning("per-sample Fisher: vmap failed (%s); falling back to a per-example loop", err)
                    grads = None
                if grads is not None:
                    for name in names:
                        sums[name] += grads[name].float().square().sum(dim=0)
                    count += n
                    continue
            for i in range(n):
                one = {k: v[i : i + 1] for k, v in inputs.items()}
                g = torch.func.grad(lambda v, o=one, y=labels[i : i + 1]: loglik(v, o, y).sum())(detached)
                for name in names:
                    sums[name] += g[name].float().square()
            count += n
    finally:
        module.train(was_training)
    return FisherSum(sums, count)


def _vmap_grads(
    loglik: Callable[[dict[str, Tensor], Mapping[str, Tensor], Tensor], Tensor],
    params: dict[str, Tensor],
    inputs: Mapping[str, Tensor],
    labels: Tensor,
) -> dict[str, Tensor]:
    def one(values: dict[str, Tensor], example: dict[str, Tensor], label: Tensor) -> Tensor:
        batched = {k: v.unsqueeze(0) for k, v in example.items()}
        return loglik(values, batched, label.unsqueeze(0)).sum()

    grads: dict[str, Tensor] = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, dict(inputs), labels)
    return grads


def check_fisher(fisher: Mapping[str, Tensor], task: str = "") -> list[str]:
    """Names of tensors whose Fisher is all zero or non-finite; raises :class:`FisherError` if every tensor is."""
    bad = [n for n, f in fisher.items() if not torch.isfinite(f).all() or not (f.abs().sum() > 0)]
    if fisher and len(bad) == len(fisher):
        raise FisherError(
            f"The Fisher of {task or 'the task'} is all zero or non-finite in every tensor ({bad[:3]} ...): check "
            "that the expert is active and receives gradients (LoRA B or adapter W_up all zero gives a zero Fisher "
            "for A / W_down) and that the loss is finite."
        )
    return bad

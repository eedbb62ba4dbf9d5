"""Combining experts: the weighted parameter average (:meth:`~pituning.bank.ExpertBank.average`) and its parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pituning.bank.records import Expert
from pituning.bank.store import BankStore
from pituning.errors import BackboneMismatchError, ConfigError
from pituning.experts.base import ExpertConfig
from pituning.experts.lora import LoraConfig
from pituning.tasks import TaskInfo

__all__ = ["CombineMixin", "average_heads"]


class CombineMixin(BankStore):
    """:meth:`average` (part of :class:`~pituning.bank.ExpertBank`)."""

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

        When every expert has a head and the heads have the same shapes (one label set), the new expert's head is
        their average with the same weights; otherwise it has none.

        Args:
            names: experts of one kind, config and backbone.
            weights: one weight per expert (default uniform ``1/n``); not renormalised.
            name: the new expert's name.
            lora: ``params`` averages LoRA's A and B like any parameter (the linear merge of PEFT's
                ``add_weighted_adapter``); ``delta`` averages the updates ``B A`` exactly, as one LoRA of rank
                ``sum r_i`` (ranks may then differ).
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
        weights = list(weights) if weights is not None else [1.0 / len(names)] * len(names)
        if len(weights) != len(names) or not all(isinstance(w, (int, float)) and w == w for w in weights):
            raise ConfigError(f"average() needs one finite weight per expert: {len(names)} names, weights {weights}.")
        if lora not in ("params", "delta"):
            raise ConfigError(f"average(lora=...) must be 'params' or 'delta', got {lora!r}.")
        experts = self.select(names)
        first = experts[0]
        for other in experts[1:]:
            if other.config.kind != first.config.kind:
                raise ConfigError(f"Cannot average a {first.config.kind} and a {other.config.kind} expert.")
            mine, theirs = first.backbone.fingerprint, other.backbone.fingerprint
            if theirs.structure != mine.structure:
                raise BackboneMismatchError(
                    f"Cannot average {first.name!r} and {other.name!r}: they belong to backbones of different "
                    f"structure ({first.backbone.source!r} and {other.backbone.source!r})."
                )
            if theirs.weights != mine.weights and not allow_backbone_mismatch:
                raise BackboneMismatchError(
                    f"Cannot average {first.name!r} and {other.name!r}: they were trained on different backbone "
                    f"weights ({first.backbone.source!r} and {other.backbone.source!r}), so the average would be "
                    "stored under a backbone one of them never saw. Pass allow_backbone_mismatch=True to average them "
                    "anyway."
                )
            if set(other.state) != set(first.state):
                raise ConfigError(f"Cannot average {first.name!r} and {other.name!r}: they cover different modules.")
        w = torch.tensor(weights, dtype=torch.float64)
        config = first.config
        if first.config.kind == "lora" and lora == "delta":
            state, config = _lora_delta_average(experts, w)
        else:
            for other in experts[1:]:
                if other.config != first.config or any(other.state[k].shape != v.shape for k, v in first.state.items()):
                    raise ConfigError(
                        f"Cannot average the parameters of {first.name!r} and {other.name!r}: their configs or shapes "
                        "differ (for LoRA of different ranks use lora='delta')."
                    )
            state = _weighted_sum([e.state for e in experts], [float(x) for x in w])
        head = average_heads([e.head for e in experts], [float(x) for x in w])
        averaged = Expert(
            name=name,
            config=config,
            state=state,
            task=task or first.task,
            backbone=first.backbone,
            head=head,
            provenance={
                "average_of": list(names),
                "weights": [float(x) for x in weights],
                "lora": lora,
                **({"backbones": [e.backbone.to_dict() for e in experts]} if allow_backbone_mismatch else {}),
            },
            modules=first.modules,
        )
        self.add(averaged, overwrite=overwrite)
        return averaged


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


def _lora_delta_average(experts: Sequence[Expert], w: Tensor) -> tuple[dict[str, Tensor], ExpertConfig]:
    from pituning.interpolation import lora_concat

    configs = [e.config for e in experts]
    assert all(isinstance(c, LoraConfig) for c in configs)
    scales = torch.tensor([c.scaling for c in configs], dtype=torch.float64)  # type: ignore[attr-defined]
    coef = (w * scales).float()
    state: dict[str, Tensor] = {}
    for key in experts[0].state:
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len("lora_A")]
        a, b = lora_concat([e.state[key] for e in experts], [e.state[prefix + "lora_B"] for e in experts], coef)
        state[key], state[prefix + "lora_B"] = a, b
    # the one collapse rule (rank sum r_i, alpha = rank); the stored average keeps the first expert's dropout
    return state, LoraConfig.collapsed(configs).replace(dropout=configs[0].dropout)  # type: ignore[attr-defined]

"""``ExpertModel``: a frozen backbone with named, interpolable experts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pituning.backbones import Backbone, BackboneDescription, BackboneInfo, Fingerprint, fingerprint, load_backbone
from pituning.experts import inject
from pituning.experts.base import ExpertConfig

__all__ = ["ExpertModel"]


class ExpertModel(nn.Module):
    """A frozen backbone that hosts named experts: add, activate, interpolate, collapse, save and load them.

    ``forward`` calls the backbone unchanged; the experts act through the modules they are attached to. Parameter
    names are relative to this module (``backbone.`` first); module names (insertion points, interpolation weights)
    are relative to the backbone, as in :attr:`info`.

    Example:
        >>> from transformers import BertConfig
        >>> from pituning import ExpertModel, LoraConfig
        >>> model = ExpertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                intermediate_size=37, vocab_size=99))
        >>> len(model.add_expert("task_a", LoraConfig(r=4)))  # q, k, v, o of 2 layers
        8
        >>> model.add_expert("task_b", LoraConfig(r=4)) and None
        >>> model.interpolate(["task_a", "task_b"]) and None
        >>> model.collapse("task_ab").r
        8
    """

    def __init__(
        self,
        backbone: Backbone | nn.Module | str | Path | Any,
        *,
        description: BackboneDescription | None = None,
        **load_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, description=description, **load_kwargs)
        self.backbone = backbone.model
        self.info: BackboneInfo = backbone.info
        self.source = backbone.source
        self._fingerprint: Fingerprint | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.backbone(*args, **kwargs)

    def train(self, mode: bool = True) -> ExpertModel:
        """Train mode, except for the frozen backbone's batch norms: a BatchNorm whose weights do not train stays in
        eval mode, so its running statistics (part of the backbone's fingerprint) never change while experts
        train. Dropout still follows ``mode``."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    # ------------------------------------------------------------------ experts
    def add_expert(
        self, name: str, config: ExpertConfig, *, activate: bool = True, trainable: bool = True
    ) -> list[str]:
        """Inject a new expert; see :func:`pituning.experts.add_expert`. Returns the modules it attached to.

        With ``trainable`` (default) its parameters require gradients; everything else keeps its state.
        """
        targets = inject.add_expert(self.backbone, name, config, self.info, activate=activate)
        if not trainable:
            for param in self.expert_parameters(name).values():
                param.requires_grad_(False)
        return targets

    def remove_expert(self, name: str) -> None:
        """Delete an expert from every module."""
        inject.remove_expert(self.backbone, name)

    @property
    def experts(self) -> dict[str, ExpertConfig]:
        """Expert name -> config."""
        return inject.expert_configs(self.backbone)

    @property
    def active(self) -> list[str]:
        """The active experts (the pool while interpolating)."""
        return inject.active_experts(self.backbone)

    def set_active(self, names: str | Sequence[str]) -> None:
        """Make exactly ``names`` active; ends interpolation."""
        inject.set_active(self.backbone, names)

    def expert_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Full parameter name -> parameter of expert ``name``."""
        suffix = f".{name}"
        return {n: p for n, p in self.named_parameters() if ".pi_" in n and n.endswith(suffix)}

    # ------------------------------------------------------------------ interpolation
    def interpolate(
        self,
        pool: Sequence[str],
        *,
        mixing: str = "softmax",
        share: str = "module",
        init: Sequence[float] | None = None,
    ) -> dict[str, int]:
        """Interpolate ``pool`` with learnable logits: softmax weights per insertion point, equal at init, by
        default; see :func:`pituning.experts.inject.start_interpolation` for ``mixing``, ``share`` and ``init``."""
        return inject.start_interpolation(self.backbone, pool, mixing=mixing, share=share, init=init)

    def interpolation_parameters(self) -> dict[str, nn.Parameter]:
        """Full parameter name -> interpolation logits."""
        return {n: p for n, p in self.named_parameters() if n.endswith("_logits") and ".pi_" in n}

    def interpolation_weights(self) -> dict[str, dict[str, float]]:
        """Module name -> {expert: alpha}."""
        return inject.interpolation_weights(self.backbone)

    def collapse(self, name: str, *, rank: int | None = None, activate: bool = True) -> ExpertConfig:
        """Collapse the interpolated pool into one plain expert; see :func:`pituning.experts.collapse`."""
        return inject.collapse(self.backbone, name, rank=rank, activate=activate)

    def merge(self, name: str) -> None:
        """Add a LoRA expert's update into the backbone weights and delete it."""
        inject.merge_expert(self.backbone, name)
        self._fingerprint = None  # the backbone weights changed

    def fingerprint(self) -> Fingerprint:
        """The frozen backbone's fingerprint (computed once; experts are left out)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.backbone)
        return self._fingerprint

    # ------------------------------------------------------------------ training and state
    def set_trainable(
        self,
        experts: Sequence[str] | None = None,
        *,
        interpolation: bool = True,
        bitfit: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """Freeze all but the chosen parameters; see :func:`pituning.experts.set_trainable`.

        ``extra`` patterns are searched in the names this method returns (relative to this module, ``backbone.``
        first), so a name it printed can be passed back.

        Returns:
            Names of the trainable parameters, relative to this module.
        """
        inject.set_trainable(self.backbone, experts, interpolation=interpolation, bitfit=bitfit)
        patterns = [re.compile(p) for p in extra]
        for name, param in self.named_parameters():
            if any(p.search(name) for p in patterns):
                param.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def expert_state_dict(self, name: str) -> dict[str, Tensor]:
        """The weights of one expert, keyed independently of its name."""
        return inject.expert_state_dict(self.backbone, name)

    def expert_modules(self, name: str) -> dict[str, dict[str, Any]]:
        """Module name -> its class and host layout (what exporters need), for every module of expert ``name``."""
        return inject.expert_modules(self.backbone, name)

    def load_expert(
        self, name: str, config: ExpertConfig, state_dict: Mapping[str, Tensor], *, activate: bool = True
    ) -> None:
        """Inject expert ``name`` with saved weights (shapes and kind checked; nothing changes on error)."""
        inject.load_expert(self.backbone, name, config, state_dict, self.info, activate=activate)

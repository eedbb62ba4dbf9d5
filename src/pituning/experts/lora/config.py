"""Configuration of LoRA experts."""

from __future__ import annotations

from dataclasses import dataclass

from pituning.backbones import BackboneInfo
from pituning.errors import ConfigError
from pituning.experts.base import ExpertConfig, positive, register_expert_kind

__all__ = ["LoraConfig"]


@register_expert_kind
@dataclass
class LoraConfig(ExpertConfig):
    """A LoRA expert: ``W x + (alpha / r) * B A x``, A random and B zero at init (an identity at init).

    By default it targets the attention query, key, value and output projections of every layer (docs/concepts.md,
    stage 1).

    Example:
        >>> LoraConfig(r=8, alpha=16).scaling
        2.0
    """

    kind = "lora"

    r: int = 16
    """Rank of the update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input (training only)."""
    include_mlp: bool = False
    """Also target the feed-forward projections (the description's ``lora_mlp_roles``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoraConfig.r must be a positive integer (the rank), got {self.r!r}.")
        positive(self.alpha, "LoraConfig.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    def default_roles(self, info: BackboneInfo) -> tuple[str, ...]:
        desc = info.description
        return (*desc.lora_roles, *desc.lora_mlp_roles) if self.include_mlp else desc.lora_roles

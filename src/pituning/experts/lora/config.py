"""Configuration of LoRA experts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pituning.backbones import BackboneInfo
from pituning.errors import ConfigError
from pituning.experts.base import ExpertConfig, positive

__all__ = ["LoraConfig"]


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

    @classmethod
    def collapsed(cls, configs: Sequence[ExpertConfig], rank: int | None = None) -> ExpertConfig:
        """The config of the LoRA an interpolated pool collapses into: rank ``rank``, or ``sum_i r_i`` (the ``A_i``
        concatenated); ``alpha = rank`` (scaling 1: the ``B_i`` carry the weights and scalings); the largest dropout;
        the other fields of the first config.

        Example:
            >>> LoraConfig.collapsed([LoraConfig(r=4, alpha=8), LoraConfig(r=2, dropout=0.1)])
            LoraConfig(target_modules=None, r=6, alpha=6.0, dropout=0.1, include_mlp=False)

        Raises:
            ConfigError: ``configs`` is empty or holds a config of another kind.
        """
        if not configs:
            raise ConfigError("LoraConfig.collapsed needs at least one config (the pool is empty).")
        loras = [c for c in configs if isinstance(c, LoraConfig)]
        if len(loras) != len(configs):
            kinds = sorted({c.kind for c in configs})
            raise ConfigError(f"LoraConfig.collapsed takes LoRA configs only, got kinds {kinds}.")
        new_rank = rank if rank is not None else sum(c.r for c in loras)
        return loras[0].replace(r=new_rank, alpha=float(new_rank), dropout=max(c.dropout for c in loras))

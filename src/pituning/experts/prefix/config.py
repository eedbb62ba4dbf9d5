"""Configuration of prefix experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pituning.backbones import BackboneInfo
from pituning.errors import ConfigError
from pituning.experts.base import ExpertConfig, positive

__all__ = ["PrefixConfig"]


@dataclass
class PrefixConfig(ExpertConfig):
    """A prefix expert: per self-attention layer, ``num_tokens`` learned key and value vectors prepended to the
    attention's keys and values (docs/concepts.md, stage 1). Every query attends to them; they have no position.

    Only transformer backbones host prefixes (modules that dispatch through ``transformers``' attention interface,
    with the ``eager`` or ``sdpa`` implementation).

    Example:
        >>> PrefixConfig(num_tokens=10).num_tokens
        10
    """

    kind = "prefix"

    num_tokens: int = 20
    """Prefix length ``L`` (the paper uses 100 for large models; fewer for small ones)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of the prefix keys and values."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ConfigError(f"PrefixConfig.num_tokens must be a positive integer, got {self.num_tokens!r}.")
        positive(self.init_std, "PrefixConfig.init_std", allow_zero=True)

    attaches_to: ClassVar[str] = "self-attention layers (as extra keys and values)"

    def default_roles(self, info: BackboneInfo) -> tuple[str, ...]:
        role = info.description.prefix_role
        return (role,) if role is not None else ()

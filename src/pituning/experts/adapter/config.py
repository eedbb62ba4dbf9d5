"""Configuration of bottleneck adapter experts."""

from __future__ import annotations

from dataclasses import dataclass

from pituning.backbones import BackboneInfo
from pituning.errors import ConfigError
from pituning.experts.base import ExpertConfig, positive

__all__ = ["ACTIVATIONS", "AdapterConfig"]

#: Activation names an adapter accepts.
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class AdapterConfig(ExpertConfig):
    """A bottleneck adapter: ``out = y + s * (W_up act(W_down y + b_down) + b_up)`` on a module's output ``y``.

    By default two per layer: after the attention output projection and after the feed-forward output projection,
    each before the residual add (docs/concepts.md, stage 1); on a CNN, after each block. With ``zero_init_up``
    (default, Houlsby) the adapter is an exact identity at init; otherwise ``W_up`` is ``N(0, init_std)`` like the
    released code.

    Example:
        >>> AdapterConfig(bottleneck=64).activation
        'relu'
    """

    kind = "adapter"

    bottleneck: int = 128
    """Width of the bottleneck."""
    scale: float = 1.0
    """Multiplier ``s`` of the adapter branch."""
    activation: str = "relu"
    """Non-linearity between down and up projection: relu, gelu, silu or tanh."""
    dropout: float = 0.0
    """Dropout on the bottleneck activations (training only)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of the weights."""
    zero_init_up: bool = True
    """Start ``W_up`` at zero so the adapter is an identity at init."""

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ConfigError(f"AdapterConfig.bottleneck must be a positive integer, got {self.bottleneck!r}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"AdapterConfig.activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        positive(self.init_std, "AdapterConfig.init_std", allow_zero=True)

    def default_roles(self, info: BackboneInfo) -> tuple[str, ...]:
        return info.description.adapter_roles

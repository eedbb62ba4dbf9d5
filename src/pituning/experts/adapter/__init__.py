"""Bottleneck adapter experts: ``y + s * (W_up act(W_down y + b_down) + b_up)`` after a module's output."""

from pituning.experts.adapter.config import AdapterConfig
from pituning.experts.adapter.layer import AdapterHost

__all__ = ["AdapterConfig", "AdapterHost"]

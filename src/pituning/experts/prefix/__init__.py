"""Prefix experts: learned keys and values prepended to every self-attention layer."""

from pituning.experts.prefix.config import PrefixConfig
from pituning.experts.prefix.layer import PrefixHost

__all__ = ["PrefixConfig", "PrefixHost"]

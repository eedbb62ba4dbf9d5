"""LoRA experts: ``W x + (alpha / r) B A x`` on linear and convolution layers."""

from pituning.experts.lora.config import LoraConfig
from pituning.experts.lora.layer import LoraHost

__all__ = ["LoraConfig", "LoraHost"]

"""pituning: π-Tuning (Predict-Interpolate Tuning) for foundation models, in PyTorch Lightning.

Importing pituning imports torch but not Lightning, transformers model code, PEFT, matplotlib or vision packages.
"""

from pituning._version import __version__
from pituning.backbones import (
    Backbone,
    BackboneDescription,
    BackboneInfo,
    DualEncoder,
    InsertionPoint,
    describe,
    load_backbone,
)
from pituning.bank import ExpertBank
from pituning.errors import (
    BackboneError,
    BackboneMismatchError,
    BankCorruptionError,
    BankError,
    ConfigError,
    ExpertError,
    InterpolationError,
    PiTuningError,
    UnsupportedExpertError,
)
from pituning.experts import (
    EXPERT_KINDS,
    AdapterConfig,
    ExpertConfig,
    LoraConfig,
    PrefixConfig,
    config_from_dict,
)
from pituning.model import ExpertModel

__all__ = [
    "EXPERT_KINDS",
    "AdapterConfig",
    "Backbone",
    "BackboneDescription",
    "BackboneError",
    "BackboneInfo",
    "BackboneMismatchError",
    "BankCorruptionError",
    "BankError",
    "ConfigError",
    "DualEncoder",
    "ExpertBank",
    "ExpertConfig",
    "ExpertError",
    "ExpertModel",
    "InsertionPoint",
    "InterpolationError",
    "LoraConfig",
    "PiTuningError",
    "PrefixConfig",
    "UnsupportedExpertError",
    "__version__",
    "config_from_dict",
    "describe",
    "load_backbone",
]

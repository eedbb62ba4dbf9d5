"""pituning: π-Tuning (Predict-Interpolate Tuning) for foundation models, in PyTorch Lightning.

Importing pituning imports nothing heavy: each public name loads its module (and torch) on first use, so a command
such as ``pituning --help`` starts without torch; nothing here imports Lightning, transformers model code, PEFT,
matplotlib or vision packages.
"""

import importlib
from typing import TYPE_CHECKING, Any

from pituning._version import __version__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time the names load lazily
    from pituning.backbones import (
        Backbone,
        BackboneDescription,
        BackboneInfo,
        DualEncoder,
        InsertionPoint,
        describe,
        load_backbone,
    )
    from pituning.bank import (
        ExpertBank,
    )
    from pituning.errors import (
        BackboneError,
        BackboneMismatchError,
        BankCorruptionError,
        BankError,
        ConfigError,
        ExpertError,
        InterpolationError,
        NonFiniteError,
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
    from pituning.model import (
        ExpertModel,
    )

_LAZY = {
    "Backbone": "pituning.backbones",
    "BackboneDescription": "pituning.backbones",
    "BackboneInfo": "pituning.backbones",
    "DualEncoder": "pituning.backbones",
    "InsertionPoint": "pituning.backbones",
    "describe": "pituning.backbones",
    "load_backbone": "pituning.backbones",
    "ExpertBank": "pituning.bank",
    "BackboneError": "pituning.errors",
    "BackboneMismatchError": "pituning.errors",
    "BankCorruptionError": "pituning.errors",
    "BankError": "pituning.errors",
    "ConfigError": "pituning.errors",
    "ExpertError": "pituning.errors",
    "InterpolationError": "pituning.errors",
    "NonFiniteError": "pituning.errors",
    "PiTuningError": "pituning.errors",
    "UnsupportedExpertError": "pituning.errors",
    "EXPERT_KINDS": "pituning.experts",
    "AdapterConfig": "pituning.experts",
    "ExpertConfig": "pituning.experts",
    "LoraConfig": "pituning.experts",
    "PrefixConfig": "pituning.experts",
    "config_from_dict": "pituning.experts",
    "ExpertModel": "pituning.model",
}
"""Public name -> the module that defines it (imported on first use)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pituning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "NonFiniteError",
    "PiTuningError",
    "PrefixConfig",
    "UnsupportedExpertError",
    "__version__",
    "config_from_dict",
    "describe",
    "load_backbone",
]

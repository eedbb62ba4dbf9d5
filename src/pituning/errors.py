"""The pituning exception hierarchy.

Every error pituning raises on bad input derives from :class:`PiTuningError`, so callers can catch one class.
Messages name the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "BackboneError",
    "BackboneMismatchError",
    "BankCorruptionError",
    "BankError",
    "ConfigError",
    "ExpertError",
    "InterpolationError",
    "NonFiniteError",
    "PiTuningError",
    "UnsupportedExpertError",
]


class PiTuningError(Exception):
    """Base class of every pituning error."""


class ConfigError(PiTuningError, ValueError):
    """An option has an invalid value (the message names the option and the allowed values)."""


class BackboneError(PiTuningError):
    """A backbone cannot be loaded or described, or a target module is not in it."""


class UnsupportedExpertError(BackboneError):
    """The backbone cannot host this kind of expert (for example a prefix on a CNN)."""


class ExpertError(PiTuningError):
    """An expert is missing, duplicated, or its weights do not fit the model."""


class NonFiniteError(ExpertError):
    """Training or a task embedding met NaN or inf (the message names the task, the batch and the likely cause)."""


class InterpolationError(ExpertError):
    """Experts cannot be interpolated together (different kinds, shapes or insertion points)."""


class BankError(PiTuningError):
    """An expert bank operation failed (unknown entry, name taken, bad location)."""


class BankCorruptionError(BankError):
    """A bank file does not match its recorded sha256 or cannot be parsed (the message names the file)."""


class BackboneMismatchError(BankError):
    """An expert was trained on another backbone than the one it is being loaded into."""

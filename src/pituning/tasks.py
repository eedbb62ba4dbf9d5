"""What an expert was trained on: :class:`TaskInfo` and the modalities a task can have.

A leaf of the package (it imports only :mod:`pituning.errors`), shared by the DataModules, which describe their task
with it, and the bank, which stores it with every expert; neither has to import the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pituning.errors import ConfigError

__all__ = ["MODALITIES", "TaskInfo"]

MODALITIES = ("text", "vision", "vision-language", "other")


@dataclass
class TaskInfo:
    """What an expert was trained on."""

    name: str
    """Task name (for example ``tweets/airline_ua``)."""
    modality: str = "text"
    """``text``, ``vision``, ``vision-language`` or ``other``."""
    label_names: list[str] = field(default_factory=list)
    """Class names, in label order."""
    num_examples: int | None = None
    """Number of training examples."""
    shots: int | None = None
    """Examples per class when trained k-shot; ``None`` for full data."""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"TaskInfo.modality must be one of {list(MODALITIES)}, got {self.modality!r}.")

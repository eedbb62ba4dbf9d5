"""Callbacks for the stage modules."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from pituning.errors import ConfigError

__all__ = ["RestoreBest"]


class RestoreBest(pl.Callback):
    """Early stopping without checkpoint files: keep the trainable weights of the best validation epoch in memory
    and put them back when training ends, before the module stores its expert.

    With few shots, give the DataModule ``holdout_shots`` so the validation split is a held-out slice of the shots
    (no extra labels). Ties keep the earlier epoch.

    Args:
        monitor: a logged validation metric (``val_loss``, ``val_acc``).
        mode: ``min`` or ``max``.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"RestoreBest mode must be 'min' or 'max', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.state: dict[str, Tensor] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"RestoreBest monitors {self.monitor!r} but the module logged {sorted(trainer.callback_metrics)}; "
                "give the DataModule a validation split (holdout_shots=... in k-shot runs)."
            )
        score = float(value)
        if (score < self.best) if self.mode == "min" else (score > self.best):
            self.best = score
            self.best_epoch = trainer.current_epoch
            self.state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.state:
            return
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

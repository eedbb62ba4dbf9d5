"""What every stage module shares: attribute access to its hyper-parameters, its DataModule, its backbone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from pituning.backbones import load_backbone
from pituning.model import ExpertModel

__all__ = ["BACKBONE_DTYPES", "StageModule"]

#: ``backbone_dtype`` option -> dtype of the frozen backbone (``None``: as stored).
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}


class StageModule(pl.LightningModule):
    """Base of the stage modules; subclasses save ``backbone``, ``backbone_task``, ``backbone_dtype`` and
    ``attn_implementation`` as hyper-parameters."""

    @property
    def hp(self) -> Any:
        """The saved hyper-parameters (attribute access)."""
        return self.hparams

    def datamodule(self) -> Any:
        """The trainer's DataModule (``None`` when dataloaders were passed directly)."""
        return getattr(self.trainer, "datamodule", None)

    def load_experts(self) -> ExpertModel:
        """The frozen backbone with no experts yet."""
        hp = self.hp
        kwargs: dict[str, Any] = {"task": hp.backbone_task, "dtype": BACKBONE_DTYPES[hp.backbone_dtype]}
        if hp.attn_implementation is not None:
            kwargs["attn_implementation"] = hp.attn_implementation
        return ExpertModel(load_backbone(hp.backbone, **kwargs))

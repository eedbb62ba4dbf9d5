"""Stage 3: fine-tune the target with a learnable interpolation of similar source experts and its own expert."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from pituning.bank import ExpertBank, average_heads
from pituning.errors import BankError, ConfigError
from pituning.experts.inject import check_train_mode
from pituning.model import ExpertModel
from pituning.modules.expert import ExpertTrainingModule

__all__ = ["PREDICTORS", "InterpolationModule", "rank_by_few_shot_loss", "select_sources"]


def select_sources(
    bank: ExpertBank,
    target: str,
    k: int,
    *,
    rescale: str = "unit_mean",
    kind: str | None = None,
    modality: str | None = None,
    candidates: list[str] | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` sources most similar to ``target`` by their stored Fisher embeddings.

    Args:
        bank: the bank.
        target: the target's entry (it needs an embedding).
        k: how many.
        rescale: Fisher rescaling.
        kind: only experts of this kind.
        modality: only this modality.
        candidates: rank only these entries (for example the suite's sources, not other targets).

    Raises:
        BankError: the target has no embedding, or fewer than ``k`` sources are comparable with it.
    """
    ranked = bank.similar(target, k=max(1, len(bank)), rescale=rescale, kind=kind, modality=modality)
    if candidates is not None:
        ranked = [(n, s) for n, s in ranked if n in set(candidates)]
    if len(ranked) < k:
        raise BankError(
            f"k={k} sources were asked for target {target!r} but only {len(ranked)} comparable source(s) with task "
            "embeddings are in the bank (same expert layout and backbone); lower k or embed more sources."
        )
    return ranked[:k]


PREDICTORS = ("fisher", "few_shot_loss")
HEAD_INITS = ("target", "best_source", "sources", "fresh")


def rank_by_few_shot_loss(
    bank: ExpertBank,
    experts: ExpertModel,
    names: list[str],
    batches: list[dict[str, Tensor]],
    task_type: str,
    candidates: dict[str, Tensor] | None = None,
) -> list[tuple[str, float]]:
    """Rank source experts by their loss on the target's labelled shots, each with its own head (lowest first).

    A direct transfer predictor for the few-shot case (docs/concepts.md, "A direct predictor"): the score returned is
    the negative mean cross-entropy, so higher is better, like a similarity. Sources whose head does not fit the
    target's classes are left out.
    """
    from torch.nn import functional as F

    from pituning.heads import TaskModel

    scores = []
    was = experts.active
    for name in names:
        stored = bank.load_into(experts, name, as_name="ranked_source")
        try:
            if stored.head is None:
                continue
            if task_type == "matching" and candidates is not None:
                num_classes = int(candidates["input_ids"].shape[0])  # one class per candidate text, any source head
            else:
                # a linear head's weight, or a dual encoder's pair head's classifier
                weight = stored.head.get("weight", stored.head.get("classifier.weight"))
                num_classes = int(weight.shape[0]) if weight is not None else 2
            model = TaskModel(experts, task_type, num_classes, candidates=candidates)
            try:
                model.head.load_state_dict(stored.head)
            except RuntimeError:
                continue
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in batches:
                    labels = batch["labels"]
                    if int(labels.max()) >= num_classes:
                        break
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
                    total += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                    count += int(labels.shape[0])
                else:
                    if count:
                        scores.append((name, -total / count))
        finally:
            experts.remove_expert("ranked_source")
    experts.set_active(was)
    return sorted(scores, key=lambda item: -item[1])


class InterpolationModule(ExpertTrainingModule):
    """π-Tuning on the target task: interpolate the top-k similar source experts and the target's own expert.

    The pool is the sources (chosen by Fisher similarity to ``target``, or given) plus the target expert, fresh or
    trained. Learnable logits per layer and insertion point start equal; mode ``experts_and_weights`` trains logits
    and every pool expert, ``weights_only`` the logits (and the head). At the end of fit the pool collapses into one
    plain expert ``output_name``, stored in the bank with its sources, similarities and learned weights.

    Args:
        target: bank entry of the target task's expert: its embedding ranks the sources, and it is the target expert
            when ``target_init="trained"``. Its config is used for a fresh target expert unless ``expert`` is given.
        sources: the source experts; by default the ``k`` most similar to ``target``.
        candidates: the entries ``sources`` are chosen among (default: every comparable bank entry).
        k: how many sources (0 trains the target expert alone through the same code path).
        target_init: ``fresh`` (a new expert) or ``trained`` (the stored target expert).
        mode: ``experts_and_weights`` or ``weights_only``.
        logits_lr: learning rate of the interpolation logits (the experts use ``lr``).
        source_lr: learning rate of the source experts in the pool (default ``lr``, which the target expert keeps):
            lower keeps more of what the sources learned on their full data while the few shots train the
            target expert and the logits; ``0`` freezes the sources' parameters (they still mix).
        weights_only_steps: train only the logits (and the head) for this many steps first.
        output_name: name of the collapsed expert (default ``<target>_pi``).
        rescale: Fisher rescaling for the similarity (``unit_mean`` or ``none``).
        predictor: how sources are ranked: ``fisher`` (similarity of the stored task embeddings) or
            ``few_shot_loss`` (each source expert's loss, with its own head, on the target's training shots; needs
            ``candidates``).
        head_init: ``target`` (the target expert's stored head), ``best_source`` (the head of the top-ranked source,
            when its classes are the target's), ``sources`` (the selected sources' heads averaged with the sources'
            share of ``init_weights``, the head that matches the interpolated experts; needs heads of one shape) or
            ``fresh``.
        init_weights: initial interpolation weights of the pool, sources in rank order then the target expert
            (normalised; default equal). For example ``[0.7, 0.1, 0.1, 0.1]`` starts near the best-ranked source.
        logits_data: ``train`` (the logits learn on the training batches, like the experts) or ``holdout`` (on the
            DataModule's validation split, cycled, one batch per step: give it ``holdout_shots`` so that split is
            a held-out slice of the shots the experts never see).
        **kwargs: :class:`ExpertTrainingModule` options (``backbone``, ``bank``, ``lr``, ...).
    """

    def __init__(
        self,
        backbone: str,
        bank: str,
        target: str,
        *,
        sources: list[str] | None = None,
        candidates: list[str] | None = None,
        k: int = 3,
        target_init: str = "fresh",
        mode: str = "experts_and_weights",
        logits_lr: float = 5e-2,
        source_lr: float | None = None,
        weights_only_steps: int = 0,
        output_name: str | None = None,
        rescale: str = "unit_mean",
        predictor: str = "fisher",
        head_init: str = "target",
        init_weights: list[float] | None = None,
        logits_data: str = "train",
        expert: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_train_mode(mode)
        if target_init not in ("fresh", "trained"):
            raise ConfigError(f"target_init must be 'fresh' or 'trained', got {target_init!r}.")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {list(HEAD_INITS)}, got {head_init!r}.")
        if source_lr is not None and source_lr < 0:
            raise ConfigError(f"source_lr must be >= 0 (0 freezes the source experts), got {source_lr}.")
        if k < 0:
            raise ConfigError(f"k must be >= 0, got {k}.")
        if logits_data not in ("train", "holdout"):
            raise ConfigError(f"logits_data must be 'train' or 'holdout', got {logits_data!r}.")
        if init_weights is not None and (len(init_weights) != k + 1 or min(init_weights) <= 0):
            raise ConfigError(
                f"init_weights needs k + 1 = {k + 1} positive weights (the sources in rank order, then the target "
                f"expert), got {init_weights}."
            )
        if predictor not in PREDICTORS:
            raise ConfigError(f"predictor must be one of {list(PREDICTORS)}, got {predictor!r}.")
        if predictor == "few_shot_loss" and candidates is None and sources is None:
            raise ConfigError("predictor='few_shot_loss' needs candidates=[...] (the source experts to rank).")
        # set before the parent's __init__, which may already build the pool (when num_classes is given)
        self.target = target
        self.opts: dict[str, Any] = {
            "sources": sources,
            "candidates": candidates,
            "k": k,
            "target_init": target_init,
            "mode": mode,
            "logits_lr": logits_lr,
            "source_lr": source_lr,
            "weights_only_steps": weights_only_steps,
            "output_name": output_name,
            "rescale": rescale,
            "predictor": predictor,
            "head_init": head_init,
            "init_weights": init_weights,
            "logits_data": logits_data,
        }
        self._holdout: Any = None
        self._holdout_grads: list[Tensor | None] = []
        self.selected: list[tuple[str, float]] = []
        self.pool: list[str] = []
        stored_config = ExpertBank(bank, create=False).get(target).config.to_dict()
        super().__init__(backbone, expert or stored_config, f"{target}_target", bank, **kwargs)
        self.save_hyperparameters()

    def add_experts(self, experts: ExpertModel) -> dict[str, Tensor] | None:
        hp = self.opts
        bank = self.bank()
        if hp["sources"] is not None:
            if len(hp["sources"]) < hp["k"]:
                raise BankError(f"k={hp['k']} but only {len(hp['sources'])} sources were given.")
            self.selected = [(s, float("nan")) for s in hp["sources"][: hp["k"]]]
        elif hp["k"] > 0 and hp["predictor"] == "few_shot_loss":
            datamodule = self.datamodule()
            if datamodule is None:
                raise ConfigError("predictor='few_shot_loss' needs the target's DataModule (fit with a datamodule).")
            batches = list(datamodule.embedding_dataloader())
            candidates = datamodule.candidates() if self.hp.task_type == "matching" else None
            names = [c for c in (hp["candidates"] or hp["sources"] or []) if c != self.target]
            ranked = rank_by_few_shot_loss(bank, experts, names, batches, self.hp.task_type, candidates)
            if len(ranked) < hp["k"]:
                raise BankError(f"k={hp['k']} sources were asked for but only {len(ranked)} could be scored.")
            self.selected = ranked[: hp["k"]]
        elif hp["k"] > 0:
            pool = [c for c in hp["candidates"] if c != self.target] if hp["candidates"] is not None else None
            self.selected = select_sources(
                bank, self.target, hp["k"], rescale=hp["rescale"], kind=self.expert_config.kind, candidates=pool
            )
        for name, _ in self.selected:
            bank.load_into(experts, name, activate=False)
        target = bank.get(self.target)
        if hp["target_init"] == "trained":
            bank.load_into(experts, self.target, as_name=self.expert_name, activate=False)
        else:
            experts.add_expert(self.expert_name, self.expert_config, activate=False)
        self.pool = [name for name, _ in self.selected] + [self.expert_name]
        experts.interpolate(self.pool)
        if hp["init_weights"] is not None:
            prior = torch.tensor(hp["init_weights"], dtype=torch.float32)
            with torch.no_grad():
                for logits in experts.interpolation_parameters().values():
                    logits.copy_(torch.log(prior / prior.sum()).to(logits.device))
        if hp["head_init"] == "best_source" and self.selected:
            return bank.get(self.selected[0][0]).head
        if hp["head_init"] == "sources" and self.selected:
            return self._sources_head(bank)
        return target.head if hp["head_init"] == "target" else None

    def _sources_head(self, bank: ExpertBank) -> dict[str, Tensor]:
        """The selected sources' heads averaged with their share of ``init_weights`` (equal by default)."""
        init = self.opts["init_weights"]
        shares = torch.tensor(init[: len(self.selected)] if init else [1.0] * len(self.selected), dtype=torch.float64)
        head = average_heads([bank.get(name).head for name, _ in self.selected], (shares / shares.sum()).tolist())
        if head is None:
            raise ConfigError(
                "head_init='sources' averages the sources' heads, but one of "
                f"{[name for name, _ in self.selected]} has no head or one of another shape than the others (other "
                "classes); use head_init='target' or 'fresh'."
            )
        return head

    def select_trainable(self) -> list[str]:
        assert self.task_model is not None
        experts = self.pool if self.opts["mode"] == "experts_and_weights" else []
        if self.opts["source_lr"] == 0:
            experts = [e for e in experts if e == self.expert_name]
        self.task_model.experts.set_trainable(experts, interpolation=True)
        for param in self.task_model.head.parameters():
            param.requires_grad_(True)
        return [n for n, p in self.task_model.named_parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        assert self.task_model is not None
        logits = [p for p in self.task_model.experts.interpolation_parameters().values() if p.requires_grad]
        logit_ids = {id(p) for p in logits}
        source_lr = self.opts["source_lr"]
        source_ids = set()
        if source_lr:  # None: one group at ``lr``; 0: the sources are frozen (select_trainable)
            for name, _ in self.selected:
                source_ids |= {id(p) for p in self.task_model.experts.expert_parameters(name).values()}
        groups = []
        for group in super().param_groups():
            params = group["params"]
            group["params"] = [p for p in params if id(p) not in logit_ids and id(p) not in source_ids]
            groups.append(group)
            if group["name"] == "experts" and source_ids:
                sources = [p for p in params if id(p) in source_ids and p.requires_grad]
                groups.append({"params": sources, "lr": source_lr, "name": "sources"})
        groups.append({"params": logits, "lr": self.opts["logits_lr"], "name": "logits", "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ logits on a held-out slice
    def _holdout_batch(self) -> dict[str, Tensor]:
        if self._holdout is None:
            datamodule = self.datamodule()
            if datamodule is None or not datamodule.splits.get("validation", ([], []))[0]:
                raise ConfigError(
                    "logits_data='holdout' needs a DataModule with a validation split (holdout_shots=... for k-shot)."
                )
            self._holdout = iter(datamodule.val_dataloader())
        try:
            batch = next(self._holdout)
        except StopIteration:
            self._holdout = None
            return self._holdout_batch()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # read outside the Trainer's loop: cast as the Trainer casts its own batches (bf16-true: float inputs to bf16)
        converted: dict[str, Tensor] = self.trainer.precision_plugin.convert_input(batch)
        return converted

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.opts["logits_data"] == "holdout":
            assert self.task_model is not None
            logits = list(self.task_model.experts.interpolation_parameters().values())
            held = self._holdout_batch()
            loss = self._loss(
                self._train_logits(self(**{k: v for k, v in held.items() if k != "labels"})), held["labels"]
            )
            self.log("holdout_loss", loss, batch_size=held["labels"].shape[0])
            grads = torch.autograd.grad(loss, logits, allow_unused=True)
            self._holdout_grads = list(grads)
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        """``logits_data='holdout'``: the logits' gradients are the held-out batch's, not the training batch's."""
        if self.opts["logits_data"] != "holdout" or self.task_model is None:
            return
        for param, grad in zip(
            self.task_model.experts.interpolation_parameters().values(), self._holdout_grads, strict=True
        ):
            param.grad = None if grad is None else grad.detach()

    def lr_factor(self, group: dict[str, Any], step: int, *, total: int) -> float:
        if group.get("name") in ("experts", "sources") and step < self.opts["weights_only_steps"]:
            return 0.0
        return super().lr_factor(group, step, total=total)

    def mean_weights(self) -> dict[str, float]:
        """Mean interpolation weight of each pool member over all insertion points."""
        assert self.task_model is not None
        sums: dict[str, float] = defaultdict(float)
        per_module = self.task_model.experts.interpolation_weights()
        for weights in per_module.values():
            for name, value in weights.items():
                sums[name] += value
        return {name: value / max(1, len(per_module)) for name, value in sums.items()}

    def on_train_epoch_end(self) -> None:
        for name, value in self.mean_weights().items():
            self.log(f"alpha/{name}", value)

    def expert_to_store(self) -> tuple[str, dict[str, Any]]:
        assert self.task_model is not None
        hp = self.opts
        name = hp["output_name"] or f"{self.target}_pi"
        weights = self.mean_weights()
        per_module = self.task_model.experts.interpolation_weights()
        self.task_model.experts.collapse(name)
        provenance = {
            "stage": "interpolate",
            "target": self.target,
            "sources": [n for n, _ in self.selected],
            "similarities": dict(self.selected),
            "mean_weights": weights,
            "weights": per_module,
            "mode": hp["mode"],
            "predictor": hp["predictor"],
            "target_init": hp["target_init"],
            "init_weights": hp["init_weights"],
            "logits_data": hp["logits_data"],
        }
        return name, provenance

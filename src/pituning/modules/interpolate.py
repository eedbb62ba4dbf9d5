"""Stage 3: fine-tune the target with a learnable interpolation of similar source experts and its own expert."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from pituning.bank import ExpertBank, average_heads
from pituning.config import InterpolationConfig, fold_flat_options
from pituning.errors import BankError, ConfigError
from pituning.model import ExpertModel
from pituning.modules.expert import ExpertTrainingModule

__all__ = ["PREDICTORS", "InterpolationModule", "rank_by_few_shot_loss", "select_sources"]


def _has_split(datamodule: Any, split: str) -> bool:
    """Whether ``datamodule`` has a non-empty ``split`` (``val`` ...)."""
    try:
        return len(getattr(datamodule, f"{split}_dataloader")()) > 0
    except Exception:  # no such split, or a DataModule that raises for it
        return False


def _last(p: Tensor) -> Tensor:
    return torch.tensor([p.shape[0] - 1], device=p.device)


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
_INTERPOLATION_FIELDS = frozenset(f.name for f in dataclasses.fields(InterpolationConfig))


def rank_by_few_shot_loss(
    bank: ExpertBank,
    experts: ExpertModel,
    names: list[str],
    batches: list[dict[str, Tensor]],
    task_type: str,
    candidates: dict[str, Tensor] | None = None,
    *,
    num_classes: int | None = None,
) -> list[tuple[str, float]]:
    """Rank source experts by their loss on the target's labelled shots, best first (docs/concepts.md, "A direct
    predictor"; docs/recycling.md, "Ranking sources without their data").

    Each source is read through its own head when that head has the target's classes and scores above chance on the
    shots; otherwise through a linear head refitted on the shots and scored on held-out folds, so sources without a
    head (imported PEFT adapters) or with another label set are ranked too. The score is the negative mean
    cross-entropy (higher is better, like a similarity). Sources that cannot be scored are logged and left out.
    """
    from pituning.recycling.source_free import rank_sources

    return rank_sources(
        experts,
        bank,
        names,
        batches,
        predictor="few_shot_loss",
        task_type=task_type,
        on_unscored="warn",
        num_classes=num_classes,
        match_candidates=candidates,
    )


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
        interpolation: how the pool is interpolated (:class:`~pituning.config.InterpolationConfig`: ``mode``,
            ``target_init``, ``logits_lr``, ``source_lr``, ``weights_only_steps``, ``rescale``, ``predictor``,
            ``head_init``, ``init_weights``, ``logits_data``; documented there), the suite's ``interpolation:`` too.
        output_name: name of the collapsed expert (default ``<target>_pi``).
        expert: config of a fresh target expert (default: the stored target expert's).
        **kwargs: :class:`ExpertTrainingModule` options (``optim``, ``backbone_task``, ``task_type`` ...); the
            ``interpolation`` options one by one are deprecated.
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
        interpolation: InterpolationConfig | None = None,
        output_name: str | None = None,
        expert: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        flat = {key: kwargs.pop(key) for key in list(kwargs) if key in _INTERPOLATION_FIELDS}
        kwargs.pop("expert_name", None)  # a checkpoint's hparams carry the parent's; it is always <target>_target
        interp = fold_flat_options(interpolation, InterpolationConfig, "interpolation", flat, type(self).__name__)
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be an integer >= 0, got {k!r}.")
        members = k + 1 if interp.include_target else k
        if interp.init_weights is not None and len(interp.init_weights) != members:
            where = "the sources in rank order, then the target expert" if interp.include_target else "the sources"
            raise ConfigError(f"init_weights needs {members} weights ({where}), got {list(interp.init_weights)}.")
        if not interp.include_target and k < 1:
            raise ConfigError("include_target: false interpolates the sources alone: it needs k >= 1.")
        if interp.predictor == "few_shot_loss" and candidates is None and sources is None:
            raise ConfigError("predictor='few_shot_loss' needs candidates=[...] (the source experts to rank).")
        # set before the parent's __init__, which may already build the pool (when num_classes is given)
        self.target = target
        self.interpolation = interp
        """The interpolation options (typed)."""
        self.opts: dict[str, Any] = {
            **dataclasses.asdict(interp),
            "init_weights": list(interp.init_weights) if interp.init_weights is not None else None,
            "sources": sources,
            "candidates": candidates,
            "k": k,
            "output_name": output_name,
        }
        self._holdout: Any = None
        self._holdout_grads: list[Tensor | None] = []
        self.selected: list[tuple[str, float]] = []
        self.pool: list[str] = []
        stored_config = ExpertBank(bank, create=False).get(target).config.to_dict()
        super().__init__(backbone, bank, f"{target}_target", expert or stored_config, **kwargs)
        parent = {key: value for key, value in self.hparams.items() if key not in ("expert", "expert_name")}
        self.save_hyperparameters(
            {
                **parent,
                "target": target,
                "sources": sources,
                "candidates": candidates,
                "k": k,
                "interpolation": {**dataclasses.asdict(interp), "init_weights": self.opts["init_weights"]},
                "output_name": output_name,
                "expert": expert,
            }
        )

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
            ranked = rank_by_few_shot_loss(
                bank, experts, names, batches, self.hp.task_type, candidates, num_classes=datamodule.num_classes
            )
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
        if not hp["include_target"]:
            pass  # the sources alone (a control): no target expert in the model
        elif hp["target_init"] == "trained":
            bank.load_into(experts, self.target, as_name=self.expert_name, activate=False)
        else:
            experts.add_expert(self.expert_name, self.expert_config, activate=False)
        self.pool = [name for name, _ in self.selected] + ([self.expert_name] if hp["include_target"] else [])
        experts.interpolate(self.pool, mixing=hp["mixing"], share=hp["share"], init=self._initial_logits())
        if hp["head_init"] == "best_source" and self.selected:
            return bank.get(self.selected[0][0]).head
        if hp["head_init"] == "sources" and self.selected:
            return self._sources_head(bank)
        return target.head if hp["head_init"] == "target" else None

    def _initial_logits(self) -> list[float]:
        """Starting logits of the pool: ``log`` of the normalised ``init_weights`` (softmax), the weights themselves
        (linear), or the defaults (equal weights; linear: every source 0 and the target 1)."""
        init, hp = self.opts["init_weights"], self.opts
        n = len(self.pool)
        if hp["mixing"] == "linear":
            if init is not None:
                return [float(w) for w in init]
            if hp["include_target"]:
                return [0.0] * (n - 1) + [1.0]
            return [1.0 / n] * n  # the sources alone: start at their average
        if init is None:
            return [0.0] * n
        prior = torch.tensor(init, dtype=torch.float64)
        return torch.log(prior / prior.sum()).tolist()  # type: ignore[no-any-return]

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
        guard = self._guard() if hp["guard"] else None
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
            "mixing": hp["mixing"],
            "share": hp["share"],
            "include_target": hp["include_target"],
            **({"guard": guard} if guard is not None else {}),
        }
        return name, provenance

    def _guard(self) -> dict[str, Any]:
        """``guard``: the mixture's mean loss against the target expert's alone inside the pool (every source's weight
        zero), on the validation split when there is one, else the training shots; when the target alone is better
        (lower loss), the weights are set to it, so the collapsed expert is the target expert."""
        assert self.task_model is not None
        datamodule = self.datamodule()
        if datamodule is None:
            raise ConfigError("interpolation.guard needs the target's DataModule (fit with a datamodule).")
        loader = datamodule.val_dataloader() if _has_split(datamodule, "val") else datamodule.train_dataloader()
        batches = [{k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in loader]
        logits = list(self.task_model.experts.interpolation_parameters().values())
        learned = [p.detach().clone() for p in logits]
        alone = [0.0] * (len(self.pool) - 1) + [1.0] if self.opts["mixing"] == "linear" else None
        mixture_loss = self._mean_loss(batches)
        with torch.no_grad():
            for p in logits:  # softmax: the target's logit far above the others gives it weight 1 (to fp32 precision)
                p.copy_(
                    torch.tensor(alone) if alone is not None else torch.full_like(p, -1e4).index_fill(0, _last(p), 0)
                )
        target_loss = self._mean_loss(batches)
        kept = "target" if target_loss < mixture_loss else "mixture"
        if kept == "mixture":
            with torch.no_grad():
                for p, value in zip(logits, learned, strict=True):
                    p.copy_(value)
        return {"mixture_loss": mixture_loss, "target_loss": target_loss, "kept": kept}

    def _mean_loss(self, batches: list[dict[str, Any]]) -> float:
        assert self.task_model is not None
        was = self.task_model.training
        self.task_model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for batch in batches:
                    n = int(batch["labels"].shape[0])
                    logits = self(**{k: v for k, v in batch.items() if k != "labels"})
                    total += float(self._loss(logits, batch["labels"])) * n
                    count += n
        finally:
            self.task_model.train(was)
        if not count:
            raise ConfigError("interpolation.guard found no examples to compare the mixture and the target expert on.")
        return total / count

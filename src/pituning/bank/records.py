"""The bank's records: an :class:`Expert` in memory, the :class:`BackboneIdentity` it belongs to, a stored
:class:`BankEntry` and the :class:`Recovery` report. Plain dataclasses; no file access, and no torch import."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pituning.errors import BackboneMismatchError, ExpertError
from pituning.tasks import TaskInfo

if TYPE_CHECKING:  # annotations only: the records import no torch (``pituning bank list`` starts without it)
    from torch import Tensor

    from pituning.backbones import Fingerprint
    from pituning.experts.base import ExpertConfig
    from pituning.model import ExpertModel

__all__ = ["BackboneIdentity", "BankEntry", "Expert", "Recovery", "check_backbone"]


@dataclass(frozen=True)
class BackboneIdentity:
    """Which frozen backbone an expert belongs to."""

    source: str
    """Hub name, directory or description of the backbone."""
    family: str
    """Backbone family (``bert``, ``vit`` ...)."""
    fingerprint: Fingerprint
    """Structure and weight hashes (:func:`pituning.backbones.fingerprint`)."""

    @classmethod
    def of(cls, model: ExpertModel) -> BackboneIdentity:
        """The identity of ``model``'s backbone."""
        return cls(model.source, model.info.family, model.fingerprint())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"source": self.source, "family": self.family, **self.fingerprint.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneIdentity:
        """Inverse of :meth:`to_dict`."""
        from pituning.backbones import Fingerprint

        fp = Fingerprint(str(data["structure"]), str(data["weights"]), int(data["num_parameters"]))
        return cls(str(data["source"]), str(data["family"]), fp)


@dataclass
class Expert:
    """One expert in memory: config, fp32 weights and metadata (what the bank stores and returns)."""

    name: str
    """Expert name (unique in a bank)."""
    config: ExpertConfig
    """Its config."""
    state: dict[str, Tensor]
    """Its weights, keyed as :meth:`ExpertModel.expert_state_dict` writes them."""
    task: TaskInfo
    """The task it was trained on."""
    backbone: BackboneIdentity
    """The backbone it belongs to."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Training / validation metrics."""
    embedding: dict[str, Tensor] | None = None
    """Task embedding: diagonal Fisher per expert tensor (same keys as ``state``)."""
    head: dict[str, Tensor] | None = None
    """Weights of a task head trained with the expert."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """How it was made (sources, interpolation weights, similarities ...)."""
    created: str = ""
    """Creation time (UTC, ISO 8601)."""
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Module name -> class and layout of every module the expert attaches to (used by PEFT export)."""

    @classmethod
    def from_model(
        cls,
        model: ExpertModel,
        name: str,
        task: TaskInfo,
        *,
        as_name: str | None = None,
        metrics: Mapping[str, float] | None = None,
        embedding: Mapping[str, Tensor] | None = None,
        head: Mapping[str, Tensor] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Expert:
        """Capture expert ``name`` of ``model`` (stored as ``as_name`` if given)."""
        config = model.experts.get(name)
        if config is None:
            raise ExpertError(f"No expert named {name!r} in the model; experts present: {sorted(model.experts)}.")
        return cls(
            name=as_name or name,
            config=config,
            state={k: v.float() for k, v in model.expert_state_dict(name).items()},
            task=task,
            backbone=BackboneIdentity.of(model),
            metrics=dict(metrics or {}),
            embedding={k: v.detach().float().cpu() for k, v in embedding.items()} if embedding else None,
            head={k: v.detach().float().cpu() for k, v in head.items()} if head else None,
            provenance=dict(provenance or {}),
            modules=model.expert_modules(name),
        )


@dataclass(frozen=True)
class BankEntry:
    """A bank record (read from the manifest without touching the expert's files)."""

    name: str
    kind: str
    modality: str
    task: str
    backbone: str
    structure: str
    weights_fingerprint: str
    created: str
    folder: str
    files: dict[str, dict[str, str]]
    embedding_layout: str | None

    @property
    def has_embedding(self) -> bool:
        """Whether a task embedding is stored."""
        return "embedding" in self.files

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> BankEntry:
        return cls(
            name=record["name"],
            kind=record["kind"],
            modality=record["modality"],
            task=record["task"],
            backbone=record["backbone"],
            structure=record["structure"],
            weights_fingerprint=record["weights_fingerprint"],
            created=record["created"],
            folder=record["folder"],
            files=record["files"],
            embedding_layout=record.get("embedding_layout"),
        )


@dataclass
class Recovery:
    """What :meth:`ExpertBank.recover` did."""

    registered: builtins.list[str] = field(default_factory=list)
    """Experts re-registered from intact folders no record listed."""
    dropped: builtins.list[str] = field(default_factory=list)
    """Damaged manifest or journal records left out (each message names the file and line)."""
    skipped: builtins.list[str] = field(default_factory=list)
    """Unlisted folders not registered, with the reason (damaged, dead, superseded by a listed expert)."""
    backup: str | None = None
    """Bank-relative folder holding the manifest and journal as they were, when anything changed."""
    entries: int = 0
    """Experts in the bank afterwards."""


def check_backbone(expert: Expert, model: ExpertModel, fix: str, *, mine: Fingerprint | None = None) -> None:
    """Raise :class:`BackboneMismatchError` unless ``expert`` was trained on ``model``'s backbone (same structure and
    weight fingerprints); ``fix`` is the message's last sentence. ``mine``: the model's fingerprint, when the caller
    checks several experts against it."""
    mine = mine if mine is not None else model.fingerprint()
    theirs = expert.backbone.fingerprint
    if (mine.structure, mine.weights) != (theirs.structure, theirs.weights):
        what = "structure" if mine.structure != theirs.structure else "weights"
        raise BackboneMismatchError(
            f"Expert {expert.name!r} was trained on backbone {expert.backbone.source!r} ({what} fingerprint "
            f"{getattr(theirs, what)[:12]}), but this model's backbone {model.source!r} has "
            f"{getattr(mine, what)[:12]}. {fix}"
        )

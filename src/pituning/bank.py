"""``ExpertBank``: trained experts and their task embeddings on disk, safely.

A bank is a directory (local or any fsspec URL)::

    manifest.json        {"format": "pituning-bank", "schema": 1, "entries": {name: record}}
    journal.jsonl        one committed add/remove record per line, replayed over manifest.json
    experts/<name>--<id>/expert.json, weights.safetensors, [embedding.safetensors], [head.safetensors]
    cache/               derived data (stacked embeddings for similarity search), safe to delete

Every record lists its files with their sha256. Only JSON and safetensors are ever read: no pickle. A write puts the
expert's files in a fresh folder first (each atomically: temp file, fsync, rename), then commits by appending one
line to the journal under the bank lock ("manifest last"); a crash before the commit leaves an unreferenced folder
that :meth:`ExpertBank.verify` reports and :meth:`ExpertBank.gc` removes, never a half-written entry. The journal is
folded into ``manifest.json`` (atomically) every few hundred records; replaying is idempotent, so a crash between
the two is harmless.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.backbones import Fingerprint
from pituning.errors import BackboneMismatchError, BankCorruptionError, BankError, ConfigError, ExpertError
from pituning.experts.base import ExpertConfig, config_from_dict, validate_name
from pituning.experts.lora import LoraConfig
from pituning.experts.prefix import PrefixConfig
from pituning.graph import flatten_embeddings, prepare_rows, similarity_rows
from pituning.model import ExpertModel
from pituning.storage import Storage, open_storage

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "BackboneIdentity",
    "BankEntry",
    "Expert",
    "ExpertBank",
    "TaskInfo",
    "average_heads",
    "sync_experts_",
]

SCHEMA_VERSION = 1
MODALITIES = ("text", "vision", "vision-language", "other")
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
COMPACT_EVERY = 512
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _library() -> str:
    from pituning import __version__

    return f"pituning {__version__}"


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _layout(tensors: Mapping[str, Tensor]) -> str:
    return _sha256(";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(tensors.items())).encode())[:16]


def _save_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> bytes:
    from safetensors.torch import save

    return bytes(save({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}))


class ExpertBank:
    """A directory of experts with a checksummed manifest.

    Args:
        location: a local directory or an fsspec URL (``memory://bank``, ``s3://bucket/bank``).
        create: create an empty bank if none is there (else raise).
        dtype: storage dtype of expert weights, ``torch.float32`` (default) or ``torch.bfloat16``; experts always
            load as fp32.

    Example:
        >>> bank = ExpertBank("memory://doc-bank")
        >>> len(bank)
        0
    """

    def __init__(self, location: str | Path, *, create: bool = True, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"ExpertBank dtype must be torch.float32 or torch.bfloat16, got {dtype}.")
        self.location = str(location)
        self.dtype = dtype
        self.storage: Storage = open_storage(location)
        self._entries: dict[str, dict[str, Any]] = {}
        self._manifest_token: Any = None
        self._journal_offset = 0
        self._journal_records = 0
        self._similarity_cache: dict[str, _EmbeddingIndex] = {}
        self._wanted_memo: dict[tuple[Any, ...], builtins.list[tuple[str, str]]] = {}
        if not self.storage.exists(MANIFEST):
            if not create:
                raise BankError(
                    f"No expert bank at {self.location} (no {MANIFEST}): check the path; ExpertBank(path) or "
                    "`pituning bank import-peft` creates one."
                )
            with self.storage.lock():
                if not self.storage.exists(MANIFEST):
                    self._write_manifest({})

    # ------------------------------------------------------------------ manifest and journal
    def _write_manifest(self, entries: Mapping[str, Any]) -> None:
        body = {"format": "pituning-bank", "schema": SCHEMA_VERSION, "library": _library(), "entries": entries}
        self.storage.write_atomic(MANIFEST, json.dumps(body, sort_keys=True).encode())

    def _refresh(self) -> dict[str, dict[str, Any]]:
        """Current entries: manifest.json plus the journal, re-read only where it changed."""
        token = self.storage.token(MANIFEST)
        size = max(self.storage.size(JOURNAL), 0)
        if token is None or token != self._manifest_token or size < self._journal_offset:
            self._load_manifest(token)
        if size > self._journal_offset:
            data = self.storage.read_from(JOURNAL, self._journal_offset)
            end = data.rfind(b"\n") + 1  # a line without its newline was never committed
            for line in data[:end].splitlines():
                if line.strip():
                    self._apply(line)
                    self._journal_records += 1
            self._journal_offset += end
        return self._entries

    def _load_manifest(self, token: Any) -> None:
        try:
            manifest = json.loads(self.storage.read(MANIFEST))
        except FileNotFoundError as err:
            raise BankError(f"{self.storage.describe(MANIFEST)} is missing; this is not an expert bank.") from err
        except ValueError as err:
            raise BankCorruptionError(f"{self.storage.describe(MANIFEST)} is not valid JSON ({err}).") from err
        if manifest.get("format") != "pituning-bank" or manifest.get("schema", 0) > SCHEMA_VERSION:
            raise BankError(
                f"{self.storage.describe(MANIFEST)} is not a pituning bank of schema <= {SCHEMA_VERSION}; "
                "upgrade pituning to read it."
            )
        self._entries = dict(manifest["entries"])
        self._manifest_token = token
        self._journal_offset = 0
        self._journal_records = 0

    def _apply(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError as err:
            raise BankCorruptionError(f"{self.storage.describe(JOURNAL)} has an unreadable record ({err}).") from err
        if record["op"] == "add":
            self._entries[record["entry"]["name"]] = record["entry"]
        elif record["op"] == "remove":
            self._entries.pop(record["name"], None)

    def _commit(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append records to the journal (the commit point); fold it into the manifest when long. Lock held."""
        self.storage.append(JOURNAL, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records))
        entries = self._refresh()
        if self._journal_records >= COMPACT_EVERY:
            self._write_manifest(entries)
            self.storage.write_atomic(JOURNAL, b"")
            self._manifest_token = None
            self._refresh()

    # ------------------------------------------------------------------ listing
    def __len__(self) -> int:
        return len(self._refresh())

    def __contains__(self, name: object) -> bool:
        return name in self._refresh()

    def names(self) -> builtins.list[str]:
        """All expert names, sorted."""
        return sorted(self._refresh())

    def entry(self, name: str) -> BankEntry:
        """The record of ``name``."""
        record = self._refresh().get(name)
        if record is None:
            raise BankError(f"No expert {name!r} in the bank at {self.location}; `pituning bank list` shows them.")
        return BankEntry.from_record(record)

    def list(
        self,
        *,
        modality: str | None = None,
        backbone: str | None = None,
        kind: str | None = None,
        task: str | None = None,
        has_embedding: bool | None = None,
    ) -> builtins.list[BankEntry]:
        """Entries that match every given filter, sorted by name.

        ``backbone`` matches the source or the structure fingerprint (or a prefix of it).
        """
        out = []
        for record in self._refresh().values():
            if modality is not None and record["modality"] != modality:
                continue
            if kind is not None and record["kind"] != kind:
                continue
            if task is not None and record["task"] != task:
                continue
            if backbone is not None and record["backbone"] != backbone and not record["structure"].startswith(backbone):
                continue
            if has_embedding is not None and ("embedding" in record["files"]) != has_embedding:
                continue
            out.append(record)
        return [BankEntry.from_record(r) for r in sorted(out, key=lambda r: r["name"])]

    # ------------------------------------------------------------------ writing
    def _stage(self, expert: Expert, dtype: torch.dtype) -> dict[str, Any]:
        """Write an expert's files into a fresh folder and return its (uncommitted) record."""
        validate_name(expert.name)
        if expert.embedding is not None and set(expert.embedding) != set(expert.state):
            raise ConfigError(
                f"The embedding of {expert.name!r} covers other tensors than its weights; an embedding holds the "
                "Fisher of each expert tensor, under the same keys."
            )
        folder = f"experts/{expert.name}--{uuid.uuid4().hex[:12]}"
        meta = {
            "schema": SCHEMA_VERSION,
            "library": _library(),
            "name": expert.name,
            "kind": expert.config.kind,
            "config": expert.config.to_dict(),
            "backbone": expert.backbone.to_dict(),
            "task": asdict(expert.task),
            "metrics": expert.metrics,
            "provenance": expert.provenance,
            "created": expert.created or _now(),
            "dtype": str(dtype).removeprefix("torch."),
            "tensors": {k: list(v.shape) for k, v in sorted(expert.state.items())},
            "modules": expert.modules,
        }
        blobs = {
            "weights": ("weights.safetensors", _save_tensors(expert.state, dtype)),
            "expert": ("expert.json", json.dumps(meta, sort_keys=True, indent=1).encode()),
        }
        if expert.embedding is not None:
            blobs["embedding"] = ("embedding.safetensors", _save_tensors(expert.embedding, torch.float32))
        if expert.head is not None:
            blobs["head"] = ("head.safetensors", _save_tensors(expert.head, torch.float32))
        files = {}
        try:
            for role, (filename, data) in blobs.items():
                path = f"{folder}/{filename}"
                self.storage.write_atomic(path, data)
                files[role] = {"path": path, "sha256": _sha256(data)}
        except BaseException:
            self.storage.remove_tree(folder)
            raise
        return {
            "name": expert.name,
            "kind": expert.config.kind,
            "modality": expert.task.modality,
            "task": expert.task.name,
            "backbone": expert.backbone.source,
            "structure": expert.backbone.fingerprint.structure,
            "weights_fingerprint": expert.backbone.fingerprint.weights,
            "created": meta["created"],
            "folder": folder,
            "files": files,
            "embedding_layout": _layout(expert.embedding) if expert.embedding is not None else None,
        }

    def add(self, expert: Expert, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> BankEntry:
        """Store ``expert``. Raises :class:`BankError` if the name is taken, unless ``overwrite``."""
        return self.add_many([expert], overwrite=overwrite, dtype=dtype)[0]

    def add_many(
        self, experts: Sequence[Expert], *, overwrite: bool = False, dtype: torch.dtype | None = None
    ) -> builtins.list[BankEntry]:
        """Store several experts with one commit (all or none become visible)."""
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise BankError(f"add_many got a name twice: {sorted(n for n in set(names) if names.count(n) > 1)}.")
        if not overwrite:
            taken = [n for n in names if n in self._refresh()]
            if taken:
                raise BankError(f"Experts {taken} are already in the bank; remove them or pass overwrite=True.")
        records: builtins.list[dict[str, Any]] = []
        old_folders: builtins.list[str] = []
        try:
            for expert in experts:
                records.append(self._stage(expert, dtype or self.dtype))
            with self.storage.lock():
                current = self._refresh()
                old_folders = [current[n]["folder"] for n in names if n in current]
                if old_folders and not overwrite:
                    raise BankError(
                        f"Experts {[n for n in names if n in current]} were added meanwhile; pass overwrite=True."
                    )
                self._commit([{"op": "add", "entry": r} for r in records])
        except BaseException:
            for record in records:
                self.storage.remove_tree(record["folder"])
            raise
        for folder in old_folders:
            self.storage.remove_tree(folder)
        return [BankEntry.from_record(r) for r in records]

    def remove(self, name: str) -> None:
        """Delete expert ``name`` (commit first, then its files)."""
        with self.storage.lock():
            folder = self.entry(name).folder
            self._commit([{"op": "remove", "name": name}])
        self.storage.remove_tree(folder)

    def set_embedding(self, name: str, embedding: Mapping[str, Tensor]) -> BankEntry:
        """Store (or replace) the task embedding of an existing expert."""
        expert = self.get(name)
        expert.embedding = {k: v.detach().float().cpu() for k, v in embedding.items()}
        stored = _DTYPES[self._meta(self.entry(name))["dtype"]]
        return self.add(expert, overwrite=True, dtype=stored)

    # ------------------------------------------------------------------ reading
    def _read_verified(self, entry: BankEntry, role: str) -> bytes:
        info = entry.files[role]
        try:
            data = self.storage.read(info["path"])
        except FileNotFoundError as err:
            raise BankCorruptionError(
                f"{self.storage.describe(info['path'])} of expert {entry.name!r} is missing; restore it or remove the "
                "expert."
            ) from err
        if _sha256(data) != info["sha256"]:
            raise BankCorruptionError(
                f"{self.storage.describe(info['path'])} of expert {entry.name!r} is corrupt: its sha256 does not match "
                "the manifest. Restore it from a backup or remove the expert."
            )
        return data

    def _tensors(self, entry: BankEntry, role: str) -> dict[str, Tensor]:
        from safetensors.torch import load

        data = self._read_verified(entry, role)
        try:
            return {k: v.float() for k, v in load(data).items()}
        except Exception as err:
            raise BankCorruptionError(
                f"{entry.files[role]['path']} is not a readable safetensors file ({err})."
            ) from err

    def _meta(self, entry: BankEntry) -> dict[str, Any]:
        data = self._read_verified(entry, "expert")
        try:
            meta = json.loads(data)
        except ValueError as err:
            raise BankCorruptionError(f"{entry.files['expert']['path']} is not valid JSON ({err}).") from err
        assert isinstance(meta, dict)
        return meta

    def get(self, name: str) -> Expert:
        """Load expert ``name`` (fp32), verifying every file's sha256."""
        entry = self.entry(name)
        meta = self._meta(entry)
        return Expert(
            name=name,
            config=config_from_dict(meta["config"]),
            state=self._tensors(entry, "weights"),
            task=TaskInfo(**meta["task"]),
            backbone=BackboneIdentity.from_dict(meta["backbone"]),
            metrics=meta.get("metrics", {}),
            embedding=self._tensors(entry, "embedding") if entry.has_embedding else None,
            head=self._tensors(entry, "head") if "head" in entry.files else None,
            provenance=meta.get("provenance", {}),
            created=meta.get("created", ""),
            modules=meta.get("modules", {}),
        )

    def select(self, names: Iterable[str]) -> builtins.list[Expert]:
        """Load several experts."""
        return [self.get(n) for n in names]

    def load_into(
        self,
        model: ExpertModel,
        name: str,
        *,
        as_name: str | None = None,
        activate: bool = True,
        allow_backbone_mismatch: bool = False,
    ) -> Expert:
        """Inject expert ``name`` into ``model`` (as ``as_name``), checking the backbone fingerprint first.

        Raises:
            BackboneMismatchError: the expert was trained on another backbone (structure or weights differ), unless
                ``allow_backbone_mismatch`` (shapes must still fit).
        """
        expert = self.get(name)
        mine = model.fingerprint()
        theirs = expert.backbone.fingerprint
        if not allow_backbone_mismatch and (mine.structure, mine.weights) != (theirs.structure, theirs.weights):
            what = "structure" if mine.structure != theirs.structure else "weights"
            raise BackboneMismatchError(
                f"Expert {name!r} was trained on backbone {expert.backbone.source!r} ({what} fingerprint "
                f"{getattr(theirs, what)[:12]}), but this model's backbone {model.source!r} has "
                f"{getattr(mine, what)[:12]}. Load it into the backbone it was trained on, or pass "
                "allow_backbone_mismatch=True to load it anyway."
            )
        model.load_expert(as_name or name, expert.config, expert.state, activate=activate)
        return expert

    # ------------------------------------------------------------------ combining and searching
    def average(
        self,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        name: str,
        lora: str = "params",
        task: TaskInfo | None = None,
        overwrite: bool = False,
    ) -> Expert:
        """Store the weighted parameter average ``sum_i w_i theta_i`` of ``names`` as a new expert ``name``.

        When every expert has a head and the heads have the same shapes (one label set), the new expert's head is
        their average with the same weights; otherwise it has none.

        Args:
            names: experts of one kind, config and backbone.
            weights: one weight per expert (default uniform ``1/n``); not renormalised.
            name: the new expert's name.
            lora: ``params`` averages LoRA's A and B like any parameter (the linear merge of PEFT's
                ``add_weighted_adapter``); ``delta`` averages the updates ``B A`` exactly, as one LoRA of rank
                ``sum r_i`` (ranks may then differ).
            task: task of the new expert (default: the first expert's task).
            overwrite: replace an existing entry ``name`` (a re-run's average).
        """
        if not names:
            raise ConfigError("average() needs at least one expert name.")
        weights = list(weights) if weights is not None else [1.0 / len(names)] * len(names)
        if len(weights) != len(names) or not all(isinstance(w, (int, float)) and w == w for w in weights):
            raise ConfigError(f"average() needs one finite weight per expert: {len(names)} names, weights {weights}.")
        if lora not in ("params", "delta"):
            raise ConfigError(f"average(lora=...) must be 'params' or 'delta', got {lora!r}.")
        experts = self.select(names)
        first = experts[0]
        for other in experts[1:]:
            if other.config.kind != first.config.kind:
                raise ConfigError(f"Cannot average a {first.config.kind} and a {other.config.kind} expert.")
            if other.backbone.fingerprint.structure != first.backbone.fingerprint.structure:
                raise BackboneMismatchError(
                    f"Cannot average {first.name!r} and {other.name!r}: they belong to different backbones."
                )
            if set(other.state) != set(first.state):
                raise ConfigError(f"Cannot average {first.name!r} and {other.name!r}: they cover different modules.")
        w = torch.tensor(weights, dtype=torch.float64)
        config = first.config
        if first.config.kind == "lora" and lora == "delta":
            state, config = _lora_delta_average(experts, w)
        else:
            for other in experts[1:]:
                if other.config != first.config or any(other.state[k].shape != v.shape for k, v in first.state.items()):
                    raise ConfigError(
                        f"Cannot average the parameters of {first.name!r} and {other.name!r}: their configs or shapes "
                        "differ (for LoRA of different ranks use lora='delta')."
                    )
            state = _weighted_sum([e.state for e in experts], [float(x) for x in w])
        head = average_heads([e.head for e in experts], [float(x) for x in w])
        averaged = Expert(
            name=name,
            config=config,
            state=state,
            task=task or first.task,
            backbone=first.backbone,
            head=head,
            provenance={"average_of": list(names), "weights": [float(x) for x in weights], "lora": lora},
            modules=first.modules,
        )
        self.add(averaged, overwrite=overwrite)
        return averaged

    def similar(
        self,
        target: str | Mapping[str, Tensor],
        k: int = 5,
        *,
        rescale: str = "unit_mean",
        eps: float = 1e-6,
        modality: str | None = None,
        kind: str | None = None,
        task: str | None = None,
        structure: str | None = None,
    ) -> builtins.list[tuple[str, float]]:
        """The ``k`` stored experts whose task embeddings are most similar to ``target``'s, best first.

        Args:
            target: an expert name in the bank (its stored embedding) or an embedding ``{tensor: Fisher}``.
            k: how many to return at most.
            rescale: Fisher rescaling before comparison (see :mod:`pituning.graph`).
            eps: the normalised cosine's epsilon.
            modality: only sources of this modality.
            kind: only this expert kind.
            task: only this task name.
            structure: only this backbone structure (default: the target's, when it is a bank entry).

        Only entries with an embedding of the same layout (tensor names and shapes) are compared; the target itself
        is left out, and so are sources whose similarity is undefined (every tensor all-zero or non-finite). The
        stacked, rescaled embeddings are cached in memory and in ``cache/``, keyed by each file's sha256.
        """
        if k < 1:
            raise ConfigError(f"similar() needs k >= 1, got {k}.")
        exclude = None
        if isinstance(target, str):
            entry = self.entry(target)
            if not entry.has_embedding:
                raise BankError(
                    f"Expert {target!r} has no task embedding; compute one first (the embedding stage) or pass an "
                    "embedding dict."
                )
            embedding = self._tensors(entry, "embedding")
            structure = structure or entry.structure
            exclude = target
        else:
            embedding = {k_: v.float() for k_, v in target.items()}
        layout = _layout(embedding)
        entries = self._refresh()
        memo_key = (
            self._manifest_token,
            self._journal_offset,
            len(entries),
            layout,
            exclude,
            modality,
            kind,
            task,
            structure,
        )
        wanted = self._wanted_memo.get(memo_key) if self._manifest_token is not None else None
        if wanted is None:
            wanted = [
                (name, r["files"]["embedding"]["sha256"])
                for name, r in entries.items()
                if r.get("embedding_layout") == layout
                and name != exclude
                and (modality is None or r["modality"] == modality)
                and (kind is None or r["kind"] == kind)
                and (task is None or r["task"] == task)
                and (structure is None or r["structure"] == structure)
            ]
            self._wanted_memo = {memo_key: wanted}
        if not wanted:
            return []
        index = self._embedding_index(layout, wanted)
        rows, usable = index.prepared(rescale)
        _, _, flat = flatten_embeddings([embedding])
        target_row, target_usable = prepare_rows(flat, index.sizes, rescale)
        sims = similarity_rows(target_row[0], target_usable[0], rows, usable, index.sizes, eps)
        top = torch.topk(torch.nan_to_num(sims, nan=-float("inf")), min(k, len(wanted)))
        return [
            (wanted[int(i)][0], float(v)) for v, i in zip(top.values, top.indices, strict=True) if v > -float("inf")
        ]

    def _embedding_index(self, layout: str, wanted: builtins.list[tuple[str, str]]) -> _EmbeddingIndex:
        """Stacked embeddings of ``wanted`` ``(name, sha256)`` rows, reusing cached rows whose sha256 still match."""
        from safetensors.torch import load, save

        cached = self._similarity_cache.get(layout)
        path = f"cache/embeddings-{layout}.safetensors"
        if cached is None:
            with contextlib.suppress(FileNotFoundError, KeyError, ValueError, RuntimeError):
                tensors = load(self.storage.read(path))
                meta = json.loads(tensors["meta"].numpy().tobytes().decode())
                keys = [(str(a), str(b)) for a, b in meta["keys"]]
                cached = _EmbeddingIndex(keys, meta["names"], meta["sizes"], tensors["raw"])
        if cached is not None and cached.keys == wanted:
            self._similarity_cache[layout] = cached
            return cached
        rows = {key: i for i, key in enumerate(cached.keys)} if cached is not None else {}
        missing = [key for key in wanted if key not in rows]
        fresh = {key: self._tensors(self.entry(key[0]), "embedding") for key in missing}
        if fresh:
            names, sizes, fresh_flat = flatten_embeddings(list(fresh.values()))
        else:
            assert cached is not None
            names, sizes, fresh_flat = cached.names, cached.sizes, torch.empty(0)
        parts = []
        fresh_row = {key: i for i, key in enumerate(fresh)}
        for key in wanted:
            if key in fresh_row:
                parts.append(fresh_flat[fresh_row[key]])
            else:
                assert cached is not None
                parts.append(cached.raw[rows[key]])
        index = _EmbeddingIndex(wanted, names, sizes, torch.stack(parts))
        self._similarity_cache[layout] = index
        meta = json.dumps({"keys": wanted, "names": names, "sizes": sizes}).encode()
        blob = {"raw": index.raw, "meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}
        with contextlib.suppress(OSError):  # a read-only bank still answers
            self.storage.write_atomic(path, bytes(save(blob)))
        return index

    # ------------------------------------------------------------------ PEFT interop
    def export_peft(self, name: str, out_dir: str | Path, *, num_attention_heads: int | None = None) -> Path:
        """Write expert ``name`` as a PEFT adapter directory (LoRA exactly; prefix in PEFT's layout, see
        :func:`pituning.peft_io.prefix_to_peft`, which needs ``num_attention_heads``: the key/value heads)."""
        from pituning.peft_io import lora_to_peft, prefix_to_peft

        expert = self.get(name)
        if not expert.modules:
            raise BankError(f"Expert {name!r} was stored without its module layout; re-add it from a model.")
        source = expert.backbone.source
        if expert.config.kind == "lora":
            assert isinstance(expert.config, LoraConfig)
            return lora_to_peft(expert.config, expert.state, expert.modules, out_dir, base_model_name_or_path=source)
        if expert.config.kind == "prefix":
            assert isinstance(expert.config, PrefixConfig)
            if num_attention_heads is None:
                raise ConfigError("Exporting a prefix needs num_attention_heads (the model's key/value heads).")
            return prefix_to_peft(
                expert.config,
                expert.state,
                expert.modules,
                out_dir,
                num_attention_heads=num_attention_heads,
                base_model_name_or_path=source,
            )
        raise ConfigError(
            f"Expert {name!r} is a {expert.config.kind} expert; PEFT has no bottleneck-adapter format, so only LoRA "
            "and prefix experts export."
        )

    def import_peft(
        self, adapter_dir: str | Path, model: ExpertModel, name: str, task: TaskInfo, *, overwrite: bool = False
    ) -> Expert:
        """Store a PEFT LoRA or prefix-tuning adapter directory as expert ``name`` of ``model``'s backbone.

        The weights are loaded into ``model`` once to check every shape (and removed again), so a bad adapter never
        reaches the bank.
        """
        from pituning.peft_io import lora_from_peft, prefix_from_peft, read_peft_config

        validate_name(name)
        peft_type = read_peft_config(adapter_dir).get("peft_type")
        config: ExpertConfig
        if peft_type == "LORA":
            config, state = lora_from_peft(adapter_dir, {n for n, _ in model.backbone.named_modules()})
        elif peft_type == "PREFIX_TUNING":
            config, state = prefix_from_peft(adapter_dir, model.info.names("self_attn"))
        else:
            raise ConfigError(f"{adapter_dir} holds a {peft_type} adapter; LORA and PREFIX_TUNING import.")
        model.load_expert(name, config, state, activate=False)
        try:
            expert = Expert.from_model(model, name, task, provenance={"imported_from": str(adapter_dir)})
        finally:
            model.remove_expert(name)
        self.add(expert, overwrite=overwrite)
        return expert

    # ------------------------------------------------------------------ integrity
    def verify(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """Re-check every file of every entry.

        Returns:
            ``(problems, warnings)``: problems are missing or corrupt files and unreadable metadata; warnings are
            expert folders no entry refers to (left by an interrupted write; :meth:`gc` removes them).
        """
        problems: builtins.list[str] = []
        entries = self._refresh()
        for name in sorted(entries):
            entry = BankEntry.from_record(entries[name])
            for role in entry.files:
                try:
                    if role == "expert":
                        self._meta(entry)
                    else:
                        self._tensors(entry, role)
                except BankCorruptionError as err:
                    problems.append(str(err))
        referenced = {e["folder"].split("/", 1)[1] for e in entries.values()}
        orphans = [f"experts/{d}" for d in self.storage.listdir("experts") if d not in referenced]
        warnings = [
            f"{self.storage.describe(o)} is not referenced by the manifest (interrupted write?)" for o in orphans
        ]
        return problems, warnings

    def gc(self) -> builtins.list[str]:
        """Delete unreferenced expert folders; returns what was removed."""
        with self.storage.lock():
            referenced = {e["folder"].split("/", 1)[1] for e in self._refresh().values()}
            removed = [f"experts/{d}" for d in self.storage.listdir("experts") if d not in referenced]
            for folder in removed:
                self.storage.remove_tree(folder)
        return removed

    # ------------------------------------------------------------------ distributed
    @staticmethod
    def sync_(target: ExpertModel | Expert | Sequence[Expert], names: Sequence[str] | None = None) -> None:
        """Mean-reduce experts across the ranks of the default process group, in place (see :func:`sync_experts_`)."""
        sync_experts_(target, names)


@dataclass
class _EmbeddingIndex:
    """Stacked flattened embeddings of one layout, with their prepared (rescaled) forms cached per rescaling."""

    keys: builtins.list[tuple[str, str]]
    names: builtins.list[str]
    sizes: builtins.list[int]
    raw: Tensor
    _prepared: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def prepared(self, rescale: str) -> tuple[Tensor, Tensor]:
        if rescale not in self._prepared:
            self._prepared[rescale] = prepare_rows(self.raw, self.sizes, rescale)
        return self._prepared[rescale]


def average_heads(heads: Sequence[Mapping[str, Tensor] | None], weights: Sequence[float]) -> dict[str, Tensor] | None:
    """``sum_i weights[i] * heads[i]`` per tensor (accumulated in fp64, returned fp32); ``None`` when a head is missing
    or the heads differ in shape (other label sets): such heads do not average."""
    if not heads or any(h is None for h in heads):
        return None
    present = [h for h in heads if h is not None]
    shapes = [{k: v.shape for k, v in h.items()} for h in present]
    if any(shape != shapes[0] for shape in shapes):
        return None
    return _weighted_sum(present, weights)


def _weighted_sum(tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i weights[i] * tensors[i][k]`` for every key of the first mapping, accumulated in fp64, returned fp32."""
    return {
        k: sum((float(w) * t[k].double() for w, t in zip(weights, tensors, strict=True)), torch.zeros(())).float()
        for k in tensors[0]
    }


def _lora_delta_average(experts: Sequence[Expert], w: Tensor) -> tuple[dict[str, Tensor], ExpertConfig]:
    from pituning.interpolation import lora_concat

    configs = [e.config for e in experts]
    assert all(isinstance(c, LoraConfig) for c in configs)
    scales = torch.tensor([c.scaling for c in configs], dtype=torch.float64)  # type: ignore[attr-defined]
    coef = (w * scales).float()
    state: dict[str, Tensor] = {}
    for key in experts[0].state:
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len("lora_A")]
        a, b = lora_concat([e.state[key] for e in experts], [e.state[prefix + "lora_B"] for e in experts], coef)
        state[key], state[prefix + "lora_B"] = a, b
    rank = sum(c.r for c in configs)  # type: ignore[attr-defined]
    return state, configs[0].replace(r=rank, alpha=float(rank))


def sync_experts_(target: ExpertModel | Expert | Sequence[Expert], names: Sequence[str] | None = None) -> None:
    """Replace expert parameters by their mean over the ranks of ``torch.distributed``'s default group.

    One flat fp32 buffer is all-reduced (a sum) and divided once by the world size, whatever the tensors' dtypes (bf16
    parameters are reduced in fp32). Works with gloo (CPU tensors) and nccl (the buffer goes to the current CUDA
    device). Without an initialised process group it does nothing.

    Args:
        target: an :class:`ExpertModel` (its live parameters of ``names``, default every expert), one
            :class:`Expert` or a list of them (their ``state`` tensors).
        names: with an ExpertModel, which experts to reduce.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    tensors: list[Tensor]
    if isinstance(target, ExpertModel):
        chosen = list(names) if names is not None else sorted(target.experts)
        tensors = [p.data for n in chosen for _, p in sorted(target.expert_parameters(n).items())]
    elif isinstance(target, Expert):
        tensors = [target.state[k] for k in sorted(target.state)]
    else:
        tensors = [e.state[k] for e in target for k in sorted(e.state)]
    if not tensors:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor).to(tensor.device, tensor.dtype))
            offset += n

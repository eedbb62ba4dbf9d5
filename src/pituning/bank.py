"""``ExpertBank``: trained experts and their task embeddings on disk, safely.

A bank is a directory (local or any fsspec URL)::

    manifest.json        {"format": "pituning-bank", "schema": 2, "entries": {name: record}, "sha256": seal}
    journal.jsonl        one sealed add/remove record per line, replayed over manifest.json
    experts/<name>--<id>/expert.json, weights.safetensors, [embedding.safetensors], [head.safetensors]
    cache/               derived data (stacked embeddings for similarity search, with a digest), safe to delete
    backup/              manifest and journal as they were before a :meth:`ExpertBank.recover`

Every record lists its files with their sha256, and every manifest and journal line carries the sha256 of its own
canonical JSON, so damage anywhere is a :class:`~pituning.errors.BankCorruptionError` naming the file (and line); every
field is validated on read, and no path from a record can lead outside ``experts/``. Only JSON and safetensors are ever
read: no pickle.

A write takes the bank lock, puts the expert's files in a fresh folder (each atomically: temp file, fsync, rename;
``expert.json`` last, listing the others' sha256), then commits by appending one line to the journal ("manifest
last"). A crash before the commit leaves an unreferenced folder: :meth:`ExpertBank.gc` (under the same lock, so never
while a write is staging) removes it if it has no ``expert.json``, and otherwise keeps it for
:meth:`ExpertBank.recover`, which re-registers intact folders no record lists. A removed or replaced expert's folder
is marked dead before its commit, so gc can tell it from one a damaged journal forgot. The journal is folded into
``manifest.json`` (atomically) every few hundred records; replaying is idempotent, so a crash between the two is
harmless.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.backbones import Fingerprint
from pituning.bankfile import (
    FILENAMES,
    SCHEMA_VERSION,
    check_folder,
    check_meta,
    check_record,
    decode_line,
    decode_manifest,
    encode_line,
    encode_manifest,
)
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
    "Recovery",
    "TaskInfo",
    "average_heads",
    "sync_experts_",
]

MODALITIES = ("text", "vision", "vision-language", "other")
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
DEAD = ".dead"  # marks an expert folder whose entry was removed or replaced, before the commit
_TEMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # an atomic write's temporary file
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
        self._schema = SCHEMA_VERSION
        self._manifest_token: Any = None
        self._journal_offset = 0
        self._journal_records = 0
        self._journal_lines = 0
        self._similarity_cache: dict[str, _EmbeddingIndex] = {}
        self._wanted_memo: dict[tuple[Any, ...], builtins.list[tuple[str, str]]] = {}
        if not self.storage.exists(MANIFEST):
            if self.storage.exists(JOURNAL) or self.storage.listdir("experts"):
                raise BankCorruptionError(
                    f"{self.storage.describe(MANIFEST)} is missing but the bank holds experts; "
                    "`pituning bank recover` rebuilds it from the expert folders."
                )
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
        self.storage.write_atomic(MANIFEST, encode_manifest(entries, _library()))

    def _refresh(self) -> dict[str, dict[str, Any]]:
        """Current entries: manifest.json plus the journal, re-read only where it changed.

        Raises:
            BankCorruptionError: a damaged manifest or journal line (the message names the file and line).
        """
        token = self.storage.token(MANIFEST)
        size = max(self.storage.size(JOURNAL), 0)
        if token is None or token != self._manifest_token or size < self._journal_offset:
            self._load_manifest(token)
        if size > self._journal_offset:
            data = self.storage.read_from(JOURNAL, self._journal_offset)
            end = data.rfind(b"\n") + 1  # a line without its newline was never committed
            try:
                for line in data[:end].split(b"\n")[:-1]:
                    self._journal_lines += 1
                    if line.strip():
                        self._apply(line)
                        self._journal_records += 1
            except BaseException:
                self._manifest_token = None  # re-read from the start next time, never half-applied
                raise
            self._journal_offset += end
        return self._entries

    def _load_manifest(self, token: Any) -> None:
        try:
            data = self.storage.read(MANIFEST)
        except FileNotFoundError as err:
            raise BankError(f"{self.storage.describe(MANIFEST)} is missing; this is not an expert bank.") from err
        self._entries, self._schema = decode_manifest(data, self.storage.describe(MANIFEST))
        self._manifest_token = token
        self._journal_offset = 0
        self._journal_records = 0
        self._journal_lines = 0

    def _apply(self, line: bytes) -> None:
        where = f"{self.storage.describe(JOURNAL)} line {self._journal_lines}"
        record = decode_line(line, where, sealed=self._schema >= SCHEMA_VERSION)
        if record["op"] == "add":
            self._entries[record["entry"]["name"]] = record["entry"]
        else:
            self._entries.pop(record["name"], None)

    def _append(self, ops: Sequence[Mapping[str, Any]]) -> None:
        """Append sealed records to the journal: the commit point. Lock held.

        A torn tail (an append cut by a crash, never acknowledged) is cut off first, so it cannot glue itself to the
        new line; a schema 1 bank is sealed first.
        """
        self._refresh()
        if self.storage.size(JOURNAL) > self._journal_offset:
            self.storage.truncate(JOURNAL, self._journal_offset)
        if self._schema < SCHEMA_VERSION:
            self._compact()
        self.storage.append(JOURNAL, b"".join(encode_line(op) for op in ops))

    def _after_commit(self) -> None:
        """Read the new records back; fold the journal into the manifest when long. Lock held."""
        self._refresh()
        if self._journal_records >= COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        """Fold the journal into a sealed manifest, then empty the journal (replay is idempotent). Lock held."""
        entries = self._refresh()
        if self._schema < SCHEMA_VERSION and self.storage.size(JOURNAL) > 0:
            # seal schema-1 lines first, so a crash before the journal is emptied leaves only sealed lines
            lines = self.storage.read(JOURNAL)[: self._journal_offset].split(b"\n")
            sealed = [decode_line(line, JOURNAL, sealed=False) for line in lines if line.strip()]
            self.storage.write_atomic(JOURNAL, b"".join(encode_line(op) for op in sealed))
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
        """Write an expert's files into a fresh folder and return its (uncommitted) record. Lock held.

        ``expert.json`` is written last and lists the other files' sha256: a folder without it is an interrupted
        write, one with it can be re-registered by :meth:`recover`.
        """
        validate_name(expert.name)
        if expert.embedding is not None and set(expert.embedding) != set(expert.state):
            raise ConfigError(
                f"The embedding of {expert.name!r} covers other tensors than its weights; an embedding holds the "
                "Fisher of each expert tensor, under the same keys."
            )
        folder = f"experts/{expert.name}--{uuid.uuid4().hex[:12]}"
        blobs = {"weights": _save_tensors(expert.state, dtype)}
        if expert.embedding is not None:
            blobs["embedding"] = _save_tensors(expert.embedding, torch.float32)
        if expert.head is not None:
            blobs["head"] = _save_tensors(expert.head, torch.float32)
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
            "head_tensors": {k: list(v.shape) for k, v in sorted((expert.head or {}).items())},
            "modules": expert.modules,
            "files": {role: _sha256(data) for role, data in blobs.items()},
        }
        blobs["expert"] = json.dumps(meta, sort_keys=True, indent=1).encode()
        files = {}
        try:
            for role, data in blobs.items():
                path = f"{folder}/{FILENAMES[role]}"
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
        """Store several experts with one commit (all or none become visible).

        Staging and commit happen under the bank lock, so :meth:`gc` never sees a folder being written; a replaced
        expert's old folder is marked dead before the commit and deleted after it.
        """
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise BankError(f"add_many got a name twice: {sorted(n for n in set(names) if names.count(n) > 1)}.")
        for expert in experts:
            validate_name(expert.name)
            _check_finite(expert)
        if not overwrite:
            taken = [n for n in names if n in self._refresh()]
            if taken:
                raise BankError(f"Experts {taken} are already in the bank; remove them or pass overwrite=True.")
        with self.storage.lock():
            current = self._refresh()
            old_folders = [current[n]["folder"] for n in names if n in current]
            if old_folders and not overwrite:
                raise BankError(
                    f"Experts {[n for n in names if n in current]} were added meanwhile; pass overwrite=True."
                )
            records: builtins.list[dict[str, Any]] = []
            marked: builtins.list[str] = []
            try:
                for expert in experts:
                    records.append(self._stage(expert, dtype or self.dtype))
                for folder in old_folders:
                    self.storage.write_atomic(f"{folder}/{DEAD}", b"superseded\n")
                    marked.append(folder)
                self._append([{"op": "add", "entry": r} for r in records])
            except BaseException:
                for folder in marked:
                    self.storage.remove_tree(f"{folder}/{DEAD}")
                for record in records:
                    self.storage.remove_tree(record["folder"])
                raise
            self._after_commit()
            for folder in old_folders:
                self.storage.remove_tree(folder)
        return [BankEntry.from_record(r) for r in records]

    def remove(self, name: str) -> None:
        """Delete expert ``name`` (mark its folder dead, commit, then delete its files)."""
        with self.storage.lock():
            folder = self.entry(name).folder
            self.storage.write_atomic(f"{folder}/{DEAD}", b"removed\n")
            try:
                self._append([{"op": "remove", "name": name}])
            except BaseException:
                self.storage.remove_tree(f"{folder}/{DEAD}")
                raise
            self._after_commit()
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
        except (FileNotFoundError, NotADirectoryError) as err:
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
        return _load_tensors(self._read_verified(entry, role), self.storage.describe(entry.files[role]["path"]))

    def _meta(self, entry: BankEntry) -> dict[str, Any]:
        data = self._read_verified(entry, "expert")
        where = self.storage.describe(entry.files["expert"]["path"])
        try:
            meta = json.loads(data)
        except ValueError as err:
            raise BankCorruptionError(f"{where} is not valid JSON ({err}).") from err
        return check_meta(meta, where, asdict(entry))

    def get(self, name: str) -> Expert:
        """Load expert ``name`` (fp32), verifying every file's sha256 and the stored tensors against the record."""
        entry = self.entry(name)
        meta = self._meta(entry)
        where = self.storage.describe(entry.files["expert"]["path"])
        try:
            config = config_from_dict(meta["config"])
            task = TaskInfo(**meta["task"])
            backbone = BackboneIdentity.from_dict(meta["backbone"])
        except (ConfigError, TypeError, KeyError, ValueError) as err:
            raise BankCorruptionError(f"{where} holds an unreadable config, task or backbone ({err}).") from err
        state = self._tensors(entry, "weights")
        _check_shapes(state, meta["tensors"], self.storage.describe(entry.files["weights"]["path"]))
        embedding = self._tensors(entry, "embedding") if entry.has_embedding else None
        if embedding is not None:
            _check_shapes(embedding, meta["tensors"], self.storage.describe(entry.files["embedding"]["path"]))
        head = self._tensors(entry, "head") if "head" in entry.files else None
        if head is not None and "head_tensors" in meta:
            _check_shapes(head, meta["head_tensors"], self.storage.describe(entry.files["head"]["path"]))
        return Expert(
            name=name,
            config=config,
            state=state,
            task=task,
            backbone=backbone,
            metrics=meta["metrics"],
            embedding=embedding,
            head=head,
            provenance=meta["provenance"],
            created=meta["created"],
            modules=meta["modules"],
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
        allow_backbone_mismatch: bool = False,
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
            allow_backbone_mismatch: average experts whose backbones differ in weights (same structure); the result
                is stored under the first one's backbone and its provenance lists every backbone.

        Raises:
            BackboneMismatchError: the experts belong to backbones of different structure, or (unless
                ``allow_backbone_mismatch``) of different weights.
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
            mine, theirs = first.backbone.fingerprint, other.backbone.fingerprint
            if theirs.structure != mine.structure:
                raise BackboneMismatchError(
                    f"Cannot average {first.name!r} and {other.name!r}: they belong to backbones of different "
                    f"structure ({first.backbone.source!r} and {other.backbone.source!r})."
                )
            if theirs.weights != mine.weights and not allow_backbone_mismatch:
                raise BackboneMismatchError(
                    f"Cannot average {first.name!r} and {other.name!r}: they were trained on different backbone "
                    f"weights ({first.backbone.source!r} and {other.backbone.source!r}), so the average would be "
                    "stored under a backbone one of them never saw. Pass allow_backbone_mismatch=True to average them "
                    "anyway."
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
            provenance={
                "average_of": list(names),
                "weights": [float(x) for x in weights],
                "lora": lora,
                **({"backbones": [e.backbone.to_dict() for e in experts]} if allow_backbone_mismatch else {}),
            },
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
        """Stacked embeddings of ``wanted`` ``(name, sha256)`` rows, reusing cached rows whose sha256 still match.

        The cache file carries a digest of its contents; a damaged or edited one is ignored and rebuilt.
        """
        cached = self._similarity_cache.get(layout)
        path = f"cache/embeddings-{layout}.safetensors"
        if cached is None:
            cached = self._read_cache(path)
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
        with contextlib.suppress(OSError, BankError):  # a read-only bank still answers
            self.storage.write_atomic(path, _encode_cache(index))
        return index

    def _read_cache(self, path: str) -> _EmbeddingIndex | None:
        """The cached index at ``path``, or ``None`` if absent, unreadable or not matching its digest."""
        try:
            return _decode_cache(self.storage.read(path))
        except (FileNotFoundError, BankCorruptionError):
            return None

    # ------------------------------------------------------------------ PEFT interop
    def export_peft(
        self,
        name: str,
        out_dir: str | Path,
        *,
        num_attention_heads: int | None = None,
        task_class: str | None = None,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> Path:
        """Write expert ``name`` as a PEFT adapter directory (LoRA exactly; prefix in PEFT's layout, see
        :func:`pituning.peft_io.prefix_to_peft`, which needs ``num_attention_heads``: the key/value heads).

        The directory also gets ``README.md`` (a model card) and ``pituning.json`` (task, backbone, metrics and
        provenance, read back by :meth:`import_peft`); PEFT ignores both.

        Args:
            name: the expert.
            out_dir: a new (or empty) directory.
            num_attention_heads: key/value heads (prefix experts only).
            task_class: the transformers class the adapter should load into (``BertForSequenceClassification``); the
                module paths are moved into it. Default: the class the expert's paths fit (the one it came from).
            task_type: a PEFT task type instead (``SEQ_CLS``, ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``TOKEN_CLS``,
                ``QUESTION_ANS``, ``FEATURE_EXTRACTION``).
            base_model_name_or_path: what ``AutoPeftModel...`` loads; default the backbone's directory or hub name
                (``None`` for a backbone built from a config or module).
        """
        from pituning.peft_io import export_files, loadable_base, lora_to_peft, prefix_to_peft, resolve_export_target

        expert = self.get(name)
        if not expert.modules:
            raise BankError(f"Expert {name!r} was stored without its module layout; re-add it from a model.")
        base = base_model_name_or_path or loadable_base(expert.backbone.source)
        if expert.config.kind not in ("lora", "prefix"):
            raise ConfigError(
                f"Expert {name!r} is a {expert.config.kind} expert; PEFT has no bottleneck-adapter format, so only "
                "LoRA and prefix experts export."
            )
        if expert.config.kind == "prefix" and num_attention_heads is None:
            raise ConfigError("Exporting a prefix needs num_attention_heads (the model's key/value heads).")
        if expert.config.kind == "lora" or task_class is not None or task_type is not None:
            target = resolve_export_target(
                expert.modules, base_model_name_or_path=base, task_class=task_class, task_type=task_type
            )
        else:
            target = None
        files = export_files(expert, base_model_name_or_path=base, target=target, library=_library())
        if isinstance(expert.config, LoraConfig):
            options = expert.provenance.get("peft")
            return lora_to_peft(
                expert.config,
                expert.state,
                expert.modules,
                out_dir,
                base_model_name_or_path=base,
                target=target,
                options=options if isinstance(options, dict) else None,
                extra_files=files,
            )
        assert isinstance(expert.config, PrefixConfig) and num_attention_heads is not None
        return prefix_to_peft(
            expert.config,
            expert.state,
            expert.modules,
            out_dir,
            num_attention_heads=num_attention_heads,
            task_type=target.task_type if target is not None else None,
            base_model_name_or_path=base,
            extra_files=files,
        )

    def import_peft(
        self, adapter_dir: str | Path, model: ExpertModel, name: str, task: TaskInfo, *, overwrite: bool = False
    ) -> Expert:
        """Store a PEFT LoRA or prefix-tuning adapter directory as expert ``name`` of ``model``'s backbone.

        Only adapters pituning computes exactly import (see :func:`pituning.peft_io.check_lora_config`); every file is
        validated, and a problem raises a :class:`~pituning.errors.ConfigError` (or ``ExpertError`` when the weights do
        not fit the backbone) naming the file. A ``pituning.json`` sidecar (written by :meth:`export_peft`) brings the
        expert's provenance and metrics back. The weights are loaded into ``model`` once to check every shape (and
        removed again), so a bad adapter never reaches the bank.
        """
        from pituning.errors import PiTuningError
        from pituning.peft_io import imported_metadata, lora_from_peft, prefix_from_peft, read_peft_config, read_sidecar

        validate_name(name)
        cfg = read_peft_config(adapter_dir)
        sidecar = read_sidecar(adapter_dir) or {}
        peft_type = cfg["peft_type"]
        config: ExpertConfig
        if peft_type == "LORA":
            config, state = lora_from_peft(
                adapter_dir,
                {n for n, _ in model.backbone.named_modules()},
                backbone=model.backbone,
                base_heads=sidecar.get("peft", {}).get("head_from_base", []),
            )
        elif peft_type == "PREFIX_TUNING":
            config, state = prefix_from_peft(adapter_dir, model.info.names("self_attn"))
        else:
            raise ConfigError(f"{adapter_dir} holds a {peft_type} adapter; LORA and PREFIX_TUNING import.")
        provenance, metrics = imported_metadata(adapter_dir, cfg)
        try:
            model.load_expert(name, config, state, activate=False)
        except PiTuningError as err:
            raise ExpertError(f"{adapter_dir}: the adapter does not fit this backbone: {err}") from err
        try:
            expert = Expert.from_model(model, name, task, provenance=provenance, metrics=metrics)
        finally:
            model.remove_expert(name)
        self.add(expert, overwrite=overwrite)
        return expert

    # ------------------------------------------------------------------ integrity
    def verify(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """Re-check the manifest, the journal, every file of every entry and the bank's other contents.

        Returns:
            ``(problems, warnings)``. Problems: a damaged manifest or journal line, missing or corrupt expert files,
            metadata that contradicts its record, a path leading outside the bank. Warnings: folders no entry refers
            to (an interrupted write, which :meth:`gc` removes, or an intact expert that :meth:`recover`
            re-registers), leftover temporary files and damaged cache files (both removed by :meth:`gc`).
        """
        problems: builtins.list[str] = []
        warnings: builtins.list[str] = []
        try:
            entries = dict(self._refresh())
        except BankError as err:
            return [str(err)], []
        for name in sorted(entries):
            try:
                self.get(name)
            except BankError as err:
                problems.append(str(err))
        with self.storage.lock():
            tail = self._journal_tail()
            if tail:
                try:
                    decode_line(tail, JOURNAL)
                    problems.append(
                        f"{self.storage.describe(JOURNAL)} ends with a complete record that lost its newline (damage); "
                        "`pituning bank recover` restores it."
                    )
                except BankCorruptionError:
                    warnings.append(
                        f"{self.storage.describe(JOURNAL)} ends with {len(tail)} bytes of an interrupted write (never "
                        "committed); the next write removes them."
                    )
            referenced = {e["folder"].split("/", 1)[1] for e in entries.values()}
            for folder in self.storage.listdir("experts"):
                if folder in referenced:
                    continue
                where = self.storage.describe(f"experts/{folder}")
                state, _ = self._orphan(folder)
                if state == "outside":
                    problems.append(f"{where} leads outside the bank (a symlink?); remove it by hand.")
                elif state == "intact":
                    warnings.append(
                        f"{where} is an intact expert the manifest does not list (an interrupted write or a damaged "
                        "journal); `pituning bank recover` registers it."
                    )
                elif state == "damaged":
                    warnings.append(
                        f"{where} is not referenced by the manifest and its files are damaged; gc keeps it."
                    )
                else:
                    warnings.append(f"{where} is not referenced by the manifest (interrupted write); gc removes it.")
            warnings += [
                f"{self.storage.describe(p)} is a leftover temporary file; gc removes it." for p in self._temps()
            ]
            warnings += [
                f"{self.storage.describe(p)} is a damaged cache file; gc removes it." for p in self._bad_cache()
            ]
        return problems, warnings

    def _journal_tail(self) -> bytes:
        """Bytes after the journal's last newline (an append cut short). Lock held."""
        self._refresh()
        return self.storage.read_from(JOURNAL, self._journal_offset) if self.storage.exists(JOURNAL) else b""

    def _orphan(self, folder: str) -> tuple[str, dict[str, Any] | None]:
        """Classify an unreferenced folder of ``experts/``. Lock held, so no write is in progress.

        Returns:
            ``(state, record)``: ``dead`` (removed or replaced, deletion cut short), ``partial`` (a write cut short
            before its ``expert.json``), ``intact`` (a complete expert; its record), ``damaged`` (has an
            ``expert.json`` but bad files) or ``outside`` (leads outside the bank).
        """
        path = f"experts/{folder}"
        try:
            if self.storage.exists(f"{path}/{DEAD}"):
                return "dead", None
            if not self.storage.exists(f"{path}/{FILENAMES['expert']}"):
                return "partial", None
        except BankError:
            return "outside", None
        try:
            return "intact", _record_from_folder(self.storage, path)
        except (BankError, OSError):
            return "damaged", None

    def _temps(self) -> builtins.list[str]:
        """Leftover temporary files of atomic writes in the bank root and cache. Lock held."""
        return [f"{d}/{n}" if d else n for d in ("", "cache") for n in self.storage.listdir(d) if _TEMP.fullmatch(n)]

    def _bad_cache(self) -> builtins.list[str]:
        """Cache files that are unreadable or do not match their digest."""
        paths = [f"cache/{n}" for n in self.storage.listdir("cache") if n.startswith("embeddings-")]
        return [p for p in paths if self._read_cache(p) is None]

    def gc(self) -> builtins.list[str]:
        """Delete what is provably abandoned; returns what was removed.

        Under the bank lock (so no write is in progress): expert folders of removed or replaced experts, folders of
        writes cut short before their ``expert.json``, leftover temporary files and damaged cache files. Never an
        intact expert folder, even one the manifest does not list (:meth:`recover` registers those), never a
        damaged one, and nothing on a bank whose manifest or journal is damaged.
        """
        with self.storage.lock():
            referenced = {e["folder"].split("/", 1)[1] for e in self._refresh().values()}
            removed = []
            for folder in self.storage.listdir("experts"):
                if folder not in referenced and self._orphan(folder)[0] in ("dead", "partial"):
                    removed.append(f"experts/{folder}")
            removed += self._temps() + self._bad_cache()
            for path in removed:
                self.storage.remove_tree(path)
        return removed

    @classmethod
    def recover(cls, location: str | Path) -> Recovery:
        """Rebuild a damaged bank's manifest from what is intact, losing no intact expert.

        Reads the manifest (if intact) and every journal line that is intact, reports the damaged ones, then
        registers every intact expert folder that no record lists (an interrupted write, or one whose record was
        damaged). The damaged manifest and journal are kept under ``backup/<time>/``; a fresh sealed manifest and an
        empty journal replace them.
        """
        storage = open_storage(location)
        with storage.lock():
            report = Recovery()
            entries: dict[str, dict[str, Any]] = {}
            originals = {p: storage.read(p) for p in (MANIFEST, JOURNAL) if storage.exists(p)}
            if MANIFEST in originals:
                try:
                    entries, _ = decode_manifest(originals[MANIFEST], storage.describe(MANIFEST))
                except BankCorruptionError as err:
                    report.dropped.append(str(err))
            lines = originals.get(JOURNAL, b"").split(b"\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    op = decode_line(line, f"{storage.describe(JOURNAL)} line {number}", sealed=False)
                except BankCorruptionError as err:
                    if number < len(lines):  # a torn last line is an uncommitted write, not damage
                        report.dropped.append(str(err))
                    continue
                if op["op"] == "add":
                    entries[op["entry"]["name"]] = op["entry"]
                else:
                    entries.pop(op["name"], None)
            bank = cls.__new__(cls)
            bank.storage = storage
            referenced = {e["folder"].split("/", 1)[1] for e in entries.values()}
            found: dict[str, dict[str, Any]] = {}
            for folder in storage.listdir("experts"):
                if folder in referenced:
                    continue
                state, record = bank._orphan(folder)
                if record is None:
                    report.skipped.append(f"experts/{folder} ({state})")
                elif record["name"] in entries:
                    report.skipped.append(f"experts/{folder} (a newer {record['name']!r} is listed)")
                elif record["name"] not in found or found[record["name"]]["created"] < record["created"]:
                    found[record["name"]] = record
            entries.update(found)
            report.registered = sorted(found)
            if report.dropped or report.registered or MANIFEST not in originals:
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
                report.backup = f"backup/{stamp}-{uuid.uuid4().hex[:6]}"
                for path, data in originals.items():
                    storage.write_atomic(f"{report.backup}/{path}", data)
                storage.write_atomic(MANIFEST, encode_manifest(entries, _library()))
                storage.write_atomic(JOURNAL, b"")
            report.entries = len(entries)
        return report

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


def _check_finite(expert: Expert) -> None:
    for part, tensors in (("weights", expert.state), ("head", expert.head or {})):
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if bad:
            raise ExpertError(
                f"Expert {expert.name!r} has non-finite {part} (NaN or inf in {bad[:3]}); it is not stored. Its "
                "training diverged or its inputs held NaN: lower the learning rate or check the data."
            )


def _check_shapes(tensors: Mapping[str, Tensor], shapes: Mapping[str, Any], where: str) -> None:
    found = {k: list(v.shape) for k, v in tensors.items()}
    if found != {k: list(v) for k, v in shapes.items()}:
        raise BankCorruptionError(
            f"{where} holds tensors {sorted(found)[:4]}... that do not match the names and shapes its expert.json "
            "records; the file was replaced. Restore it or remove the expert."
        )


def _load_tensors(data: bytes, where: str) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        return {k: v.float() for k, v in load(data).items()}
    except Exception as err:  # safetensors raises its own error types for every malformed header
        raise BankCorruptionError(f"{where} is not a readable safetensors file ({err}).") from err


def _record_from_folder(storage: Storage, folder: str) -> dict[str, Any]:
    """The bank record of an expert folder, rebuilt from its ``expert.json`` after checking every file."""
    name = check_folder(folder, storage.describe(folder))
    where = storage.describe(f"{folder}/{FILENAMES['expert']}")
    raw = storage.read(f"{folder}/{FILENAMES['expert']}")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise BankCorruptionError(f"{where} is not valid JSON ({err}).") from err
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("task"), dict)
        or not isinstance(meta.get("backbone"), dict)
    ):
        raise BankCorruptionError(f"{where} is not an expert's metadata.")
    listed = meta.get("files")
    if not isinstance(listed, dict):  # written before expert.json listed its files: take them as they are
        present = [r for r in FILENAMES if r != "expert" and storage.exists(f"{folder}/{FILENAMES[r]}")]
        listed = {r: _sha256(storage.read(f"{folder}/{FILENAMES[r]}")) for r in present}
    files = {"expert": {"path": f"{folder}/{FILENAMES['expert']}", "sha256": _sha256(raw)}}
    tensors: dict[str, dict[str, Tensor]] = {}
    for role, digest in listed.items():
        path = f"{folder}/{FILENAMES.get(role, '?')}"
        data = storage.read(path) if role in FILENAMES and role != "expert" else b""
        if _sha256(data) != digest:
            raise BankCorruptionError(f"{storage.describe(path)} does not match the sha256 its expert.json lists.")
        tensors[role] = _load_tensors(data, storage.describe(path))
        files[role] = {"path": path, "sha256": digest}
    backbone, task = meta["backbone"], meta["task"]
    record = {
        "name": name,
        "kind": meta.get("kind"),
        "modality": task.get("modality"),
        "task": task.get("name"),
        "backbone": backbone.get("source"),
        "structure": backbone.get("structure"),
        "weights_fingerprint": backbone.get("weights"),
        "created": meta.get("created"),
        "folder": folder,
        "files": files,
        "embedding_layout": _layout(tensors["embedding"]) if "embedding" in tensors else None,
    }
    check_record(record, where)
    check_meta(meta, where, record)
    if "weights" not in tensors:
        raise BankCorruptionError(f"{where} lists no weights.")
    _check_shapes(tensors["weights"], meta["tensors"], storage.describe(f"{folder}/{FILENAMES['weights']}"))
    return record


def _encode_cache(index: _EmbeddingIndex) -> bytes:
    from safetensors.torch import save

    meta = json.dumps({"keys": index.keys, "names": index.names, "sizes": index.sizes}).encode()
    raw = index.raw.float().contiguous()
    digest = _sha256(meta + raw.numpy().tobytes()).encode()
    blob = {
        "raw": raw,
        "meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8),
        "digest": torch.frombuffer(bytearray(digest), dtype=torch.uint8),
    }
    return bytes(save(blob))


def _decode_cache(data: bytes) -> _EmbeddingIndex:
    """Inverse of :func:`_encode_cache`; :class:`BankCorruptionError` if anything does not match its digest."""
    try:
        from safetensors.torch import load

        loaded = load(data)
        meta_bytes = loaded["meta"].numpy().tobytes()
        raw = loaded["raw"]
        if raw.dtype != torch.float32 or loaded["digest"].numpy().tobytes().decode() != _sha256(
            meta_bytes + raw.contiguous().numpy().tobytes()
        ):
            raise ValueError("digest mismatch")
        meta = json.loads(meta_bytes)
        keys = [(str(a), str(b)) for a, b in meta["keys"]]
        names, sizes = [str(n) for n in meta["names"]], [int(s) for s in meta["sizes"]]
        if raw.ndim != 2 or raw.shape != (len(keys), sum(sizes)) or len(names) != len(sizes):
            raise ValueError("shape mismatch")
    except Exception as err:
        raise BankCorruptionError(f"damaged embedding cache ({err})") from err
    return _EmbeddingIndex(keys, names, sizes, raw)


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
    # the one collapse rule (rank sum r_i, alpha = rank); the stored average keeps the first expert's dropout
    return state, LoraConfig.collapsed(configs).replace(dropout=configs[0].dropout)  # type: ignore[attr-defined]


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

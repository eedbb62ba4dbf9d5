"""The bank's store: writing and reading experts over the catalog's manifest and journal (see :mod:`pituning.bank`).

:class:`BankStore` is the base every other part of :class:`~pituning.bank.ExpertBank` builds on; it also holds the
file helpers (sha256, tensor files, shape and finiteness checks) the other parts share.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pituning.bank.catalog import DEAD, JOURNAL, MANIFEST, BankCatalog, _library
from pituning.bank.format import (
    FILENAMES,
    SCHEMA_VERSION,
    check_meta,
    decode_line,
    encode_line,
)
from pituning.bank.records import BackboneIdentity, BankEntry, Expert, check_backbone
from pituning.errors import BankCorruptionError, BankError, ConfigError, ExpertError
from pituning.experts.base import config_from_dict, validate_name
from pituning.model import ExpertModel
from pituning.tasks import TaskInfo

if TYPE_CHECKING:
    from pituning.bank.search import _EmbeddingIndex

__all__ = ["COMPACT_EVERY", "DEAD", "JOURNAL", "MANIFEST", "BankStore"]

COMPACT_EVERY = 512
_TEMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # an atomic write's temporary file
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _layout(tensors: Mapping[str, Tensor]) -> str:
    return _sha256(";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(tensors.items())).encode())[:16]


def _save_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> bytes:
    from safetensors.torch import save

    return bytes(save({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}))


class BankStore(BankCatalog):
    """The storage core of :class:`~pituning.bank.ExpertBank`: writing and reading experts, over the catalog
    (:class:`~pituning.bank.catalog.BankCatalog`: manifest and journal, listing).

    Args:
        location: a local directory or an fsspec URL (``memory://bank``, ``s3://bucket/bank``).
        create: create an empty bank if none is there (else raise).
        dtype: storage dtype of expert weights, ``torch.float32`` (default) or ``torch.bfloat16``; experts always
            load as fp32.
    """

    def __init__(self, location: str | Path, *, create: bool = True, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"ExpertBank dtype must be torch.float32 or torch.bfloat16, got {dtype}.")
        self.dtype = dtype
        self._similarity_cache: dict[str, _EmbeddingIndex] = {}
        self._wanted_memo: dict[tuple[Any, ...], builtins.list[tuple[str, str]]] = {}
        super().__init__(location, create=create)

    # ------------------------------------------------------------------ journal writes
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
        if not allow_backbone_mismatch:
            check_backbone(
                expert,
                model,
                "Load it into the backbone it was trained on, or pass allow_backbone_mismatch=True to load it anyway.",
            )
        model.load_expert(as_name or name, expert.config, expert.state, activate=activate)
        return expert


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

"""The bank's catalog: ``manifest.json`` plus the journal, read and listed without torch.

:class:`BankCatalog` opens a bank (creating an empty one if asked), replays its journal over the manifest and lists
the records; it reads no expert file and imports neither torch nor any model code, so ``pituning bank list`` starts
fast. :class:`~pituning.bank.store.BankStore` builds the writing and reading of experts on it.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pituning._version import __version__
from pituning.bank.format import SCHEMA_VERSION, decode_line, decode_manifest, encode_manifest
from pituning.bank.records import BankEntry
from pituning.errors import BankCorruptionError, BankError
from pituning.storage import Storage, open_storage

__all__ = ["DEAD", "JOURNAL", "MANIFEST", "BankCatalog"]

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
DEAD = ".dead"  # marks an expert folder whose entry was removed or replaced, before the commit


def _library() -> str:
    return f"pituning {__version__}"


class BankCatalog:
    """The records of the bank at ``location`` (a local directory or an fsspec URL), current at every call.

    Args:
        location: a local directory or an fsspec URL (``memory://bank``, ``s3://bucket/bank``).
        create: create an empty bank if none is there (else raise).

    Raises:
        BankError: no bank there and ``create`` is false.
        BankCorruptionError: the manifest is missing while the bank holds experts, or a record is damaged.
    """

    def __init__(self, location: str | Path, *, create: bool = True) -> None:
        self.location = str(location)
        self.storage: Storage = open_storage(location)
        self._entries: dict[str, dict[str, Any]] = {}
        self._schema = SCHEMA_VERSION
        self._manifest_token: Any = None
        self._journal_offset = 0
        self._journal_records = 0
        self._journal_lines = 0
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

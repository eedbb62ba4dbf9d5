"""Integrity of a bank: :meth:`~pituning.bank.ExpertBank.verify`, :meth:`~pituning.bank.ExpertBank.gc` and
:meth:`~pituning.bank.ExpertBank.recover` (see :mod:`pituning.bank` for what each guarantees)."""

from __future__ import annotations

import builtins
import datetime as _dt
import json
import uuid
from pathlib import Path
from typing import Any

from torch import Tensor

from pituning.bank.catalog import _library
from pituning.bank.format import (
    FILENAMES,
    check_folder,
    check_meta,
    check_record,
    decode_line,
    decode_manifest,
    encode_manifest,
)
from pituning.bank.records import Recovery
from pituning.bank.search import SearchMixin
from pituning.bank.store import (
    _TEMP,
    DEAD,
    JOURNAL,
    MANIFEST,
    _check_shapes,
    _layout,
    _load_tensors,
    _sha256,
)
from pituning.errors import BankCorruptionError, BankError
from pituning.storage import Storage, open_storage

__all__ = ["IntegrityMixin"]


class IntegrityMixin(SearchMixin):
    """:meth:`verify`, :meth:`gc` and :meth:`recover` (part of :class:`~pituning.bank.ExpertBank`; damaged search
    cache files are among what they find and remove)."""

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

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

The bank is a package, one module per responsibility, composed into :class:`ExpertBank`:
:mod:`~pituning.bank.records` (the dataclasses), :mod:`~pituning.bank.format` (the on-disk record format),
:mod:`~pituning.bank.catalog` (manifest, journal and listing, without torch), :mod:`~pituning.bank.store` (writing
and reading experts), :mod:`~pituning.bank.search` (similarity search
and its cache), :mod:`~pituning.bank.combine` (averaging), :mod:`~pituning.bank.interop` (PEFT) and
:mod:`~pituning.bank.integrity` (verify, gc, recover). :class:`TaskInfo` lives in :mod:`pituning.tasks` and
:func:`sync_experts_` in :mod:`pituning.distributed`; both are re-exported here.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from pituning.bank.catalog import DEAD as DEAD
from pituning.bank.catalog import JOURNAL as JOURNAL
from pituning.bank.catalog import MANIFEST as MANIFEST
from pituning.bank.catalog import BankCatalog
from pituning.bank.format import SCHEMA_VERSION
from pituning.bank.records import BackboneIdentity, BankEntry, Expert, Recovery
from pituning.tasks import MODALITIES, TaskInfo

if TYPE_CHECKING:  # pragma: no cover - for type checkers and the docs; at run time these load on first use
    from pituning.bank.combine import average_heads
    from pituning.bank.expert_bank import ExpertBank
    from pituning.distributed import sync_experts_

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "BackboneIdentity",
    "BankCatalog",
    "BankEntry",
    "Expert",
    "ExpertBank",
    "Recovery",
    "TaskInfo",
    "average_heads",
    "sync_experts_",
]

_LAZY = {
    "ExpertBank": "pituning.bank.expert_bank",
    "average_heads": "pituning.bank.combine",
    "sync_experts_": "pituning.distributed",
}
"""The names that need torch -> their module, imported on first use (listing a bank needs none of them)."""


class _BankModule(types.ModuleType):
    """The type of the ``pituning.bank`` module: its ``COMPACT_EVERY`` is the store's, and the names that need torch
    load on first use.

    ``pituning.bank.COMPACT_EVERY = 3`` (tests and benchmarks set it, also through ``monkeypatch.setattr``) sets
    :data:`pituning.bank.store.COMPACT_EVERY`, which the store reads at every commit, as it did when the bank was one
    module.
    """

    @property
    def COMPACT_EVERY(self) -> int:  # noqa: N802
        return int(importlib.import_module("pituning.bank.store").COMPACT_EVERY)

    @COMPACT_EVERY.setter
    def COMPACT_EVERY(self, value: int) -> None:  # noqa: N802
        store: Any = importlib.import_module("pituning.bank.store")
        store.COMPACT_EVERY = value

    def __getattr__(self, name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'pituning.bank' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(self, name, value)  # the next access is a plain attribute
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_LAZY))


sys.modules[__name__].__class__ = _BankModule

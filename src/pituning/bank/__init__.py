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
:mod:`~pituning.bank.store` (manifest, journal, writing and reading), :mod:`~pituning.bank.search` (similarity search
and its cache), :mod:`~pituning.bank.combine` (averaging), :mod:`~pituning.bank.interop` (PEFT) and
:mod:`~pituning.bank.integrity` (verify, gc, recover). :class:`TaskInfo` lives in :mod:`pituning.tasks` and
:func:`sync_experts_` in :mod:`pituning.distributed`; both are re-exported here.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

from pituning.bank import store as _store
from pituning.bank.combine import CombineMixin, average_heads
from pituning.bank.format import SCHEMA_VERSION
from pituning.bank.integrity import IntegrityMixin
from pituning.bank.interop import PeftMixin
from pituning.bank.records import BackboneIdentity, BankEntry, Expert, Recovery
from pituning.bank.search import SearchMixin
from pituning.bank.store import DEAD as DEAD
from pituning.bank.store import JOURNAL as JOURNAL
from pituning.bank.store import MANIFEST as MANIFEST
from pituning.distributed import sync_experts_
from pituning.model import ExpertModel
from pituning.tasks import MODALITIES, TaskInfo

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


class ExpertBank(IntegrityMixin, PeftMixin, SearchMixin, CombineMixin):
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

    # ------------------------------------------------------------------ distributed
    @staticmethod
    def sync_(target: ExpertModel | Expert | Sequence[Expert], names: Sequence[str] | None = None) -> None:
        """Mean-reduce experts across the ranks of the default process group, in place (see :func:`sync_experts_`)."""
        sync_experts_(target, names)


class _BankModule(types.ModuleType):
    """The type of the ``pituning.bank`` module: its ``COMPACT_EVERY`` is the store's.

    ``pituning.bank.COMPACT_EVERY = 3`` (tests and benchmarks set it, also through ``monkeypatch.setattr``) sets
    :data:`pituning.bank.store.COMPACT_EVERY`, which the store reads at every commit, as it did when the bank was one
    module.
    """

    @property
    def COMPACT_EVERY(self) -> int:  # noqa: N802
        return _store.COMPACT_EVERY

    @COMPACT_EVERY.setter
    def COMPACT_EVERY(self, value: int) -> None:  # noqa: N802
        _store.COMPACT_EVERY = value


sys.modules[__name__].__class__ = _BankModule

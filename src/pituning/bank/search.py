"""Similarity search over the bank's task embeddings, with the stacked embeddings cached in ``cache/``."""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pituning.bank.store import BankStore, _layout, _sha256
from pituning.errors import BankCorruptionError, BankError, ConfigError
from pituning.graph import flatten_embeddings, prepare_rows, similarity_rows

__all__ = ["SearchMixin"]


class SearchMixin(BankStore):
    """:meth:`similar` and its embedding cache (part of :class:`~pituning.bank.ExpertBank`)."""

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

"""Task similarity from Fisher task embeddings (docs/concepts.md, stage 2), in plain torch.

A task embedding is the diagonal Fisher information of an expert's parameters, kept per parameter tensor:
``{tensor name: F}``. The similarity of tasks ``i`` and ``j`` is Task2Vec's symmetric normalised cosine, per tensor
``k``::

    a = F_i / (F_i + F_j + eps),   b = F_j / (F_i + F_j + eps),   s_k = cos(a, b)

averaged over tensors. Fisher values of few-shot tasks can be orders of magnitude smaller than those of data-rich
tasks, so by default each Fisher is first rescaled to unit mean per tensor (``rescale="unit_mean"``), which makes the
comparison about the *shape* of the Fisher rather than its scale. Tensors whose Fisher is all zero or non-finite are
reported in :class:`Similarity.skipped`, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pituning.errors import ConfigError

__all__ = [
    "RESCALE",
    "Similarity",
    "TaskGraph",
    "flatten_embeddings",
    "prepare_rows",
    "rescale_fisher",
    "similarity_rows",
    "similarity_to_many",
    "task_similarity",
]

#: Fisher rescaling options.
RESCALE = ("unit_mean", "none")


@dataclass(frozen=True)
class Similarity:
    """A task similarity and the tensors that could not take part."""

    value: float
    """Mean over usable tensors of the symmetric normalised cosine (``nan`` when no tensor is usable)."""
    per_tensor: dict[str, float] = field(default_factory=dict)
    """Similarity of each usable tensor."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Tensor name -> why it was left out (all zero or non-finite on one side)."""


def rescale_fisher(fisher: Tensor, rescale: str = "unit_mean") -> Tensor:
    """Rescale a Fisher tensor (any shape, last dims flattened by the caller) along its last dimension.

    ``unit_mean`` divides by the mean (rows of zeros stay zero); ``none`` returns it unchanged (as float32).
    """
    if rescale not in RESCALE:
        raise ConfigError(f"Unknown Fisher rescaling {rescale!r}; choose one of {list(RESCALE)}.")
    fisher = fisher.float()
    if rescale == "none":
        return fisher
    mean = fisher.mean(dim=-1, keepdim=True)
    return fisher / torch.where(mean > 0, mean, torch.ones_like(mean))


def _pair_cosine(fi: Tensor, fj: Tensor, eps: float) -> Tensor:
    """Symmetric normalised cosine along the last dim; broadcasts ``(d,)`` against ``(N, d)``."""
    total = fi + fj + eps
    a, b = fi / total, fj / total
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def task_similarity(
    fisher_i: Mapping[str, Tensor], fisher_j: Mapping[str, Tensor], *, eps: float = 1e-6, rescale: str = "unit_mean"
) -> Similarity:
    """Similarity of two tasks from their Fisher embeddings (same tensor names and shapes).

    Example:
        >>> f = {"w": torch.tensor([1.0, 2.0, 3.0])}
        >>> round(task_similarity(f, f).value, 6)
        1.0
    """
    if set(fisher_i) != set(fisher_j):
        raise ConfigError(
            f"Task embeddings cover different tensors ({sorted(set(fisher_i) ^ set(fisher_j))[:3]} ...); compare "
            "embeddings of experts with the same kind, config and backbone."
        )
    per_tensor: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in sorted(fisher_i):
        fi, fj = fisher_i[name].flatten().float(), fisher_j[name].flatten().float()
        if fi.shape != fj.shape:
            raise ConfigError(f"Task embeddings disagree on the shape of {name!r}: {fi.shape} vs {fj.shape}.")
        reason = _why_unusable(fi, "first") or _why_unusable(fj, "second")
        if reason:
            skipped[name] = reason
            continue
        per_tensor[name] = float(_pair_cosine(rescale_fisher(fi, rescale), rescale_fisher(fj, rescale), eps))
    value = sum(per_tensor.values()) / len(per_tensor) if per_tensor else float("nan")
    return Similarity(value, per_tensor, skipped)


def _why_unusable(fisher: Tensor, side: str) -> str:
    if not torch.isfinite(fisher).all():
        return f"non-finite Fisher in the {side} embedding"
    if not (fisher.abs().sum() > 0):
        return f"all-zero Fisher in the {side} embedding"
    return ""


def flatten_embeddings(embeddings: Sequence[Mapping[str, Tensor]]) -> tuple[list[str], list[int], Tensor]:
    """Stack embeddings of one layout into one matrix.

    Returns:
        ``(tensor names (sorted), their sizes, (N, D))`` where each row concatenates one embedding's flattened tensors.
    """
    names = sorted(embeddings[0])
    sizes = [embeddings[0][n].numel() for n in names]
    rows = [torch.cat([e[n].reshape(-1).float() for n in names]) for e in embeddings]
    return names, sizes, torch.stack(rows)


def _segments(sizes: Sequence[int], device: torch.device) -> Tensor:
    """One-hot ``(D, K)`` matrix mapping each column to its tensor (segment sums become one matmul)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return torch.nn.functional.one_hot(ids, len(sizes)).float()


def prepare_rows(flat: Tensor, sizes: Sequence[int], rescale: str = "unit_mean") -> tuple[Tensor, Tensor]:
    """Rescale each tensor segment of each row and mark the usable ones.

    Args:
        flat: ``(N, D)`` stacked flattened Fisher.
        sizes: the segment sizes (sum ``D``).
        rescale: ``unit_mean`` or ``none``.

    Returns:
        ``(rescaled (N, D), usable (N, K))``: a segment is usable when it is finite and not all zero; unusable
        segments are zeroed in the rescaled matrix.
    """
    if rescale not in RESCALE:
        raise ConfigError(f"Unknown Fisher rescaling {rescale!r}; choose one of {list(RESCALE)}.")
    flat = flat.float()
    seg = _segments(sizes, flat.device)
    finite = torch.isfinite(flat)
    clean = torch.where(finite, flat, torch.zeros_like(flat))
    usable = ((~finite).float() @ seg == 0) & (clean.abs() @ seg > 0)
    if rescale == "unit_mean":
        means = (clean @ seg) / torch.tensor(sizes, dtype=torch.float32, device=flat.device)
        means = torch.where(means > 0, means, torch.ones_like(means))
        clean = clean / (means @ seg.t())
    return clean * (usable.float() @ seg.t()), usable


def similarity_rows(
    target: Tensor, target_usable: Tensor, rows: Tensor, rows_usable: Tensor, sizes: Sequence[int], eps: float = 1e-6
) -> Tensor:
    """Symmetric normalised cosine of one prepared target ``(D,)`` against prepared rows ``(N, D)``, mean over the
    segments usable on both sides; ``nan`` where none is.

    With ``T = f_t + F + eps``: ``cos(f_t / T, F / T) = sum(f_t F / T^2) / sqrt(sum(f_t^2 / T^2) sum(F^2 / T^2))``
    per segment, so the whole batch costs a few elementwise passes and three ``(N, D) @ (D, K)`` products.
    """
    seg = _segments(sizes, rows.device)
    k = len(sizes)
    weights = torch.cat([seg * target[:, None], seg * target.square()[:, None], seg], dim=1)  # (D, 3K)
    shifted = target + eps
    sums = torch.empty(rows.shape[0], 3 * k, device=rows.device)
    step = max(16, (1 << 18) // max(1, rows.shape[1]))  # ~1 MB blocks stay in cache: far faster than whole passes
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        inv = torch.add(block, shifted).pow_(-2)  # 1 / T^2
        sums[start : start + step, k : 2 * k] = inv @ weights[:, k : 2 * k]  # sum f_t^2 / T^2
        inv.mul_(block)
        sums[start : start + step, :k] = inv @ weights[:, :k]  # sum f_t F / T^2
        sums[start : start + step, 2 * k :] = inv.mul_(block) @ weights[:, 2 * k :]  # sum F^2 / T^2
    cross, tgt, own = sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :]
    cos = cross / (own * tgt).sqrt().clamp_min(1e-12)
    ok = rows_usable & target_usable[None, :]
    count = ok.sum(dim=1)
    mean = torch.where(ok, cos, torch.zeros_like(cos)).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def similarity_to_many(
    target: Mapping[str, Tensor],
    candidates: Sequence[Mapping[str, Tensor]],
    *,
    eps: float = 1e-6,
    rescale: str = "unit_mean",
) -> Tensor:
    """Similarity of one task to ``N`` others at once (the batched form of :func:`task_similarity`).

    Args:
        target: ``{tensor: F}`` of the target.
        candidates: ``N`` embeddings with the same tensor names and shapes.
        eps: the normalised cosine's epsilon (applied after rescaling).
        rescale: ``unit_mean`` or ``none``.

    Returns:
        ``(N,)`` similarities; ``nan`` for a candidate with no usable tensor.
    """
    if any(set(c) != set(target) for c in candidates):
        raise ConfigError("Target and candidate embeddings cover different tensors; compare like with like.")
    _, sizes, flat = flatten_embeddings([target, *candidates])
    prepared, usable = prepare_rows(flat, sizes, rescale)
    return similarity_rows(prepared[0], usable[0], prepared[1:], usable[1:], sizes, eps)


class TaskGraph:
    """Pairwise task similarities: a symmetric matrix over named tasks, with top-k queries, export and plots.

    Tasks whose embeddings cannot be compared (other layout or backbone) have ``nan`` similarity.

    Example:
        >>> g = TaskGraph(["a", "b", "c"], torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]]))
        >>> g.top_k("a", 1)
        [('b', 0.8999999761581421)]
    """

    def __init__(
        self,
        names: Sequence[str],
        matrix: Tensor,
        *,
        modalities: Mapping[str, str] | None = None,
        skipped: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if matrix.shape != (len(names), len(names)):
            raise ConfigError(f"TaskGraph matrix has shape {tuple(matrix.shape)} for {len(names)} names.")
        self.names = list(names)
        self.matrix = matrix.float()
        self.modalities = dict(modalities or {})
        self.skipped = {k: dict(v) for k, v in (skipped or {}).items()}

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Mapping[str, Mapping[str, Tensor]],
        *,
        rescale: str = "unit_mean",
        eps: float = 1e-6,
        modalities: Mapping[str, str] | None = None,
    ) -> TaskGraph:
        """Build the graph from ``{task: embedding}``; pairs of different layouts get ``nan``."""
        names = list(embeddings)
        matrix = torch.full((len(names), len(names)), float("nan"))
        skipped: dict[str, dict[str, str]] = {}
        for i, a in enumerate(names):
            matrix[i, i] = 1.0
            for j in range(i + 1, len(names)):
                b = names[j]
                layout_a = {k: tuple(v.shape) for k, v in embeddings[a].items()}
                layout_b = {k: tuple(v.shape) for k, v in embeddings[b].items()}
                if layout_a != layout_b:
                    continue
                sim = task_similarity(embeddings[a], embeddings[b], eps=eps, rescale=rescale)
                matrix[i, j] = matrix[j, i] = sim.value
                if sim.skipped:
                    skipped[f"{a}|{b}"] = sim.skipped
        return cls(names, matrix, modalities=modalities, skipped=skipped)

    @classmethod
    def from_bank(cls, bank: Any, names: Sequence[str] | None = None, **kwargs: Any) -> TaskGraph:
        """The graph over ``names`` (default: every bank entry with an embedding)."""
        entries = {e.name: e for e in bank.list(has_embedding=True)}
        chosen = list(names) if names is not None else list(entries)
        missing = [n for n in chosen if n not in entries]
        if missing:
            raise ConfigError(f"No task embedding for {missing}; run the embedding stage for them first.")
        embeddings = {n: bank.get(n).embedding for n in chosen}
        return cls.from_embeddings(embeddings, modalities={n: entries[n].modality for n in chosen}, **kwargs)

    def similarity(self, a: str, b: str) -> float:
        """Similarity of tasks ``a`` and ``b``."""
        return float(self.matrix[self.names.index(a), self.names.index(b)])

    def top_k(
        self, target: str, k: int, *, modality: str | None = None, exclude: Sequence[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` tasks most similar to ``target`` (itself, ``exclude`` and ``nan`` pairs left out), best first."""
        if target not in self.names:
            raise ConfigError(f"{target!r} is not in the task graph ({self.names}).")
        row = self.matrix[self.names.index(target)]
        ranked = [
            (name, float(row[i]))
            for i, name in enumerate(self.names)
            if name != target
            and name not in exclude
            and not torch.isnan(row[i])
            and (modality is None or self.modalities.get(name) == modality)
        ]
        ranked.sort(key=lambda item: -item[1])
        return ranked[:k]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``nan`` as ``None``)."""
        rows = [[None if v != v else float(v) for v in row.tolist()] for row in self.matrix]
        return {"names": self.names, "matrix": rows, "modalities": self.modalities, "skipped": self.skipped}

    def save(self, directory: str | Any) -> dict[str, str]:
        """Write ``graph.json`` and ``graph.csv`` into ``directory``; returns their paths."""
        import csv
        import json
        from pathlib import Path

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph.json").write_text(json.dumps(self.to_dict(), indent=1))
        with open(out / "graph.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["task", *self.names])
            for name, row in zip(self.names, self.to_dict()["matrix"], strict=True):
                writer.writerow([name, *["" if v is None else f"{v:.6f}" for v in row]])
        return {"json": str(out / "graph.json"), "csv": str(out / "graph.csv")}

    @classmethod
    def load(cls, path: str | Any) -> TaskGraph:
        """Read a ``graph.json``."""
        import json
        from pathlib import Path

        data = json.loads(Path(path).read_text())
        matrix = torch.tensor([[float("nan") if v is None else v for v in row] for row in data["matrix"]])
        return cls(data["names"], matrix, modalities=data.get("modalities"), skipped=data.get("skipped"))

    def colour_range(self) -> tuple[float, float]:
        """The heatmap's colour scale: the range of the off-diagonal similarities (a task's similarity to itself is
        always the top and would squeeze every other value into a few shades), padded by 5% of it; ``(0, 1)`` when
        there are no two finite off-diagonal values that differ."""
        n = len(self.names)
        off = self.matrix[~torch.eye(n, dtype=torch.bool)] if n > 1 else self.matrix.new_zeros(0)
        off = off[torch.isfinite(off)]
        if off.numel() < 2 or float(off.max() - off.min()) <= 0.0:
            return 0.0, 1.0
        low, high = float(off.min()), float(off.max())
        pad = 0.05 * (high - low)
        return low - pad, high + pad

    def heatmap_figure(self) -> Any:
        """The heatmap as a matplotlib figure: off-diagonal similarities on :meth:`colour_range`, the diagonal in grey,
        values written in the cells up to 12 tasks; sized for 2 to 20+ tasks, with the title clear of the colour bar
        (constrained layout)."""
        import matplotlib.pyplot as plt

        n = len(self.names)
        low, high = self.colour_range()
        values = self.matrix.clone()
        values.fill_diagonal_(float("nan"))
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("lightgrey")
        side = max(3.5, 1.4 + 0.42 * n)
        fig, ax = plt.subplots(figsize=(side + 1.3, side), layout="constrained")
        image = ax.imshow(values.numpy(), vmin=low, vmax=high, cmap=cmap)
        fontsize = 8 if n <= 12 else 6
        ax.set_xticks(range(n), self.names, rotation=60, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), self.names, fontsize=fontsize)
        if n <= 12:
            middle = (low + high) / 2
            for i in range(n):
                for j in range(n):
                    value = float(self.matrix[i, j])
                    if i != j and value == value:
                        colour = "black" if value > middle else "white"
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        fig.colorbar(image, ax=ax, shrink=0.8, label=f"task similarity (off-diagonal, {low:.2f} to {high:.2f})")
        ax.set_title("Task similarity (Fisher)", fontsize=10)
        return fig

    def plot(self, directory: str | Any, *, k: int = 2) -> dict[str, str]:
        """Write ``heatmap.png`` (the matrix, :meth:`heatmap_figure`) and ``graph.png`` (each task linked to its
        ``k`` nearest) with matplotlib (an optional dependency: ``pip install matplotlib``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ConfigError("Plots need matplotlib: pip install matplotlib (or the 'examples' extra).") from err
        import math as _math
        from pathlib import Path

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        n = len(self.names)
        fig = self.heatmap_figure()
        fig.savefig(out / "heatmap.png", dpi=120)
        plt.close(fig)
        low, high = self.colour_range()
        fig, ax = plt.subplots(figsize=(6, 6), layout="constrained")
        points = {
            name: (_math.cos(2 * _math.pi * i / n), _math.sin(2 * _math.pi * i / n))
            for i, name in enumerate(self.names)
        }
        for name in self.names:
            for other, sim in self.top_k(name, k):
                (x0, y0), (x1, y1) = points[name], points[other]
                strength = max(0.0, min(1.0, (sim - low) / (high - low)))  # on the heatmap's scale
                ax.plot([x0, x1], [y0, y1], color="tab:blue", alpha=0.15 + 0.85 * strength, lw=0.5 + 2.5 * strength)
        for name, (x, y) in points.items():
            ax.scatter([x], [y], s=80, color="tab:orange", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_axis_off()
        ax.set_title(f"Task graph: each task linked to its {k} most similar")
        fig.savefig(out / "graph.png", dpi=120)
        plt.close(fig)
        return {"heatmap": str(out / "heatmap.png"), "graph": str(out / "graph.png")}

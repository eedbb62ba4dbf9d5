"""Task similarity from Fisher embeddings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pituning import ConfigError
from pituning.graph import TaskGraph, rescale_fisher, similarity_to_many, task_similarity


def _emb(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(4, 3, generator=gen) * scale, "b": torch.rand(5, generator=gen) * scale}


def test_symmetric_normalised_cosine_by_hand() -> None:
    fi, fj = _emb(0), _emb(1)
    sim = task_similarity(fi, fj, rescale="none")
    per = []
    for name in ("a", "b"):
        x, y = fi[name].flatten(), fj[name].flatten()
        a, b = x / (x + y + 1e-6), y / (x + y + 1e-6)
        per.append(float(torch.dot(a, b) / (a.norm() * b.norm())))
    assert sim.per_tensor == pytest.approx(dict(zip(("a", "b"), per, strict=True)))
    assert sim.value == pytest.approx(sum(per) / 2)
    assert task_similarity(fj, fi, rescale="none").value == pytest.approx(sim.value)


def test_unit_mean_rescaling_removes_scale() -> None:
    fi, fj = {k: v * 1e-7 for k, v in _emb(0).items()}, _emb(1)  # a few-shot target near eps, another task
    small, large = ({k: v * c for k, v in fj.items()} for c in (1e-7, 1e-3))
    rescaled = [task_similarity(fi, f, rescale="unit_mean").value for f in (small, large)]
    raw = [task_similarity(fi, f, rescale="none").value for f in (small, large)]
    assert rescaled[0] == pytest.approx(rescaled[1], abs=1e-6)  # only the shapes count
    assert abs(raw[0] - raw[1]) > 0.01  # without rescaling the scale of the source changes the answer
    assert rescale_fisher(torch.tensor([2.0, 4.0])).mean().item() == pytest.approx(1.0)


def test_zero_and_non_finite_tensors_are_reported_not_dropped_silently() -> None:
    fi, fj = _emb(0), _emb(1)
    fj["a"] = torch.zeros_like(fj["a"])
    fi["b"] = fi["b"].clone()
    fi["b"][0] = math.nan
    sim = task_similarity(fi, fj)
    assert sim.skipped == {
        "a": "all-zero Fisher in the second embedding",
        "b": "non-finite Fisher in the first embedding",
    }
    assert math.isnan(sim.value) and sim.per_tensor == {}


def test_batched_equals_pairwise() -> None:
    target = _emb(0)
    candidates = [_emb(i, scale=10.0**-i) for i in range(1, 6)]
    candidates[2]["a"] = torch.zeros_like(candidates[2]["a"])  # one tensor unusable: mean over the other
    candidates[3] = {k: torch.zeros_like(v) for k, v in candidates[3].items()}  # nothing usable: nan
    for rescale in ("unit_mean", "none"):
        batched = similarity_to_many(target, candidates, rescale=rescale)
        for i, cand in enumerate(candidates):
            pair = task_similarity(target, cand, rescale=rescale).value
            if math.isnan(pair):
                assert math.isnan(batched[i])
            else:
                assert batched[i].item() == pytest.approx(pair, abs=1e-5)


def test_layout_mismatch_is_an_error() -> None:
    with pytest.raises(ConfigError, match="different tensors"):
        task_similarity({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ConfigError, match="different tensors"):
        similarity_to_many({"a": torch.ones(2)}, [{"b": torch.ones(2)}])
    with pytest.raises(ConfigError, match="Unknown Fisher rescaling"):
        rescale_fisher(torch.ones(2), "log")


@pytest.mark.parametrize("n", [2, 5, 17, 20])
def test_heatmap_scale_fits_the_off_diagonal_and_the_title_clears_the_colour_bar(n: int, tmp_path: Path) -> None:
    """Similarities clustered in 0.70-0.86 (as a 17-task suite gave) fill the colour scale, not a sliver of 0-1; the
    title overlaps neither the colour bar nor the matrix, from 2 to 20 tasks."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(n)
    upper = 0.70 + 0.16 * torch.rand(n, n, generator=gen)
    matrix = torch.triu(upper, 1) + torch.triu(upper, 1).T + torch.eye(n)
    if n == 2:
        matrix = torch.tensor([[1.0, 0.8], [0.8, 1.0]])  # one off-diagonal value: nothing to spread, the 0-1 scale
    graph = TaskGraph([f"task_{i:02d}_name" for i in range(n)], matrix)
    low, high = graph.colour_range()
    off = matrix[~torch.eye(n, dtype=torch.bool)]
    if n == 2:
        assert (low, high) == (0.0, 1.0)
    else:
        assert low < float(off.min()) < float(off.max()) < high and high - low < 0.2  # the clustered range, padded
    fig = graph.heatmap_figure()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    heat, bar = fig.axes
    title = heat.title.get_window_extent(renderer)
    assert not title.overlaps(bar.get_window_extent(renderer))
    assert not title.overlaps(heat.get_window_extent(renderer)) or title.y0 >= heat.get_window_extent(renderer).y1 - 1
    plt.close(fig)
    assert set(graph.plot(tmp_path, k=1)) == {"heatmap", "graph"}

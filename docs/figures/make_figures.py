"""Draw the figures of the documentation into ``docs/figures/`` (the PNGs are committed).

Run from the repository root, with the ``examples`` extra (matplotlib) installed::

    python docs/figures/make_figures.py

Figures:

- ``pipeline.png``: the three stages of π-Tuning (a diagram).
- ``interpolation.png``: one insertion point during stage 3, and its collapse (a diagram).
- ``task_graph/heatmap.png`` and ``task_graph/graph.png``: written by the real ``pituning graph`` command over a small
  bank of LoRA experts on a tiny random BERT whose task embeddings are *synthetic* Fisher values of three task
  families (so the figure shows what the command draws without training anything).
- ``demo_weights.png``, ``demo_accuracy.png``: the committed results of ``make demo``
  (``benchmarks/results/demo_tweets.json``).
- ``bank_latency.png``: the committed ExpertBank benchmark (``benchmarks/results/bank.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DPI = 130
COLORS = {"source": "#4C72B0", "target": "#DD8452", "backbone": "#B0B0B0", "result": "#55A868", "text": "#222222"}


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, color: str, *, fontsize: int = 9) -> None:
    patch = FancyBboxPatch(
        (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.03", fc=color, ec="none", alpha=0.9, zorder=2
    )
    ax.add_patch(patch)
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color="white", zorder=3)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], text: str = "") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.4, color="#555555", zorder=1))
    if text:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.03)
        ax.text(*mid, text, ha="center", va="bottom", fontsize=8, color="#555555")


def pipeline(out: Path) -> None:
    """The three stages: experts per source task, Fisher embeddings and top-k, interpolation and collapse."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 3.3)
    ax.set_ylim(0, 1.25)
    ax.set_axis_off()
    titles = ["1. Experts", "2. Predict", "3. Interpolate"]
    subtitles = [
        "one expert per source task,\nbackbone frozen",
        "diagonal Fisher of each expert,\nsimilarity, top-k sources",
        "learnable softmax over the pool,\ncollapse into one expert",
    ]
    for i, (title, sub) in enumerate(zip(titles, subtitles, strict=True)):
        ax.text(0.05 + 1.1 * i, 1.18, title, fontsize=12, weight="bold", color=COLORS["text"], va="top")
        ax.text(0.05 + 1.1 * i, 1.08, sub, fontsize=8.5, color="#555555", va="top")
    # stage 1: frozen backbone and one expert per source task
    _box(ax, 0.05, 0.08, 0.9, 0.14, "frozen backbone (text / vision / VL)", COLORS["backbone"])
    for j, name in enumerate(["task A", "task B", "task C"]):
        _box(ax, 0.05 + 0.31 * j, 0.42, 0.26, 0.2, f"expert\n{name}", COLORS["source"], fontsize=8.5)
        _arrow(ax, (0.18 + 0.31 * j, 0.23), (0.18 + 0.31 * j, 0.41))
        _arrow(ax, (0.18 + 0.31 * j, 0.63), (0.18 + 0.31 * j, 0.71))
    _box(ax, 0.05, 0.72, 0.9, 0.14, "ExpertBank (safetensors + JSON)", "#8172B2")
    # stage 2: Fisher embeddings and the task graph
    for j, (name, value) in enumerate([("task A", 0.91), ("task B", 0.88), ("task C", 0.42)]):
        y = 0.62 - 0.17 * j
        _box(ax, 1.15, y, 0.34, 0.13, f"F({name})", COLORS["source"], fontsize=8.5)
        ax.barh(y + 0.065, 0.45 * value, height=0.09, left=1.55, color=COLORS["result"] if j < 2 else "#999999")
        ax.text(1.57 + 0.45 * value, y + 0.065, f"{value:.2f}", va="center", fontsize=8)
    _box(ax, 1.15, 0.08, 0.34, 0.13, "F(target)", COLORS["target"], fontsize=8.5)
    ax.text(1.55, 0.145, "similarity to the target\n(top-k = 2 kept)", va="center", fontsize=8, color="#555555")
    ax.text(1.15, 0.8, "F = E[(∂ log p(y|x) / ∂θ)²]", fontsize=9, color=COLORS["text"])
    # stage 3: the pool, the weights and the collapsed expert
    pool = [("A", 0.45, COLORS["source"]), ("B", 0.35, COLORS["source"]), ("target", 0.20, COLORS["target"])]
    for j, (name, alpha, color) in enumerate(pool):
        x = 2.3 + 0.33 * j
        _box(ax, x, 0.64, 0.27, 0.15, f"φ {name}", color, fontsize=8.5)
        ax.text(x + 0.135, 0.585, f"α = {alpha:.2f}", ha="center", fontsize=8, color="#555555")
        _arrow(ax, (x + 0.135, 0.57), (2.83, 0.46))
    _box(ax, 2.4, 0.3, 0.86, 0.15, "Σ αᵢ φᵢ,  α = softmax(w)", "#8172B2", fontsize=9)
    _arrow(ax, (2.83, 0.29), (2.83, 0.2), "")
    ax.text(2.86, 0.225, "collapse()", fontsize=8, color="#555555")
    _box(ax, 2.4, 0.04, 0.86, 0.15, "one plain expert  <target>_pi", COLORS["result"], fontsize=9)
    _arrow(ax, (0.97, 0.78), (1.13, 0.68), "")
    _arrow(ax, (2.02, 0.45), (2.23, 0.6), "")
    fig.tight_layout()
    fig.savefig(out / "pipeline.png", dpi=DPI)
    plt.close(fig)


def interpolation(out: Path) -> None:
    """One LoRA insertion point: the pool's updates weighted by a softmax, then collapsed by concatenation."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.set_xlim(0, 3.0)
    ax.set_ylim(0, 1.0)
    ax.set_axis_off()
    ax.text(0.02, 0.97, "During stage 3, at every insertion point (here a LoRA on one projection W)", fontsize=10,
            weight="bold", va="top")  # fmt: skip
    rows = [("B₁A₁  (source 1)", COLORS["source"]), ("B₂A₂  (source 2)", COLORS["source"]),
            ("B₃A₃  (source 3)", COLORS["source"]), ("BₜAₜ  (target)", COLORS["target"])]  # fmt: skip
    for j, (text, color) in enumerate(rows):
        y = 0.72 - 0.18 * j
        _box(ax, 0.05, y, 0.55, 0.13, text, color, fontsize=9)
        _arrow(ax, (0.61, y + 0.065), (1.05, 0.45), "")
    _box(ax, 1.07, 0.36, 0.75, 0.18, "W x + Σᵢ αᵢ sᵢ BᵢAᵢ x", "#8172B2", fontsize=10)
    ax.text(1.44, 0.6, "α = softmax(w)\nw: one logit per pool member,\nequal at init, learnt on the target",
            ha="center", fontsize=8.5, color="#555555")  # fmt: skip
    _arrow(ax, (1.83, 0.45), (2.1, 0.45), "collapse()")
    _box(ax, 2.12, 0.3, 0.84, 0.3, "one LoRA of rank Σ rᵢ:\nA = [A₁; …; Aₜ]\nB = [α₁s₁B₁, …, αₜsₜBₜ]", COLORS["result"],
         fontsize=9)  # fmt: skip
    ax.text(2.54, 0.2, "exactly the interpolation;\ninference costs one expert", ha="center", va="top", fontsize=8.5,
            color="#555555")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "interpolation.png", dpi=DPI)
    plt.close(fig)


def task_graph(out: Path) -> None:
    """Run ``pituning graph`` on a small bank whose embeddings are synthetic Fisher values of three task families."""
    import torch
    from transformers import BertConfig

    from pituning import ExpertBank, ExpertModel, LoraConfig, load_backbone
    from pituning.bank import Expert, TaskInfo
    from pituning.cli import main

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
    model = ExpertModel(load_backbone(config))
    tasks = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "c1": "c", "c2": "c", "target_16shot": "a"}
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bank = ExpertBank(Path(tmp) / "bank")
        family_base: dict[str, dict[str, torch.Tensor]] = {}
        for name, family in tasks.items():
            model.add_expert(name, LoraConfig(r=4))
            expert = Expert.from_model(model, name, TaskInfo(name, shots=16 if "shot" in name else None))
            model.remove_expert(name)
            if family not in family_base:  # each family has its own Fisher pattern (log-normal per entry)
                family_base[family] = {k: torch.randn(v.shape, generator=gen).exp() for k, v in expert.state.items()}
            # a task = its family's pattern with task noise; the few-shot target's Fisher is 100x smaller
            scale = 0.01 if "shot" in name else 1.0
            expert.embedding = {
                k: scale * v * (0.6 * torch.randn(v.shape, generator=gen)).exp() for k, v in family_base[family].items()
            }
            bank.add(expert)
        target = out / "task_graph"
        shutil.rmtree(target, ignore_errors=True)
        main(["graph", "--bank", str(Path(tmp) / "bank"), "--out", str(target), "--neighbours", "2"])
        for extra in ("graph.json", "graph.csv"):  # only the plots go into the docs
            (target / extra).unlink()


def _demo() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / "demo_tweets.json").read_text())
    return data


def demo_weights(out: Path) -> None:
    """Per seed of the demo: the Fisher similarity of the selected sources and the learnt mean weight of the pool."""
    rows = _demo()["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        pool = list(row["mean_weights"])
        weights = [row["mean_weights"][n] for n in pool]
        labels = ["target expert" if n.endswith("_target") else n for n in pool]
        colors = [COLORS["target"] if n.endswith("_target") else COLORS["source"] for n in pool]
        bars = ax.bar(range(len(pool)), weights, color=colors)
        for bar, name in zip(bars, pool, strict=True):
            sim = row["similarities"].get(name)
            if sim is not None:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"sim {sim:.3f}", ha="center",
                        fontsize=8)  # fmt: skip
        ax.axhline(1 / len(pool), color="#999999", ls="--", lw=1)
        ax.text(len(pool) - 0.5, 1 / len(pool) + 0.01, "uniform (init)", ha="right", fontsize=8, color="#777777")
        ax.set_xticks(range(len(pool)), labels, fontsize=8.5)
        ax.set_ylabel("mean interpolation weight α")
        ax.set_ylim(0, max(weights) + 0.1)
        ax.set_title(f"target {row['target']}, 16 shots per class, seed {row['seed']}", fontsize=10)
    fig.suptitle("make demo: learnt weights of the pool (sources ranked by Fisher similarity)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "demo_weights.png", dpi=DPI)
    plt.close(fig)


def demo_accuracy(out: Path) -> None:
    """Test accuracy of each method of the demo, per seed and on average."""
    demo = _demo()
    titles = {"alone": "expert alone", "best_source_init": "best source\nas init",
              "uniform_average": "uniform top-k\naverage", "pi": "π-Tuning"}  # fmt: skip
    methods = [m for m in titles if m in demo["mean"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / (len(demo["rows"]) + 1)
    for i, row in enumerate(demo["rows"]):
        xs = [k + (i - len(demo["rows"]) / 2) * width for k in range(len(methods))]
        ax.bar(xs, [row[m] for m in methods], width, label=f"seed {row['seed']}", alpha=0.55)
    xs = [k + (len(demo["rows"]) / 2) * width for k in range(len(methods))]
    bars = ax.bar(xs, [demo["mean"][m] for m in methods], width, label="mean", color=COLORS["result"])
    for bar in bars:
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.005, f"{bar.get_height():.3f}", ha="center",
                fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(methods)), [titles[m] for m in methods], fontsize=9)
    highest = max(max(row[m] for m in methods) for row in demo["rows"])
    ax.set_ylim(0.5, highest + 0.06)  # room for the labels and the legend
    ax.set_ylabel("test accuracy (300 tweets)")
    ax.set_title("make demo: JetBlue, 16 shots per class, all-MiniLM-L6-v2, CPU", fontsize=10)
    ax.legend(fontsize=8, ncols=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "demo_accuracy.png", dpi=DPI)
    plt.close(fig)


def bank_latency(out: Path) -> None:
    """Median latency of the ExpertBank operations at 1,000 and 10,000 experts (log scale)."""
    data = json.loads((RESULTS / "bank.json").read_text())
    ops = {
        "add_one": "add one expert",
        "list_filter_cold": "list + filter, new handle",
        "list_filter_warm": "list + filter, warm",
        "load": "load one expert",
        "average_3": "average 3 experts",
        "topk_cold_build": "top-5 similar, first call",
        "topk_warm": "top-5 similar, warm",
        "topk_new_handle_persisted_cache": "top-5 similar, new handle",
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    height = 0.8 / len(data["runs"])
    for i, run in enumerate(data["runs"]):
        ys = [k + i * height for k in range(len(ops))]
        ax.barh(ys, [run[op]["median_ms"] for op in ops], height, label=f"{run['size']:,} experts")
    ax.set_yticks([k + height * (len(data["runs"]) - 1) / 2 for k in range(len(ops))], list(ops.values()))
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title("ExpertBank operations (benchmarks/bank/run.py, 2 CPU cores)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bank_latency.png", dpi=DPI)
    plt.close(fig)


FIGURES = {
    "pipeline": pipeline,
    "interpolation": interpolation,
    "task_graph": task_graph,
    "demo_weights": demo_weights,
    "demo_accuracy": demo_accuracy,
    "bank_latency": bank_latency,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"Figures to draw, among {', '.join(FIGURES)} (default: all).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="Output folder.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose among {list(FIGURES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or FIGURES:
        FIGURES[name](args.out)
        print(f"drew {name}")


if __name__ == "__main__":
    main()

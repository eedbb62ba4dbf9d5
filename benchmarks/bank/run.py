"""ExpertBank benchmark: add, list+filter, load, average and top-k similarity over 1,000 and 10,000 small experts.

Each expert is a LoRA (r=2) on 4 modules of width 64 (1,024 parameters) with a task embedding of the same size, as a
bank of many small experts. Writes ``benchmarks/results/bank.json`` and ``bank.md``.

    python benchmarks/bank/run.py                 # sizes 1000 10000, bank in a temp dir
    python benchmarks/bank/run.py --sizes 200     # a quick smoke run (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pituning import LoraConfig
from pituning.backbones import Fingerprint
from pituning.bank import BackboneIdentity, Expert, ExpertBank, TaskInfo
from pituning.suite import machine

MODULES = [f"layers.{i}.attn.q" for i in range(4)]
BACKBONE = BackboneIdentity("bench-backbone", "bench", Fingerprint("a" * 64, "b" * 64, 1_000_000))
RESULTS = Path(__file__).resolve().parents[1] / "results"


def make_expert(i: int) -> Expert:
    gen = torch.Generator().manual_seed(i)
    state = {}
    for module in MODULES:
        state[f"{module}.pi_lora.lora_A"] = torch.randn(2, 64, generator=gen)
        state[f"{module}.pi_lora.lora_B"] = torch.randn(64, 2, generator=gen)
    return Expert(
        name=f"expert{i:05d}",
        config=LoraConfig(r=2, alpha=4),
        state=state,
        task=TaskInfo(f"task{i % 50}", modality=("text", "vision", "vision-language")[i % 3]),
        backbone=BACKBONE,
        embedding={k: torch.rand(v.shape, generator=gen) for k, v in state.items()},
        modules={m: {"type": "Linear", "conv": False, "weight_shape": [], "plain_conv": False} for m in MODULES},
    )


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeat}


def bench(size: int, root: Path) -> dict[str, object]:
    location = root / f"bank{size}"
    bank = ExpertBank(location)
    start = time.perf_counter()
    batch = 500
    for lo in range(0, size, batch):
        bank.add_many([make_expert(i) for i in range(lo, min(size, lo + batch))])
    fill_s = time.perf_counter() - start
    out: dict[str, object] = {"size": size, "fill_add_many_s": fill_s, "fill_per_expert_ms": 1e3 * fill_s / size}
    extra = iter(range(size, size + 10_000))
    out["add_one"] = timed(lambda: bank.add(make_expert(next(extra))), 50)

    def list_cold() -> object:
        return ExpertBank(location).list(modality="vision", kind="lora", task="task3")

    out["list_filter_cold"] = timed(list_cold, 10)
    out["list_filter_warm"] = timed(lambda: bank.list(modality="vision", kind="lora", task="task3"), 20)
    names = bank.names()
    picks = iter(names[:: max(1, len(names) // 100)] * 3)
    out["load"] = timed(lambda: bank.get(next(picks)), 50)
    counter = iter(range(100_000))
    out["average_3"] = timed(lambda: bank.average(names[:3], name=f"avg{next(counter)}"), 10)
    fresh = ExpertBank(location)
    out["topk_cold_build"] = timed(lambda: fresh.similar(names[0], k=5), 1)
    out["topk_warm"] = timed(lambda: fresh.similar(names[0], k=5), 20)
    out["topk_new_handle_persisted_cache"] = timed(lambda: ExpertBank(location).similar(names[0], k=5), 5)
    out["topk_result"] = fresh.similar(names[0], k=5)
    return out


def write_markdown(results: dict[str, object], path: Path) -> None:
    lines = [
        "# ExpertBank benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']}  ",
        f"Load average (1, 5, 15 min): start {results['load_average']['start']}, end {results['load_average']['end']}",
        "",
        "Small experts: LoRA r=2 on 4 modules of width 64 (1,024 parameters) plus a task embedding of the same size. "
        "Local directory bank; every add is durable (fsync before the commit). Median of the repeats, in ms.",
        "",
        "| operation | " + " | ".join(f"{r['size']:,} experts" for r in results["runs"]) + " |",  # type: ignore[index]
        "| --- |" + " --- |" * len(results["runs"]),  # type: ignore[arg-type]
    ]
    rows = [
        ("fill with add_many (batches of 500), per expert", "fill_per_expert_ms", None),
        ("add one expert (own commit)", "add_one", "median_ms"),
        ("list + filter, new handle (parse manifest)", "list_filter_cold", "median_ms"),
        ("list + filter, warm handle", "list_filter_warm", "median_ms"),
        ("load one expert (checksums verified)", "load", "median_ms"),
        ("average 3 experts into a new one", "average_3", "median_ms"),
        ("top-5 similar, first call (reads every embedding)", "topk_cold_build", "median_ms"),
        ("top-5 similar, warm", "topk_warm", "median_ms"),
        ("top-5 similar, new handle (persisted cache)", "topk_new_handle_persisted_cache", "median_ms"),
    ]
    for label, key, sub in rows:
        cells = []
        for run in results["runs"]:  # type: ignore[attr-defined]
            value = run[key] if sub is None else run[key][sub]
            cells.append(f"{value:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets (issue): list + filter of 10,000 entries under 100 ms; "
        "top-k over 10,000 stored embeddings under 50 ms.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bank", help="result file stem")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for size in args.sizes:
            print(f"benchmarking {size} experts ...", flush=True)
            runs.append(bench(size, Path(tmp)))
            print(json.dumps(runs[-1], default=str), flush=True)
    results = {
        "command": "python benchmarks/bank/run.py " + " ".join(f"--sizes {' '.join(map(str, args.sizes))}".split()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, args.out / f"{args.name}.md")
    print(f"wrote {args.out / (args.name + '.json')} and {args.name}.md")


if __name__ == "__main__":
    main()

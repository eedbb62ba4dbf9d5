"""Start-up time of the ``pituning`` command: how long each command takes to answer when it does almost nothing.

Each command runs as a fresh process (``python -m pituning.cli ...``), ``--repeats`` times after one warm-up run; the
median wall time is reported, with ``python -c "import torch"`` measured in the same run as the reference (the cost
the light commands avoid) and whether each command imported torch or Lightning (``-X importtime``). Writes
``benchmarks/results/startup.{json,md}``::

    python benchmarks/startup/run.py               # 7 repeats
    python benchmarks/startup/run.py --repeats 1 --no-stages   # quick (the smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _commands(bank: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "pituning.cli"]
    return {
        'python -c "import torch" (reference)': [sys.executable, "-c", "import torch"],
        "pituning --help": [*cli, "--help"],
        "pituning bank list": [*cli, "bank", "list", "--bank", bank],
        "pituning run --help": [*cli, "run", "--help"],
        "pituning train-expert --help": [*cli, "train-expert", "--help"],
    }


def _heavy_imports(command: list[str]) -> list[str]:
    """The heavy packages ``command`` imports (from ``-X importtime``)."""
    out = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in ("torch", "lightning", "transformers") if m in loaded]


def _time(command: list[str], repeats: int) -> list[float]:
    subprocess.run(command, capture_output=True, check=True)  # warm-up: the page cache, .pyc files
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "startup"), help="Results file stem.")
    parser.add_argument("--no-stages", action="store_true", help="Leave out the Trainer stages' --help (slowest).")
    args = parser.parse_args(argv)
    from pituning.bank import BankCatalog
    from pituning.report import machine

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        BankCatalog(Path(tmp) / "bank")  # an empty bank (creating it needs no torch either)
        rows = []
        for name, command in _commands(str(Path(tmp) / "bank")).items():
            if args.no_stages and name.startswith("pituning train-expert"):
                continue
            times = _time(command, args.repeats)
            rows.append({"command": name, "median_s": statistics.median(times), "times_s": times})
            rows[-1]["imports"] = _heavy_imports(command)
    reference = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_import_torch"] = row["median_s"] / reference
    result = {
        "command": "python benchmarks/startup/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Start-up time of the `pituning` command",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
        f"torch {result['machine']['torch']}  ",
        f"Load average (1, 5, 15 min) at the start {load_start}, at the end {result['load_average_end']}  ",
        f"Median of {args.repeats} fresh processes each, after one warm-up run.",
        "",
        "| command | median (s) | vs `import torch` | imports |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        imports = ", ".join(row["imports"]) or "none of torch, lightning, transformers"
        lines.append(f"| {row['command']} | {row['median_s']:.2f} | {row['ratio_to_import_torch']:.2f}x | {imports} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

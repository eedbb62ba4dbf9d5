"""The committed benchmark scripts still run (tiny sizes; the numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bank_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "bank" / "run.py"
    done = subprocess.run(
        [sys.executable, str(script), "--sizes", "60", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "bank.json").read_text())
    run = results["runs"][0]
    assert run["size"] == 60 and len(run["topk_result"]) == 5
    assert "| list + filter, warm handle |" in (tmp_path / "bank.md").read_text()

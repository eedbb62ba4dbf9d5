"""The committed benchmark scripts still run (tiny sizes; the numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = ROOT / "benchmarks" / "speed" / name
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    _script("run.py", tmp_path=tmp_path)
    results = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert results["settings"]["smoke"] and results["machine"]["cpu"] and results["machine"]["torch"]
    items = results["items"]
    assert set(items) == {"a_peft", "b_interpolation", "c_fisher", "d_memory", "e_bank"}
    for item in items.values():
        assert "goal" in item and "met" in item
    assert items["c_fisher"]["per_sample_vs_naive_relative_difference"] <= 1e-4
    assert set(items["d_memory"]["variants"]) == {"single", "k3"}
    markdown = (tmp_path / "speed_cpu.md").read_text()
    assert "| a. LoRA step, pituning / PEFT |" in markdown and "Smoke run" in markdown


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path: Path) -> None:
    args = ("--compile", "--compile-backend", "aot_eager")  # the compile path, without inductor's C++ build
    done = _script("gpu.py", *args, tmp_path=tmp_path)
    results = json.loads((tmp_path / "speed_gpu_smoke.json").read_text())
    variants = results["throughput"]["variants"]
    assert "pituning bf16 backbone, compiled" in variants and "peft bf16 autocast" in variants
    assert all(row["samples_per_s"] > 0 for row in variants.values())
    assert results["fisher"]["per_sample_vs_naive_relative_difference"] <= 1e-4
    if results["device_type"] == "cpu":
        assert not results["gpu_measured"] and results["goal_met"] == "not measured"
        assert "no GPU results were measured" in done.stdout
        assert "no GPU results were measured" in (tmp_path / "speed_gpu_smoke.md").read_text()

"""The reliability catalogue (``benchmarks/reliability/run.py``) in smoke mode: its report is written and its goals
hold (0 acknowledged adds lost, 0 silent bit flips, 0 raw exceptions, 0 files touched outside the bank, 0 hostile
PEFT adapters accepted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliability_run", ROOT / "benchmarks" / "reliability" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of the whole catalogue (about 30 s on 2 cores), shared by the tests below."""
    root = tmp_path_factory.mktemp("reliability")
    results = _load_script().main(["--smoke", "--out", str(root / "results"), "--work", str(root / "work")])
    results["_out"] = root / "results"
    return results


def test_report_is_written(report: dict[str, Any]) -> None:
    out = report["_out"]
    saved = json.loads((out / "reliability.json").read_text())
    assert saved["command"] == "python benchmarks/reliability/run.py --smoke"
    assert saved["machine"]["cpus"] and len(saved["load_average"]["start"]) == 3
    assert set(saved["items"]) == {"a_kill", "b_gc_race", "c_bit_flips", "d_hostile_paths", "e_hostile_adapters"}
    markdown = (out / "reliability.md").read_text()
    assert "Goal: 0 acknowledged adds lost, 100% of flips detected or harmless, 0 raw exceptions" in markdown
    assert "## c. one-bit flips" in markdown and "Load average" in markdown
    a, b, c = (report["items"][k] for k in ("a_kill", "b_gc_race", "c_bit_flips"))
    assert a["trials"] == 3 and a["acknowledged_adds"] > 0 and b["acknowledged_adds"] > 0
    assert c["flips"] == 2 * 7 and c["reference_deterministic"]
    assert report["items"]["e_hostile_adapters"]["controls_ok"]  # the untouched adapters do import


def test_no_acknowledged_add_is_lost(report: dict[str, Any]) -> None:
    a, b = report["items"]["a_kill"], report["items"]["b_gc_race"]
    assert a["lost"] == 0, a["lost_examples"]
    assert a["torn_unacknowledged"] == 0
    assert b["unreadable"] == 0, b["unreadable_examples"]
    assert b["corruption_errors"] == 0 and b["verify_problems_during_race"] == 0, b["exception_examples"]


def test_bit_flips_are_detected_or_harmless(report: dict[str, Any]) -> None:
    c = report["items"]["c_bit_flips"]
    assert c["silent"] == 0 and c["raw_exceptions"] == 0, c["failures"]
    assert c["gc_deleted_intact_folder"] == 0, c["failures"]


def _raw(result: dict[str, Any]) -> list[str]:
    """The raw exceptions an item recorded, one short line each (for the assertion message)."""
    lines = [f"{e['type']}: {e['message'][:200]}" for e in result.get("raw_examples", [])]
    lines += [f"{e['side']}: {e['type']}: {e['message'][:200]}" for e in result.get("exception_examples", [])]
    for row in result.get("failures", []):
        error = row.get("error") or {}
        where = " / ".join(str(row[k]) for k in ("group", "case", "op", "file", "detail") if k in row)
        if row.get("outcome") == "raw exception":
            lines.append(f"{where}: {error.get('type', '')} {error.get('message', '')[:200]}")
    return lines


@pytest.mark.parametrize("item", ["a_kill", "b_gc_race", "c_bit_flips", "d_hostile_paths", "e_hostile_adapters"])
def test_no_raw_exceptions(report: dict[str, Any], item: str) -> None:
    result = report["items"][item]
    assert result["raw_exceptions"] == 0, "\n".join(_raw(result))


def test_nothing_outside_the_bank_is_touched(report: dict[str, Any]) -> None:
    d = report["items"]["d_hostile_paths"]
    assert d["touched_outside"] == 0, [t for t in d["failures"] if t["touched_outside"]]


def test_hostile_adapters_are_refused(report: dict[str, Any]) -> None:
    e = report["items"]["e_hostile_adapters"]
    assert e["unpickling_attempts"] == []
    assert e["silently_accepted"] == 0, [r["case"] for r in e["failures"] if r["outcome"] == "silently accepted"]
    assert e["model_left_dirty"] == 0 and e["bank_changed_on_refusal"] == 0


def test_goals_summary(report: dict[str, Any]) -> None:
    missed = [goal for goal, met in report["goals"]["met"].items() if not met]
    assert missed == [], {k: v for k, v in report["goals"].items() if k != "met"}

"""The ranking measures of ``benchmarks/recycling/predictors.py`` (Regret@k, NDCG@k, weighted Kendall τ) on hand-worked
rankings, and its report on a transfer study written here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recycling" / "predictors.py"
MEASURED = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}
PERFECT = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
REVERSED = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}


@pytest.fixture(scope="module")
def predictors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("predictors_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regret_in_points(predictors: ModuleType) -> None:
    assert predictors.regret(PERFECT, MEASURED, 1) == 0.0
    assert predictors.regret(REVERSED, MEASURED, 1) == pytest.approx(30.0)  # picks d: 0.9 - 0.6
    assert predictors.regret(REVERSED, MEASURED, 3) == pytest.approx(10.0)  # d, c, b: 0.9 - 0.8


def test_ndcg_against_the_worked_value(predictors: ModuleType) -> None:
    assert predictors.ndcg(PERFECT, MEASURED, 3) == pytest.approx(1.0)
    # gains (measured - worst): a .3, b .2, c .1, d 0; the reversed top 3 is d, c, b
    ideal = 0.3 + 0.2 / math.log2(3) + 0.1 / 2
    got = 0.0 + 0.1 / math.log2(3) + 0.2 / 2
    assert predictors.ndcg(REVERSED, MEASURED, 3) == pytest.approx(got / ideal)
    assert predictors.ndcg(PERFECT, dict.fromkeys(MEASURED, 0.5), 3) == 1.0  # nothing to gain: every order is ideal


def test_weighted_tau_signs(predictors: ModuleType) -> None:
    pytest.importorskip("scipy")
    assert predictors.weighted_tau(PERFECT, MEASURED) == pytest.approx(1.0)
    assert predictors.weighted_tau(REVERSED, MEASURED) == pytest.approx(-1.0)


def test_report_from_a_transfer_study(predictors: ModuleType, tmp_path: Path) -> None:
    """Every predictor is ranked against each transfer measure; what each needs is said, a rescored study's drift is
    reported, and a suite without the source-free predictors is named."""
    pytest.importorskip("scipy")
    run = {
        "sources": list(MEASURED),
        "fine_tuned": MEASURED,
        "zero_shot": {},
        "predictors": {"fisher_probe": PERFECT, "fisher_at_source": REVERSED},
        "reproduced": {"fisher_probe": 0.002},
    }
    (tmp_path / "transfer_text.json").write_text(json.dumps({"runs": {"t/0": run, "t/1": run}}))
    assert predictors.main(tmp_path) == 0
    out = json.loads((tmp_path / "predictors.json").read_text())
    summary = out["summary"]
    assert summary["text|fisher_probe|fine_tuned"]["regret1"] == [0.0, 0.0]
    assert summary["text|fisher_at_source|fine_tuned"]["regret1"][0] == pytest.approx(30.0)
    assert summary["text|fisher_at_source|fine_tuned"]["runs"] == 2
    assert out["reproduced"] == {"text": {"fisher_probe": 0.002}}
    text = (tmp_path / "predictors.md").read_text()
    assert "| text | fisher_at_source | fine_tuned | -1.00 ± 0.00 | 30.00 ± 0.00 | 10.00 ± 0.00 |" in text
    assert "`fisher_at_source`: each source's weights only" in text
    assert "text: fisher_probe 2.0e-03" in text
    assert "Source-free predictors not measured yet on: vision, vision_language" in text

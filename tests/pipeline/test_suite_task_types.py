"""`pituning run` beyond classification: a text-to-text (T5) suite and an image-caption matching (CLIP) suite embed
every task and interpolate, through the same typed pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pituning.bank import ExpertBank
from pituning.config import SuiteConfig, TaskSpec
from pituning.suite import run_suite
from tiny import tiny_model_dir


def _check(results: dict[str, Any], output: Path, sources: list[str]) -> None:
    bank = ExpertBank(output / "bank")
    for name in [*sources, "target_s0"]:
        assert bank.entry(name).has_embedding, name  # every task embedded, the target too
    row = results["rows"][0]
    assert len(row["sources"]) == 1 and 0.0 <= row["pi"] <= 1.0 and 0.0 <= row["best_source_init"] <= 1.0
    assert "target_s0_pi" in bank
    assert set(json.loads((output / "graph" / "graph.json").read_text())["names"]) == {*sources, "target_s0"}


def test_run_suite_text_to_text(tasks: dict[str, str], tmp_path: Path) -> None:
    t5 = str(tiny_model_dir(tmp_path / "t5", "t5"))
    output = tmp_path / "run"
    cfg = SuiteConfig(
        backbone=t5,
        data_class="pituning.data.TextClassificationDataModule",
        sources=[TaskSpec("close", tasks["close"]), TaskSpec("far1", tasks["far1"])],
        targets=[TaskSpec("target", tasks["target"])],
        data={
            "tokenizer": t5,
            "max_length": 16,
            "batch_size": 16,
            "max_train_examples": 48,
            "max_eval_examples": 48,
            "text_to_text": True,
            "label_names": ["neg", "pos"],
        },
        expert={"kind": "lora", "r": 2, "alpha": 4},
        k=1,
        shots=4,
        output=str(output),
        task_type="text_to_text",
        backbone_task="seq2seq-lm",
        baselines=["best_source_init"],
        source_epochs=1,
        target_epochs=1,
        accelerator="cpu",
    )
    _check(run_suite(cfg), output, ["close", "far1"])


def _captioned_images(path: Path, n: int = 48) -> Path:
    """``n`` images whose caption class is their colour (the matching task's labels are caption words)."""
    rng = np.random.default_rng(0)
    names = ["w10", "w11", "w12"]
    labels = np.arange(n) % len(names)
    base = rng.integers(0, 255, (len(names), 1, 1, 3))
    images = np.clip(base[labels] + rng.integers(-30, 30, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels, label_names=np.array(names))
    return path


def test_run_suite_matching(tmp_path: Path) -> None:
    clip = str(tiny_model_dir(tmp_path / "clip", "clip"))
    npz = str(_captioned_images(tmp_path / "colours.npz"))
    output = tmp_path / "run"
    cfg = SuiteConfig(
        backbone=clip,
        data_class="pituning.data.VisionLanguageDataModule",
        sources=[TaskSpec("a", npz), TaskSpec("b", npz, {"caption_template": "w2 {}"})],
        targets=[TaskSpec("target", npz, {"caption_template": "w1 {}"})],
        data={"tokenizer": clip, "mode": "matching", "image_size": 16, "batch_size": 8},
        expert={"kind": "lora", "r": 2, "alpha": 4},
        k=1,
        shots=4,
        output=str(output),
        task_type="matching",
        baselines=["best_source_init"],
        source_epochs=1,
        target_epochs=1,
        accelerator="cpu",
    )
    _check(run_suite(cfg), output, ["a", "b"])

"""The stage configs run under DDP on 2 CPU processes (gloo), and 2 processes give the same embedding as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pituning import ExpertBank
from tiny import tiny_suite

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _pituning(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("pituning")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "pituning.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)


def test_train_and_embed_under_ddp(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = str(tmp_path / "bank")
    data = {
        "class_path": "pituning.data.TextClassificationDataModule",
        "init_args": {
            "dataset": tasks["close"],
            "tokenizer": tiny_backbone,
            "task_name": "close",
            "max_length": 16,
            "batch_size": 8,
            "max_train_examples": 50,  # not a multiple of 2 x 8: ranks get uneven shares
        },
    }
    trainer = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    train = {
        "model": {"backbone": tiny_backbone, "expert": {"kind": "lora", "r": 4}, "expert_name": "close", "bank": bank},
        "data": data,
        "trainer": {**trainer, "max_epochs": 1, "strategy": "ddp", "devices": 2},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    done = _pituning("train-expert", "--config", str(tmp_path / "train.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ExpertBank(bank).names() == ["close"]

    embed = {"model": {"backbone": tiny_backbone, "bank": bank, "expert_name": "close"}, "data": data}
    single = {**embed, "trainer": {**trainer, "devices": 1}}
    double = {**embed, "trainer": {**trainer, "devices": 2, "strategy": "ddp"}}
    results = []
    for name, config in (("single", single), ("double", double)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        done = _pituning("embed", "--config", str(tmp_path / f"{name}.yaml"))
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(ExpertBank(bank).get("close").embedding)
    one, two = results
    assert one is not None and two is not None
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-12)

    # stage 3 under DDP: the pool of one source and a fresh target expert collapses on rank zero
    interp = {
        "model": {"backbone": tiny_backbone, "bank": bank, "target": "close", "sources": ["close"], "k": 1},
        "data": {**data, "init_args": {**data["init_args"], "shots": 8}},
        "trainer": {**trainer, "max_epochs": 1, "strategy": "ddp", "devices": 2},
    }
    (tmp_path / "interp.yaml").write_text(yaml.safe_dump(interp))
    done = _pituning("interpolate", "--config", str(tmp_path / "interp.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ExpertBank(bank).get("close_pi").provenance["sources"] == ["close"]


def test_run_suite_under_ddp(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    """``pituning run`` with 2 devices: Lightning re-runs the command on rank 1, which must neither print nor write
    twice; the Fisher count covers both ranks."""
    suite = tiny_suite(tiny_backbone, tasks, tmp_path / "run", devices=2)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    done = _pituning("run", "--config", str(tmp_path / "suite.yaml"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("source close: training the expert") == 1  # rank zero speaks
    assert done.stdout.count("target target_s1: uniform_average\n") == 1  # announced once (then its result)
    assert done.stdout.count("source far1: embedded (Fisher over 96 examples)") == 1  # 48 per rank, summed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["rows"]) == 1 and set(results["sources"]) == {"close", "far1"}
    stored = set(ExpertBank(tmp_path / "run" / "bank").names())
    assert {"target_s1_uniform_average_merged", "target_s1_pi", "probe"} <= stored

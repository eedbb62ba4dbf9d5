"""Shared test set-up: helpers import from this folder; transformers stays quiet and offline; a tiny BERT with its
tokenizer and synthetic domain tasks for the pipeline tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import logging
import warnings
from pathlib import Path

import pytest

from tiny import domain, keyword_task, task_keywords, tiny_bert_dir


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*batching rule.*")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_bert_dir(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="session")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three source domains and a target drawn from domain 0 (the close source's)."""
    root = tmp_path_factory.mktemp("tasks")
    out = {
        name: str(keyword_task(root / f"{name}.jsonl", task_keywords(i), 400, seed=1, vocabulary=domain(i)))
        for name, i in (("close", 0), ("far1", 1), ("far2", 2))
    }
    out["target"] = str(keyword_task(root / "target.jsonl", task_keywords(0), 600, seed=7, vocabulary=domain(0)))
    return out

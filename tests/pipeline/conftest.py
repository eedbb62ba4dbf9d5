"""Fixtures of the pipeline tests: a tiny BERT with its tokenizer, synthetic domain tasks, quiet Lightning."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from tiny import domain, keyword_task, tiny_bert_dir


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*batching rule.*")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_bert_dir(tmp_path_factory.mktemp("tiny") / "bert"))


def task_keywords(index: int) -> tuple[list[str], list[str]]:
    words = domain(index)
    return words[:2], words[2:4]


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


def trainer(**kwargs: Any) -> Any:
    import lightning.pytorch as pl

    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def text_data(path: str, backbone: str, name: str, **kwargs: Any) -> Any:
    from pituning.data import TextClassificationDataModule

    options: dict[str, Any] = {"batch_size": 32, "max_length": 16}
    return TextClassificationDataModule(path, backbone, name, **{**options, **kwargs})


def bank_dir(path: Path) -> str:
    return str(path / "bank")

"""``pituning.suite`` helpers (whole suites run in tests/integration/test_cli_pipeline.py)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import pituning.backbones
from pituning import ExpertBank
from pituning.errors import ConfigError
from pituning.suite import (
    SuiteConfig,
    TaskSpec,
    evaluate_quality,
    expert_quality,
    make_probe,
    paired_difference,
)


def test_make_probe_reuses_a_matching_probe_and_replaces_a_stale_one(
    tiny_backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # regression: a probe left by a run with another expert config was reused, and embedding the new experts at it
    # failed ("the embedding covers other tensors than its weights")
    bank = ExpertBank(tmp_path / "bank")
    assert make_probe(tiny_backbone, {"kind": "lora", "r": 2}, bank) == "probe"
    with monkeypatch.context() as patch:  # same backbone, config and seed: kept, nothing is rebuilt
        patch.setattr(pituning.backbones, "load_backbone", lambda *a, **k: pytest.fail("the probe was rebuilt"))
        make_probe(tiny_backbone, {"kind": "lora", "r": 2}, bank)
    make_probe(tiny_backbone, {"kind": "adapter", "bottleneck": 4}, bank)
    assert bank.get("probe").config.kind == "adapter"
    make_probe(tiny_backbone, {"kind": "adapter", "bottleneck": 4}, bank, seed=1)
    assert bank.get("probe").provenance["probe_seed"] == 1


def test_expert_quality_flags_an_expert_that_only_learned_the_prior() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, -1])  # -1: no class (a text-to-text target that spells none)
    prior_only = expert_quality(torch.tensor([0, 0, 0, 0, 0, 1]), labels)
    assert prior_only.acc == pytest.approx(0.6) and prior_only.majority_share == 1.0
    assert prior_only.true_majority_share == pytest.approx(0.6) and prior_only.collapsed
    good = expert_quality(torch.tensor([0, 0, 0, 1, 0, 1]), labels)
    assert good.acc == pytest.approx(0.8) and not good.collapsed
    assert good.to_dict() == {"acc": good.acc, "majority_share": 0.8, "true_majority_share": 0.6, "collapsed": False}
    with pytest.raises(ConfigError, match="two 1-D tensors"):
        expert_quality(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="No labelled example"):
        expert_quality(torch.tensor([0]), torch.tensor([-1]))


def test_evaluate_quality_uses_the_modules_predictions_and_restores_its_mode() -> None:
    class Constant(torch.nn.Module):
        device = torch.device("cpu")

        def predict_classes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            assert not self.training
            return torch.zeros_like(batch["labels"])

        def class_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return batch["labels"]

    module = Constant()
    batches = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([0, 0])}]
    quality = evaluate_quality(module, batches)
    assert (quality.acc, quality.majority_share, quality.collapsed) == (0.75, 1.0, True)
    assert module.training
    with pytest.raises(ConfigError, match="empty"):
        evaluate_quality(module, [])


def test_paired_difference_needs_pairs() -> None:
    assert paired_difference([0.5], [0.25]) == {"mean": 25.0, "std": 0.0, "wins": 1, "n": 1}
    with pytest.raises(ConfigError, match="equally long"):
        paired_difference([0.5, 0.6], [0.5])
    with pytest.raises(ConfigError, match="non-empty"):
        paired_difference([], [])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embed_examples", 0, "embed_examples must be at least 1"),
        ("collapsed_sources", "ignore", r"collapsed_sources must be one of \['warn', 'exclude', 'error'\]"),
        ("data", {"shots": 4}, r"data options \['shots'\] are set by the suite"),
        ("interpolation", {"k": 3}, "Unknown interpolation option.*'k'.*move it to the top level"),
        ("module", {"lrr": 0.1}, r"'lrr' \(did you mean 'lr'\?\)"),
        ("k", 2, "k=2 but the suite has only 1 source"),
        ("baselines", ["oracle"], "baselines"),
    ],
)
def test_run_suite_checks_its_config_before_any_work(tmp_path: Path, field: str, value: object, message: str) -> None:
    sources = [TaskSpec("a", "a.jsonl")]
    with pytest.raises(ConfigError, match=message):  # the typed config refuses it when built, before any work
        SuiteConfig("no-such-backbone", "x.Y", sources, [], output=str(tmp_path / "run"), **{"k": 1, field: value})
    assert not (tmp_path / "run").exists()  # nothing written, no backbone loaded


def test_every_input_is_checked_before_anything_trains(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    """A misspelt DataModule option, a missing target file, too many shots, a backbone that is no directory and an
    output that is a file: every problem reported at once, before any model loads, and nothing written."""
    from pituning.suite import run_suite
    from tiny import tiny_suite

    typo = tiny_suite(tiny_backbone, tasks, tmp_path / "run", data={"tokenizer": tiny_backbone, "max_lenght": 16})
    with pytest.raises(ConfigError, match=r"data: unknown TextClassificationDataModule option\(s\) 'max_lenght' "
                       r"\(did you mean 'max_length'\?\)"):  # fmt: skip
        run_suite(SuiteConfig(**typo))
    assert not (tmp_path / "run").exists()  # nothing written
    (tmp_path / "output_file").write_text("not a folder")
    suite = tiny_suite(
        tiny_backbone,
        tasks,
        tmp_path / "output_file",
        shots=500,
        targets=[{"name": "target", "dataset": tasks["target"]}, {"name": "gone", "dataset": str(tmp_path / "x.csv")}],
    )
    with pytest.raises(ConfigError) as err:
        run_suite(SuiteConfig(**{**suite, "backbone": str(tmp_path / "no_such_model")}))
    message = str(err.value)
    assert "4 problem(s); nothing was trained" in message
    assert "target target: Task 'target': class" in message and "fewer than shots=500 (what remains" in message
    assert "target gone: Could not load dataset" in message
    assert "backbone: No backbone directory at" in message
    assert f"output: The output location {tmp_path / 'output_file'} is a file; pass a directory" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output_file"]  # nothing written


@pytest.mark.parametrize("damage", [b'{"a": {"recipe": {"x": 1}, "res', b"\x00\xff not json", b"[1, 2]"])
def test_a_torn_resume_file_means_recompute(tmp_path: Path, damage: bytes) -> None:
    """A ``sources.json`` / ``runs.json`` cut by a crash (or damaged) is read as "nothing measured", never a crash,
    and the next write replaces it whole (atomically)."""
    import json

    from pituning.pipeline import ResumeCache

    path = tmp_path / "runs.json"
    path.write_bytes(damage)
    cache = ResumeCache(path)
    assert cache.get("a", {"x": 1}) is None
    cache.put("a", {"x": 1}, {"acc": 0.5})
    assert json.loads(path.read_text()) == {"a": {"recipe": {"x": 1}, "result": {"acc": 0.5}}}
    assert ResumeCache(path).get("a", {"x": 1}) == {"acc": 0.5} and ResumeCache(path).get("a", {"x": 2}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.json"]  # no temporary file left


def test_progress_estimates_the_time_left_from_the_items_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed suite reads its first items from the cache in no time: the estimate waits for an item that ran and
    then counts only those, instead of announcing "about 0 s left" or a fraction of the real time."""
    import pituning.suite as suite

    ticks = [0.0, 0.01, 0.01, 0.02, 0.02, 600.02, 600.02, 1200.02, 1200.02, 1800.02]  # two cached items, then three ran
    clock = iter(ticks)
    monkeypatch.setattr(suite, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    said: list[str] = []
    suite._each(["a", "b", "c", "d", "e"], "sources", said.append, lambda item: item)
    assert said == [
        "sources: 1 of 5 done",
        "sources: 2 of 5 done",
        "sources: 3 of 5 done, about 20 min left",
        "sources: 4 of 5 done, about 10 min left",
    ]

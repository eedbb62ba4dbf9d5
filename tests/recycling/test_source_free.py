"""Source-free ranking of a zoo of imported PEFT adapters from a target's shots alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from pituning import ConfigError, ExpertModel, LoraConfig
from pituning.bank import ExpertBank
from pituning.errors import BankError
from pituning.heads import TaskModel
from pituning.recycling.heads import HeadChoice, cross_validated_loss, fit_linear_head
from pituning.recycling.source_free import (
    few_shot_loss,
    fisher_at_source,
    rank_sources,
    score_sources,
    shot_fisher,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_few_shot_loss_ranks_the_adapter_that_labels_the_target_first(zoo: Any) -> None:
    report = score_sources(zoo.backbone, zoo.bank, zoo.names, zoo.shots)
    assert len(zoo.names) >= 20 and not report.unscored
    assert report.ranked[0][0] == zoo.right
    assert report.ranked == sorted(report.ranked, key=lambda item: -item[1])
    # imported adapters have no head: every source is scored with a head refitted on the shots, and says so
    assert {choice.kind for choice in report.heads.values()} == {"refit"}
    assert "no stored head" in report.heads[zoo.right].reason
    assert report.accuracy[zoo.right] >= max(report.accuracy.values()) - 1e-9
    assert rank_sources(zoo.backbone, zoo.bank, zoo.names, zoo.shots) == report.ranked  # deterministic


def test_fisher_at_source_scores_the_reference_layout_and_reports_every_other(zoo: Any) -> None:
    same = [n for n, spec in zoo.layouts.items() if spec == zoo.probe_layout]
    report = score_sources(
        zoo.backbone, zoo.bank, [*zoo.names, zoo.probe], zoo.shots, predictor="fisher_at_source", reference=zoo.probe
    )
    assert sorted(n for n, _ in report.ranked) == sorted([*same, zoo.probe])
    assert report.ranked[0][0] == zoo.probe and report.ranked[0][1] == pytest.approx(1.0)  # the reference itself
    assert all(0.0 <= score <= 1.0 + 1e-6 for _, score in report.ranked)
    assert set(report.unscored) == set(zoo.names) - set(same)
    assert all("layout" in why for why in report.unscored.values())
    assert report.reference_head is not None and report.reference_head.kind == "refit"
    with pytest.raises(BankError, match=r"could not be scored.*zoo01: ConfigError.*on_unscored='warn'"):
        rank_sources(zoo.backbone, zoo.bank, zoo.names, zoo.shots, predictor="fisher_at_source", reference=zoo.probe)


def test_fisher_reference_may_be_given_as_a_fisher(zoo: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = ExpertModel(zoo.backbone).eval()
    zoo.bank.load_into(model, zoo.probe)
    task = TaskModel(model, "classification", 2)
    features_head = fit_linear_head(*_features(task, zoo), 2)
    task.head.load_state_dict(features_head)
    reference = shot_fisher(task, zoo.probe, zoo.shots)
    model.remove_expert(zoo.probe)
    by_name = score_sources(
        model, zoo.bank, zoo.names, zoo.shots, predictor="fisher_at_source", reference=zoo.probe
    ).ranked
    with caplog.at_level(logging.WARNING):
        by_fisher = rank_sources(
            model,
            zoo.bank,
            zoo.names,
            zoo.shots,
            predictor="fisher_at_source",
            reference=reference,
            on_unscored="warn",
        )
    assert [n for n, _ in by_fisher] == [n for n, _ in by_name]
    torch.testing.assert_close(torch.tensor([s for _, s in by_fisher]), torch.tensor([s for _, s in by_name]))
    assert "could not be scored" in caplog.text


def _features(task: TaskModel, zoo: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from pituning.recycling.heads import head_features

    return head_features(task, zoo.shots)


def test_the_model_and_random_state_are_left_as_they_were(zoo: Any) -> None:
    model = ExpertModel(zoo.backbone).train()
    model.add_expert("mine", LoraConfig(r=2))
    before = {k: v.clone() for k, v in model.expert_state_dict("mine").items()}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    rank_sources(model, zoo.bank, zoo.names[:2], zoo.shots)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert list(model.experts) == ["mine"] and model.active == ["mine"] and model.training
    for key, value in model.expert_state_dict("mine").items():
        assert torch.equal(value, before[key])


def test_unscorable_candidates_are_reported_with_the_reason(zoo: Any, tmp_path: Path) -> None:
    report = score_sources(zoo.backbone, zoo.bank, [zoo.right, "nowhere"], zoo.shots, head="source")
    assert report.ranked == []
    assert "no stored head" in report.unscored[zoo.right]
    assert "nowhere" in report.unscored["nowhere"]
    other = ExpertModel(zoo.backbone)
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)  # another backbone: its fingerprint differs
    report = score_sources(other, zoo.bank, [zoo.right], zoo.shots)
    assert "BackboneMismatchError" in report.unscored[zoo.right]
    assert score_sources(other, zoo.bank, [zoo.right], zoo.shots, allow_backbone_mismatch=True).ranked


def test_stored_heads_are_reused_only_where_they_fit_the_target(zoo: Any, tmp_path: Path) -> None:
    bank = ExpertBank(tmp_path / "bank")
    right = zoo.bank.get(zoo.right)
    swapped = {k: v.flip(0) for k, v in zoo.head.items()}  # the same classes, in the other order
    three = {"weight": torch.randn(3, 32), "bias": torch.zeros(3)}
    for name, head in (("true", zoo.head), ("swapped", swapped), ("three", three)):
        right.name, right.head = name, head
        bank.add(right)
    report = score_sources(zoo.backbone, bank, ["true", "swapped", "three"], zoo.shots)
    assert report.heads["true"].kind == "source" and report.heads["true"].check is not None
    assert report.heads["true"].check.accuracy == 1.0
    assert report.heads["swapped"].kind == "refit" and "not above chance" in report.heads["swapped"].reason
    assert report.heads["three"].kind == "refit" and "3 classes" in report.heads["three"].reason
    assert report.ranked[0][0] == "true"  # its head was trained for these classes: lowest loss of all
    forced = score_sources(zoo.backbone, bank, ["true", "swapped"], zoo.shots, head="source")
    assert dict(forced.ranked)["swapped"] < dict(forced.ranked)["true"]  # unchecked: the swapped head is scored
    refit = score_sources(zoo.backbone, bank, ["true", "swapped", "three"], zoo.shots, head="refit")
    scores = [s for _, s in refit.ranked]
    assert max(scores) - min(scores) < 1e-6  # one expert: the same features, the same refitted head


def test_few_shot_loss_and_fisher_at_source_on_a_loaded_model(zoo: Any) -> None:
    model = ExpertModel(zoo.backbone).eval()
    zoo.bank.load_into(model, zoo.right)
    task = TaskModel(model, "classification", 2)
    own = few_shot_loss(task, zoo.shots, HeadChoice("source", "test", dict(zoo.head)))
    refit = few_shot_loss(task, zoo.shots, HeadChoice("refit", "test"), folds=len(zoo.shots[0]["labels"]) * 2)
    assert own > -0.1 and refit < 0  # leave-one-out with the refitted head
    reference = shot_fisher(task, zoo.right, zoo.shots)
    assert fisher_at_source(task, zoo.right, zoo.shots, reference).value == pytest.approx(1.0)
    model.set_active([])
    with pytest.raises(ConfigError, match="not active"):
        shot_fisher(task, zoo.right, zoo.shots)


def test_options_are_validated(zoo: Any) -> None:
    args = (zoo.backbone, zoo.bank, zoo.names[:1], zoo.shots)
    with pytest.raises(ConfigError, match="predictor must be one of"):
        rank_sources(*args, predictor="oracle")
    with pytest.raises(ConfigError, match="needs reference="):
        rank_sources(*args, predictor="fisher_at_source")
    with pytest.raises(ConfigError, match="head must be one of"):
        rank_sources(*args, head="best")
    with pytest.raises(ConfigError, match="on_unscored must be one of"):
        rank_sources(*args, on_unscored="ignore")
    with pytest.raises(ConfigError, match="No shots"):
        rank_sources(zoo.backbone, zoo.bank, zoo.names[:1], [])
    with pytest.raises(ConfigError, match="have no 'labels'"):
        rank_sources(zoo.backbone, zoo.bank, zoo.names[:1], [{"input_ids": zoo.shots[0]["input_ids"]}])
    with pytest.raises(BankError, match="reference 'nowhere' cannot be used"):
        rank_sources(*args, predictor="fisher_at_source", reference="nowhere")


def test_refitted_heads_are_deterministic_and_cross_validated() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    head = fit_linear_head(x, y, 2)
    assert torch.equal(head["weight"], fit_linear_head(x, y, 2)["weight"])
    assert ((x @ head["weight"].T + head["bias"]).argmax(-1) == y).float().mean() == 1.0
    loss, accuracy = cross_validated_loss(x, y, 2, folds=5)
    assert accuracy >= 0.9 and loss < 0.5
    noise, chance = cross_validated_loss(x, torch.randint(0, 2, (40,), generator=gen), 2, folds=40)
    assert noise > loss and chance < accuracy  # random labels: held out, nothing to learn
    with pytest.raises(ConfigError, match="labels span"):
        fit_linear_head(x, y + 1, 2)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        cross_validated_loss(x, y, 2, folds=1)

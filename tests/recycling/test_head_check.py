"""The head check: a source head is reused only where it classifies the target's shots above chance."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from pituning import ConfigError, ExpertModel, LoraConfig
from pituning.heads import TaskModel
from pituning.recycling.heads import check_head, head_features, reuse_head

Shots = Callable[..., tuple[list[dict[str, Tensor]], dict[str, Tensor]]]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def source(tiny_backbone: str) -> ExpertModel:
    """The tiny BERT with a random LoRA source expert, active."""
    model = ExpertModel(tiny_backbone).eval()
    model.add_expert("src", LoraConfig(r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.expert_parameters("src").values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def test_a_matching_binary_head_is_reused_and_a_swapped_one_is_not(source: ExpertModel, shots_for: Shots) -> None:
    shots, head = shots_for(source, n=32)
    task = TaskModel(source, "classification", 2)
    own = {k: v.clone() for k, v in task.head.state_dict().items()}
    check = check_head(task, head, shots)
    assert check.accuracy == 1.0 and check.chance == 0.5 and check.majority_share == 0.5 and check.above_chance
    assert check.num_examples == 32 and check.num_classes == 2
    choice = reuse_head(task, head, shots)
    assert choice.kind == "source" and "above chance" in choice.reason
    assert choice.state is not None and torch.equal(choice.state["weight"], head["weight"])

    swapped = {k: v.flip(0) for k, v in head.items()}  # class 0 is the target's class 1: bare labels say nothing
    check = check_head(task, swapped, shots)
    assert check.accuracy < check.chance and not check.above_chance
    choice = reuse_head(task, swapped, shots)
    assert choice.kind == "refit" and "not above chance" in choice.reason and choice.check == check
    assert choice.state is not None
    features, labels = head_features(task, shots)
    refit = features @ choice.state["weight"].T + choice.state["bias"]
    assert (refit.argmax(-1) == labels).float().mean() == 1.0  # the refitted head fits the target's classes
    assert reuse_head(task, swapped, shots, refit=False).kind == "fresh"
    for key, value in task.head.state_dict().items():  # the task model's own head is untouched
        assert torch.equal(value, own[key])


def test_another_label_set_or_no_head_is_refitted(source: ExpertModel, shots_for: Shots) -> None:
    shots, _ = shots_for(source, n=16)
    task = TaskModel(source, "classification", 2)
    three = {"weight": torch.randn(3, 32), "bias": torch.zeros(3)}
    choice = reuse_head(task, three, shots)
    assert choice.kind == "refit" and "3 classes, the target 2" in choice.reason and choice.check is None
    assert reuse_head(task, None, shots).reason.endswith("the source has no stored head")
    with pytest.raises(ConfigError, match="3 classes"):
        check_head(task, three, shots)


def test_majority_baseline_refuses_a_head_that_always_answers_one_class(source: ExpertModel, shots_for: Shots) -> None:
    shots, _ = shots_for(source, n=16)
    labels = torch.cat([b["labels"] for b in shots])
    unbalanced = [{**b, "labels": torch.where(torch.arange(len(b["labels"])) % 4 == 0, b["labels"], 0)} for b in shots]
    share = float((torch.cat([b["labels"] for b in unbalanced]) == 0).float().mean())
    assert share > 0.5 and labels.float().mean() == 0.5
    constant = {"weight": torch.zeros(2, 32), "bias": torch.tensor([1.0, 0.0])}  # always class 0
    task = TaskModel(source, "classification", 2)
    assert reuse_head(task, constant, unbalanced).kind == "source"  # above chance 0.5 ...
    choice = reuse_head(task, constant, unbalanced, baseline="majority")
    assert choice.kind == "refit" and "majority" in choice.reason  # ... but no better than the majority class
    assert reuse_head(task, constant, unbalanced, margin=share).kind == "refit"


def test_matching_heads_have_no_classes_and_are_reused() -> None:
    from families import FAMILIES

    model = ExpertModel(FAMILIES["clip"].build()).eval()
    gen = torch.Generator().manual_seed(0)
    texts = {"input_ids": torch.randint(3, 99, (3, 5), generator=gen), "attention_mask": torch.ones(3, 5).long()}
    task = TaskModel(model, "matching", candidates=texts)
    shots = [{"pixel_values": torch.randn(6, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}]
    stored = {"logit_scale": torch.tensor(1.0)}
    choice = reuse_head(task, stored, shots)
    assert choice.kind == "source" and "no class dimension" in choice.reason
    assert choice.check is not None and choice.check.chance == pytest.approx(1 / 3)
    assert reuse_head(task, None, shots).kind == "fresh"
    with pytest.raises(ConfigError, match="linear head"):
        head_features(task, shots)


def test_bad_inputs_are_refused(source: ExpertModel, shots_for: Shots) -> None:
    shots, head = shots_for(source, n=8)
    task = TaskModel(source, "classification", 2)
    with pytest.raises(ConfigError, match="baseline must be one of"):
        reuse_head(task, head, shots, baseline="median")
    with pytest.raises(ConfigError, match="No shots"):
        reuse_head(task, head, [])
    with pytest.raises(ConfigError, match="labels span 0..2"):
        check_head(task, head, [{**shots[0], "labels": torch.tensor([0, 1, 2, 0])}])
    with pytest.raises(ConfigError, match="no 'labels'"):
        check_head(task, head, [{"input_ids": shots[0]["input_ids"]}])

"""Gradient-free mixture weights (LoraHub): the search, the merged-loss objective and the merged expert."""

from __future__ import annotations

import builtins
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from pituning import ExpertModel, LoraConfig
from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.errors import BackboneMismatchError, ConfigError, ExpertError
from pituning.experts import AdapterConfig
from pituning.heads import TaskModel
from pituning.recycling.search import (
    SearchResult,
    linear_merge,
    lorahub,
    mean_cross_entropy,
    merged_loss_objective,
    search_weights,
)

pytest.importorskip("nevergrad")


# ---------------------------------------------------------------------------------------------------- search
def _quadratic(target: list[float]) -> Any:
    return lambda w: sum((a - b) ** 2 for a, b in zip(w, target, strict=True))


def test_search_finds_the_minimum_of_a_quadratic() -> None:
    result = search_weights(_quadratic([0.6, -0.4]), 2, budget=40, l1=0.0)
    assert isinstance(result, SearchResult)
    assert result.weights == pytest.approx([0.6, -0.4], abs=0.05)
    assert result.loss == pytest.approx(0.0, abs=5e-3)
    assert result.penalised == result.loss  # l1 = 0
    assert [s for s, _ in result.history] == list(range(1, 41))
    assert min(v for _, v in result.history) == result.penalised


def test_l1_pulls_an_irrelevant_weight_to_zero() -> None:
    # the objective ignores w[1]: only the penalty sees it
    result = search_weights(lambda w: (w[0] - 1.0) ** 2, 2, budget=60, l1=0.1, init=[0.0, 0.8])
    assert abs(result.weights[1]) < 0.1
    assert result.penalised == pytest.approx(result.loss + 0.1 * sum(abs(w) for w in result.weights))
    unpenalised = search_weights(lambda w: (w[0] - 1.0) ** 2, 2, budget=60, l1=0.0, init=[0.0, 0.8])
    assert abs(result.weights[1]) < abs(unpenalised.weights[1])


@pytest.mark.parametrize("optimizer", ["NGOpt", "OnePlusOne", "RandomSearch"])
def test_search_is_reproducible_by_seed(optimizer: str) -> None:
    def run(seed: int) -> SearchResult:
        return search_weights(_quadratic([0.3, 0.2, -0.1]), 3, budget=15, seed=seed, optimizer=optimizer)

    assert run(3) == run(3)
    if optimizer != "NGOpt":  # NGOpt picks a deterministic optimiser at this size
        assert run(3).history != run(4).history


def test_bounds_are_respected_and_init_is_evaluated_first() -> None:
    seen: list[list[float]] = []

    def objective(w: list[float]) -> float:
        seen.append(list(w))
        return -sum(w)  # pushes every weight to the upper bound

    result = search_weights(objective, 3, budget=30, lower=-0.5, upper=0.7, l1=0.0, optimizer="RandomSearch")
    assert seen[0] == pytest.approx([1 / 3] * 3)
    assert all(-0.5 <= x <= 0.7 for w in seen for x in w)
    assert all(-0.5 <= x <= 0.7 for x in result.weights)


def test_progress_is_called_every_step() -> None:
    calls: list[tuple[int, int, float]] = []
    search_weights(_quadratic([0.1]), 1, budget=7, progress=lambda *args: calls.append(args))
    assert [c[0] for c in calls] == list(range(1, 8))
    assert all(c[1] == 7 for c in calls)
    bests = [c[2] for c in calls]
    assert bests == sorted(bests, reverse=True)  # best so far never grows


def test_non_finite_values_are_skipped() -> None:
    def objective(w: list[float]) -> float:
        return math.nan if w[0] > 0.5 else (w[0] - 0.2) ** 2

    result = search_weights(objective, 1, budget=25, l1=0.0, optimizer="RandomSearch", init=[0.9])
    assert math.isfinite(result.loss) and result.weights[0] <= 0.5
    assert result.history[0] == (1, math.inf)  # the start was NaN


def test_every_value_non_finite_raises() -> None:
    with pytest.raises(ExpertError, match="not finite at any"):
        search_weights(lambda w: math.inf, 2, budget=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n >= 1"),
        ({"budget": 0}, "budget"),
        ({"lower": 1.0, "upper": 1.0}, "lower < upper"),
        ({"l1": -0.1}, "l1"),
        ({"init": [0.5]}, "one weight per expert"),
        ({"init": [2.0, 0.0]}, "within the bounds"),
        ({"optimizer": "NoSuchOptimizer"}, "Unknown optimizer"),
    ],
)
def test_search_validates_its_options(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {"n": 2, **kwargs}
    n = options.pop("n")
    with pytest.raises(ConfigError, match=match):
        search_weights(_quadratic([0.0] * max(n, 1)), n, **options)


def test_missing_nevergrad_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "nevergrad" or name.startswith("nevergrad."):
            raise ImportError("No module named 'nevergrad'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"pip install 'pituning\[search\]'"):
        search_weights(_quadratic([0.0]), 1)


# ---------------------------------------------------------------------------------------------------- live merges
def _task_model(seed: int = 0) -> TaskModel:
    from transformers import BertConfig

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    return TaskModel(ExpertModel(config), "classification", 2)


def _random_expert(model: TaskModel, name: str, seed: int, config: Any = None) -> Expert:
    host = model.experts
    host.add_expert(name, config or LoraConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in host.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    expert = Expert.from_model(host, name, TaskInfo(name))
    host.remove_expert(name)
    return expert


def _batches(n: int = 2, size: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token 5 or 6 at a random place decides the label; the other tokens are filler."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 40, (size, 8), generator=gen)
        labels = torch.arange(size) % 2
        where = torch.randint(1, 8, (size,), generator=gen)
        ids[torch.arange(size), where] = 5 + labels
        ids[:, 0] = 2
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _slow_loss(model: TaskModel, expert: Expert, batches: list[dict[str, torch.Tensor]]) -> float:
    """Load ``expert`` from scratch into a fresh slot and compute the mean cross-entropy by hand."""
    host = model.experts
    was = host.active
    host.load_expert("slow", expert.config, expert.state)
    host.set_active("slow")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            count += len(batch["labels"])
    host.remove_expert("slow")
    host.set_active(was)
    return total / count


def test_merged_loss_matches_the_bank_average(tmp_path: Path) -> None:
    model = _task_model()
    experts = [_random_expert(model, "a", 1), _random_expert(model, "b", 2)]
    bank = ExpertBank(tmp_path / "bank")
    for e in experts:
        bank.add(e)
    batches = _batches()
    objective = merged_loss_objective(model, experts, batches)
    assert "lorahub" in model.experts.experts and model.experts.active == []
    for weights in ([0.7, -0.2], [0.1, 1.3], [0.7, -0.2]):
        fast = objective(list(weights))
        average = bank.average(["a", "b"], weights, name="avg", overwrite=True)
        assert fast == pytest.approx(_slow_loss(model, average, batches), abs=1e-6)
    assert objective.evaluations == 3
    assert model.experts.active == []  # restored after every call
    assert not any(p.requires_grad for p in model.experts.expert_parameters("lorahub").values())
    objective.close()
    assert "lorahub" not in model.experts.experts
    with pytest.raises(ExpertError, match="removed"):
        objective([0.5, 0.5])


def test_merged_loss_does_not_leak_state_between_calls() -> None:
    model = _task_model()
    experts = [_random_expert(model, "a", 1), _random_expert(model, "b", 2)]
    batches = _batches()
    with merged_loss_objective(model, experts, batches, slot="probe") as objective:
        first = objective([1.0, 0.0])
        objective([-1.4, 1.5])
        assert objective([1.0, 0.0]) == first
        assert first == pytest.approx(_slow_loss(model, experts[0], batches), abs=1e-6)
        assert objective([0.0, 0.0]) == pytest.approx(mean_cross_entropy(model, batches, active=[]), abs=1e-6)
    assert "probe" not in model.experts.experts


def test_merged_loss_with_a_custom_merge_and_adapters() -> None:
    model = _task_model()
    config = AdapterConfig(bottleneck=8)
    experts = [_random_expert(model, "a", 1, config), _random_expert(model, "b", 2, config)]
    batches = _batches(1)
    seen: list[list[float]] = []

    def first_only(states: Any, weights: Any) -> dict[str, torch.Tensor]:
        seen.append(list(weights))
        return {k: v * weights[0] for k, v in states[0].items()}

    with merged_loss_objective(model, experts, batches, merge=first_only) as objective:
        value = objective([1.0, 0.5])
    assert seen == [[1.0, 0.5]]
    assert value == pytest.approx(_slow_loss(model, experts[0], batches), abs=1e-6)
    merged = linear_merge([e.state for e in experts], [0.25, 0.75])
    for key, tensor in merged.items():
        assert torch.allclose(tensor, 0.25 * experts[0].state[key] + 0.75 * experts[1].state[key], atol=1e-6)


def test_merged_loss_errors() -> None:
    model = _task_model()
    lora = _random_expert(model, "a", 1)
    other_rank = _random_expert(model, "b", 2, LoraConfig(r=2, alpha=4))
    adapter = _random_expert(model, "c", 3, AdapterConfig(bottleneck=8))
    batches = _batches(1)
    with pytest.raises(ExpertError, match="of one kind"):
        merged_loss_objective(model, [lora, adapter], batches)
    with pytest.raises(ExpertError, match="configs differ"):
        merged_loss_objective(model, [lora, other_rank], batches)
    elsewhere = _random_expert(_task_model(seed=5), "d", 4)
    with pytest.raises(BackboneMismatchError, match="different backbones"):
        merged_loss_objective(model, [lora, elsewhere], batches)
    with pytest.raises(ConfigError, match="at least one expert"):
        merged_loss_objective(model, [], batches)
    with pytest.raises(ConfigError, match="labels"):
        merged_loss_objective(model, [lora], [{"input_ids": batches[0]["input_ids"]}])
    model.experts.add_expert("taken", LoraConfig(r=4))
    with pytest.raises(ExpertError, match="already has an expert 'taken'"):
        merged_loss_objective(model, [lora], batches, slot="taken")
    assert sorted(model.experts.experts) == ["taken"]  # nothing left behind by the failures
    with merged_loss_objective(model, [lora], batches) as objective, pytest.raises(ConfigError, match="one weight"):
        objective([1.0, 2.0])


def _train(model: TaskModel, name: str, batches: list[dict[str, torch.Tensor]], steps: int = 20) -> Expert:
    """A quick LoRA expert and head for the keyword task."""
    host = model.experts
    host.add_expert(name, LoraConfig(r=4, alpha=8))
    params = [*host.expert_parameters(name).values(), *model.head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    expert = Expert.from_model(host, name, TaskInfo(name), head=model.head_state_dict())
    host.remove_expert(name)
    return expert


def test_lorahub_end_to_end() -> None:
    model = _task_model()
    for p in model.head.parameters():
        p.requires_grad_(True)
    batches = _batches(2)
    good = _train(model, "good", batches)
    noise = _random_expert(model, "noise", 7)
    model.head.load_state_dict(good.head or {})
    experts = [noise, good]
    with merged_loss_objective(model, experts, batches, slot="uniform") as objective:
        uniform = objective([0.5, 0.5])
    steps: list[int] = []
    target = TaskInfo("target")
    merged, result = lorahub(
        model, experts, batches, name="hub", task=target, budget=20, l1=0.0, progress=lambda s, b, best: steps.append(s)
    )
    assert steps == list(range(1, 21))
    assert result.loss <= uniform
    assert result.loss < 0.9 * uniform  # the search found the trained expert
    assert result.weights[1] > result.weights[0]
    assert sorted(model.experts.experts) == []  # the slot is gone
    assert merged.name == "hub" and merged.task == target and merged.config == good.config
    assert merged.provenance == {
        "method": "lorahub",
        "sources": ["noise", "good"],
        "weights": result.weights,
        "budget": 20,
        "l1": 0.0,
        "seed": 0,
        "optimizer": "NGOpt",
    }
    assert merged.metrics == {"lorahub_loss": result.loss}
    assert merged.head is not None and torch.equal(merged.head["weight"], model.head_state_dict()["weight"])
    assert _slow_loss(model, merged, batches) == pytest.approx(result.loss, abs=1e-6)

"""Fisher estimators: per-sample equals a naive loop, the batch estimator is what the released code computes,
sampled labels are seeded, accumulation is fp32, parameters never change."""

from __future__ import annotations

import logging

import pytest
import torch

from families import FAMILIES
from pituning import AdapterConfig, ExpertConfig, ExpertModel, LoraConfig, PrefixConfig
from pituning.fisher import FisherError, check_fisher, fisher_sum, log_likelihood
from pituning.heads import TaskModel

CONFIGS = {"lora": LoraConfig(r=2), "adapter": AdapterConfig(bottleneck=4), "prefix": PrefixConfig(num_tokens=2)}


def _task(fam: str, config: ExpertConfig, dtype: torch.dtype = torch.float32) -> tuple[TaskModel, dict, dict]:
    experts = ExpertModel(FAMILIES[fam].build())
    experts.add_expert("a", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.expert_parameters("a").values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model = TaskModel(experts, "classification", 3).to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in FAMILIES[fam].inputs(gen).items()}
    batch["labels"] = torch.tensor([0, 2])
    params = {f"experts.{n}": p for n, p in experts.expert_parameters("a").items()}
    return model, params, batch


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("fam", ["bert", "llama", "vit"])
def test_per_sample_equals_a_naive_loop(fam: str, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    model, params, batch = _task(fam, CONFIGS[kind], torch.float64)
    with caplog.at_level(logging.WARNING, logger="pituning.fisher"):
        fast = fisher_sum(model, params, [batch], estimator="per_sample")
    assert not caplog.records, "vmap fell back to the loop"
    slow = fisher_sum(model, params, [batch], estimator="loop")
    assert fast.count == slow.count == 2
    assert _rel(fast.sums, slow.sums) <= 1e-6
    # fp32 too
    model32, params32, batch32 = _task(fam, CONFIGS[kind])
    assert (
        _rel(
            fisher_sum(model32, params32, [batch32]).sums,
            fisher_sum(model32, params32, [batch32], estimator="loop").sums,
        )
        <= 1e-5
    )


def test_cnn_per_sample_and_fallback(caplog: pytest.LogCaptureFixture) -> None:
    experts = ExpertModel(FAMILIES["cnn"].build()).double()  # TinyCNN returns 5 class logits itself
    experts.add_expert("a", LoraConfig(r=2))
    experts.double()
    with torch.no_grad():
        for param in experts.expert_parameters("a").values():
            param.normal_(0, 0.1)
    model, params = experts, experts.expert_parameters("a")
    batch = {"x": torch.randn(3, 3, 8, 8, dtype=torch.float64), "labels": torch.tensor([0, 4, 2])}
    fast = fisher_sum(model, params, [batch])
    assert _rel(fast.sums, fisher_sum(model, params, [batch], estimator="loop").sums) <= 1e-6

    class Branchy(torch.nn.Module):  # data-dependent control flow: vmap cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if x.sum() > -1e9 else -self.lin(x)

    branchy = Branchy()
    x = {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 1, 0])}
    with caplog.at_level(logging.WARNING, logger="pituning.fisher"):
        fell_back = fisher_sum(branchy, dict(branchy.named_parameters()), [x])
    assert "falling back to a per-example loop" in caplog.text
    loop = fisher_sum(branchy, dict(branchy.named_parameters()), [x], estimator="loop")
    assert _rel(fell_back.sums, loop.sums) <= 1e-6


def test_batch_estimator_squares_batch_gradients() -> None:
    model, params, batch = _task("bert", LoraConfig(r=2), torch.float64)
    result = fisher_sum(model, params, [batch, batch], estimator="batch")
    assert result.count == 2
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = log_likelihood(model(**inputs), batch["labels"]).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, _), grad in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(result.sums[name], (2 * grad.square()).float())


def test_sampled_labels_are_seeded_and_params_never_change() -> None:
    model, params, batch = _task("bert", AdapterConfig(bottleneck=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = [
        fisher_sum(model, params, [batch], estimator="sampled", generator=torch.Generator().manual_seed(s)).sums
        for s in (1, 1, 2)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None


def test_bf16_autocast_accumulates_in_fp32() -> None:
    model, params, batch = _task("bert", LoraConfig(r=2))
    mixed = fisher_sum(model, params, [batch], autocast_dtype=torch.bfloat16)
    exact = fisher_sum(model, params, [batch])
    assert all(v.dtype == torch.float32 for v in mixed.sums.values())
    assert _rel(mixed.sums, exact.sums) < 0.2


def test_unusable_fisher_is_an_error() -> None:
    with pytest.raises(FisherError, match="all zero or non-finite in every tensor"):
        check_fisher({"a": torch.zeros(3), "b": torch.tensor([float("nan")])}, "t")
    assert check_fisher({"a": torch.zeros(3), "b": torch.ones(2)}) == ["a"]
    with pytest.raises(FisherError, match="saw no examples"):
        fisher_sum(torch.nn.Linear(2, 2), dict(torch.nn.Linear(2, 2).named_parameters()), []).mean()


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_per_sample_fisher_runs_batched_without_torch_warnings(kind: str) -> None:
    """The per-sample pass batches attention under vmap (math kernel): no per-example fallback, so no "Please file
    us an issue" warning from torch."""
    import warnings

    model, params, batch = _task("bert", CONFIGS[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher_sum(model, params, [batch])
    assert not [w for w in caught if "batching rule" in str(w.message)]

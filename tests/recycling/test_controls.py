"""Controls for expert reuse: random pools, random-parameter experts, the pool without the target."""

from __future__ import annotations

import pytest
import torch

from bank_helpers import tiny_expert
from pituning import AdapterConfig
from pituning.errors import ConfigError
from pituning.recycling.controls import random_parameter_expert, random_parameter_pool, random_pool, without


def test_random_pool_is_seeded_and_order_free() -> None:
    names = [f"e{i}" for i in range(10)]
    pool = random_pool(names, 4, seed=3)
    assert len(pool) == 4 == len(set(pool)) and set(pool) <= set(names)
    assert random_pool(list(reversed(names)), 4, seed=3) == pool
    assert any(random_pool(names, 4, seed=s) != pool for s in range(4, 10))
    assert sorted(random_pool(names, 10, seed=0)) == sorted(names)
    assert random_pool(names, 0, seed=0) == []


@pytest.mark.parametrize(
    ("names", "k", "match"), [(["a", "b"], 3, "k=3"), (["a", "b"], -1, "k=-1"), (["a", "a"], 1, "distinct")]
)
def test_random_pool_errors(names: list[str], k: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        random_pool(names, k, seed=0)


def test_random_parameter_expert_matches_shapes_and_norms() -> None:
    original = tiny_expert("a", seed=1)
    original.head = {"weight": torch.randn(2, 8), "bias": torch.zeros(2)}
    control = random_parameter_expert(original, seed=5, name="a_random")
    assert control.name == "a_random"
    assert control.config == original.config and control.task == original.task
    assert control.backbone == original.backbone and control.modules == original.modules
    assert list(control.state) == sorted(original.state)
    for key, tensor in original.state.items():
        random = control.state[key]
        assert random.shape == tensor.shape and random.dtype == tensor.dtype
        assert float(random.norm()) == pytest.approx(float(tensor.norm()), rel=1e-5)
        assert not torch.allclose(random, tensor)
    assert control.head is not None and all(torch.equal(control.head[k], v) for k, v in original.head.items())
    assert control.embedding is None
    assert control.provenance == {"control": "random_parameters", "of": "a", "seed": 5, "match": "norm"}
    again = random_parameter_expert(original, seed=5, name="x")
    assert all(torch.equal(again.state[k], v) for k, v in control.state.items())
    other = random_parameter_expert(original, seed=6, name="y")
    assert not torch.equal(other.state["layers.0.q.pi_lora.lora_A"], control.state["layers.0.q.pi_lora.lora_A"])


def test_random_parameter_expert_matches_lora_updates() -> None:
    original = tiny_expert("a", seed=2, rank=3)
    scaling = original.config.scaling  # type: ignore[attr-defined]
    control = random_parameter_expert(original, seed=0, name="a_random", match="delta")
    assert control.provenance["match"] == "delta"
    for module in ("layers.0.q", "layers.1.q"):
        a, b = f"{module}.pi_lora.lora_A", f"{module}.pi_lora.lora_B"
        want = float((scaling * original.state[b] @ original.state[a]).norm())
        got = float((scaling * control.state[b] @ control.state[a]).norm())
        assert got == pytest.approx(want, rel=1e-5)
        assert float(control.state[a].norm()) == pytest.approx(float(original.state[a].norm()), rel=1e-5)
        assert control.state[b].shape == original.state[b].shape


def test_zero_tensors_stay_zero() -> None:
    original = tiny_expert("a")
    original.state["layers.0.q.pi_lora.lora_B"].zero_()  # an untrained LoRA
    for match in ("norm", "delta"):
        control = random_parameter_expert(original, seed=0, name="z", match=match)
        assert not control.state["layers.0.q.pi_lora.lora_B"].any()
        assert control.state["layers.0.q.pi_lora.lora_A"].any()


def test_random_parameter_errors() -> None:
    original = tiny_expert("a")
    with pytest.raises(ConfigError, match="match must be one of"):
        random_parameter_expert(original, seed=0, name="x", match="scale")
    adapter = tiny_expert("b")
    adapter.config = AdapterConfig(bottleneck=4)
    with pytest.raises(ConfigError, match="match='norm'"):
        random_parameter_expert(adapter, seed=0, name="x", match="delta")
    with pytest.raises(ConfigError, match="at least one expert"):
        random_parameter_pool([], seed=0)


def test_random_parameter_pool() -> None:
    experts = [tiny_expert("a", 1), tiny_expert("b", 1)]  # the same weights: different noise all the same
    pool = random_parameter_pool(experts, seed=10)
    assert [e.name for e in pool] == ["a_random", "b_random"]
    assert [e.provenance["seed"] for e in pool] == [10, 11]
    key = "layers.0.q.pi_lora.lora_A"
    assert not torch.equal(pool[0].state[key], pool[1].state[key])
    delta = random_parameter_pool(experts, seed=10, match="delta", suffix="_noise")
    assert [e.name for e in delta] == ["a_noise", "b_noise"]


def test_without() -> None:
    assert without(["t", "a", "b"], "t") == ["a", "b"]
    assert without(["a", "t", "b"], ["t", "b"]) == ["a"]
    assert without(["a", "b"], "t") == ["a", "b"]  # the target was not selected
    with pytest.raises(ConfigError, match="leaves no expert"):
        without(["t"], "t")

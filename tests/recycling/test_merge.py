"""Merge methods: the tensor math by hand, DARE's randomness, exactness of concat on a live model, identities, the
bank's merge and average, and the error messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from bank_helpers import FAKE_BACKBONE, tiny_expert
from families import FAMILIES
from pituning import AdapterConfig, ConfigError, ExpertModel, LoraConfig, PrefixConfig
from pituning.backbones import Fingerprint
from pituning.bank import BackboneIdentity, Expert, ExpertBank, TaskInfo
from pituning.errors import BackboneMismatchError
from pituning.recycling.merge import (
    MERGE_METHODS,
    dare,
    dare_linear,
    dare_ties,
    disjoint_mean,
    elect_sign,
    magnitude_prune,
    merge_experts,
    merge_states,
    merge_tensors,
    numerical_rank,
    task_arithmetic,
    ties_merge,
    trim_magnitude,
)

TASK = TaskInfo("t", modality="text", label_names=["neg", "pos"], num_examples=8, shots=4)
MODULES = ("layers.0.q", "layers.1.q")


# ------------------------------------------------------------------------------------------------- tensor math
def test_trim_keeps_the_largest_magnitudes() -> None:
    t = torch.tensor([0.5, -2.0, 1.0, 0.1, -0.7])
    assert torch.equal(trim_magnitude(t, 0.4), torch.tensor([0.0, -2.0, 1.0, 0.0, 0.0]))  # int(0.4 * 5) = 2 kept
    assert torch.equal(trim_magnitude(t, 0.6), torch.tensor([0.0, -2.0, 1.0, 0.0, -0.7]))
    assert trim_magnitude(t, 1.0) is t
    assert torch.equal(trim_magnitude(t.view(5, 1), 0.4), torch.tensor([[0.0], [-2.0], [1.0], [0.0], [0.0]]))


def test_ties_by_hand() -> None:
    t1 = torch.tensor([4.0, -1.0, 2.0, 0.5])
    t2 = torch.tensor([2.0, 3.0, -1.0, -3.0])
    t3 = torch.tensor([-1.0, 2.0, -5.0, 1.0])
    # density 0.5 keeps two entries each: [4, 0, 2, 0], [0, 3, 0, -3], [0, 2, -5, 0]
    # total mass per entry: [4, 5, -3, -3] -> signs [+, +, -, -]; agreeing: {4}, {3, 2}, {-5}, {-3}
    weights = [1.0, 0.5, 2.0]
    want = torch.tensor([4.0, (0.5 * 3 + 2.0 * 2) / 2, 2.0 * -5, 0.5 * -3])
    torch.testing.assert_close(ties_merge([t1, t2, t3], weights, 0.5), want)
    # by frequency, entry 2 has one + and one -: a tie elects +, so only t1's 2 counts
    want_freq = want.clone()
    want_freq[2] = 1.0 * 2.0
    torch.testing.assert_close(ties_merge([t1, t2, t3], weights, 0.5, majority_sign="frequency"), want_freq)
    # at density 1 nothing is trimmed: entry 0 sums to 5 > 0, so 4 and 2 agree
    full = ties_merge([t1, t2, t3], [1.0, 1.0, 1.0], 1.0)
    assert full[0].item() == pytest.approx(3.0) and full[2].item() == pytest.approx((-1.0 - 5.0) / 2)


def test_sign_election_and_disjoint_mean() -> None:
    stacked = torch.tensor([[1.0, -1.0, 0.0], [-3.0, -1.0, 0.0], [1.0, 5.0, 0.0]])
    assert torch.equal(elect_sign(stacked), torch.tensor([-1.0, 1.0, 1.0]))
    assert torch.equal(elect_sign(stacked, "frequency"), torch.tensor([1.0, -1.0, 1.0]))
    agree = stacked.sign() == elect_sign(stacked)
    assert torch.equal(disjoint_mean(stacked, agree), torch.tensor([-3.0, 5.0, 0.0]))  # zeros never agree


def test_magnitude_prune_and_linear_by_hand() -> None:
    t1, t2 = torch.tensor([3.0, 1.0, -0.5, 2.0]), torch.tensor([1.0, -2.0, 4.0, 0.1])
    # density 0.5: [3, 0, 0, 2] and [0, -2, 4, 0]
    torch.testing.assert_close(magnitude_prune([t1, t2], [0.5, 2.0], 0.5), torch.tensor([1.5, -4.0, 8.0, 1.0]))
    torch.testing.assert_close(task_arithmetic([t1, t2], [1.0, -1.0]), t1 - t2)
    pruned = merge_tensors([t1, t2], [0.5, 2.0], "magnitude_prune", density=0.5)
    torch.testing.assert_close(pruned, 0.5 * trim_magnitude(t1, 0.5) + 2.0 * trim_magnitude(t2, 0.5))


def test_dare_is_seeded_and_unbiased() -> None:
    t = torch.linspace(-1.0, 1.0, 64)
    one = dare(t, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(one, dare(t, 0.3, torch.Generator().manual_seed(5)))
    assert not torch.equal(one, dare(t, 0.3, torch.Generator().manual_seed(6)))
    kept = one != 0
    torch.testing.assert_close(one[kept], t[kept] / 0.3)  # kept entries are rescaled by 1 / density
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dare(t, 0.3, gen) for _ in range(4000)])
    assert (draws != 0).double().mean().item() == pytest.approx(0.3, abs=0.01)
    assert (draws.mean(0) - t).abs().max().item() < 0.1  # expectation unchanged (std of the mean <= 0.024)
    assert dare(t, 1.0) is t
    merged = dare_linear([t, -t], [1.0, 1.0], 0.5, torch.Generator().manual_seed(1))
    again = dare_linear([t, -t], [1.0, 1.0], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(merged, again) and merged.abs().sum() > 0  # different masks: t and -t do not cancel
    torch.testing.assert_close(dare_linear([t, -t], [2.0, 1.0], 1.0), t)
    torch.testing.assert_close(dare_ties([t, 2 * t], [1.0, 1.0], 1.0), 1.5 * t)


def test_tensor_functions_check_their_inputs() -> None:
    t = torch.ones(3)
    with pytest.raises(ConfigError, match="one shape"):
        task_arithmetic([t, torch.ones(4)], [1.0, 1.0])
    with pytest.raises(ConfigError, match="one finite weight per task tensor"):
        task_arithmetic([t, t], [1.0, float("nan")])
    with pytest.raises(ConfigError, match="density"):
        ties_merge([t], [1.0], 0.0)
    with pytest.raises(ConfigError, match="concat and svd"):
        merge_tensors([t], [1.0], "concat")
    with pytest.raises(ConfigError, match="'total' or 'frequency'"):
        ties_merge([t], [1.0], 1.0, majority_sign="most")


# ------------------------------------------------------------------------------------------------- live experts
def _model() -> ExpertModel:
    return ExpertModel(FAMILIES["bert"].build()).eval()


def _randomise(model: ExpertModel, name: str, seed: int, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _experts(configs: Sequence[object], seed: int = 0) -> list[Expert]:
    model = _model()
    out = []
    for i, config in enumerate(configs):
        name = f"e{i}"
        model.add_expert(name, config)  # type: ignore[arg-type]
        _randomise(model, name, seed + i)
        out.append(Expert.from_model(model, name, TASK))
    return out


def _output(experts: Sequence[Expert], scales: Sequence[float] | None = None) -> Tensor:
    """Output of a fresh model with ``experts`` all active (summed), optionally with their branch scaled."""
    model = _model()
    names = []
    for i, expert in enumerate(experts):
        state = dict(expert.state)
        if scales is not None:  # w_i * branch_i: scale the last factor of the branch (LoRA B; adapter up)
            state = {
                k: v * scales[i] if k.endswith(("lora_B", "up_weight", "up_bias")) else v for k, v in state.items()
            }
        model.load_expert(f"x{i}", expert.config, state, activate=False)
        names.append(f"x{i}")
    model.set_active(names)
    with torch.no_grad():
        return FAMILIES["bert"].output(model, FAMILIES["bert"].inputs(torch.Generator().manual_seed(1)))


def _delta(expert: Expert, module: str) -> Tensor:
    assert isinstance(expert.config, LoraConfig)
    prefix = f"{module}.pi_lora."
    return expert.config.scaling * expert.state[prefix + "lora_B"].double() @ expert.state[prefix + "lora_A"].double()


def _lora_modules(expert: Expert) -> list[str]:
    return [k[: -len(".pi_lora.lora_A")] for k in expert.state if k.endswith(".pi_lora.lora_A")]


@pytest.fixture(scope="module")
def loras() -> list[Expert]:
    return _experts([LoraConfig(r=2, alpha=6.0), LoraConfig(r=3, alpha=3.0), LoraConfig(r=2, alpha=2.0)])


@pytest.fixture(scope="module")
def adapters() -> list[Expert]:
    return _experts(
        [AdapterConfig(bottleneck=3, activation="gelu"), AdapterConfig(bottleneck=5, activation="gelu", scale=0.5)]
    )


@pytest.fixture(scope="module")
def same_adapters() -> list[Expert]:
    return _experts([AdapterConfig(bottleneck=3, activation="gelu")] * 2, seed=5)


@pytest.fixture(scope="module")
def prefixes() -> list[Expert]:
    return _experts([PrefixConfig(num_tokens=3), PrefixConfig(num_tokens=3)])


def test_concat_is_the_exact_weighted_sum_on_a_live_model(
    loras: list[Expert], adapters: list[Expert], same_adapters: list[Expert]
) -> None:
    for experts, weights in ((loras, [0.7, -0.4, 1.5]), (adapters, [0.6, 1.3])):  # ranks / bottlenecks differ
        merged = merge_experts(experts, weights, method="concat", name="cat")
        reference = _output(experts, weights)
        torch.testing.assert_close(_output([merged]), reference, atol=1e-5, rtol=0)
        if experts is adapters:
            assert merged.config.bottleneck == 8  # type: ignore[attr-defined]
            assert merged.config.scale == 1.0  # type: ignore[attr-defined]
        else:
            assert merged.config.r == 7 and merged.config.scaling == 1.0  # type: ignore[attr-defined]
    same = same_adapters
    averaged = _output([merge_experts(same, [1.0, 1.0], name="p")])
    torch.testing.assert_close(_output([merge_experts(same, [1.0, 1.0], method="concat", name="c")]), _output(same))
    assert (averaged - _output(same)).abs().max() > 1e-3  # a parameter average of adapters is another function


def test_concat_of_prefixes_is_refused(prefixes: list[Expert]) -> None:
    with pytest.raises(ConfigError, match="not exact for prefix"):
        merge_experts(prefixes, method="concat", name="cat")
    with pytest.raises(ConfigError, match="factorises LoRA updates"):
        merge_experts(prefixes, method="svd", name="svd")


@pytest.mark.parametrize("method", MERGE_METHODS)
@pytest.mark.parametrize("space", ["delta", "factors", "params"])
def test_a_single_lora_at_weight_one_comes_back(loras: list[Expert], method: str, space: str) -> None:
    source = loras[1]
    merged = merge_experts([source], [1.0], method=method, lora_space=space, name="one")
    if space == "params" and method not in ("concat", "svd"):
        assert merged.config == source.config
        assert all(torch.equal(merged.state[k], v) for k, v in source.state.items())  # bit for bit
    for module in _lora_modules(source):
        torch.testing.assert_close(_delta(merged, module), _delta(source, module), atol=1e-6, rtol=0)
    assert merged.config.r == source.config.r  # type: ignore[attr-defined]  # the smallest exact rank


@pytest.mark.parametrize("method", [m for m in MERGE_METHODS if m != "svd"])
def test_a_single_adapter_or_prefix_at_weight_one_comes_back(
    adapters: list[Expert], prefixes: list[Expert], method: str
) -> None:
    for source in (adapters[1], prefixes[0]):
        if method == "concat" and source is prefixes[0]:
            continue
        merged = merge_experts([source], [1.0], method=method, name="one")
        assert merged.config == source.config
        assert all(torch.equal(merged.state[k], v) for k, v in source.state.items())


@pytest.mark.parametrize("method", ["linear", "concat", "svd"])
def test_one_hot_weights_return_the_chosen_expert(
    loras: list[Expert], adapters: list[Expert], same_adapters: list[Expert], prefixes: list[Expert], method: str
) -> None:
    rank = 3 if method == "svd" else None  # full rank for the chosen expert (r = 3)
    merged = merge_experts(loras, [0.0, 1.0, 0.0], method=method, rank=rank, name="hot")
    for module in _lora_modules(loras[1]):
        torch.testing.assert_close(_delta(merged, module), _delta(loras[1], module), atol=1e-6, rtol=0)
    if method == "svd":
        return
    for experts in (adapters, same_adapters) if method == "concat" else (same_adapters,):
        merged = merge_experts(experts, [1.0, 0.0], method=method, name="hot")
        torch.testing.assert_close(_output([merged]), _output([experts[0]]), atol=1e-6, rtol=0)
    if method == "linear":
        merged = merge_experts(prefixes, [0.0, 1.0], method=method, name="hot")
        assert all(torch.equal(merged.state[k], v) for k, v in prefixes[1].state.items())


def test_lora_delta_space_math(loras: list[Expert]) -> None:
    weights = [0.5, -1.0, 2.0]
    modules = _lora_modules(loras[0])
    for method in ("ties", "dare_ties", "magnitude_prune", "dare_linear"):
        merged = merge_experts(loras, weights, method=method, density=0.4, seed=3, name="m")
        gen = torch.Generator().manual_seed(3)  # the masks are drawn module by module, expert by expert
        ranks = []
        for module in modules:  # the merged update, stored exactly
            want = merge_tensors([_delta(e, module) for e in loras], weights, method, density=0.4, generator=gen)
            torch.testing.assert_close(_delta(merged, module), want, atol=1e-6, rtol=0)
            ranks.append(numerical_rank(want))
        assert merged.config.r == max(ranks) == 32  # type: ignore[attr-defined]  # pruned updates: full rank (32 x 32)
    low = merge_experts(loras[:1], [2.0], method="ties", name="low")  # a rank-2 update trimmed at density 1
    assert low.config.r == 2  # type: ignore[attr-defined]  # the smallest exact rank, not min(d_out, d_in)
    truncated = merge_experts(loras, weights, method="ties", density=0.4, rank=4, name="m4")
    exact = merge_experts(loras, weights, method="ties", density=0.4, name="m")
    for module in modules:
        u, s, vh = torch.linalg.svd(_delta(exact, module))
        torch.testing.assert_close(_delta(truncated, module), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-6, rtol=0)
    linear = merge_experts(loras, weights, name="lin")
    assert linear.config.r == 7  # type: ignore[attr-defined]  # the concatenation
    for module in modules:
        expected = torch.stack([w * _delta(e, module) for w, e in zip(weights, loras, strict=True)]).sum(0)
        torch.testing.assert_close(_delta(linear, module), expected, atol=1e-6, rtol=0)
    svd = merge_experts(loras, weights, method="svd", name="svd")
    assert svd.config.r == 3  # type: ignore[attr-defined]  # PEFT's default: the largest source rank


def test_dare_merges_are_reproducible(loras: list[Expert], same_adapters: list[Expert]) -> None:
    for experts in (loras, same_adapters):
        one = merge_experts(experts, method="dare_ties", density=0.5, seed=7, name="d")
        two = merge_experts(experts, method="dare_ties", density=0.5, seed=7, name="d")
        other = merge_experts(experts, method="dare_ties", density=0.5, seed=8, name="d")
        assert all(torch.equal(one.state[k], two.state[k]) for k in one.state)
        assert any(not torch.equal(one.state[k], other.state[k]) for k in one.state)
        shuffled = [Expert(**{**vars(e), "state": dict(reversed(e.state.items()))}) for e in experts]
        three = merge_experts(shuffled, method="dare_ties", density=0.5, seed=7, name="d")  # dict order is irrelevant
        assert list(three.state) == list(one.state) and all(
            torch.equal(one.state[k], three.state[k]) for k in one.state
        )


def test_adapter_and_prefix_methods_merge_parameters(
    adapters: list[Expert], same_adapters: list[Expert], prefixes: list[Expert]
) -> None:
    for experts in (same_adapters, prefixes):
        merged = merge_experts(experts, [0.3, 0.9], method="ties", density=0.5, name="t")
        for key in experts[0].state:
            want = ties_merge([e.state[key] for e in experts], [0.3, 0.9], 0.5)
            assert torch.equal(merged.state[key], want)
    with pytest.raises(ConfigError, match="shape"):
        merge_experts(adapters, method="linear", name="bad")  # bottlenecks 3 and 5 do not average


def test_heads_and_provenance() -> None:
    a, b, c = tiny_expert("a", 0), tiny_expert("b", 1), tiny_expert("c", 2)
    a.head = {"weight": torch.ones(2, 4)}
    b.head = {"weight": torch.zeros(2, 4)}
    c.head = {"weight": torch.ones(3, 4)}
    merged = merge_experts([a, b], [0.25, 2.0], method="ties", density=0.5, seed=4, name="ab")
    assert merged.head is not None
    torch.testing.assert_close(merged.head["weight"], torch.full((2, 4), 0.25))
    assert merge_experts([a, c], name="ac").head is None
    assert merged.provenance == {
        "method": "ties",
        "sources": ["a", "b"],
        "weights": [0.25, 2.0],
        "density": 0.5,
        "seed": 4,
        "lora_space": "delta",
        "rank": None,
        "majority_sign": "total",
    }
    assert merged.task == a.task and merged.backbone == a.backbone and merged.modules == a.modules


def test_bank_merge_stores_the_merge() -> None:
    bank = ExpertBank(f"memory://merge-{uuid.uuid4().hex}")
    bank.add_many([tiny_expert("a", 0), tiny_expert("b", 1), tiny_expert("c", 2, rank=3)])
    merged = bank.merge(["a", "b", "c"], [1.0, 0.5, -0.5], method="dare_linear", density=0.5, seed=1, name="abc")
    stored = bank.get("abc")
    assert stored.provenance["method"] == "dare_linear" and stored.provenance["sources"] == ["a", "b", "c"]
    assert all(torch.equal(stored.state[k], v) for k, v in merged.state.items())
    again = bank.merge(["a", "b", "c"], [1.0, 0.5, -0.5], method="dare_linear", density=0.5, seed=1, name="abc2")
    assert all(torch.equal(again.state[k], v) for k, v in merged.state.items())
    with pytest.raises(Exception, match="abc"):
        bank.merge(["a", "b"], method="linear", name="abc")
    bank.merge(["a", "b"], method="linear", name="abc", overwrite=True)
    assert bank.get("abc").provenance["sources"] == ["a", "b"]
    with pytest.raises(ConfigError, match="at least one"):
        bank.merge([], method="linear", name="x")


def test_average_is_the_linear_merge() -> None:
    bank = ExpertBank(f"memory://avg-{uuid.uuid4().hex}")
    bank.add_many([tiny_expert("a", 0), tiny_expert("b", 1)])
    avg = bank.average(["a", "b"], [0.25, 0.75], name="avg", lora="delta")
    merged = bank.merge(["a", "b"], [0.25, 0.75], method="linear", name="lin")
    assert avg.config == merged.config
    assert all(torch.equal(avg.state[k], merged.state[k]) for k in avg.state)
    params = bank.average(["a", "b"], [0.25, 0.75], name="avg2")
    same = bank.merge(["a", "b"], [0.25, 0.75], method="linear", lora_space="params", name="lin2")
    assert all(torch.equal(params.state[k], same.state[k]) for k in params.state)


# ------------------------------------------------------------------------------------------------- errors
def test_merge_errors_name_the_problem(loras: list[Expert], adapters: list[Expert]) -> None:
    a, b = tiny_expert("a", 0), tiny_expert("b", 1)
    with pytest.raises(ConfigError, match="Did you mean 'ties'"):
        merge_experts([a, b], method="tie", name="x")
    for density in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"density must be a number in \(0, 1\]"):
            merge_experts([a, b], method="ties", density=density, name="x")
    with pytest.raises(ConfigError, match="density=0.5 prunes"):
        merge_experts([a, b], method="linear", density=0.5, name="x")
    with pytest.raises(ConfigError, match="rank must be None or a positive int"):
        merge_experts([a, b], method="svd", rank=0, name="x")
    with pytest.raises(ConfigError, match="lora_space must be one of"):
        merge_experts([a, b], lora_space="weights", name="x")
    with pytest.raises(ConfigError, match="majority_sign"):
        merge_experts([a, b], method="ties", majority_sign="mass", name="x")
    with pytest.raises(ConfigError, match="one finite weight per expert"):
        merge_experts([a, b], [1.0, float("inf")], name="x")
    with pytest.raises(ConfigError, match="one finite weight per expert"):
        merge_experts([a, b], [1.0], name="x")
    with pytest.raises(ConfigError, match="of one kind"):
        merge_experts([loras[0], adapters[0]], name="x")
    with pytest.raises(ConfigError, match="Invalid expert name"):
        merge_experts([a, b], name="a/b")
    partial = tiny_expert("p", 2)
    partial.state = {k: v for k, v in partial.state.items() if not k.startswith("layers.1.")}
    with pytest.raises(ConfigError, match="different insertion points"):
        merge_experts([a, partial], name="x")
    broken = tiny_expert("n", 3)
    broken.state["layers.0.q.pi_lora.lora_A"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN or inf"):
        merge_experts([a, broken], name="x")
    c = tiny_expert("c", 2, rank=3)
    with pytest.raises(ConfigError, match="lora_space='delta'"):
        merge_experts([a, c], lora_space="factors", name="x")
    with pytest.raises(ConfigError, match="keeps its rank"):
        merge_experts([a, b], method="ties", lora_space="factors", rank=2, name="x")
    with pytest.raises(ConfigError, match="LoRA experts only"):
        merge_experts(adapters, method="concat", rank=2, name="x")
    other = tiny_expert("o", 4)
    fp = FAKE_BACKBONE.fingerprint
    other.backbone = BackboneIdentity("toy-finetuned", "toy", Fingerprint(fp.structure, "v" * 64, fp.num_parameters))
    with pytest.raises(BackboneMismatchError, match="allow_backbone_mismatch=True"):
        merge_experts([a, other], name="x")
    mixed = merge_experts([a, other], name="x", allow_backbone_mismatch=True)
    assert [b["source"] for b in mixed.provenance["backbones"]] == ["toy-backbone", "toy-finetuned"]
    with pytest.raises(ConfigError, match="at least one expert"):
        merge_experts([], name="x")


def test_merge_states_without_records() -> None:
    states = [{"m.pi_lora.lora_A": torch.ones(1, 2), "m.pi_lora.lora_B": torch.ones(2, 1)}] * 2
    configs = [LoraConfig(r=1, alpha=1.0)] * 2
    state, config = merge_states(states, configs, [0.5, 0.5], method="concat")
    assert isinstance(config, LoraConfig) and config.r == 2
    assert torch.equal(state["m.pi_lora.lora_B"] @ state["m.pi_lora.lora_A"], torch.ones(2, 2))

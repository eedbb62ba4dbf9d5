"""Parity with PEFT's ``add_weighted_adapter``: the same LoRA experts merged by pituning and by PEFT give the same
merged update ``Delta W`` (<= 1e-6) on every module, and the same model outputs.

How the two are put in correspondence: the experts are trained-looking random LoRA weights on a tiny BERT, loaded into
a PEFT model under the same names (as in tests/experts/test_peft_parity.py). PEFT's per-factor methods (``linear``,
``ties``, ``dare_*``, ``magnitude_prune``) are pituning's ``lora_space="factors"``; ``cat`` is ``concat``; ``svd`` is
``svd``; the ``*_svd`` methods are pituning's ``delta`` space with ``rank=svd_rank``.

DARE: PEFT draws its masks from the global torch generator after ``add_weighted_adapter`` has initialised the new
adapter (which consumes random numbers). We wrap PEFT's ``inject_adapter`` to reseed the global generator with the
merge's seed right after the new adapter is injected; pituning draws from a ``torch.Generator`` with that seed in the
same order (per module, every expert's ``A`` then every expert's ``B``, or every expert's update), so both use the
same masks and the comparison is exact, not statistical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from families import FAMILIES
from pituning import ExpertModel, LoraConfig
from pituning.bank import Expert, TaskInfo
from pituning.recycling.merge import merge_experts

peft = pytest.importorskip("peft")

TASK = TaskInfo("t", modality="text", label_names=["neg", "pos"], num_examples=8, shots=4)
TOL = 1e-6


def _setup(ranks: Sequence[int], alphas: Sequence[float]) -> tuple[list[Expert], Any, list[str]]:
    """Our experts and a PEFT model holding the same adapters ``e0``, ``e1`` ...; and the target modules."""
    ours = ExpertModel(FAMILIES["bert"].build()).eval()
    experts, targets = [], []
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        name = f"e{i}"
        targets = ours.add_expert(name, LoraConfig(r=r, alpha=alpha))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # updates of a realistic size: entries of s B A around 0.01
            for param in ours.expert_parameters(name).values():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        experts.append(Expert.from_model(ours, name, TASK))
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    model = None
    for i, expert in enumerate(experts):
        config = expert.config
        assert isinstance(config, LoraConfig)
        peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=pattern, lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(FAMILIES["bert"].build().model.eval(), peft_config, adapter_name=f"e{i}")
        else:
            model.add_adapter(f"e{i}", peft_config)
        state = {}
        for key, value in expert.state.items():
            module, _, role = key.rsplit(".", 2)
            state[f"base_model.model.{module}.{role}.e{i}.weight"] = value
        _, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected
    return experts, model, targets


def _peft_merge(model: Any, weights: Sequence[float], seed: int, **kwargs: Any) -> None:
    """``add_weighted_adapter`` into ``merged``, the global generator reseeded after the new adapter is injected."""
    lora_model = model.base_model
    inject: Callable[..., Any] = lora_model.inject_adapter

    def reseeded(*args: Any, **kw: Any) -> Any:
        out = inject(*args, **kw)
        torch.manual_seed(seed)
        return out

    lora_model.inject_adapter = reseeded
    try:
        names = [f"e{i}" for i in range(len(weights))]
        lora_model.add_weighted_adapter(names, list(weights), "merged", **kwargs)
    finally:
        del lora_model.inject_adapter


def _peft_delta(model: Any, module: str) -> Tensor:
    return model.base_model.model.get_submodule(module).get_delta_weight("merged").detach().double()


def _our_delta(expert: Expert, module: str) -> Tensor:
    config = expert.config
    assert isinstance(config, LoraConfig)
    a, b = expert.state[f"{module}.pi_lora.lora_A"], expert.state[f"{module}.pi_lora.lora_B"]
    return config.scaling * b.double() @ a.double()


def _assert_same_updates(merged: Expert, model: Any, targets: Sequence[str]) -> None:
    worst = max((_our_delta(merged, m) - _peft_delta(model, m)).abs().max().item() for m in targets)
    scale = max(_peft_delta(model, m).abs().max().item() for m in targets)
    assert scale > 1e-3  # a non-trivial merge
    assert worst <= TOL, f"max |Delta W_ours - Delta W_peft| = {worst:.2e} (updates up to {scale:.2e})"


# (PEFT combination_type, our method, our lora_space, density, PEFT kwargs, our rank)
FACTOR_CASES = [
    ("linear", "linear", 1.0, {}),
    ("ties", "ties", 0.5, {"majority_sign_method": "total"}),
    ("ties", "ties", 0.3, {"majority_sign_method": "frequency"}),
    ("dare_linear", "dare_linear", 0.6, {}),
    ("dare_ties", "dare_ties", 0.5, {"majority_sign_method": "total"}),
    ("dare_ties", "dare_ties", 0.7, {"majority_sign_method": "frequency"}),
    ("magnitude_prune", "magnitude_prune", 0.4, {}),
]


@pytest.mark.parametrize(("combination", "method", "density", "extra"), FACTOR_CASES)
def test_factor_space_matches_peft(combination: str, method: str, density: float, extra: dict[str, Any]) -> None:
    experts, model, targets = _setup([4, 4, 4], [8.0, 4.0, 12.0])
    weights = [0.7, -0.4, 1.3]
    kwargs = {"density": density, **extra} if combination != "linear" else {}
    _peft_merge(model, weights, seed=11, combination_type=combination, **kwargs)
    majority = extra.get("majority_sign_method", "total")
    merged = merge_experts(
        experts, weights, method=method, lora_space="factors", density=density, seed=11, majority_sign=majority,
        name="merged",
    )  # fmt: skip
    assert merged.config.r == 4 and merged.config.alpha == 4.0  # type: ignore[attr-defined]  # PEFT's r, alpha = r
    _assert_same_updates(merged, model, targets)


def _delta_cases() -> list[tuple[str, str, float, dict[str, Any], int | None, int | None]]:
    # (PEFT type, our method, density, PEFT extra kwargs, PEFT svd_rank, our rank)
    return [
        ("cat", "concat", 1.0, {}, None, None),
        ("svd", "svd", 1.0, {}, None, None),  # both default to the largest rank (4)
        ("svd", "svd", 1.0, {}, 3, 3),
        ("svd", "linear", 1.0, {}, 32, None),  # full-rank SVD = the exact linear merge
        ("ties_svd", "ties", 0.5, {"majority_sign_method": "total"}, 32, None),  # exact factorisation
        ("ties_svd", "ties", 0.5, {"majority_sign_method": "frequency"}, 5, 5),  # truncated
        ("dare_linear_svd", "dare_linear", 0.6, {}, 32, None),
        ("dare_ties_svd", "dare_ties", 0.5, {}, 6, 6),
        ("magnitude_prune_svd", "magnitude_prune", 0.4, {}, 32, None),
    ]


@pytest.mark.parametrize(("combination", "method", "density", "extra", "svd_rank", "rank"), _delta_cases())
def test_update_space_matches_peft(
    combination: str, method: str, density: float, extra: dict[str, Any], svd_rank: int | None, rank: int | None
) -> None:
    experts, model, targets = _setup([2, 4, 3], [4.0, 4.0, 9.0])
    weights = [0.7, -0.4, 1.3]
    kwargs: dict[str, Any] = dict(extra)
    if density < 1.0:
        kwargs["density"] = density
    if svd_rank is not None:
        kwargs["svd_rank"] = svd_rank
    _peft_merge(model, weights, seed=5, combination_type=combination, **kwargs)
    merged = merge_experts(
        experts, weights, method=method, density=density, seed=5, rank=rank,
        majority_sign=extra.get("majority_sign_method", "total"), name="merged",
    )  # fmt: skip
    _assert_same_updates(merged, model, targets)
    if combination == "cat":  # PEFT's layout of 'cat' too: the weights on A
        again = merge_experts(experts, weights, method="concat", lora_space="factors", name="merged")
        peft_a = model.base_model.model.get_submodule(targets[0]).lora_A["merged"].weight
        torch.testing.assert_close(again.state[f"{targets[0]}.pi_lora.lora_A"], peft_a, atol=TOL, rtol=0)
        _assert_same_updates(again, model, targets)


def test_merged_models_give_the_same_outputs() -> None:
    experts, model, _ = _setup([4, 4], [8.0, 2.0])
    _peft_merge(model, [0.6, 0.9], seed=2, combination_type="dare_ties", density=0.5)
    merged = merge_experts(experts, [0.6, 0.9], method="dare_ties", lora_space="factors", density=0.5, seed=2,
                           name="merged")  # fmt: skip
    model.set_adapter("merged")
    ours = ExpertModel(FAMILIES["bert"].build()).eval()
    ours.load_expert("merged", merged.config, merged.state)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = FAMILIES["bert"].output(model, inputs)
        got = FAMILIES["bert"].output(ours, inputs)
        base = FAMILIES["bert"].output(ExpertModel(FAMILIES["bert"].build()).eval(), inputs)
    assert (expected - base).abs().max().item() > 1e-3  # the merged adapter changes the output
    assert (got - expected).abs().max().item() <= 1e-5


def test_dare_masks_differ_with_the_seed() -> None:
    """The reseeding above is what makes DARE agree: another seed gives another merge (the check can fail)."""
    experts, model, targets = _setup([4, 4], [8.0, 2.0])
    _peft_merge(model, [0.6, 0.9], seed=2, combination_type="dare_linear", density=0.5)
    other = merge_experts(experts, [0.6, 0.9], method="dare_linear", lora_space="factors", density=0.5, seed=3,
                          name="merged")  # fmt: skip
    worst = max((_our_delta(other, m) - _peft_delta(model, m)).abs().max().item() for m in targets)
    assert worst > 1e-3

"""The contract every expert kind satisfies on every supported backbone family (tiny models built from configs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from families import FAMILIES, Family
from pituning import AdapterConfig, ExpertConfig, ExpertModel, LoraConfig, PrefixConfig, UnsupportedExpertError

KINDS: dict[str, ExpertConfig] = {
    "lora": LoraConfig(r=4, alpha=8),
    "adapter": AdapterConfig(bottleneck=8),
    "prefix": PrefixConfig(num_tokens=3),
}
CASES = [pytest.param(f, k, id=f"{k}-{f}") for f in FAMILIES for k in KINDS if FAMILIES[f].prefix or k != "prefix"]


def _model(family: Family) -> ExpertModel:
    backbone = family.build()
    backbone.model.eval()  # no dropout: outputs are compared exactly
    return ExpertModel(backbone)


def _inputs(family: Family) -> dict[str, Tensor]:
    return family.inputs(torch.Generator().manual_seed(1))


def _randomize(model: ExpertModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _out(family: Family, model: ExpertModel, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return family.output(model, inputs)


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_identity_at_init(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    before = _out(family, model, inputs)
    model.add_expert("a", KINDS[kind])
    after = _out(family, model, inputs)
    if kind == "prefix":  # a prefix is not an identity: it adds keys every query attends to
        assert after.shape == before.shape and torch.isfinite(after).all()
        assert not torch.equal(after, before)
    else:
        torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_only_expert_and_interpolation_parameters_train(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_expert(name, KINDS[kind])
        _randomize(model, name, seed)
    model.interpolate(["a", "b"])
    trainable = set(model.set_trainable())
    expected = {*model.expert_parameters("a"), *model.expert_parameters("b"), *model.interpolation_parameters()}
    assert trainable == expected
    family.output(model, inputs).float().pow(2).mean().backward()
    for pname, param in model.named_parameters():
        if pname in expected:
            assert param.grad is not None, pname
            assert param.grad.abs().sum() > 0, pname
        else:
            assert param.grad is None, pname


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_state_dict_round_trip_is_exact(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    inputs = _inputs(family)
    source = _model(family)
    source.add_expert("a", KINDS[kind])
    _randomize(source, "a", 3)
    expected = _out(family, source, inputs)
    state = source.expert_state_dict("a")
    assert state and all(".pi_" in key and not key.endswith(".a") for key in state)

    target = _model(family)
    target.load_expert("renamed", KINDS[kind], state)
    torch.testing.assert_close(_out(family, target, inputs), expected, rtol=0, atol=0)

    # the full module state dict round-trips too
    again = _model(family)
    again.add_expert("a", KINDS[kind])
    again.load_state_dict(source.state_dict())
    torch.testing.assert_close(_out(family, again, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_one_hot_interpolation_reproduces_the_single_expert(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    for i, name in enumerate(("a", "b", "c")):
        model.add_expert(name, KINDS[kind])
        _randomize(model, name, 10 + i)
    model.set_active("b")
    single = _out(family, model, inputs)
    model.interpolate(["a", "b", "c"])
    with torch.no_grad():
        for logits in model.interpolation_parameters().values():
            logits.copy_(torch.tensor([-math.inf, 0.0, -math.inf]))
    weights = model.interpolation_weights()
    assert weights and all(w == {"a": 0.0, "b": 1.0, "c": 0.0} for w in weights.values())
    torch.testing.assert_close(_out(family, model, inputs), single, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_collapse_equals_the_interpolated_forward(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    for i, name in enumerate(("a", "b", "c")):
        model.add_expert(name, KINDS[kind])
        _randomize(model, name, 20 + i)
    model.interpolate(["a", "b", "c"])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for logits in model.interpolation_parameters().values():
            logits.copy_(torch.randn(3, generator=gen))
    interpolated = _out(family, model, inputs)
    assert not torch.allclose(interpolated, _out(family, _model(family), inputs))
    config = model.collapse("abc")
    assert model.active == ["abc"] and type(config) is type(KINDS[kind])
    if kind == "lora":
        assert isinstance(config, LoraConfig) and config.r == 12 and config.scaling == 1.0
    assert (_out(family, model, inputs) - interpolated).abs().max().item() <= 1e-5

    # the collapsed expert is a plain expert: it saves and loads into a model that never saw the pool
    fresh = _model(family)
    fresh.load_expert("abc", config, model.expert_state_dict("abc"))
    assert (_out(family, fresh, inputs) - interpolated).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_bf16_forward_runs(fam: str, kind: str) -> None:
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    model.add_expert("a", KINDS[kind])
    _randomize(model, "a", 4)
    reference = _out(family, model, inputs).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _out(family, model, inputs).float()
    assert torch.isfinite(mixed).all()
    scale = reference.abs().max().item() + 1.0
    assert (mixed - reference).abs().max().item() <= 0.1 * scale
    model.to(torch.bfloat16)  # a bf16-true backbone with bf16 experts
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    pure = _out(family, model, inputs)
    assert pure.dtype == torch.bfloat16 and torch.isfinite(pure.float()).all()


def test_cnn_refuses_prefix() -> None:
    model = _model(FAMILIES["cnn"])
    # a CNN has no self-attention: the error names the kinds that fit first (target_modules cannot help)
    with pytest.raises(
        UnsupportedExpertError, match=r"prefix experts do not fit .*self-attention.*Use adapter or lora"
    ):
        model.add_expert("p", PrefixConfig())
    assert model.experts == {}


def test_dual_targets_both_towers_and_prefixes_the_text_tower_only() -> None:
    model = _model(FAMILIES["dual"])
    lora = model.add_expert("l", KINDS["lora"])
    assert [t for t in lora if t.startswith("image.")] == [
        "image._blocks.0._expand_conv",
        "image._blocks.0._project_conv",
        "image._blocks.1._expand_conv",
        "image._blocks.1._project_conv",
        "image._conv_head",
    ]
    assert sorted({t.rsplit(".", 1)[-1] for t in lora if t.startswith("text.")}) == ["dense", "key", "query", "value"]
    adapter = model.add_expert("a", KINDS["adapter"])
    assert [t for t in adapter if t.startswith("image.")] == ["image._blocks.0", "image._blocks.1"]
    assert len([t for t in adapter if t.startswith("text.")]) == 4  # attention and FFN outputs of 2 layers
    prefix = model.add_expert("p", KINDS["prefix"])
    assert prefix == ["text.encoder.layer.0.attention.self", "text.encoder.layer.1.attention.self"]


@pytest.mark.parametrize(("fam", "kind"), CASES)
def test_bf16_backbone_with_fp32_experts(fam: str, kind: str) -> None:
    """``backbone_dtype="bfloat16"``: the frozen backbone stored and computed in bf16, the experts fp32 (their weights,
    gradients and optimizer state), within ~bf16 rounding of the fp32 model."""
    family = FAMILIES[fam]
    model, inputs = _model(family), _inputs(family)
    model.add_expert("a", KINDS[kind])
    _randomize(model, "a", 4)
    reference = _out(family, model, inputs).float()
    model.backbone.to(torch.bfloat16)
    for param in model.expert_parameters("a").values():
        param.data = param.data.float()
    assert all(p.dtype == torch.float32 for p in model.expert_parameters("a").values())
    pixels = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}  # as TaskModel does
    model.set_trainable(["a"])
    out = family.output(model, pixels)
    assert torch.isfinite(out.float()).all()
    scale = reference.abs().max().item() + 1.0
    assert (out.float() - reference).abs().max().item() <= 0.1 * scale
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.expert_parameters("a").values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

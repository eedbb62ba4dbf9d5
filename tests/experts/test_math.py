"""Each expert computes exactly what docs/concepts.md states, checked against formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from families import FAMILIES, TinyCNN, _cfg
from pituning import (
    AdapterConfig,
    Backbone,
    BackboneDescription,
    ExpertModel,
    LoraConfig,
    PrefixConfig,
    load_backbone,
)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)))


MLP_DESC = BackboneDescription(
    family="mlp", roles={"blocks": "inp|out", "proj": "inp|out"}, lora_roles=("proj",), adapter_roles=("proj",)
)


def _mlp() -> ExpertModel:
    torch.manual_seed(0)
    return ExpertModel(Backbone.from_module(MLP(), MLP_DESC))


def _randomize(model: ExpertModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _lora(model: ExpertModel, name: str, module: str) -> tuple[Tensor, Tensor]:
    host = model.backbone.get_submodule(module).pi_lora
    return host.lora_A[name], host.lora_B[name]


def test_lora_formula() -> None:
    model = _mlp()
    model.add_expert("a", LoraConfig(r=2, alpha=6, target_modules=["inp"]))
    _randomize(model, "a", 0)
    x = torch.randn(3, 6)
    a, b = _lora(model, "a", "inp")
    inp, out = model.backbone.inp, model.backbone.out
    expected = out(torch.tanh(x @ inp.weight.t() + inp.bias + 3.0 * x @ (b @ a).t()))
    torch.testing.assert_close(model(x), expected)


def test_lora_active_set_adds_updates_and_interpolation_weights_them() -> None:
    model = _mlp()
    model.add_expert("a", LoraConfig(r=2, alpha=2, target_modules=["out"]))
    model.add_expert("b", LoraConfig(r=3, alpha=6, target_modules=["out"]))
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    x = torch.randn(4, 6)
    h = torch.tanh(model.backbone.inp(x))
    (a1, b1), (a2, b2) = _lora(model, "a", "out"), _lora(model, "b", "out")
    base = model.backbone.out.weight
    model.set_active(["a", "b"])
    torch.testing.assert_close(model(x), F.linear(h, base + b1 @ a1 + 2.0 * b2 @ a2, model.backbone.out.bias))
    model.interpolate(["a", "b"])
    logits = model.backbone.out.pi_lora.lora_logits
    with torch.no_grad():
        logits.copy_(torch.tensor([0.2, -0.5]))
    w = torch.softmax(torch.tensor([0.2, -0.5]), 0)
    delta = w[0] * b1 @ a1 + w[1] * 2.0 * b2 @ a2
    torch.testing.assert_close(model(x), F.linear(h, base + delta, model.backbone.out.bias))


def test_adapter_formula_and_interpolation_is_the_adapter_of_averaged_parameters() -> None:
    model = _mlp()
    for i, name in enumerate(("a", "b")):
        model.add_expert(name, AdapterConfig(bottleneck=3, scale=0.5, activation="gelu", target_modules=["inp"]))
        _randomize(model, name, 3 + i)
    host = model.backbone.inp.pi_adapter
    x = torch.randn(3, 6)

    def adapter(y: Tensor, p: dict[str, Tensor]) -> Tensor:
        h = F.gelu(y @ p["adapter_down_weight"].t() + p["adapter_down_bias"])
        return y + 0.5 * (h @ p["adapter_up_weight"].t() + p["adapter_up_bias"])

    y = model.backbone.inp.weight @ x.t()
    y = y.t() + model.backbone.inp.bias
    model.set_active("a")
    torch.testing.assert_close(model(x), model.backbone.out(torch.tanh(adapter(y, host.expert_tensors("a")))))
    model.interpolate(["a", "b"])
    with torch.no_grad():
        host.adapter_logits.copy_(torch.tensor([1.0, 0.0]))
    w = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    avg = {k: w[0] * host.expert_tensors("a")[k] + w[1] * host.expert_tensors("b")[k] for k in host.param_names}
    torch.testing.assert_close(model(x), model.backbone.out(torch.tanh(adapter(y, avg))))


def test_lora_on_a_conv_subclass_equals_the_updated_kernel() -> None:
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    model = ExpertModel(
        Backbone.from_module(cnn, BackboneDescription("c", {"k": r"blocks\.0\.conv"}, lora_roles=("k",)))
    )
    model.add_expert("a", LoraConfig(r=3, alpha=3))
    _randomize(model, "a", 5)
    conv = cnn.blocks[0].conv
    a, b = _lora(model, "a", "blocks.0.conv")
    x = torch.randn(2, 8, 6, 6)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight + (b @ a).view(conv.weight.shape), conv.bias)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("fam", ["bert", "gpt2", "cnn"])
def test_merge_keeps_outputs(fam: str) -> None:
    family = FAMILIES[fam]
    model = ExpertModel(family.build()).eval()
    model.add_expert("a", LoraConfig(r=2))
    _randomize(model, "a", 6)
    inputs = family.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = family.output(model, inputs)
        model.merge("a")
        after = family.output(model, inputs)
    assert model.experts == {}
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_prefix_formula_on_one_attention_module() -> None:
    model = ExpertModel(load_backbone(_cfg("bert"), attn_implementation="eager")).eval()
    model.add_expert("p", PrefixConfig(num_tokens=3))
    _randomize(model, "p", 7)
    layer = model.backbone.encoder.layer[0]
    attn = layer.attention.self
    host = attn.pi_prefix
    x = torch.randn(2, 5, 32)

    def heads(t: Tensor) -> Tensor:
        return t.view(t.shape[0], -1, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
    pk = heads(host.prefix_key["p"][None].expand(2, -1, -1))
    pv = heads(host.prefix_value["p"][None].expand(2, -1, -1))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    probs = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(8), dim=-1)
    expected = (probs @ v).transpose(1, 2).reshape(2, 5, 32)
    got = layer.attention(x)[0]
    torch.testing.assert_close(got, layer.attention.output(expected, x))


@pytest.mark.parametrize("fam", ["bert", "t5", "gpt2", "llama", "vit", "distilbert"])
def test_prefix_eager_and_sdpa_agree(fam: str) -> None:
    family = FAMILIES[fam]
    outputs = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = ExpertModel(load_backbone(_cfg(fam), attn_implementation=impl)).eval()
        model.add_expert("p", PrefixConfig(num_tokens=4))
        _randomize(model, "p", 8)
        with torch.no_grad():
            outputs.append(family.output(model, family.inputs(torch.Generator().manual_seed(1))))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefix_keeps_decoders_causal(fam: str, impl: str) -> None:
    torch.manual_seed(0)
    model = ExpertModel(load_backbone(_cfg(fam), attn_implementation=impl)).eval()
    model.add_expert("p", PrefixConfig(num_tokens=2))
    _randomize(model, "p", 9)
    ids = torch.randint(3, 99, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 99
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(input_ids=changed).last_hidden_state
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_active_prefixes_concatenate() -> None:
    model = ExpertModel(load_backbone(_cfg("bert"), attn_implementation="eager")).eval()
    model.add_expert("p", PrefixConfig(num_tokens=2))
    model.add_expert("q", PrefixConfig(num_tokens=3))
    _randomize(model, "p", 1)
    _randomize(model, "q", 2)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    model.set_active(["p", "q"])
    with torch.no_grad():
        both = model(**inputs).last_hidden_state
    merged = ExpertModel(load_backbone(_cfg("bert"), attn_implementation="eager")).eval()
    merged.backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    merged.add_expert("pq", PrefixConfig(num_tokens=5))
    for name, host in ((n, m.pi_prefix) for n, m in model.backbone.named_modules() if hasattr(m, "pi_prefix")):
        target = merged.backbone.get_submodule(name).pi_prefix
        with torch.no_grad():
            for role in host.param_names:
                target.params(role)["pq"].copy_(torch.cat([host.params(role)["p"], host.params(role)["q"]]))
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).last_hidden_state, both)

"""Arrow routing: prototypes, per-token routing against a transparent reference and against PEFT, detaching, errors."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from families import FAMILIES
from pituning import Backbone, BackboneDescription, ExpertModel, LoraConfig
from pituning.bank import Expert, TaskInfo
from pituning.errors import BackboneMismatchError, ConfigError, ExpertError, UnsupportedExpertError
from pituning.experts import AdapterConfig
from pituning.recycling.arrow import (
    arrow_prototypes,
    arrow_update,
    arrow_weights,
    attach_arrow,
    lora_prototype,
)

# ------------------------------------------------------------------------------------------------------------- helpers


def _fill(model: ExpertModel, name: str, gen: torch.Generator, spectrum: Sequence[float] | None = None) -> None:
    """Random LoRA factors; with ``spectrum``, ``Delta W = B A`` has those singular values (A and B themselves are
    not orthonormal: an invertible ``G`` sits between them)."""
    with torch.no_grad():
        for key, param in model.expert_parameters(name).items():
            if spectrum is None:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif key.split(".")[-2] == "lora_A":
                b = model.get_parameter(key.replace(".lora_A.", ".lora_B."))
                (fan_out, r), fan_in = b.shape, param.shape[1]
                u, _ = torch.linalg.qr(torch.randn(fan_out, r, generator=gen, dtype=torch.float64))
                v, _ = torch.linalg.qr(torch.randn(fan_in, r, generator=gen, dtype=torch.float64))
                g = torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
                s = torch.tensor(list(spectrum)[:r], dtype=torch.float64)
                b.copy_(u @ torch.diag(s) @ g)
                param.copy_(torch.linalg.inv(g) @ v.t())


def _library(
    build: Any,
    specs: Sequence[tuple[str, LoraConfig]],
    *,
    seed: int = 0,
    spectrum: Sequence[float] | None = None,
) -> list[Expert]:
    """LoRA experts with random weights, captured from a model built by ``build``."""
    source = ExpertModel(build())
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, config in specs:
        source.add_expert(name, config)
        _fill(source, name, gen, spectrum)
        out.append(Expert.from_model(source, name, TaskInfo(name)))
        source.remove_expert(name)
    return out


SPECS = [
    ("nli", LoraConfig(r=4, alpha=8)),
    ("qa", LoraConfig(r=2, alpha=6)),
    ("sum", LoraConfig(r=3, alpha=3)),
    ("code", LoraConfig(r=4, alpha=4)),
]


def _reference_hooks(backbone: nn.Module, experts: Sequence[Expert], top_k: int, temperature: float) -> list[Any]:
    """The formula, token by token: prototypes from a full SVD of ``Delta W``, a sort, a softmax, a sum."""
    handles = []
    for module_name in arrow_prototypes(experts):
        deltas = []
        for e in experts:
            a = e.state[f"{module_name}.pi_lora.lora_A"].double()
            b = e.state[f"{module_name}.pi_lora.lora_B"].double()
            assert isinstance(e.config, LoraConfig)
            deltas.append((e.config.scaling, b @ a))
        protos = [torch.linalg.svd(d)[2][0] for _, d in deltas]

        def hook(
            module: nn.Module, args: tuple[Any, ...], output: Tensor, deltas: Any = deltas, protos: Any = protos
        ) -> Tensor:
            x = args[0].double()
            flat, rows = x.reshape(-1, x.shape[-1]), []
            for token in flat:
                scores = [abs(float(v @ token)) for v in protos]
                kept = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
                logits = torch.tensor([scores[i] / temperature for i in kept], dtype=torch.float64)
                p = torch.softmax(logits, dim=0)
                rows.append(sum(p[j] * deltas[i][0] * (deltas[i][1] @ token) for j, i in enumerate(kept)))
            update = torch.stack(rows).reshape(*output.shape[:-1], -1)
            return output + update.to(output.dtype)

        handles.append(backbone.get_submodule(module_name).register_forward_hook(hook))
    return handles


class TwoLinear(nn.Module):
    """``second(first(x))``: the routed ``first`` sees the inputs themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


def _two_linear() -> Backbone:
    torch.manual_seed(0)
    desc = BackboneDescription(family="two-linear", roles={"blocks": r"first|second", "lin": r"first"},
                               lora_roles=("lin",), adapter_roles=("blocks",), prefix_role=None)  # fmt: skip
    return Backbone.from_module(TwoLinear().eval(), desc)


def _axis_experts(n: int = 3) -> list[Expert]:
    """Rank-1 experts on ``first`` with ``A_i = e_i``: prototype ``i`` is the ``i``-th axis."""
    source = ExpertModel(_two_linear())
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        name = f"axis{i}"
        source.add_expert(name, LoraConfig(r=1, alpha=2))
        with torch.no_grad():
            source.get_parameter(f"backbone.first.pi_lora.lora_A.{name}").copy_(torch.eye(8)[i : i + 1])
            source.get_parameter(f"backbone.first.pi_lora.lora_B.{name}").copy_(torch.randn(8, 1, generator=gen))
        out.append(Expert.from_model(source, name, TaskInfo(name)))
        source.remove_expert(name)
    return out


# ---------------------------------------------------------------------------------------------------------- prototypes


@pytest.mark.parametrize(("r", "fan_in", "fan_out"), [(4, 32, 24), (3, 5, 40), (6, 4, 3), (1, 7, 7)])
def test_prototype_is_the_top_right_singular_vector(r: int, fan_in: int, fan_out: int) -> None:
    gen = torch.Generator().manual_seed(r + fan_in)
    a, b = torch.randn(r, fan_in, generator=gen), torch.randn(fan_out, r, generator=gen)
    v = lora_prototype(a, b)
    reference = torch.linalg.svd((b @ a).double())[2][0]
    assert v.shape == (fan_in,) and v.dtype == torch.float32
    assert abs(float(v.double() @ reference)) == pytest.approx(1.0, abs=1e-6)  # same line, either sign
    assert float(v[v.abs().argmax()]) > 0  # deterministic sign


def test_zero_update_has_a_zero_prototype_and_bad_factors_fail() -> None:
    assert torch.equal(lora_prototype(torch.randn(2, 5), torch.zeros(3, 2)), torch.zeros(5))
    with pytest.raises(ExpertError, match=r"A of shape \(r, fan_in\)"):
        lora_prototype(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ExpertError, match="NaN or inf"):
        lora_prototype(torch.full((2, 5), float("nan")), torch.randn(3, 2))


def test_arrow_prototypes_per_module() -> None:
    experts = _library(FAMILIES["bert"].build, SPECS[:3])
    protos = arrow_prototypes(experts)
    assert len(protos) == 8  # q, k, v, o of 2 layers
    for module, stacked in protos.items():
        assert stacked.shape == (3, 32)
        for row, e in zip(stacked, experts, strict=True):
            ref = lora_prototype(e.state[f"{module}.pi_lora.lora_A"], e.state[f"{module}.pi_lora.lora_B"])
            assert torch.equal(row, ref)


# -------------------------------------------------------------------------------------------------------- routing math


def test_weights_limits() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, protos = torch.randn(50, 6, generator=gen), torch.randn(4, 6, generator=gen)
    scores = (tokens @ protos.t()).abs()
    # top_k = 1 is one-hot on the best-aligned prototype, at any temperature
    for t in (0.1, 1.0, 10.0):
        w = arrow_weights(tokens, protos, 1, t)
        assert torch.equal(w, torch.nn.functional.one_hot(scores.argmax(-1), 4).float())
    # rows sum to one over at most top_k experts; a large temperature shares equally among them
    w = arrow_weights(tokens, protos, 3, 1.0)
    assert torch.allclose(w.sum(-1), torch.ones(50)) and bool(((w > 0).sum(-1) <= 3).all())
    flat = arrow_weights(tokens, protos, 3, 1e9)
    assert torch.allclose(flat[flat > 0], torch.full((150,), 1 / 3))
    # top_k = n, large temperature: the plain mean of the experts
    assert torch.allclose(arrow_weights(tokens, protos, 4, 1e9), torch.full((50, 4), 0.25))
    # a token orthogonal to all prototypes but one routes to that one
    token = torch.tensor([[0.0, 2.5, 0.0]])
    assert torch.equal(arrow_weights(token, torch.eye(3), 1), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.equal(arrow_weights(token, torch.eye(3), 3, temperature=1e-2), torch.tensor([[0.0, 1.0, 0.0]]))


def test_update_is_the_weighted_sum_of_lora_updates() -> None:
    gen = torch.Generator().manual_seed(1)
    a = [torch.randn(r, 5, generator=gen) for r in (1, 3, 2)]
    b = [torch.randn(4, r, generator=gen) for r in (1, 3, 2)]
    tokens, weights, scales = torch.randn(7, 5, generator=gen), torch.rand(7, 3, generator=gen), torch.rand(3)
    expected = torch.stack([weights[:, i : i + 1] * scales[i] * (tokens @ (b[i] @ a[i]).t()) for i in range(3)]).sum(0)
    assert torch.allclose(arrow_update(tokens, weights, a, b, scales), expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- live pool


@pytest.mark.parametrize(("fam", "top_k", "temperature"), [("bert", 2, 1.0), ("llama", 3, 0.5), ("gpt2", 1, 1.0)])
def test_matches_the_per_token_reference(fam: str, top_k: int, temperature: float) -> None:
    family = FAMILIES[fam]
    experts = _library(family.build, SPECS)
    model = ExpertModel(family.build()).eval()
    routing = attach_arrow(model, experts, top_k=top_k, temperature=temperature)
    reference = family.build().model.eval()
    _reference_hooks(reference, experts, top_k, temperature)
    inputs = family.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = family.output(model, inputs), family.output(reference, inputs)
    assert (got - expected).abs().max().item() <= 1e-5
    assert set(routing.modules) == set(arrow_prototypes(experts))


def test_one_hot_token_routes_to_its_expert() -> None:
    experts = _axis_experts(3)
    model = ExpertModel(_two_linear()).eval()
    for j in range(3):
        x = torch.zeros(5, 8)
        x[:, j] = torch.linspace(0.5, 2.0, 5)
        x[:, 3:] = torch.randn(5, 5)  # orthogonal to every prototype
        plain = ExpertModel(_two_linear()).eval()
        plain.load_expert("only", experts[j].config, experts[j].state)
        for top_k, temperature in ((1, 1.0), (3, 1e-3)):
            with attach_arrow(model, experts, top_k=top_k, temperature=temperature) as routing, torch.no_grad():
                got = model(x)
            assert torch.allclose(got, plain(x), atol=1e-6)
            counts = routing.selection_counts()["first"]
            assert counts[f"axis{j}"] == 5 and routing.mean_routing()["first"][f"axis{j}"] == 1.0


def test_one_expert_is_the_plain_lora_and_all_experts_flat_is_their_mean() -> None:
    family = FAMILIES["bert"]
    experts = _library(family.build, SPECS[:3])
    inputs = family.inputs(torch.Generator().manual_seed(2))
    plain = ExpertModel(family.build()).eval()
    for e in experts:
        plain.load_expert(e.name, e.config, e.state, activate=False)
    model = ExpertModel(family.build()).eval()
    with torch.no_grad():
        with attach_arrow(model, experts[:1]):  # top_k clipped to 1: weight 1, the LoRA itself
            single = family.output(model, inputs)
        plain.set_active(experts[0].name)
        assert torch.allclose(single, family.output(plain, inputs), atol=1e-6)
        with attach_arrow(model, experts, top_k=3, temperature=1e9):
            flat = family.output(model, inputs)
        plain.interpolate([e.name for e in experts])  # equal weights 1/3 of the updates
        assert torch.allclose(flat, family.output(plain, inputs), atol=1e-5)


def test_detach_restores_the_model_exactly() -> None:
    family = FAMILIES["bert"]
    experts = _library(family.build, SPECS[:3])
    model = ExpertModel(family.build()).eval()
    model.add_expert("own", LoraConfig(r=2))
    _fill(model, "own", torch.Generator().manual_seed(9))
    inputs = family.inputs(torch.Generator().manual_seed(4))
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    names = set(model.named_parameters())
    with torch.no_grad():
        before = family.output(model, inputs)
        routing = attach_arrow(model, experts, top_k=2)
        assert routing.attached and model.active == ["own"]  # the library is loaded inactive, frozen
        assert set(model.experts) == {"own", "arrow-nli", "arrow-qa", "arrow-sum"}
        assert not any(p.requires_grad for p in model.expert_parameters("arrow-nli").values())
        during = family.output(model, inputs)
        routing.detach()
        routing.detach()  # idempotent
        after = family.output(model, inputs)
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert not routing.attached and list(model.experts) == ["own"]
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert set(model.named_parameters()) == names


def test_statistics() -> None:
    family = FAMILIES["bert"]
    experts = _library(family.build, SPECS)
    model = ExpertModel(family.build()).eval()
    inputs = family.inputs(torch.Generator().manual_seed(5))
    with attach_arrow(model, experts, top_k=2) as routing, torch.no_grad():
        assert routing.expert_usage() == dict.fromkeys(["nli", "qa", "sum", "code"], 0.0)
        family.output(model, inputs)
        family.output(model, inputs)
    tokens = inputs["input_ids"].numel() * 2
    assert set(routing.tokens_routed().values()) == {tokens}
    for module, counts in routing.selection_counts().items():
        assert sum(counts.values()) == 2 * tokens
        assert sum(routing.mean_routing()[module].values()) == pytest.approx(1.0)
    assert sum(routing.expert_usage().values()) == pytest.approx(1.0)
    routing.reset_statistics()
    assert set(routing.tokens_routed().values()) == {0}
    assert "detached" in repr(routing)


def test_options_can_change_while_attached() -> None:
    experts = _axis_experts(3)
    model = ExpertModel(_two_linear()).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with attach_arrow(model, experts, top_k=9) as routing, torch.no_grad():
        assert routing.top_k == 3  # clipped to the number of experts
        routing.top_k, routing.temperature = 1, 0.5
        model(x)
        assert sum(routing.selection_counts()["first"].values()) == 4
        with pytest.raises(ConfigError, match="top_k"):
            routing.top_k = 0
        with pytest.raises(ConfigError, match="temperature"):
            routing.temperature = math.inf


# -------------------------------------------------------------------------------------------------------------- errors


def test_errors_leave_the_model_unchanged() -> None:
    family = FAMILIES["bert"]
    experts = _library(family.build, SPECS[:2])
    model = ExpertModel(family.build()).eval()
    source = ExpertModel(family.build())
    source.add_expert("bottleneck", AdapterConfig())
    adapter = Expert.from_model(source, "bottleneck", TaskInfo("bottleneck"))
    with pytest.raises(ConfigError, match="arrow needs LoRA experts; use merge or π-Tuning for adapter/prefix"):
        attach_arrow(model, [*experts, adapter])
    with pytest.raises(ConfigError, match="at least one"):
        attach_arrow(model, [])
    with pytest.raises(ConfigError, match="more than once"):
        attach_arrow(model, [experts[0], experts[0]])
    with pytest.raises(ConfigError, match="top_k"):
        attach_arrow(model, experts, top_k=0)
    with pytest.raises(ConfigError, match="temperature"):
        attach_arrow(model, experts, temperature=0.0)
    with pytest.raises(ConfigError, match="Invalid expert name"):
        attach_arrow(model, experts, name="my arrow")
    mlp = _library(family.build, [("mlp", LoraConfig(r=2, include_mlp=True))])
    with pytest.raises(ExpertError, match="cover different modules"):
        attach_arrow(model, [*experts, *mlp])
    other = _library(family.build, SPECS[:1])
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)
    model._fingerprint = None
    with pytest.raises(BackboneMismatchError, match="allow_backbone_mismatch=True"):
        attach_arrow(model, other)
    assert model.experts == {}
    attach_arrow(model, other, allow_backbone_mismatch=True).detach()
    routing = attach_arrow(model, experts, allow_backbone_mismatch=True)
    with pytest.raises(ExpertError, match="already attached"):
        attach_arrow(model, experts, allow_backbone_mismatch=True)
    routing.detach()
    assert model.experts == {}


def test_convolutions_are_refused() -> None:
    family = FAMILIES["cnn"]
    experts = _library(family.build, [("c1", LoraConfig(r=2)), ("c2", LoraConfig(r=2))])  # 3x3 kernels included
    model = ExpertModel(family.build()).eval()
    with pytest.raises(UnsupportedExpertError, match="kernel larger than 1x1"):
        attach_arrow(model, experts)
    assert model.experts == {}
    assert not any(n for n, _ in model.named_modules() if "pi_lora" in n)


def test_pointwise_convolutions_route_each_pixel() -> None:
    family = FAMILIES["cnn"]
    pointwise = [r"blocks\.\d+\.proj"]  # the 1x1 convolutions: each pixel's channel vector is a token
    specs = [(n, LoraConfig(r=2, alpha=4, target_modules=pointwise)) for n in ("c1", "c2", "c3")]
    experts = _library(family.build, specs, seed=3)
    inputs = family.inputs(torch.Generator().manual_seed(4))
    model = ExpertModel(family.build()).eval()
    for expert in experts:
        model.load_expert(expert.name, expert.config, expert.state, activate=False)
    model.interpolate([e.name for e in experts])  # equal weights: the mean of the three updates at every pixel
    with torch.no_grad():
        mean = family.output(model, inputs)
    plain = ExpertModel(family.build()).eval()
    with attach_arrow(plain, experts, top_k=3, temperature=1e9) as routing, torch.no_grad():
        flat = family.output(plain, inputs)  # a huge temperature: every pixel weighs the three experts equally
        n, _, h, w = inputs["x"].shape
        assert set(routing.tokens_routed().values()) == {n * h * w}
    torch.testing.assert_close(flat, mean, atol=1e-5, rtol=1e-5)
    with attach_arrow(plain, experts, top_k=1) as routing, torch.no_grad():
        routed = family.output(plain, inputs)
        assert all(sum(c.values()) == n * h * w for c in routing.selection_counts().values())
    assert not torch.allclose(routed, flat)


def test_removing_an_expert_while_routing_is_reported() -> None:
    experts = _axis_experts(2)
    model = ExpertModel(_two_linear()).eval()
    routing = attach_arrow(model, experts)
    model.remove_expert("arrow-axis0")
    with pytest.raises(ExpertError, match="detach"):
        model(torch.randn(2, 8))
    routing.detach()
    assert model.experts == {}


# ---------------------------------------------------------------------------------------------------------------- PEFT


def _peft_arrow(family: Any, experts: Sequence[Expert], targets: Sequence[str], tmp: Path, **options: Any) -> Any:
    """PEFT's own Arrow model (``create_arrow_model``) over the same LoRA weights, saved as PEFT adapters."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "create_arrow_model"):
        pytest.skip("the installed PEFT has no Arrow routing")
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    paths = []
    for e in experts:
        assert isinstance(e.config, LoraConfig)
        config = peft.LoraConfig(r=e.config.r, lora_alpha=e.config.alpha, target_modules=pattern, lora_dropout=0.0)
        peft_model = peft.get_peft_model(family.build().model, config)
        state = {}
        for key, value in e.state.items():
            module, _, role = key.rsplit(".", 2)
            state[f"base_model.model.{module}.{role}.default.weight"] = value
        _, unexpected = peft_model.load_state_dict(state, strict=False)
        assert not unexpected
        peft_model.save_pretrained(tmp / e.name)
        paths.append(str(tmp / e.name))
    arrow = peft.ArrowConfig(use_gks=False, rng_seed=0, **options)
    return peft.create_arrow_model(family.build().model, paths, arrow).eval()


@pytest.mark.parametrize(
    ("include_mlp", "top_k", "temperature"), [(False, 2, 1.0), (True, 3, 0.5), (False, 1, 1.0), (True, 4, 2.0)]
)
def test_matches_peft_arrow(tmp_path: Path, include_mlp: bool, top_k: int, temperature: float) -> None:
    """Same LoRAs in pituning and in PEFT's Arrow (GenKnowSub off). PEFT finds prototypes by 15 power iterations,
    so the updates get a clear spectral gap (singular values 1, 0.3, 0.2, 0.1) for it to converge; ranks must agree
    in PEFT, alphas differ. Llama: PEFT's router targets modules by their last name, which is unique there."""
    family = FAMILIES["llama"]
    specs = [(f"e{i}", LoraConfig(r=4, alpha=a, include_mlp=include_mlp)) for i, a in enumerate((4, 8, 12, 6))]
    experts = _library(family.build, specs, spectrum=(1.0, 0.3, 0.2, 0.1))
    model = ExpertModel(family.build()).eval()
    routing = attach_arrow(model, experts, top_k=top_k, temperature=temperature)
    reference = _peft_arrow(family, experts, routing.modules, tmp_path, top_k=top_k, router_temperature=temperature)
    inputs = family.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = family.output(model, inputs), family.output(reference, inputs)
    assert not torch.allclose(got, family.output(ExpertModel(family.build()).eval(), inputs), atol=1e-3)
    assert (got - expected).abs().max().item() <= 1e-5
    # the prototypes agree up to sign
    for module, ours in routing.prototypes.items():
        layer = reference.base_model.model.get_submodule(module)
        theirs = layer.lora_arrow["arrow_router"].prototypes
        assert torch.allclose((ours * theirs).sum(-1).abs(), torch.ones(len(experts)), atol=1e-5)

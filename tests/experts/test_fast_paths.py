"""The paths the speed benchmarks rely on (benchmarks/speed): experts compile into one graph, a bf16 frozen backbone
trains fp32 experts, and the LoRA forward of a pool equals the formula written out term by term."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from families import FAMILIES
from pituning import AdapterConfig, ExpertConfig, ExpertModel, LoraConfig, PrefixConfig

KINDS: dict[str, ExpertConfig] = {
    "lora": LoraConfig(r=4, alpha=8),
    "adapter": AdapterConfig(bottleneck=8),
    "prefix": PrefixConfig(num_tokens=3),
}


def _model(pool: bool, kind: str, dtype: torch.dtype | None = None) -> ExpertModel:
    model = ExpertModel(FAMILIES["bert"].build()).eval()
    if dtype is not None:
        model.backbone.to(dtype)
    gen = torch.Generator().manual_seed(3)
    for name in ("a", "b", "c"):
        model.add_expert(name, KINDS[kind])
        with torch.no_grad():
            for param in model.expert_parameters(name).values():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    if pool:
        model.interpolate(["a", "b", "c"])
        with torch.no_grad():
            for logits in model.interpolation_parameters().values():
                logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    else:
        model.set_active("b")
    model.set_trainable(["a", "b", "c"], interpolation=pool)
    return model


def _loss_and_grads(model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    out = FAMILIES["bert"].output(model, inputs)
    # a fixed random readout: the output is layer-normalised, so its plain mean square hardly depends on anything
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out.float() * readout).sum().backward()
    params = dict(model.named_parameters())
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return out.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("pool", [False, True], ids=["single", "pool"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_experts_compile_into_one_graph_with_eager_results(kind: str, pool: bool) -> None:
    torch._dynamo.reset()
    model = _model(pool, kind)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(1))
    expected, expected_grads = _loss_and_grads(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    out, grads = _loss_and_grads(compiled, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool", [False, True], ids=["single", "pool"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_frozen_backbone_trains_fp32_experts(kind: str, pool: bool) -> None:
    """``backbone_dtype="bfloat16"``: the backbone computes in bf16, the experts keep fp32 weights and gradients."""
    reference = _model(pool, kind)
    half = _model(pool, kind, torch.bfloat16)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(1))
    expected, expected_grads = _loss_and_grads(reference, inputs)
    out, grads = _loss_and_grads(half, inputs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max().item() <= 0.05 * (expected.abs().max().item() + 1.0)
    assert grads.keys() == expected_grads.keys() and grads
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads.values())
    flat = torch.cat([grads[n].flatten() for n in grads])
    ref = torch.cat([expected_grads[n].flatten() for n in grads])
    assert (flat - ref).norm() <= 0.1 * ref.norm()  # bf16 rounding, not a different gradient


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lora_pool_forward_is_the_sum_of_weighted_updates(autocast: bool) -> None:
    model = _model(True, "lora")
    query = model.backbone.get_submodule("encoder.layer.0.attention.self.query")
    host = query.pi_lora
    x = torch.randn(2, 5, query.in_features, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = query(x)
    alpha = host.mixing().detach()
    expected = x @ query.weight.t() + query.bias
    for i, name in enumerate(("a", "b", "c")):  # scaling alpha / r = 8 / 4
        a, b = host.lora_A[name].detach(), host.lora_B[name].detach()
        expected = expected + alpha[i] * 2.0 * (x @ a.t()) @ b.t()
    assert got.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = 5e-2 if autocast else 1e-5
    torch.testing.assert_close(got.detach().float(), expected, rtol=tol, atol=tol)

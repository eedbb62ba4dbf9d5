"""Interpolation variants: linear mixing (a learned merge's coefficients), shared weights per layer or per task, and
initial logits; each checked against the experts' outputs written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from families import FAMILIES
from pituning import ExpertModel, LoraConfig
from pituning.errors import InterpolationError
from pituning.experts.inject import iter_hosts

KINDS = {"lora": LoraConfig(r=2, alpha=4)}


def _model() -> tuple[ExpertModel, dict[str, Tensor]]:
    family = FAMILIES["bert"]
    model = ExpertModel(family.build())
    gen = torch.Generator().manual_seed(1)
    for name in ("a", "b", "c"):
        model.add_expert(name, LoraConfig(r=2, alpha=4), activate=False)
        with torch.no_grad():
            for param in model.expert_parameters(name).values():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval(), family.inputs(torch.Generator().manual_seed(2))


def _out(model: ExpertModel, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_linear_mixing_starts_where_init_says_and_is_the_weighted_sum(caplog: pytest.LogCaptureFixture) -> None:
    model, inputs = _model()
    model.set_active(["c"])
    c_alone = _out(model, inputs)
    model.interpolate(["a", "b", "c"], mixing="linear", init=[0.0, 0.0, 1.0])
    assert torch.allclose(_out(model, inputs), c_alone, atol=1e-6)  # every source at zero: the target expert alone
    weights = model.interpolation_weights()
    assert all(w == {"a": 0.0, "b": 0.0, "c": 1.0} for w in weights.values())
    # any coefficients, negative ones included, and no normalisation: LoRA is linear in its update, so the output
    # equals the one of the summed updates, which is what collapse stores
    with torch.no_grad():
        for p in model.interpolation_parameters().values():
            p.copy_(torch.tensor([0.5, -0.25, 1.5]))
    mixed = _out(model, inputs)
    model.collapse("merged")
    assert torch.allclose(_out(model, inputs), mixed, atol=1e-5)


def test_softmax_init_logits_and_default_equal_weights() -> None:
    model, _ = _model()
    model.interpolate(["a", "b"])
    assert all(w == pytest.approx({"a": 0.5, "b": 0.5}) for w in model.interpolation_weights().values())
    model.interpolate(["a", "b"], init=[0.0, torch.log(torch.tensor(3.0)).item()])
    assert all(w == pytest.approx({"a": 0.25, "b": 0.75}) for w in model.interpolation_weights().values())


@pytest.mark.parametrize(("share", "groups"), [("module", None), ("layer", 2), ("task", 1)])
def test_shared_weights_tie_one_parameter_per_group(share: str, groups: int | None) -> None:
    model, _ = _model()
    hosts = model.interpolate(["a", "b"], share=share)
    params = {id(h.logits) for _, _, h in iter_hosts(model.backbone) if h.pool}
    assert len(params) == (len(hosts) if groups is None else groups)  # the tiny BERT has 2 layers
    assert len(model.interpolation_parameters()) == len(params)  # each shared vector is trained once
    optimizer = torch.optim.SGD(list(model.interpolation_parameters().values()), lr=1.0)
    for p in model.interpolation_parameters().values():
        p.grad = torch.tensor([1.0, -1.0])
    optimizer.step()
    for _, _, host in iter_hosts(model.backbone):
        if host.pool:  # a step moved every module of a group the same way
            assert torch.allclose(host.logits.detach(), torch.tensor([-1.0, 1.0]))


def test_variant_errors_name_the_option() -> None:
    model, _ = _model()
    with pytest.raises(InterpolationError, match="share must be one of"):
        model.interpolate(["a", "b"], share="block")
    with pytest.raises(InterpolationError, match="mixing must be one of"):
        model.interpolate(["a", "b"], mixing="relu")
    with pytest.raises(InterpolationError, match="init needs 2 finite logits"):
        model.interpolate(["a", "b"], init=[0.0])
    with pytest.raises(InterpolationError, match="init needs 2 finite logits"):
        model.interpolate(["a", "b"], init=[0.0, float("nan")])

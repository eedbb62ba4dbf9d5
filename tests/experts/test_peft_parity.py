"""The same LoRA weights on the same model give the same outputs in pituning and in PEFT."""

from __future__ import annotations

import re

import pytest
import torch

from families import FAMILIES
from pituning import ExpertModel, LoraConfig

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("fam", ["bert", "vit", "t5", "llama", "clip"])
@pytest.mark.parametrize("include_mlp", [False, True])
def test_lora_matches_peft(fam: str, include_mlp: bool) -> None:
    family = FAMILIES[fam]
    config = LoraConfig(r=4, alpha=12, include_mlp=include_mlp)
    ours = ExpertModel(family.build()).eval()
    targets = ours.add_expert("a", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.expert_parameters("a").values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)

    reference = family.build().model.eval()
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    peft_model = peft.get_peft_model(
        reference, peft.LoraConfig(r=4, lora_alpha=12, target_modules=pattern, lora_dropout=0.0, init_lora_weights=True)
    )
    state = ours.expert_state_dict("a")
    peft_state = {}
    for key, value in state.items():
        module, _, role = key.rsplit(".", 2)
        peft_state[f"base_model.model.{module}.{role}.default.weight"] = value
    missing, unexpected = peft_model.load_state_dict(peft_state, strict=False)
    assert not unexpected
    assert not [k for k in missing if "lora_" in k]
    inputs = family.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = family.output(peft_model, inputs)
        got = family.output(ours, inputs)
    assert (got - expected).abs().max().item() <= 1e-5

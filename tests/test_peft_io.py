"""PEFT adapter directories: export from the bank loads in PEFT with equal outputs; PEFT adapters import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import FAMILIES, _cfg
from pituning import ConfigError, ExpertModel, LoraConfig, PrefixConfig, load_backbone
from pituning.bank import Expert, ExpertBank, TaskInfo

peft = pytest.importorskip("peft")


def _randomize(model: ExpertModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("fam", ["bert", "vit", "t5", "gpt2"])
def test_export_collapsed_lora_loads_in_peft_with_equal_outputs(fam: str, tmp_path: Path) -> None:
    family = FAMILIES[fam]
    model = ExpertModel(family.build()).eval()
    for i, name in enumerate(("a", "b")):
        model.add_expert(name, LoraConfig(r=2 + i, alpha=4, include_mlp=True))
        _randomize(model, name, i)
    model.interpolate(["a", "b"])
    with torch.no_grad():
        for logits in model.interpolation_parameters().values():
            logits.copy_(torch.tensor([0.3, -0.2]))
    model.collapse("ab")
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "ab", TaskInfo("ab")))
    out = bank.export_peft("ab", tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "pituning.json",
    ]
    peft_model = peft.PeftModel.from_pretrained(family.build().model.eval(), str(out))
    inputs = family.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (family.output(peft_model, inputs) - family.output(model, inputs)).abs().max().item()
    assert diff <= 1e-5


def test_import_a_peft_trained_adapter(tmp_path: Path) -> None:
    family = FAMILIES["llama"]
    reference = family.build().model.eval()
    peft_model = peft.get_peft_model(
        reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = ExpertModel(family.build()).eval()
    bank = ExpertBank(tmp_path / "bank")
    expert = bank.import_peft(tmp_path / "adapter", model, "imported", TaskInfo("t"))
    assert model.experts == {}  # the check load was undone
    assert expert.provenance["imported_from"].endswith("adapter")
    bank.load_into(model, "imported")
    inputs = family.inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (family.output(peft_model, inputs) - family.output(model, inputs)).abs().max().item()
    assert diff <= 1e-5


def test_adapter_kind_and_dora_are_refused(tmp_path: Path) -> None:
    from pituning import AdapterConfig

    model = ExpertModel(FAMILIES["bert"].build())
    model.add_expert("ad", AdapterConfig(bottleneck=2))
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "ad", TaskInfo("t")))
    with pytest.raises(ConfigError, match="PEFT has no bottleneck-adapter format"):
        bank.export_peft("ad", tmp_path / "x")
    dora = peft.get_peft_model(
        FAMILIES["bert"].build().model, peft.LoraConfig(r=2, target_modules=["query"], use_dora=True)
    )
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="use_dora=True has no pituning equivalent"):
        bank.import_peft(tmp_path / "dora", ExpertModel(FAMILIES["bert"].build()), "d", TaskInfo("t"))
    assert "d" not in bank


def test_prefix_round_trips_through_peft_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ExpertModel(load_backbone(_cfg("llama"), task="causal-lm")).eval()
    model.add_expert("p", PrefixConfig(num_tokens=3))
    _randomize(model, "p", 0)
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "p", TaskInfo("t")))
    out = bank.export_peft("p", tmp_path / "peft", num_attention_heads=2)
    torch.manual_seed(0)
    peft_model = peft.PeftModel.from_pretrained(load_backbone(_cfg("llama"), task="causal-lm").model, str(out))
    embedding = next(v for k, v in peft_model.state_dict().items() if "prompt_encoder" in k)
    assert embedding.shape == (3, 2 * 2 * 16)  # layers * (key, value) * kv width
    state = model.expert_state_dict("p")
    torch.testing.assert_close(embedding[:, :16], state["model.layers.0.self_attn.pi_prefix.prefix_key"])
    torch.testing.assert_close(embedding[:, 16:32], state["model.layers.0.self_attn.pi_prefix.prefix_value"])
    fresh = ExpertModel(load_backbone(_cfg("llama"), task="causal-lm"))
    bank.import_peft(out, fresh, "back", TaskInfo("t"))
    for key, value in model.expert_state_dict("p").items():
        assert torch.equal(bank.get("back").state[key], value)

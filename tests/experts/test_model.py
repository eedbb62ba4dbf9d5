"""ExpertModel behaviour beyond the contract: selection, BitFit, copies, devices."""

from __future__ import annotations

import copy
import io

import torch

from families import FAMILIES
from pituning import AdapterConfig, ExpertModel, LoraConfig, PrefixConfig


def _bert() -> ExpertModel:
    return ExpertModel(FAMILIES["bert"].build()).eval()


def _inputs() -> dict[str, torch.Tensor]:
    return FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))


def _randomize(model: ExpertModel) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".pi_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def test_bitfit_trains_only_backbone_biases() -> None:
    model = _bert()
    names = model.set_trainable([], bitfit=True)
    assert names and all(n.endswith(".bias") for n in names)
    assert len(names) == sum(1 for n, _ in model.backbone.named_parameters() if n.endswith(".bias"))


def test_set_trainable_extra_patterns_and_weights_only() -> None:
    model = _bert()
    model.add_expert("a", LoraConfig(r=2))
    model.add_expert("b", LoraConfig(r=2))
    model.interpolate(["a", "b"])
    weights_only = model.set_trainable([], interpolation=True)
    assert weights_only and all(n.endswith("lora_logits") for n in weights_only)
    with_pooler = model.set_trainable(["a"], interpolation=False, extra=[r"^backbone\.pooler\."])
    assert any("pooler" in n for n in with_pooler)
    assert not any(n.endswith("_logits") or n.endswith(".b") for n in with_pooler)


def test_mixed_kinds_stack_on_one_model() -> None:
    model = _bert()
    inputs = _inputs()
    model.add_expert("l", LoraConfig(r=2))
    model.add_expert("ad", AdapterConfig(bottleneck=4))
    model.add_expert("p", PrefixConfig(num_tokens=2))
    _randomize(model)
    assert set(model.active) == {"l", "ad", "p"}
    with torch.no_grad():
        all_on = model(**inputs).last_hidden_state
        model.set_active("l")
        only_lora = model(**inputs).last_hidden_state
        model.set_active([])
        none = model(**inputs).last_hidden_state
    assert not torch.allclose(all_on, only_lora) and not torch.allclose(only_lora, none)
    assert model.active == []


def test_deepcopy_and_torch_save_keep_experts_working() -> None:
    model = _bert()
    model.add_expert("a", LoraConfig(r=2))
    model.add_expert("p", PrefixConfig(num_tokens=2))
    _randomize(model)
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        with torch.no_grad():
            torch.testing.assert_close(other(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    # the copy is independent: removing its expert leaves the original untouched
    clone.remove_expert("a")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=0, atol=0)
        assert not torch.allclose(clone(**inputs).last_hidden_state, expected)


def test_collapse_with_svd_rank() -> None:
    model = _bert()
    for name in ("a", "b"):
        model.add_expert(name, LoraConfig(r=2))
    _randomize(model)
    inputs = _inputs()
    model.interpolate(["a", "b"])
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    config = model.collapse("ab", rank=4)
    assert config.r == 4  # type: ignore[attr-defined]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_train_mode_keeps_backbone_batch_norm_frozen() -> None:
    # regression: in training mode the backbone's batch-norm running statistics drifted, so the "frozen" backbone
    # changed and its experts no longer loaded into a fresh copy of it (BackboneMismatchError on EfficientNet)
    family = FAMILIES["cnn"]
    model = ExpertModel(family.build())
    before = model.fingerprint()
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.add_expert("task", LoraConfig(r=2))
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert model.training and model.backbone.training
    family.output(model, family.inputs(torch.Generator().manual_seed(0))).sum().backward()
    for name, value in model.backbone.state_dict().items():
        if ".pi_" not in name:
            assert torch.equal(value, state[name]), name
    assert ExpertModel(family.build()).fingerprint() == before

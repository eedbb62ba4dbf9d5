"""Task heads on a dual encoder (tiny towers): pooling per tower, the projected matching and pair heads, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from families import FAMILIES, tiny_dual
from pituning import ConfigError, ExpertModel, LoraConfig
from pituning.heads import DualHead, TaskModel


def _candidates(n: int = 3) -> dict[str, Tensor]:
    ids = torch.tensor([[2, 6 + c, 9, 3] for c in range(n)])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(n: int = 4) -> Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _dual_experts() -> ExpertModel:
    model = ExpertModel(tiny_dual())
    model.add_expert("e", LoraConfig(r=2))
    with torch.no_grad():  # LoRA B is zero at init: give it values so both of its factors get gradients
        for name, param in model.expert_parameters("e").items():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def test_dual_matching_forward_and_backward() -> None:
    model = TaskModel(_dual_experts(), "matching", candidates=_candidates())
    head = model.head
    assert isinstance(head, DualHead) and head.classifier is None and head.logit_scale is not None
    assert head.image_proj.weight.shape == (32, 24) and head.text_proj.weight.shape == (32, 32)  # text width
    model.experts.set_trainable(["e"], interpolation=False)
    logits = model(pixel_values=_pixels())
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    # cosines scaled by the temperature: |logits| <= exp(logit_scale)
    assert logits.abs().max() <= head.logit_scale.exp() + 1e-4
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".image." in n and "lora" in n for n in grads) and any(".text." in n and "lora" in n for n in grads)
    assert {"head.image_proj.weight", "head.text_proj.weight", "head.logit_scale"} <= grads


def test_dual_features_pool_each_tower() -> None:
    model = TaskModel(ExpertModel(tiny_dual()).eval(), "matching", candidates=_candidates())
    dual = model.experts.backbone
    pixels = _pixels(2)
    expected = dual.image.extract_features(pixels).mean(dim=(2, 3))
    torch.testing.assert_close(model.image_features(pixels), expected)
    ids, mask = _candidates().values()
    hidden = dual.text(input_ids=ids, attention_mask=mask).last_hidden_state
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(model.text_features(ids, mask), mean, rtol=1e-5, atol=1e-5)


def test_dual_head_saves_loads_and_initialises_another_task() -> None:
    experts = ExpertModel(tiny_dual()).eval()
    source = TaskModel(experts, "matching", candidates=_candidates(3)).eval()
    with torch.no_grad():
        for param in source.head.parameters():
            param.add_(0.05)
    state = source.head_state_dict()
    assert sorted(state) == [
        "image_proj.bias",
        "image_proj.weight",
        "logit_scale",
        "text_proj.bias",
        "text_proj.weight",
    ]
    again = TaskModel(experts, "matching", candidates=_candidates(3)).eval()
    again.head.load_state_dict(state)
    pixels = _pixels()
    torch.testing.assert_close(again(pixel_values=pixels), source(pixel_values=pixels))
    target = TaskModel(experts, "matching", candidates=_candidates(2))  # other classes: the head is class-agnostic
    target.head.load_state_dict(state)
    assert target(pixel_values=pixels).shape == (4, 2)


def test_dual_pair_classification_and_projection_width() -> None:
    experts = ExpertModel(tiny_dual()).eval()
    model = TaskModel(experts, "pair_classification", 3, projection_dim=16)
    head = model.head
    assert isinstance(head, DualHead) and head.logit_scale is None and head.classifier is not None
    assert head.image_proj.weight.shape == (16, 24) and head.text_proj.weight.shape == (16, 32)
    assert head.classifier.weight.shape == (3, 64)
    ids, mask = _candidates(4).values()
    logits = model(pixel_values=_pixels(), input_ids=ids, attention_mask=mask)
    assert logits.shape == (4, 3)
    assert "classifier.weight" in model.head_state_dict()


def test_dual_errors() -> None:
    experts = ExpertModel(tiny_dual())
    with pytest.raises(ConfigError, match="task_type='classification' on a dual encoder.*image tower alone"):
        TaskModel(experts, "classification", 2)
    with pytest.raises(ConfigError, match="projection_dim=0 needs a dual backbone"):
        TaskModel(experts, "matching", candidates=_candidates(), projection_dim=0)
    with pytest.raises(ConfigError, match=r"projection_dim=8 needs a dual backbone \(got 'bert'\)"):
        TaskModel(ExpertModel(FAMILIES["bert"].build()), "classification", 2, projection_dim=8)


def test_clip_heads_are_unchanged() -> None:
    clip = ExpertModel(FAMILIES["clip"].build()).eval()
    matching = TaskModel(clip, "matching", candidates=_candidates())
    assert sorted(matching.head_state_dict()) == ["logit_scale"]
    pair = TaskModel(clip, "pair_classification", 2)
    assert isinstance(pair.head, torch.nn.Linear) and pair.head.in_features == 4 * 16  # CLIP's projection_dim

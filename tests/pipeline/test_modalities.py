"""Text-to-text (T5) and vision-language (CLIP, dual encoder) tasks through the stages, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pituning.backbones
from families import EfficientNet
from pituning import ExpertBank
from pituning.data import ImageClassificationDataModule, VisionLanguageDataModule
from pituning.modules import ExpertTrainingModule, InterpolationModule, TaskEmbeddingModule
from pituning.suite import evaluate_quality
from tiny import text_data, tiny_model_dir, trainer


def test_text_to_text_t5(tasks: dict[str, str], tmp_path: Path) -> None:
    t5 = str(tiny_model_dir(tmp_path / "t5", "t5"))
    bank = str(tmp_path / "bank")
    data = text_data(tasks["close"], t5, "close", text_to_text=True, label_names=["neg", "pos"], max_train_examples=64)
    module = ExpertTrainingModule(
        t5, bank, "close", {"kind": "lora", "r": 4}, backbone_task="seq2seq-lm", task_type="text_to_text", lr=1e-2
    )
    fit = trainer(max_epochs=2)
    fit.fit(module, data)
    metrics = fit.test(module, data, verbose=False)[0]
    assert 0.0 <= metrics["test_acc"] <= 1.0 and np.isfinite(metrics["test_loss"])
    embed = TaskEmbeddingModule(t5, bank, "close", backbone_task="seq2seq-lm", task_type="text_to_text")
    trainer(inference_mode=False).predict(embed, datamodule=data)
    stored = ExpertBank(bank).get("close")
    assert stored.embedding is not None and any(v.abs().sum() > 0 for v in stored.embedding.values())


def _images(tmp_path: Path) -> list[dict[str, object]]:
    from PIL import Image

    rows = []
    rng = np.random.default_rng(0)
    for i in range(48):
        label = i % 2
        pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8) + (150 if label else 0)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(
            {"image": f"{i}.png", "text": ["w1 w2", "w3 w4"][label] if i % 3 else "w5", "label": ["no", "yes"][label]}
        )
    return rows


@pytest.mark.parametrize("mode", ["pair", "matching"])
def test_vision_language_clip(tmp_path: Path, mode: str) -> None:
    clip = str(tiny_model_dir(tmp_path / "clip", "clip"))
    table = tmp_path / "vl.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in _images(tmp_path)))
    data = VisionLanguageDataModule(
        str(table), clip, "vl", mode=mode, image_size=16, batch_size=8, caption_template="{}"
    )
    task_type = "pair_classification" if mode == "pair" else "matching"
    bank = str(tmp_path / "bank")
    module = ExpertTrainingModule(clip, bank, "vl", {"kind": "lora", "r": 2}, task_type=task_type, lr=1e-2)
    fit = trainer(max_epochs=2)
    fit.fit(module, data)
    assert 0.0 <= fit.test(module, data, verbose=False)[0]["test_acc"] <= 1.0
    embed = TaskEmbeddingModule(clip, bank, "vl", task_type=task_type)
    fit = trainer(inference_mode=False)
    fit.predict(embed, datamodule=data)
    assert embed.embedding is not None and embed.examples > 0


def test_image_classification_on_clip_vision(tmp_path: Path) -> None:
    clip = str(tiny_model_dir(tmp_path / "clip", "clip"))
    images = np.random.default_rng(0).integers(0, 255, (40, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(40) % 2)
    data = ImageClassificationDataModule(str(tmp_path / "x.npz"), "imgs", image_size=16, batch_size=8)
    module = ExpertTrainingModule(clip, str(tmp_path / "bank"), "imgs", {"kind": "adapter", "bottleneck": 4})
    trainer(max_epochs=1).fit(module, data)
    assert torch.isfinite(torch.tensor(trainer().test(module, data, verbose=False)[0]["test_loss"]))


def test_few_shot_loss_ranks_matching_sources_with_more_than_two_classes(tmp_path: Path) -> None:
    # regression: a matching head (a temperature) has no class dimension, so every source was taken for a
    # 2-class head and left out of the ranking when the target had 3 or more captions
    from pituning import ExpertModel, LoraConfig
    from pituning.bank import Expert, TaskInfo
    from pituning.modules.interpolate import rank_by_few_shot_loss

    clip = str(tiny_model_dir(tmp_path / "clip", "clip"))
    bank = ExpertBank(tmp_path / "bank")
    experts = ExpertModel(clip)
    for name in ("a", "b"):
        experts.add_expert(name, LoraConfig(r=2))
        head = {"logit_scale": torch.tensor(2.6592)}
        bank.add(Expert.from_model(experts, name, TaskInfo(name, modality="vision-language"), head=head))
        experts.remove_expert(name)
    gen = torch.Generator().manual_seed(0)
    candidates = {"input_ids": torch.tensor([[2, 6, 3], [2, 7, 3], [2, 8, 3]]), "attention_mask": torch.ones(3, 3)}
    batch = {"pixel_values": torch.randn(6, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    ranked = rank_by_few_shot_loss(bank, experts, ["a", "b"], [batch], "matching", candidates)
    assert sorted(name for name, _ in ranked) == ["a", "b"]
    assert all(np.isfinite(score) for _, score in ranked)


@pytest.fixture
def tiny_efficientnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages take a backbone *name*; here the image tower's name ``efficientnet-lite0`` builds a tiny, seeded
    EfficientNet-like network (the same weights at every load, as a checkpoint), so the test needs neither the vision
    extra nor the real network's compute. ``test_real_models.py`` loads the real checkpoint."""

    def build(name: str = "efficientnet-lite0", weights: object = None, **kwargs: object) -> EfficientNet:
        torch.manual_seed(0)
        return EfficientNet()

    monkeypatch.setattr(pituning.backbones, "load_efficientnet_lite", build)


def _class_images(path: Path, names: list[str], n: int = 60) -> Path:
    """``n`` images (16x16 RGB), class ``c`` a colour of its own plus noise, in the npz format of the image data."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(names)
    base = rng.integers(0, 255, (len(names), 1, 1, 3))
    images = np.clip(base[labels] + rng.integers(-30, 30, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels, label_names=np.array(names))
    return path


def test_vision_language_dual_encoder_stages(tiny_backbone: str, tmp_path: Path, tiny_efficientnet: None) -> None:
    dual = f"dual:efficientnet-lite0+{tiny_backbone}"
    npz = str(_class_images(tmp_path / "colours.npz", ["w10", "w11", "w12", "w13"]))
    bank = str(tmp_path / "bank")

    def data(name: str, classes: list[str], **kwargs: object) -> VisionLanguageDataModule:
        return VisionLanguageDataModule(
            npz, dual, name, mode="matching", classes=classes, caption_template="w1 {}", image_size=16,
            batch_size=8, **kwargs,
        )  # fmt: skip

    tasks = {"a": ["w10", "w11"], "b": ["w12", "w13"], "target": ["w13", "w10"]}
    for name, classes in tasks.items():
        module = ExpertTrainingModule(dual, bank, name, {"kind": "lora", "r": 2}, task_type="matching", lr=1e-2)
        trainer(max_epochs=1).fit(module, data(name, classes))
        embed = TaskEmbeddingModule(dual, bank, name, task_type="matching")
        trainer(inference_mode=False).predict(embed, datamodule=data(name, classes))
        assert embed.embedding is not None and embed.examples > 0
        assert any(key.startswith("image.") for key in embed.embedding)  # both towers carry the expert
        assert any(key.startswith("text.") for key in embed.embedding)
    stored = ExpertBank(bank).get("a")
    assert stored.backbone.family == "dual" and stored.backbone.source == dual
    assert stored.head is not None and stored.head["image_proj.weight"].shape == (32, 24)  # into the text width

    target = data("target", tasks["target"], shots=4)
    module = InterpolationModule(dual, bank, "target", k=2, task_type="matching", lr=1e-2)
    fit = trainer(max_epochs=2)
    fit.fit(module, target)
    assert {name for name, _ in module.selected} == {"a", "b"}
    assert 0.0 <= fit.test(module, target, verbose=False)[0]["test_acc"] <= 1.0
    result = ExpertBank(bank).get("target_pi")
    assert result.head is not None and {"image_proj.weight", "text_proj.weight", "logit_scale"} <= set(result.head)
    assert result.provenance["sources"] and set(result.provenance["sources"]) == {"a", "b"}


def test_few_shot_loss_reads_the_classes_of_a_dual_pair_head(tmp_path: Path) -> None:
    from families import tiny_dual
    from pituning import ExpertModel, LoraConfig
    from pituning.bank import Expert, TaskInfo
    from pituning.heads import TaskModel
    from pituning.modules.interpolate import rank_by_few_shot_loss

    bank = ExpertBank(tmp_path / "bank")
    experts = ExpertModel(tiny_dual())
    for name in ("a", "b"):
        experts.add_expert(name, LoraConfig(r=2))
        head = TaskModel(experts, "pair_classification", 3).head_state_dict()  # 3 classes, in "classifier.weight"
        bank.add(Expert.from_model(experts, name, TaskInfo(name, modality="vision-language"), head=head))
        experts.remove_expert(name)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(6, 3, 16, 16, generator=gen),
        "input_ids": torch.randint(5, 40, (6, 5), generator=gen),
        "attention_mask": torch.ones(6, 5, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    ranked = rank_by_few_shot_loss(bank, experts, ["a", "b"], [batch], "pair_classification")
    assert sorted(name for name, _ in ranked) == ["a", "b"]


def test_unseen_classes_take_no_part_in_the_training_loss(
    tiny_backbone: str, tmp_path: Path, tiny_efficientnet: None
) -> None:
    dual = f"dual:efficientnet-lite0+{tiny_backbone}"
    npz = str(_class_images(tmp_path / "colours.npz", ["w10", "w11", "w12", "w13"]))
    data = VisionLanguageDataModule(npz, dual, "open", mode="matching", caption_template="w1 {}", image_size=16,
                                    batch_size=8, unseen_classes=["w13", "w11"])  # fmt: skip
    module = ExpertTrainingModule(dual, None, "open", {"kind": "lora", "r": 2}, task_type="matching", lr=1e-2)
    losses: list[float] = []
    original = module._loss

    def spy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if module.training:
            assert (logits[:, [1, 3]] == torch.finfo(logits.dtype).min).all()  # masked in the training softmax
            assert (logits[:, [0, 2]] > torch.finfo(logits.dtype).min).all()
        loss = original(logits, labels)
        losses.append(float(loss))
        return loss

    module._loss = spy  # type: ignore[method-assign]
    fit = trainer(max_epochs=1)
    fit.fit(module, data)
    assert module.unseen is not None and module.unseen.tolist() == [3, 1]
    assert losses and all(loss == loss for loss in losses)  # finite: no -inf - -inf
    module.eval()
    batch = next(iter(data.test_dataloader()))
    logits = module(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape[1] == 4 and torch.isfinite(logits).all()  # tested against every caption


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_source_check_follows_the_trainers_precision(tmp_path: Path, tiny_efficientnet: None, precision: str) -> None:
    """``evaluate_quality`` after a fit agrees with ``Trainer.test``; under ``bf16-true`` it casts the images as the
    Trainer does (a plain CNN does not cast its input to its weights' dtype)."""
    npz = _class_images(tmp_path / "x.npz", ["red", "green", "blue"])
    data = ImageClassificationDataModule(str(npz), "colours", image_size=16, batch_size=8)
    module = ExpertTrainingModule("efficientnet-lite0", None, "colours", {"kind": "adapter", "bottleneck": 4}, lr=1e-2)
    fit = trainer(max_epochs=2, precision=precision)
    fit.fit(module, data)
    tested = fit.test(module, data, verbose=False)[0]["test_acc"]
    checked = evaluate_quality(module, data.test_dataloader())
    assert checked.acc == pytest.approx(tested)
    assert checked.true_majority_share == pytest.approx(1 / 3, abs=0.1)


@pytest.mark.parametrize("setting", ["bf16-true", "bf16 backbone"])
def test_vision_pipeline_in_bf16(tmp_path: Path, tiny_efficientnet: None, setting: str) -> None:
    """Every stage on a plain CNN in bf16: ``bf16-true`` (the batches pituning reads itself, for the few-shot-loss
    ranking and the held-out slice of the interpolation logits, are cast like the Trainer's own), and a bf16 frozen
    backbone under ``32-true`` (``backbone_dtype="bfloat16"``: fp32 pixels meet bf16 convolutions)."""
    npz = str(_class_images(tmp_path / "x.npz", ["red", "green", "blue", "white"], n=80))
    bank = str(tmp_path / "bank")
    fit_options = {"precision": "bf16-true"} if setting == "bf16-true" else {}
    dtype = {"backbone_dtype": "bfloat16"} if setting == "bf16 backbone" else {}
    adapter = {"kind": "adapter", "bottleneck": 4}
    for name, classes in {"rg": ["red", "green"], "bw": ["blue", "white"]}.items():
        data = ImageClassificationDataModule(npz, name, classes=classes, image_size=16, batch_size=8)
        module = ExpertTrainingModule("efficientnet-lite0", bank, name, adapter, lr=1e-2, **dtype)
        trainer(max_epochs=1, **fit_options).fit(module, data)
        embed = TaskEmbeddingModule("efficientnet-lite0", bank, name, **dtype)
        trainer(inference_mode=False, **fit_options).predict(embed, datamodule=data)
        assert embed.embedding is not None and all(v.dtype == torch.float32 for v in embed.embedding.values())
    target = ImageClassificationDataModule(
        npz, "target", classes=["red", "blue"], image_size=16, batch_size=4, shots=6, holdout_shots=2
    )
    alone = ExpertTrainingModule("efficientnet-lite0", bank, "target", adapter, lr=1e-2, **dtype)
    trainer(max_epochs=1, **fit_options).fit(alone, target)
    checked = evaluate_quality(alone, target.test_dataloader())
    assert 0.0 <= checked.acc <= 1.0
    module = InterpolationModule(
        "efficientnet-lite0", bank, "target", k=1, candidates=["rg", "bw"], predictor="few_shot_loss",
        logits_data="holdout", lr=1e-2, **dtype,
    )  # fmt: skip
    fit = trainer(max_epochs=2, **fit_options)
    fit.fit(module, target)
    assert len(module.selected) == 1
    assert 0.0 <= fit.test(module, target, verbose=False)[0]["test_acc"] <= 1.0


def test_non_finite_inputs_and_losses_stop_training_naming_task_and_batch(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN pixels stop training (and the Fisher pass) with the task, batch and cause named; a diverged loss on finite
    inputs says to lower the learning rate; nothing reaches the bank either way."""
    from pituning.errors import NonFiniteError

    clip = str(tiny_model_dir(tmp_path / "clip", "clip"))
    images = np.random.default_rng(0).random((40, 16, 16, 3)).astype(np.float32)
    images[5, 3, 3, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, labels=np.arange(40) % 2)
    data = ImageClassificationDataModule(str(tmp_path / "nan.npz"), "nan_imgs", image_size=16, batch_size=40)
    bank = str(tmp_path / "bank")
    module = ExpertTrainingModule(clip, bank, "nan_imgs", {"kind": "adapter", "bottleneck": 4})
    with pytest.raises(NonFiniteError, match=r"task 'nan_imgs' at epoch 0, batch 0; the batch's inputs hold NaN"):
        trainer(max_epochs=1).fit(module, data)
    assert "nan_imgs" not in ExpertBank(bank)
    np.savez(tmp_path / "clean.npz", images=np.nan_to_num(images), labels=np.arange(40) % 2)
    clean = ImageClassificationDataModule(str(tmp_path / "clean.npz"), "nan_imgs", image_size=16, batch_size=40)
    trainer(max_epochs=1).fit(ExpertTrainingModule(clip, bank, "nan_imgs", {"kind": "adapter", "bottleneck": 4}), clean)
    with pytest.raises(NonFiniteError, match=r"Fisher embedding of task 'nan_imgs' met NaN or inf in batch 0"):
        trainer(inference_mode=False).predict(TaskEmbeddingModule(clip, bank, "nan_imgs"), datamodule=data)
    assert not ExpertBank(bank).entry("nan_imgs").has_embedding

    text = text_data(tasks["close"], tiny_backbone, "close", max_train_examples=32)
    diverged = ExpertTrainingModule(tiny_backbone, bank, "close", {"kind": "lora", "r": 2})
    monkeypatch.setattr(diverged, "_loss", lambda logits, labels: logits.sum() * float("inf"))
    with pytest.raises(NonFiniteError, match=r"task 'close' .* inputs are finite, so training diverged: lower the"):
        trainer(max_epochs=1).fit(diverged, text)
    assert "close" not in ExpertBank(bank)

    def finite_loss_nan_gradients(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        zero = logits - logits.detach()  # 0, with a gradient path; the square root's gradient at 0 is inf
        return torch.nn.functional.cross_entropy(logits, labels) + 0.0 * zero.abs().sqrt().sum()

    nan_grads = ExpertTrainingModule(tiny_backbone, bank, "close", {"kind": "lora", "r": 2})
    monkeypatch.setattr(nan_grads, "_loss", finite_loss_nan_gradients)
    with pytest.raises(NonFiniteError, match=r"gradients are NaN or inf on task 'close' at epoch 0, batch 0, although"):
        trainer(max_epochs=1).fit(nan_grads, text)
    assert "close" not in ExpertBank(bank)

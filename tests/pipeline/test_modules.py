"""The three Lightning stages on a tiny BERT: storage, invariants, bf16-mixed, k = 0, and errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pituning import ExpertBank
from pituning.bank import Expert
from pituning.errors import BackboneMismatchError, BankError
from pituning.fisher import FisherError
from pituning.modules import ExpertTrainingModule, InterpolationModule, TaskEmbeddingModule
from tiny import text_data, tiny_bert_dir, trainer

EXPERT = {"kind": "lora", "r": 4, "alpha": 8}


def _train(backbone: str, data_path: str, name: str, bank: str) -> ExpertTrainingModule:
    pl.seed_everything(0, verbose=False)
    data = text_data(data_path, backbone, name, max_train_examples=96)
    module = ExpertTrainingModule(backbone, bank, name, EXPERT, lr=1e-2)
    trainer(max_epochs=2).fit(module, data)
    return module


def _embed(backbone: str, bank: str, name: str, data_path: str, **kwargs: object) -> TaskEmbeddingModule:
    module = TaskEmbeddingModule(backbone, bank, name, **kwargs)  # type: ignore[arg-type]
    data = text_data(data_path, backbone, name, max_train_examples=96)
    trainer(inference_mode=False).predict(module, datamodule=data)
    return module


def test_training_stores_expert_and_head(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = str(tmp_path / "bank")
    module = _train(tiny_backbone, tasks["close"], "close", bank)
    stored = ExpertBank(bank).get("close")
    assert stored.config.to_dict()["r"] == 4 and stored.head is not None and set(stored.head) == {"weight", "bias"}
    assert stored.task.name == "close" and stored.task.num_examples == 96 and stored.task.label_names == ["neg", "pos"]
    assert "val_acc" in stored.metrics and stored.provenance["stage"] == "train-expert"
    assert module.stored is not None


def test_embedding_changes_no_parameter(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = str(tmp_path / "bank")
    _train(tiny_backbone, tasks["close"], "close", bank)
    module = TaskEmbeddingModule(tiny_backbone, bank, "close")
    data = text_data(tasks["close"], tiny_backbone, "close", max_train_examples=96)
    fit = trainer(inference_mode=False)
    module.trainer = fit  # setup needs it only for matching tasks
    module.setup("test")
    assert module.task_model is not None
    before = {n: p.detach().clone() for n, p in module.task_model.named_parameters()}
    fit.predict(module, datamodule=data)
    for name, param in module.task_model.named_parameters():
        assert torch.equal(param, before[name]), name
    embedding = ExpertBank(bank).get("close").embedding
    assert embedding is not None and set(embedding) == set(ExpertBank(bank).get("close").state)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in embedding.values())


def test_k_zero_reduces_to_single_expert_training(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank_path = str(tmp_path / "bank")
    _train(tiny_backbone, tasks["close"], "template", bank_path)  # provides the config
    results = []
    for cls in ("single", "interpolate"):
        pl.seed_everything(5, verbose=False)
        data = text_data(tasks["target"], tiny_backbone, "target", shots=8, seed=5, batch_size=8)
        if cls == "single":
            module = ExpertTrainingModule(tiny_backbone, bank_path, "alone", EXPERT, lr=1e-2)
        else:
            module = InterpolationModule(
                tiny_backbone, bank_path, "template", k=0, lr=1e-2, head_init="fresh", output_name="alone_pi"
            )
        fit = trainer(max_epochs=3)
        fit.fit(module, data)
        results.append(fit.test(module, data, verbose=False)[0]["test_acc"])
    bank = ExpertBank(bank_path)
    single, pi = bank.get("alone"), bank.get("alone_pi")
    assert pi.provenance["sources"] == [] and pi.config.to_dict()["r"] == 4
    for key in single.state:
        if key.endswith("lora_A"):
            b = key[: -len("lora_A")] + "lora_B"
            delta_single = single.state[b] @ single.state[key] * single.config.scaling  # type: ignore[attr-defined]
            delta_pi = pi.state[b] @ pi.state[key] * pi.config.scaling  # type: ignore[attr-defined]
            torch.testing.assert_close(delta_pi, delta_single, atol=1e-5, rtol=1e-4)
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_bf16_mixed_in_all_three_stages(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = str(tmp_path / "bank")
    for name in ("close", "far1"):
        data = text_data(tasks[name], tiny_backbone, name, max_train_examples=64)
        trainer(max_epochs=1, precision="bf16-mixed").fit(
            ExpertTrainingModule(tiny_backbone, bank, name, EXPERT, lr=1e-2), data
        )
        trainer(inference_mode=False, precision="bf16-mixed").predict(
            TaskEmbeddingModule(tiny_backbone, bank, name), datamodule=data
        )
    emb = ExpertBank(bank).get("close").embedding
    assert emb is not None and all(v.dtype == torch.float32 for v in emb.values())
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8)
    module = InterpolationModule(tiny_backbone, bank, "close", k=1, lr=1e-2)
    trainer(max_epochs=1, precision="bf16-mixed").fit(module, data)
    assert module.selected[0][0] == "far1" and "close_pi" in ExpertBank(bank)


def test_bf16_backbone_and_bf16_true(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    """A bf16 frozen backbone trains under 32-true (bf16 features meet the fp32 head), and under ``bf16-true`` the
    Fisher still accumulates in fp32."""
    bank = str(tmp_path / "bank")
    data = text_data(tasks["close"], tiny_backbone, "close", max_train_examples=64)
    module = ExpertTrainingModule(tiny_backbone, bank, "close", EXPERT, lr=1e-2, backbone_dtype="bfloat16")
    trainer(max_epochs=1).fit(module, data)
    embeddings = {}
    for precision in ("32-true", "bf16-true"):
        embedder = TaskEmbeddingModule(tiny_backbone, bank, "close")
        trainer(inference_mode=False, precision=precision).predict(embedder, datamodule=data)
        assert embedder.fisher is not None and embedder.fisher.total.dtype == torch.float32
        assert embedder.embedding is not None
        embeddings[precision] = embedder.embedding
    assert set(embeddings["bf16-true"]) == set(embeddings["32-true"])
    for value in embeddings["bf16-true"].values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all() and value.sum() > 0


def test_errors_write_nothing(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank_path = str(tmp_path / "bank")
    _train(tiny_backbone, tasks["close"], "close", bank_path)
    bank = ExpertBank(bank_path)
    names = bank.names()
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8)
    with pytest.raises(BankError, match="has no task embedding"):
        trainer(max_epochs=1).fit(InterpolationModule(tiny_backbone, bank_path, "close", k=1), data)
    _embed(tiny_backbone, bank_path, "close", tasks["close"])
    with pytest.raises(BankError, match=r"k=2 sources were asked .* only 0 comparable"):
        trainer(max_epochs=1).fit(InterpolationModule(tiny_backbone, bank_path, "close", k=2), data)
    other = str(tiny_bert_dir(tmp_path / "other", seed=1))
    with pytest.raises(BackboneMismatchError, match="allow_backbone_mismatch"):
        trainer(max_epochs=1).fit(InterpolationModule(other, bank_path, "close", sources=["close"], k=1), data)
    # a head of zeros makes every gradient zero: the Fisher is unusable, and no embedding is stored
    expert = bank.get("close")
    assert expert.head is not None
    zero = Expert(
        **{
            **expert.__dict__,
            "name": "deadhead",
            "head": {k: torch.zeros_like(v) for k, v in expert.head.items()},
            "embedding": None,
        }
    )
    bank.add(zero)
    with pytest.raises(FisherError, match="all zero or non-finite"):
        _embed(tiny_backbone, bank_path, "deadhead", tasks["close"])
    assert not bank.entry("deadhead").has_embedding
    assert sorted(bank.names()) == sorted([*names, "deadhead"])


def test_fit_with_bare_dataloaders(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    data = text_data(tasks["close"], tiny_backbone, "close", max_train_examples=32)
    data.setup()
    module = ExpertTrainingModule(tiny_backbone, str(tmp_path / "bank"), "bare", EXPERT, num_classes=2)
    trainer(max_epochs=1).fit(module, train_dataloaders=data.train_dataloader())
    stored = ExpertBank(str(tmp_path / "bank")).get("bare")
    assert stored.task.name == "bare" and stored.head is not None


def test_every_stage_module_takes_backbone_bank_and_name_first() -> None:
    import inspect

    first = {
        cls: list(inspect.signature(cls.__init__).parameters)[1:4]
        for cls in (ExpertTrainingModule, TaskEmbeddingModule, InterpolationModule)
    }
    assert first == {
        ExpertTrainingModule: ["backbone", "bank", "expert_name"],
        TaskEmbeddingModule: ["backbone", "bank", "expert_name"],
        InterpolationModule: ["backbone", "bank", "target"],
    }


@pytest.mark.parametrize(
    "old", [("EXPERT", "name", "BANK"), ("EXPERT",), ("None", "name", "BANK")], ids=["full", "expert", "no-expert"]
)
def test_the_earlier_argument_order_still_works_with_a_deprecation(
    old: tuple[str, ...], tiny_backbone: str, tmp_path: Path
) -> None:
    values = {"EXPERT": EXPERT, "BANK": str(tmp_path / "bank"), "name": "name", "None": None}
    args = [values[a] for a in old]
    with pytest.warns(DeprecationWarning, match=r"old argument order.*\(backbone, bank, expert_name, expert\)"):
        module = ExpertTrainingModule(tiny_backbone, *args, num_classes=2)
    assert module.bank_location == (str(tmp_path / "bank") if len(old) == 3 else None)
    assert module.expert_name == ("name" if len(old) == 3 else "expert")
    assert module.expert_config.kind == "lora" and module.hparams["bank"] == module.bank_location


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_the_fisher_pass_progress_bar_says_fisher(
    bar: str, tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bank = str(tmp_path / "bank")
    data = text_data(tasks["close"], tiny_backbone, "close", max_train_examples=32)
    trainer(max_epochs=1).fit(ExpertTrainingModule(tiny_backbone, bank, "close", EXPERT, lr=1e-2), data)
    progress = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    pl.Trainer(accelerator="cpu", logger=False, inference_mode=False, callbacks=[progress]).predict(
        TaskEmbeddingModule(tiny_backbone, bank, "close"), datamodule=data
    )
    if bar == "tqdm":
        assert progress._predict_progress_bar is not None and progress._predict_progress_bar.desc.startswith("Fisher")
    else:
        assert progress.progress is not None and [t.description for t in progress.progress.tasks] == ["Fisher"]

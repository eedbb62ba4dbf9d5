"""The few-shot levers: held-out shots, restoring the best validation epoch, initial weights, logits on held-out
data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pituning import ExpertBank
from pituning.errors import ConfigError
from pituning.modules import ExpertTrainingModule, InterpolationModule, RestoreBest
from tiny import text_data, trainer

EXPERT = {"kind": "lora", "r": 4, "alpha": 8}


def test_holdout_shots_split_the_k_shot_sample(tiny_backbone: str, tasks: dict[str, str]) -> None:
    data = text_data(tasks["target"], tiny_backbone, "t", shots=8, holdout_shots=3, seed=2)
    data.setup()
    full = text_data(tasks["target"], tiny_backbone, "t", shots=8, seed=2)
    full.setup()
    train, held = data.splits["train"], data.splits["validation"]
    assert sorted(train[1]) == [0] * 5 + [1] * 5 and sorted(held[1]) == [0] * 3 + [1] * 3
    # the same 8 shots per class, split: no label beyond the k shots is used
    assert sorted(train[0] + held[0]) == sorted(full.splits["train"][0])
    assert data.splits["test"] == full.splits["test"]


@pytest.mark.parametrize("holdout", [-1, 8, 9])
def test_holdout_shots_must_be_below_the_shots(tiny_backbone: str, tasks: dict[str, str], holdout: int) -> None:
    with pytest.raises(ConfigError, match="holdout_shots"):
        text_data(tasks["target"], tiny_backbone, "t", shots=8, holdout_shots=holdout)
    with pytest.raises(ConfigError, match="holdout_shots"):
        text_data(tasks["target"], tiny_backbone, "t", holdout_shots=2)  # needs k-shot


def test_restore_best_puts_back_the_best_epoch(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    data = text_data(tasks["target"], tiny_backbone, "t", shots=8, holdout_shots=3, batch_size=4)
    module = ExpertTrainingModule(tiny_backbone, str(tmp_path / "bank"), "t", EXPERT, lr=5e-2)
    seen: list[dict[str, torch.Tensor]] = []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    best = RestoreBest("val_loss", "min")
    trainer(max_epochs=4, callbacks=[best, Spy()], num_sanity_val_steps=0).fit(module, data)
    assert best.best_epoch is not None and len(seen) == 4
    now = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], v) for n, v in seen[best.best_epoch].items())
    # what the bank stored is the restored expert
    stored = ExpertBank(tmp_path / "bank").get("t").state
    assert any(torch.equal(v, now[n]) for n in now for v in stored.values() if v.shape == now[n].shape)


def test_restore_best_needs_a_validation_metric(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    data = text_data(tasks["target"], tiny_backbone, "t", shots=4)
    module = ExpertTrainingModule(tiny_backbone, None, "t", EXPERT)
    with pytest.raises(ConfigError, match="RestoreBest monitors 'val_nope'"):
        trainer(max_epochs=1, callbacks=[RestoreBest("val_nope")], num_sanity_val_steps=0).fit(module, data)
    with pytest.raises(ConfigError, match="mode"):
        RestoreBest(mode="up")


def _bank_with_sources(backbone: str, tasks: dict[str, str], root: Path) -> str:
    bank = str(root / "bank")
    for name in ("close", "far1"):
        pl.seed_everything(0, verbose=False)
        module = ExpertTrainingModule(backbone, bank, name, EXPERT, lr=1e-2)
        trainer(max_epochs=1).fit(module, text_data(tasks[name], backbone, name, max_train_examples=64))
    module = ExpertTrainingModule(backbone, bank, "target", EXPERT, lr=1e-2)
    trainer(max_epochs=1).fit(module, text_data(tasks["target"], backbone, "target", shots=4))
    return bank


def test_init_weights_and_logits_on_holdout(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8, holdout_shots=3, batch_size=4)
    module = InterpolationModule(
        tiny_backbone, bank, "target", sources=["close", "far1"], k=2, init_weights=[0.7, 0.2, 0.1],
        logits_data="holdout", logits_lr=0.5, weights_only_steps=100, lr=1e-2,
    )  # fmt: skip
    fit = trainer(max_epochs=1, limit_val_batches=0)
    module.trainer = fit
    fit.strategy.connect(module)
    fit._data_connector.attach_datamodule(module, datamodule=data)  # setup builds the pool with the DataModule
    module.setup("fit")
    start = module.mean_weights()
    assert start == pytest.approx({"close": 0.7, "far1": 0.2, "target_target": 0.1}, abs=1e-5)
    # the logits move with the held-out batches' gradients, not the training batches'
    assert module.task_model is not None
    module.task_model.eval()  # no dropout: the two held-out forwards below are the same computation
    logits = list(module.task_model.experts.interpolation_parameters().values())
    held = module._holdout_batch()
    loss = module._loss(module(**{k: v for k, v in held.items() if k != "labels"}), held["labels"])
    expected = torch.autograd.grad(loss, logits)
    module._holdout = None  # the step below draws the same first held-out batch
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # outside a loop: nothing to log to
    train = next(iter(data.train_dataloader()))
    step_loss = module.training_step(train, 0)
    step_loss.backward()
    module.on_after_backward()
    for param, grad in zip(logits, expected, strict=True):
        assert param.grad is not None and torch.allclose(param.grad, grad, atol=1e-6)


def test_logits_on_holdout_trains_end_to_end(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8, holdout_shots=3, batch_size=4)
    module = InterpolationModule(
        tiny_backbone, bank, "target", sources=["close", "far1"], k=2, logits_data="holdout", logits_lr=0.5, lr=1e-2
    )
    fit = trainer(max_epochs=2, callbacks=[RestoreBest("val_acc", "max")], num_sanity_val_steps=0)
    fit.fit(module, data)
    stored = ExpertBank(bank).get("target_pi")
    assert stored.provenance["logits_data"] == "holdout"
    assert stored.provenance["mean_weights"] != pytest.approx({"close": 1 / 3, "far1": 1 / 3, "target_target": 1 / 3})


def test_lever_options_are_checked(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    with pytest.raises(ConfigError, match="init_weights needs 3 weights"):
        InterpolationModule(tiny_backbone, bank, "target", k=2, init_weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="logits_data"):
        InterpolationModule(tiny_backbone, bank, "target", k=2, logits_data="test")
    data = text_data(tasks["target"], tiny_backbone, "target", shots=4, val_fraction=0.0)
    module = InterpolationModule(tiny_backbone, bank, "target", sources=["close", "far1"], k=2, logits_data="holdout")
    with pytest.raises(ConfigError, match="holdout_shots"):
        trainer(max_epochs=1, limit_val_batches=0).fit(module, data)


def test_source_lr_puts_the_sources_in_their_own_group(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8, batch_size=4)
    module = InterpolationModule(tiny_backbone, bank, "target", sources=["close", "far1"], k=2, lr=1e-2,
                                 source_lr=1e-4, weights_only_steps=3)  # fmt: skip
    trainer(max_epochs=1, limit_val_batches=0).fit(module, data)
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["sources"]["lr"] == 1e-4 and groups["experts"]["lr"] == 1e-2
    experts = module.task_model.experts if module.task_model else None
    assert experts is not None
    sources = {id(p) for name in ("close", "far1") for p in experts.expert_parameters(name).values()}
    assert {id(p) for p in groups["sources"]["params"]} == sources
    assert not sources & {id(p) for p in groups["experts"]["params"]}
    assert module.lr_factor(groups["sources"], 0, total=10) == 0.0  # the weights-only warm-up holds the sources too


def test_source_lr_zero_freezes_the_sources(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    data = text_data(tasks["target"], tiny_backbone, "target", shots=8, batch_size=4)
    before = {n: p.clone() for n, p in ExpertBank(bank).get("close").state.items()}
    module = InterpolationModule(tiny_backbone, bank, "target", sources=["close", "far1"], k=2, lr=1e-2, source_lr=0)
    trainer(max_epochs=1, limit_val_batches=0).fit(module, data)
    assert module.task_model is not None
    after = module.task_model.experts.expert_state_dict("close")
    trainable = {n for n, p in module.task_model.named_parameters() if p.requires_grad}
    assert not any(n.endswith(".close") or n.endswith(".far1") for n in trainable)
    assert any(n.endswith(".target_target") for n in trainable)
    for name, value in after.items():
        assert torch.equal(value, before[name])


def test_head_init_sources_averages_the_sources_heads(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    bank = _bank_with_sources(tiny_backbone, tasks, tmp_path)
    heads = [ExpertBank(bank).get(n).head for n in ("close", "far1")]
    assert heads[0] is not None and heads[1] is not None
    module = InterpolationModule(tiny_backbone, bank, "target", sources=["close", "far1"], k=2, head_init="sources",
                                 init_weights=[3.0, 1.0, 1.0], num_classes=2)  # fmt: skip
    assert module.task_model is not None
    for key, value in module.task_model.head.state_dict().items():
        assert torch.allclose(value, 0.75 * heads[0][key] + 0.25 * heads[1][key], atol=1e-6)
    headless = dataclasses.replace(ExpertBank(bank).get("far1"), name="headless", head=None)
    ExpertBank(bank).add(headless)
    with pytest.raises(ConfigError, match="has no head or one of another shape"):
        InterpolationModule(tiny_backbone, bank, "target", sources=["close", "headless"], k=2, head_init="sources",
                            num_classes=2)  # fmt: skip
    with pytest.raises(ConfigError, match="head_init must be one of"):
        InterpolationModule(tiny_backbone, bank, "target", k=2, head_init="mean")
    with pytest.raises(ConfigError, match="source_lr must be >= 0"):
        InterpolationModule(tiny_backbone, bank, "target", k=2, source_lr=-1.0)

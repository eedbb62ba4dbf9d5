"""π-Tuning's variants as options of the interpolate stage: linear mixing that starts at the target expert, shared
weights, a pool without the target expert, and the guard against negative transfer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from pituning import ExpertBank
from pituning.config import InterpolationConfig, OptimConfig
from pituning.errors import ConfigError
from pituning.modules import ExpertTrainingModule, InterpolationModule
from tiny import text_data, trainer

EXPERT = {"kind": "lora", "r": 4, "alpha": 8}
OPTIM = OptimConfig(lr=1e-2)


@pytest.fixture(scope="module")
def bank(tiny_backbone: str, tasks: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    location = str(tmp_path_factory.mktemp("variants") / "bank")
    for name in ("close", "far1"):
        pl.seed_everything(0, verbose=False)
        module = ExpertTrainingModule(tiny_backbone, location, name, EXPERT, optim=OPTIM)
        trainer(max_epochs=1).fit(module, text_data(tasks[name], tiny_backbone, name, max_train_examples=64))
    module = ExpertTrainingModule(tiny_backbone, location, "target", EXPERT, optim=OPTIM)
    trainer(max_epochs=1).fit(module, text_data(tasks["target"], tiny_backbone, "target", shots=4))
    return location


def _fit(backbone: str, bank: str, data: object, name: str, **interpolation: object) -> InterpolationModule:
    pl.seed_everything(0, verbose=False)
    config = InterpolationConfig(**interpolation)  # type: ignore[arg-type]
    module = InterpolationModule(
        backbone, bank, "target", sources=["close", "far1"], k=2, interpolation=config, optim=OPTIM, output_name=name
    )
    trainer(max_epochs=1, limit_val_batches=0).fit(module, data)
    return module


def test_linear_mixing_starts_at_the_target_expert(tiny_backbone: str, tasks: dict[str, str], bank: str) -> None:
    data = text_data(tasks["target"], tiny_backbone, "target", shots=4, batch_size=8)
    module = _fit(tiny_backbone, bank, data, "lin", mixing="linear", share="task", weights_only_steps=0, logits_lr=0)
    stored = ExpertBank(bank).get("lin")
    # logits_lr 0: the coefficients stay where they started, every source at 0 and the target at 1
    assert stored.provenance["mean_weights"] == pytest.approx({"close": 0.0, "far1": 0.0, "target_target": 1.0})
    assert stored.provenance["mixing"] == "linear" and stored.provenance["share"] == "task"
    assert module.pool == ["close", "far1", "target_target"]


def test_pool_without_the_target_expert(tiny_backbone: str, tasks: dict[str, str], bank: str) -> None:
    data = text_data(tasks["target"], tiny_backbone, "target", shots=4, batch_size=8)
    module = _fit(tiny_backbone, bank, data, "no_target", include_target=False, share="layer")
    assert module.pool == ["close", "far1"]
    assert module.task_model is not None and "target_target" not in module.task_model.experts.experts
    assert set(ExpertBank(bank).get("no_target").provenance["mean_weights"]) == {"close", "far1"}
    with pytest.raises(ConfigError, match="needs 2 weights \\(the sources\\)"):
        InterpolationModule(
            tiny_backbone,
            bank,
            "target",
            k=2,
            interpolation=InterpolationConfig(include_target=False, init_weights=(1, 1, 1)),
        )
    with pytest.raises(ConfigError, match="guard falls back on the target expert"):
        InterpolationConfig(include_target=False, guard=True)


@pytest.mark.parametrize(("losses", "kept"), [((1.0, 0.5), "target"), ((0.5, 1.0), "mixture")])
def test_guard_keeps_the_better_of_the_mixture_and_the_target_expert(
    tiny_backbone: str,
    tasks: dict[str, str],
    bank: str,
    monkeypatch: pytest.MonkeyPatch,
    losses: tuple[float, float],
    kept: str,
) -> None:
    data = text_data(tasks["target"], tiny_backbone, "target", shots=4, batch_size=8)
    measured = iter(losses)  # the mixture's loss, then the target expert's alone
    seen: list[dict[str, float]] = []

    def mean_loss(self: InterpolationModule, batches: list[dict[str, torch.Tensor]]) -> float:
        assert batches and self.task_model is not None
        seen.append(self.mean_weights())
        return next(measured)

    monkeypatch.setattr(InterpolationModule, "_mean_loss", mean_loss)
    name = f"guarded_{kept}"
    _fit(tiny_backbone, bank, data, name, guard=True, init_weights=(0.45, 0.45, 0.1))
    stored = ExpertBank(bank).get(name)
    assert stored.provenance["guard"] == {"mixture_loss": losses[0], "target_loss": losses[1], "kept": kept}
    assert seen[1]["target_target"] == pytest.approx(1.0)  # the second loss was the target expert's alone
    weights = stored.provenance["mean_weights"]
    if kept == "target":  # the collapsed expert is the pool's target expert alone
        assert weights["target_target"] == pytest.approx(1.0)
    else:  # the learned mixture, put back
        assert weights == pytest.approx(seen[0])


def test_guard_measures_real_losses(tiny_backbone: str, tasks: dict[str, str], bank: str) -> None:
    data = text_data(tasks["target"], tiny_backbone, "target", shots=4, batch_size=8)
    _fit(tiny_backbone, bank, data, "guarded", guard=True, mixing="linear")
    guard = ExpertBank(bank).get("guarded").provenance["guard"]
    assert guard["kept"] == ("target" if guard["target_loss"] < guard["mixture_loss"] else "mixture")
    assert 0 < guard["mixture_loss"] < 10 and 0 < guard["target_loss"] < 10

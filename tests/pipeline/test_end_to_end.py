"""End to end on a tiny model: three sources, one close to the target; the graph ranks it first, and π-Tuning on the
16-shot target beats training the target expert alone."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from pituning import ExpertBank
from pituning.graph import TaskGraph
from pituning.modules import ExpertTrainingModule, InterpolationModule, TaskEmbeddingModule
from pituning.suite import make_probe
from tiny import text_data, trainer

pytestmark = pytest.mark.slow
EXPERT = {"kind": "lora", "r": 4, "alpha": 8}
SOURCES = ("close", "far1", "far2")


def test_pi_tuning_end_to_end(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    bank_location = str(tmp_path / "bank")
    bank = ExpertBank(bank_location)
    probe = make_probe(tiny_backbone, EXPERT, bank)

    def embed(name: str, data: object) -> None:
        module = TaskEmbeddingModule(tiny_backbone, bank_location, name, probe=probe)
        trainer(inference_mode=False).predict(module, datamodule=data)  # type: ignore[attr-defined]

    for name in SOURCES:
        pl.seed_everything(0, verbose=False)
        data = text_data(tasks[name], tiny_backbone, name)
        module = ExpertTrainingModule(tiny_backbone, bank_location, name, EXPERT, lr=1e-2)
        trainer(max_epochs=8).fit(module, data)
        assert trainer().test(module, data, verbose=False)[0]["test_acc"] > 0.75  # each source is learnt
        embed(name, data)

    alone, pi = [], []
    for seed in (0, 1):
        name = f"target_s{seed}"
        data = text_data(tasks["target"], tiny_backbone, "target", shots=16, seed=seed, batch_size=8,
                         max_eval_examples=300)  # fmt: skip
        pl.seed_everything(seed, verbose=False)
        module = ExpertTrainingModule(tiny_backbone, bank_location, name, EXPERT, lr=1e-2)
        fit = trainer(max_epochs=10)
        fit.fit(module, data)
        alone.append(fit.test(module, data, verbose=False)[0]["test_acc"])
        embed(name, data)

        graph = TaskGraph.from_bank(bank, [*SOURCES, name])
        assert graph.top_k(name, 1)[0][0] == "close", graph.top_k(name, 3)

        pl.seed_everything(seed, verbose=False)
        interp = InterpolationModule(tiny_backbone, bank_location, name, k=3, candidates=list(SOURCES), lr=1e-2)
        fit = trainer(max_epochs=10)
        fit.fit(interp, data)
        pi.append(fit.test(interp, data, verbose=False)[0]["test_acc"])
        assert interp.selected[0][0] == "close"
        weights = interp.stored.provenance["mean_weights"]  # type: ignore[union-attr]
        assert max(weights, key=weights.get) == "close"
        assert f"{name}_pi" in bank

    mean_alone, mean_pi = sum(alone) / 2, sum(pi) / 2
    assert mean_pi >= mean_alone + 0.1, (alone, pi)


def test_few_shot_loss_predictor_ranks_the_related_source_first(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    bank_location = str(tmp_path / "bank")
    for name in SOURCES:
        pl.seed_everything(0, verbose=False)
        data = text_data(tasks[name], tiny_backbone, name)
        trainer(max_epochs=8).fit(ExpertTrainingModule(tiny_backbone, bank_location, name, EXPERT, lr=1e-2), data)
    target = text_data(tasks["target"], tiny_backbone, "target", shots=16, seed=0, batch_size=8)
    trainer(max_epochs=2).fit(ExpertTrainingModule(tiny_backbone, bank_location, "target", EXPERT, lr=1e-2), target)
    interp = InterpolationModule(
        tiny_backbone, bank_location, "target", k=2, candidates=list(SOURCES), predictor="few_shot_loss", lr=1e-2,
        head_init="best_source",
    )  # fmt: skip
    trainer(max_epochs=1).fit(interp, target)
    assert interp.selected[0][0] == "close", interp.selected
    assert interp.selected[0][1] > interp.selected[1][1]
    assert ExpertBank(bank_location).get("target_pi").provenance["predictor"] == "few_shot_loss"

"""Every registered reuse method runs in a suite, side by side with π-Tuning, and records what it used; the registry
and the suite's method options are checked before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pituning.config import METHOD_NAMES, SuiteConfig
from pituning.errors import ConfigError
from pituning.methods import METHODS, MethodResult, check_methods, register_method
from pituning.suite import run_suite
from tiny import tiny_suite

pytest.importorskip("nevergrad")


@pytest.fixture(scope="module")
def results(tiny_backbone: str, tasks: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    output = tmp_path_factory.mktemp("methods") / "run"
    suite = tiny_suite(
        tiny_backbone,
        tasks,
        output,
        methods=list(METHODS),
        method_options={"lorahub": {"budget": 4}, "ties": {"density": 0.3}, "dare_ties": {"finetune": False}},
    )
    return run_suite(SuiteConfig(**suite))


def test_every_method_reports_its_accuracy_and_provenance(results: dict[str, object]) -> None:
    (row,) = results["rows"]  # type: ignore[misc]
    for method in METHODS:
        assert 0.0 <= row[method] <= 1.0, method
        reuses = method not in ("linear_probe", "full_finetune")  # the two references that reuse no source
        assert bool(row["methods"][method]["sources"]) == reuses, method  # every method says which sources it used
    assert row["methods"]["full_finetune"]["lr"] == 5e-5 and row["methods"]["full_finetune"]["head"] == "fresh"
    assert row["methods"]["linear_probe"]["head"] == "refit"
    assert {row["methods"][m]["head"] for m in ("best_source_init", "ties", "lorahub", "arrow")} <= {
        "source",
        "refit",
        "fresh",
    }
    assert row["methods"]["ties"]["density"] == 0.3
    assert row["methods"]["dare_ties"]["finetune"] is False and row["methods"]["dare_ties"]["head"] == "refit"
    assert len(row["methods"]["lorahub"]["weights"]) == 2
    assert row["methods"]["random_parameters"]["matched_to"] == row["sources"]
    assert set(row["methods"]["pi_without_target"]["mean_weights"]) == set(row["sources"])
    alone_random = row["methods"]["random_pool_without_target"]  # the random pool, without the target expert
    assert alone_random["sources"] == row["methods"]["random_pool"]["sources"]
    assert set(alone_random["mean_weights"]) == set(alone_random["sources"])
    assert "guard" in row["methods"]["pi_guard"]
    paired = results["paired"]  # π-Tuning against every method, paired
    assert set(paired) == {"alone", *METHODS}  # type: ignore[arg-type]


def test_a_rerun_measures_only_a_new_method(
    results: dict[str, object], tiny_backbone: str, tasks: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    output = Path(results["config"]["output"])  # type: ignore[index]
    runs = json.loads((output / "runs.json").read_text())
    assert "target_s1:ties" in runs and "target_s1" in runs  # each method cached under its own recipe
    suite = tiny_suite(tiny_backbone, tasks, output, methods=["ties"], method_options={"ties": {"density": 0.3}})
    capsys.readouterr()
    again = run_suite(SuiteConfig(**suite))
    printed = capsys.readouterr().out
    assert "measured already" in printed and "target target_s1: ties" not in printed
    assert again["rows"][0]["ties"] == results["rows"][0]["ties"]  # type: ignore[index]


def test_methods_are_checked_before_anything_runs(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'tie' \(did you mean 'ties'\?\)"):  # when the config is built
        SuiteConfig(**tiny_suite(tiny_backbone, tasks, tmp_path / "run", methods=["tie"]))
    assert not (tmp_path / "run").exists()
    assert list(METHODS) == METHOD_NAMES  # the config knows every registered method, in registration order
    cfg = SuiteConfig(**tiny_suite(tiny_backbone, tasks, tmp_path / "run", method_options={"ties": {"dens": 1}}))
    with pytest.raises(ConfigError, match=r"method_options.ties option\(s\) 'dens' \(did you mean 'density'\?\)"):
        check_methods(cfg)
    with pytest.raises(ConfigError, match="always run"):
        SuiteConfig(**tiny_suite(tiny_backbone, tasks, tmp_path / "run", methods=["pi"]))
    with pytest.raises(ConfigError, match="registered already"):
        register_method("ties", lambda run: MethodResult(0.0), description="again")


def test_baselines_is_the_old_spelling_of_methods(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="rename it methods"):
        cfg = SuiteConfig(**tiny_suite(tiny_backbone, tasks, tmp_path, baselines=["best_source_init"]))
    assert cfg.methods == ["best_source_init"] and cfg.baselines is None


def test_gradient_free_methods_run_on_the_suites_backbone_dtype(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suite with ``backbone_dtype: bfloat16`` runs the methods that build their own task model (refitted heads,
    LoraHub, Arrow, a merge without fine-tuning) on a bf16 backbone, as the stages do."""
    import pituning.methods as methods

    dtypes: list[object] = []
    build = methods._task_model

    def spy(run: object) -> object:
        model = build(run)  # type: ignore[arg-type]
        dtypes.append(next(model.experts.backbone.parameters()).dtype)
        return model

    monkeypatch.setattr(methods, "_task_model", spy)
    suite = tiny_suite(
        tiny_backbone,
        tasks,
        tmp_path / "run",
        backbone_dtype="bfloat16",
        methods=["lorahub", "arrow", "ties"],
        method_options={"lorahub": {"budget": 2}, "ties": {"finetune": False}},
    )
    (row,) = run_suite(SuiteConfig(**suite))["rows"]
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for method in ("lorahub", "arrow", "ties"):
        assert 0.0 <= row[method] <= 1.0 and row["methods"][method]["head"] == "refit", method


def test_full_fine_tuning_trains_every_backbone_weight_and_stores_nothing(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path
) -> None:
    """The full fine-tuning reference trains the backbone itself (float32 whatever the suite's backbone_dtype),
    leaves the bank alone, and refuses a learning rate that is no positive number."""
    import lightning.pytorch as pl

    from pituning.modules import FullFineTuningModule
    from pituning.pipeline import make_datamodule

    cfg = SuiteConfig(**tiny_suite(tiny_backbone, tasks, tmp_path / "run", backbone_dtype="bfloat16"))
    datamodule = make_datamodule(cfg, cfg.targets[0], shots=cfg.shots, seed=0)
    module = FullFineTuningModule(cfg.backbone, lr=1e-2, optim=cfg.optim, num_classes=2)
    assert module.task_model is not None
    before = {n: p.detach().clone() for n, p in module.task_model.experts.backbone.named_parameters()}
    assert {p.dtype for p in before.values()} == {torch.float32}
    assert [g["name"] for g in module.param_groups()] == ["backbone", "head"]
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule)
    after = dict(module.task_model.experts.backbone.named_parameters())
    moved = [n for n, p in after.items() if not torch.equal(p, before[n])]
    assert len(moved) > len(after) // 2  # the backbone's own weights trained (not an expert: there is none)
    assert not module.task_model.experts.experts
    assert 0.0 <= trainer.test(module, datamodule, verbose=False)[0]["test_acc"] <= 1.0
    assert not (tmp_path / "run" / "bank").exists()
    for bad in (0, -1e-5, float("nan"), "2e-5"):
        with pytest.raises(ConfigError, match="lr must be a positive number"):
            FullFineTuningModule(cfg.backbone, lr=bad)  # type: ignore[arg-type]

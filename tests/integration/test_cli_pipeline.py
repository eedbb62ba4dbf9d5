"""The `pituning` Trainer stages and `pituning run` from YAML, and every shipped config parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pituning import ExpertBank
from pituning.cli import build_parser, main
from tiny import tiny_suite

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _data(dataset: str, backbone: str, name: str, **extra: object) -> dict:
    init = {"dataset": dataset, "tokenizer": backbone, "task_name": name, "max_length": 16, "batch_size": 32, **extra}
    return {"class_path": "pituning.data.TextClassificationDataModule", "init_args": init}


TRAINER = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False}


def test_stages_from_yaml(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = str(tmp_path / "bank")
    for name in ("close", "far1"):
        config = {
            "model": {
                "backbone": tiny_backbone,
                "expert": {"kind": "lora", "r": 4},
                "expert_name": name,
                "bank": bank,
                "lr": 0.01,
            },
            "data": _data(tasks[name], tiny_backbone, name, max_train_examples=96),
            "trainer": TRAINER,
        }
        assert main(["train-expert", "--config", _yaml(tmp_path / f"{name}.yaml", config)]) == 0
        assert f"stored {name} in {bank}" in capsys.readouterr().out
        embed = {
            "model": {"backbone": tiny_backbone, "bank": bank, "expert_name": name},
            "data": _data(tasks[name], tiny_backbone, name, max_train_examples=96),
            "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        }
        assert main(["embed", "--config", _yaml(tmp_path / f"embed-{name}.yaml", embed)]) == 0
    interp = {
        "model": {"backbone": tiny_backbone, "bank": bank, "target": "close", "k": 1, "lr": 0.01},
        "data": _data(tasks["target"], tiny_backbone, "target", shots=8),
        "trainer": TRAINER,
    }
    assert (
        main(["interpolate", "--config", _yaml(tmp_path / "interp.yaml", interp), "--model.mode", "weights_only"]) == 0
    )
    stored = ExpertBank(bank).get("close_pi")
    assert stored.provenance["sources"] == ["far1"] and stored.provenance["mode"] == "weights_only"
    evaluate = {
        "model": {"backbone": tiny_backbone, "bank": bank, "init_from": "close_pi", "expert_name": "evaluated"},
        "data": _data(tasks["target"], tiny_backbone, "target", shots=8),
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
    }
    assert main(["evaluate", "--config", _yaml(tmp_path / "eval.yaml", evaluate)]) == 0
    assert main(["graph", "--bank", bank, "--out", str(tmp_path / "graph"), "--neighbours", "1"]) == 0
    assert (tmp_path / "graph" / "graph.png").stat().st_size > 0
    assert main(["graph", "--bank", bank, "--out", str(tmp_path / "graph_k"), "--k", "1", "--no-plot"]) == 0
    assert "--k is deprecated and will be removed; use --neighbours" in capsys.readouterr().err
    graph = json.loads((tmp_path / "graph" / "graph.json").read_text())
    assert set(graph["names"]) == {"close", "far1"}
    assert main(["export", "--bank", bank, "close_pi", str(tmp_path / "peft")]) == 0
    assert main(["export", "--bank", bank, "close", str(tmp_path / "raw"), "--format", "safetensors"]) == 0
    assert (tmp_path / "raw" / "head.safetensors").exists()


def test_unknown_option_is_a_usage_error(
    tiny_backbone: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"model": {"backbone": tiny_backbone, "colour": "red"}, "data": _data("x.jsonl", tiny_backbone, "x")}
    assert main(["train-expert", "--config", _yaml(tmp_path / "bad.yaml", config)]) == 2
    assert "pituning: error: Unknown model option(s) 'colour'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # on the command line: LightningCLI's usage error
        main(["train-expert", "--config", _yaml(tmp_path / "ok.yaml", {**config, "model": {"backbone": "b"}}),
              "--model.colour", "red"])  # fmt: skip
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "b", "--data_class", "x", "--sources", "[]", "--targets", "[]", "--kay", "3"])
    assert exc.value.code == 2


def test_run_suite(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"tokenizer": tiny_backbone, "max_length": 16, "batch_size": 16, "max_train_examples": 96,
            "max_eval_examples": 100}  # fmt: skip
    suite = tiny_suite(tiny_backbone, tasks, tmp_path / "run", data=data, module={"lr": 0.01}, source_epochs=2,
                       target_epochs=2, embed_examples=40)  # fmt: skip
    assert main(["run", "--config", _yaml(tmp_path / "suite.yaml", suite)]) == 0
    recipes = json.loads((tmp_path / "run" / "sources.json").read_text())
    assert {r["result"]["embedded_examples"] for r in recipes.values()} == {40}  # not the 96 the experts trained on
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["rows"]) == 1 and set(results["rows"][0]["sources"]) == {"close", "far1"}
    assert results["machine"]["torch"] and results["date"].startswith("20")  # where and when it was measured
    assert "| target | 1 |" in (tmp_path / "run" / "results.md").read_text()
    assert {"alone", "best_source_init", "uniform_average", "pi"} <= set(results["mean"])
    paired = results["paired"]["alone"]  # π minus the expert alone, in points, over the one run
    mean = results["mean"]
    assert paired["n"] == 1 and paired["mean"] == pytest.approx(100 * (mean["pi"] - mean["alone"]))
    assert "π-Tuning minus each method, paired" in (tmp_path / "run" / "results.md").read_text()
    # every source is checked on its own test set right after training, and the check is reported
    assert set(results["sources"]) == {"close", "far1"}
    for q in results["sources"].values():
        assert 0.0 <= q["acc"] <= 1.0 and q["true_majority_share"] >= 1 / 3 and isinstance(q["collapsed"], bool)
    assert "| source | accuracy |" in (tmp_path / "run" / "results.md").read_text()
    printed = capsys.readouterr()
    assert "done: bank, graph and results in" in printed.out
    # one line per stage, with the time left; none of the libraries' lines (progress bars, accelerators, tips)
    assert "sources: 1 of 2 done, about" in printed.out
    for noise in ("Epoch 0", "GPU available", "Tip:", "Loading weights", "Generating train split"):
        assert noise not in printed.out + printed.err, noise
    # a second run reuses the sources trained from the same recipe, their check, and the targets measured already
    assert main(["run", "--config", str(tmp_path / "suite.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("in the bank already, from the same recipe") == 2
    assert "target target_s1: expert alone and π-Tuning measured already, from the same recipe" in out
    assert ": expert alone (" not in out
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["sources"] == results["sources"] and again["rows"] == json.loads(json.dumps(results["rows"]))
    # another target setting measures the target again (the sources stay)
    assert main(["run", "--config", _yaml(tmp_path / "e3.yaml", {**suite, "target_epochs": 1})]) == 0
    out = capsys.readouterr().out
    assert out.count("in the bank already, from the same recipe") == 2 and "target target_s1: expert alone" in out
    assert main(["run", "--config", _yaml(tmp_path / "k.yaml", {**suite, "k": 5})]) == 2


def test_run_suite_collapsed_sources(
    tiny_backbone: str,
    tasks: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A source that only predicts its majority class is flagged, excluded from the candidates, or stops the run."""
    import pituning.pipeline
    import pituning.suite

    real = pituning.pipeline.evaluate_quality

    def far1_collapses(module: object, dataloader: object) -> pituning.suite.ExpertQuality:
        share = real(module, dataloader).true_majority_share  # the check runs; its verdict is set here
        if getattr(module, "expert_name", "") != "far1":
            return pituning.suite.ExpertQuality(1.0, share, share)
        return pituning.suite.ExpertQuality(share, 1.0, share)

    monkeypatch.setattr(pituning.pipeline, "evaluate_quality", far1_collapses)
    data = {"tokenizer": tiny_backbone, "max_length": 16, "batch_size": 16, "max_train_examples": 48}
    suite = tiny_suite(tiny_backbone, tasks, tmp_path / "run", data=data, k=1, shots=4, baselines=[],
                       collapsed_sources="exclude")  # fmt: skip
    assert main(["run", "--config", _yaml(tmp_path / "suite.yaml", suite)]) == 0
    out = capsys.readouterr().out
    assert out.count("source far1 is no better than always predicting its majority class") == 1  # said once
    assert "WARNING source far1 is no better than always predicting its majority class" in out
    assert "left out of the candidates" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["sources"]["far1"]["collapsed"] and not results["sources"]["close"]["collapsed"]
    assert results["rows"][0]["sources"] == ["close"]
    assert "| far1 | " in (tmp_path / "run" / "results.md").read_text()
    # k larger than the usable sources, and the strict setting (the stored check is reused: nothing retrains)
    assert main(["run", "--config", _yaml(tmp_path / "k2.yaml", {**suite, "k": 2})]) == 2
    assert "only 1 source(s) are usable" in capsys.readouterr().err
    assert main(["run", "--config", _yaml(tmp_path / "err.yaml", {**suite, "collapsed_sources": "error"})]) == 2
    assert "collapsed_sources: warn or exclude" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", _yaml(tmp_path / "bad.yaml", {**suite, "collapsed_sources": "ignore"})])
    assert exc.value.code == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if "model" in data:
        stage = {"train_expert": "train-expert", "embed": "embed", "interpolate": "interpolate"}[path.stem]
        with pytest.raises(SystemExit) as exc:
            main([stage, "--config", str(path), "--print_config"])
        assert exc.value.code in (0, None)
    else:
        cfg = build_parser().parse_args(["run", "--config", str(path)])
        assert cfg.run.backbone and cfg.run.sources


def test_run_suite_of_sources_only(tiny_backbone: str, tasks: dict[str, str], tmp_path: Path) -> None:
    """No targets: the suite builds the bank of checked, embedded source experts and their graph."""
    suite = tiny_suite(tiny_backbone, tasks, tmp_path / "run", targets=[], k=1)
    assert main(["run", "--config", _yaml(tmp_path / "suite.yaml", suite)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["rows"] == [] and results["paired"] == {} and set(results["sources"]) == {"close", "far1"}
    assert set(json.loads((tmp_path / "run" / "graph" / "graph.json").read_text())["names"]) == {"close", "far1"}


def test_ctrl_c_says_how_to_resume(
    tiny_backbone: str,
    tasks: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C inside a Trainer (Lightning turns it into ``sys.exit(1)``) and outside one: exit 130 with how to resume,
    and no expert half-stored."""
    import signal

    from pituning.modules import ExpertTrainingModule

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    bank = tmp_path / "bank"
    config = {
        "model": {
            "backbone": tiny_backbone,
            "expert": {"kind": "lora", "r": 4},
            "expert_name": "close",
            "bank": str(bank),
        },
        "data": _data(tasks["close"], tiny_backbone, "close", max_train_examples=32),
        "trainer": TRAINER,
    }
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(ExpertTrainingModule, "training_step", interrupt)
    try:
        assert main(["train-expert", "--config", _yaml(tmp_path / "close.yaml", config)]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert "pituning: interrupted; run the same command again to resume" in capsys.readouterr().err
    assert "close" not in ExpertBank(bank)  # nothing half-stored
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def terminate(*_: object) -> None:
        raise SIGTERMException  # what Lightning's loops raise after a SIGTERM (a SystemExit of status 0)

    monkeypatch.setattr(ExpertTrainingModule, "training_step", terminate)
    assert main(["train-expert", "--config", _yaml(tmp_path / "close.yaml", config)]) == 143  # never success
    assert "pituning: terminated (SIGTERM); run the same command again to resume" in capsys.readouterr().err
    assert "close" not in ExpertBank(bank)
    import pituning.suite

    monkeypatch.setattr(pituning.suite, "run_suite", interrupt)
    suite = tiny_suite(tiny_backbone, tasks, tmp_path / "run")
    assert main(["run", "--config", _yaml(tmp_path / "suite.yaml", suite)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_a_bank_path_that_is_a_file_stops_before_training(
    tiny_backbone: str, tasks: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from pituning.modules import ExpertTrainingModule

    (tmp_path / "bank").write_text("a file")
    steps: list[int] = []
    train = ExpertTrainingModule.training_step
    monkeypatch.setattr(ExpertTrainingModule, "training_step", lambda self, *a: steps.append(1) or train(self, *a))
    config = {
        "model": {"backbone": tiny_backbone, "expert": {"kind": "lora", "r": 4}, "expert_name": "close",
                  "bank": str(tmp_path / "bank")},
        "data": _data(tasks["close"], tiny_backbone, "close", max_train_examples=32),
        "trainer": TRAINER,
    }  # fmt: skip
    assert main(["train-expert", "--config", _yaml(tmp_path / "close.yaml", config)]) == 2
    assert f"pituning: error: The bank location {tmp_path / 'bank'} is a file" in capsys.readouterr().err
    assert steps == []  # refused before the first training step

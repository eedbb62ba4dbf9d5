"""Command-line option spelling: the stages' flat model options (the spelling before the typed configs) still work, each
move announced; unknown suite keys get a suggestion; printed configs keep what they need."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pituning.cli import _fold_flat_stage_options
from pituning.errors import ConfigError


def test_flat_yaml_options_move_under_their_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": "b", "lr": 0.01, "k": 2}, "trainer": {"max_epochs": 1}}))
    args = _fold_flat_stage_options("interpolate", ["--config", str(path), "--trainer.max_epochs=3"])
    assert args[0] == "--config" and args[2:] == ["--trainer.max_epochs=3"]
    folded = yaml.safe_load(args[1])
    assert folded["model"] == {"backbone": "b", "optim": {"lr": 0.01}, "k": 2}  # k is no InterpolationConfig field
    assert folded["trainer"] == {"max_epochs": 1}
    assert (
        "pituning interpolate: model.lr -> model.optim.lr (the flat spelling is deprecated" in capsys.readouterr().err
    )


def test_interpolation_options_fold_only_for_the_interpolate_stage(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"model": {"mode": "weights_only", "logits_lr": 0.1}}))
    folded = yaml.safe_load(_fold_flat_stage_options("interpolate", ["-c", str(path)])[1])
    assert folded["model"] == {"interpolation": {"mode": "weights_only", "logits_lr": 0.1}}
    with pytest.raises(ConfigError, match=r"Unknown model option\(s\) 'logits_lr', 'mode'"):  # not train-expert's
        _fold_flat_stage_options("train-expert", ["-c", str(path)])


@pytest.mark.parametrize("args", [["--model.lr=0.5"], ["--model.lr", "0.5"]])
def test_flat_command_line_options_move(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _fold_flat_stage_options("train-expert", [*args, "--model.optim.weight_decay=0"]) == [
        "--model.optim.lr=0.5",
        "--model.optim.weight_decay=0",
    ]
    assert "pituning train-expert: --model.lr -> --model.optim.lr" in capsys.readouterr().err


def test_typed_spelling_passes_through_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"model": {"optim": {"lr": 0.01}}}))
    assert _fold_flat_stage_options("train-expert", ["--config", str(path)]) == ["--config", str(path)]
    assert capsys.readouterr().err == ""


def test_an_option_given_both_ways_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"model": {"lr": 0.01, "optim": {"lr": 0.02}}}))
    with pytest.raises(ConfigError, match=r"model.lr is given twice.*keep one"):
        _fold_flat_stage_options("train-expert", ["--config", str(path)])


def test_an_unknown_suite_key_gets_a_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pituning.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"backbone": "b", "data_class": "x.Y", "sourcse": [], "targets": []}))
    assert main(["run", "--config", str(path)]) == 2
    assert "Unknown suite option(s) 'sourcse' (did you mean 'sources'?)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


def test_print_config_skip_default_keeps_the_expert_kind(capsys: pytest.CaptureFixture[str]) -> None:
    """``--print_config=skip_default`` prints a config that still says which expert kind it trains."""
    from pituning.cli import main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        main(
            ["train-expert", "--config", str(root / "configs/stages/train_expert.yaml"), "--print_config=skip_default"]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["expert"]["kind"] == "lora"


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        (
            "data",
            {"max_lenght": 32},
            r"Unknown data.init_args option\(s\) 'max_lenght' \(did you mean 'max_length'\?\)",
        ),
        ("optim", {"lrr": 0.1}, r"Unknown model.optim option\(s\) 'lrr' \(did you mean 'lr'\?\)"),
        ("model", {"expert_nme": "x"}, r"Unknown model option\(s\) 'expert_nme' \(did you mean 'expert_name'\?\)"),
    ],
)
def test_a_misspelt_stage_option_gets_a_suggestion(
    section: str, change: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from pituning.cli import main

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs/stages/train_expert.yaml").read_text())
    where = {"data": config["data"]["init_args"], "optim": config["model"]["optim"], "model": config["model"]}
    where[section].update(change)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train-expert", "--config", str(path)]) == 2
    assert re.search(message, capsys.readouterr().err)

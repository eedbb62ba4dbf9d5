"""A suite over a library of imported PEFT adapters (experts without their data): 20 adapter directories written
with PEFT, imported, ranked on the target's shots alone, and every reuse method run on them end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pituning import ExpertModel, load_backbone
from pituning.bank import ExpertBank, TaskInfo
from pituning.config import SuiteConfig
from pituning.errors import ConfigError
from pituning.methods import METHODS
from pituning.suite import run_suite
from tiny import tiny_suite

peft = pytest.importorskip("peft")
pytest.importorskip("nevergrad")

ZOO = 20


def _adapters(backbone: str, root: Path) -> list[Path]:
    """``ZOO`` PEFT LoRA directories (r=4 on query and value, random non-zero weights), written by PEFT itself."""
    from transformers import BertModel

    out = []
    for i in range(ZOO):
        base = BertModel.from_pretrained(backbone)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        model.save_pretrained(root / f"adapter{i:02d}")
        out.append(root / f"adapter{i:02d}")
    return out


@pytest.fixture(scope="module")
def library(tiny_backbone: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("zoo")
    bank = ExpertBank(root / "library")
    model = ExpertModel(load_backbone(tiny_backbone))
    for directory in _adapters(tiny_backbone, root):
        bank.import_peft(directory, model, f"zoo_{directory.name}", TaskInfo(directory.name))
    return str(root / "library")


def _library_suite(backbone: str, tasks: dict[str, str], output: Path, library: str, **fields: object) -> dict:
    """The tiny suite with no sources of its own: the library's experts (LoRA on query and value) ranked on the
    target's shots."""
    expert = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": [r".*\.(query|value)"]}
    return tiny_suite(
        backbone, tasks, output, sources=[], library=library, expert=expert,
        interpolation={"predictor": "few_shot_loss"}, **fields,
    )  # fmt: skip


def test_every_method_runs_on_a_library_of_imported_adapters(
    tiny_backbone: str, tasks: dict[str, str], library: str, tmp_path: Path
) -> None:
    names = [e.name for e in ExpertBank(library).list()]
    assert len(names) == ZOO and all(ExpertBank(library).get(n).head is None for n in names)  # no data, no head
    suite = _library_suite(
        tiny_backbone,
        tasks,
        tmp_path / "run",
        library,
        methods=list(METHODS),
        method_options={"lorahub": {"budget": 4}},
    )
    results = run_suite(SuiteConfig(**suite))
    (row,) = results["rows"]
    assert set(row["sources"]) <= set(names) and len(row["sources"]) == 2  # ranked from the shots alone
    for method in METHODS:
        assert 0.0 <= row[method] <= 1.0, method
    # imported adapters carry no head: every method that starts from a source refits one on the shots
    assert row["methods"]["best_source_init"]["head"] == "refit"
    assert set(row["methods"]["random_pool"]["sources"]) <= set(names)


def test_a_library_needs_the_few_shot_predictor(tiny_backbone: str, tasks: dict[str, str], library: str) -> None:
    with pytest.raises(ConfigError, match="predictor: few_shot_loss"):
        SuiteConfig(**tiny_suite(tiny_backbone, tasks, Path("unused"), sources=[], library=library))


def test_one_method_on_one_target_from_the_command_line(
    tiny_backbone: str, tasks: dict[str, str], library: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command-line way to reuse a bank on one target with a chosen method: ``pituning run`` over the bank as its
    ``library:``, the method picked on the command line; the merged expert lands in the suite's bank with its
    provenance."""
    import json

    import yaml

    from pituning.cli import main

    suite = _library_suite(tiny_backbone, tasks, tmp_path / "run", library)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    argv = ["run", "--config", str(tmp_path / "suite.yaml"), "--methods", "[ties]"]
    assert main([*argv, "--method_options", "{ties: {density: 0.5, finetune: false}}"]) == 0
    out = capsys.readouterr().out
    assert "target target_s1: ties" in out and "uniform_average" not in out  # only the chosen method
    (row,) = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert row["methods"]["ties"]["density"] == 0.5 and row["methods"]["ties"]["head"] == "refit"
    merged = ExpertBank(tmp_path / "run" / "bank").get("target_s1_ties_merged").provenance
    assert merged["method"] == "ties" and merged["density"] == 0.5 and merged["sources"] == row["sources"]

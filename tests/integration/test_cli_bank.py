"""`pituning bank ...` end to end, through main(args) and through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bank_helpers import tiny_expert
from families import _cfg
from pituning import ExpertModel, LoraConfig, PrefixConfig
from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.cli import main
from pituning.errors import ConfigError


@pytest.fixture
def bank_dir(tmp_path: Path) -> Path:
    bank = ExpertBank(tmp_path / "bank")
    bank.add(tiny_expert("a", 0, modality="text"))
    bank.add(tiny_expert("b", 1, modality="vision"))
    return tmp_path / "bank"


def test_list_show_remove(bank_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "list", "--bank", str(bank_dir)]) == 0
    out = capsys.readouterr().out
    assert "NAME" in out and "2 expert(s)" in out
    assert main(["bank", "list", "--bank", str(bank_dir), "--modality", "vision", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["b"]
    assert main(["bank", "show", "--bank", str(bank_dir), "a"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "lora" and set(shown["files"]) == {"expert", "weights", "embedding"}
    assert main(["bank", "remove", "--bank", str(bank_dir), "a"]) == 0
    assert ExpertBank(bank_dir).names() == ["b"]
    assert main(["bank", "show", "--bank", str(bank_dir), "a"]) == 2
    assert "No expert 'a'" in capsys.readouterr().err


def test_verify_exits_non_zero_on_corruption(bank_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "verify", "--bank", str(bank_dir)]) == 0
    entry = ExpertBank(bank_dir).entry("b")
    path = bank_dir / entry.files["embedding"]["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["bank", "verify", "--bank", str(bank_dir)]) == 1
    out = capsys.readouterr().out
    assert "embedding.safetensors of expert 'b' is corrupt" in out and "1 problem(s)" in out


def test_unknown_option_is_a_usage_error(bank_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bank", "list", "--bank", str(bank_dir), "--colour", "red"])
    assert exc.value.code != 0


def test_peft_round_trip_through_the_console_script(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    from transformers import AutoModel

    AutoModel.from_config(_cfg("bert")).save_pretrained(tmp_path / "backbone")
    model = ExpertModel(str(tmp_path / "backbone"))
    model.add_expert("a", LoraConfig(r=2))
    ExpertBank(tmp_path / "bank").add(Expert.from_model(model, "a", TaskInfo("t")))
    exe = Path(sys.executable).with_name("pituning")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "pituning.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)

    done = run("bank", "export-peft", "--bank", str(tmp_path / "bank"), "a", str(tmp_path / "peft"))
    assert done.returncode == 0, done.stderr
    done = run(
        "bank", "import-peft", "--bank", str(tmp_path / "bank2"), str(tmp_path / "peft"),
        "--name", "back", "--backbone", str(tmp_path / "backbone"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    back = ExpertBank(tmp_path / "bank2").get("back")
    for key, value in model.expert_state_dict("a").items():
        assert torch.equal(back.state[key], value)


def test_export_command_writes_a_prefix_as_peft(tmp_path: Path) -> None:
    model = ExpertModel(_cfg("bert"))
    model.add_expert("p", PrefixConfig(num_tokens=3))
    ExpertBank(tmp_path / "bank").add(Expert.from_model(model, "p", TaskInfo("t")))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ExpertBank(tmp_path / "bank").export_peft("p", tmp_path / "nope")
    heads = _cfg("bert").num_attention_heads
    out = tmp_path / "peft"
    assert main(["export", "--bank", str(tmp_path / "bank"), "p", str(out), "--num-attention-heads", str(heads)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3

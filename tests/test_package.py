"""Package-level promises: light import, config (de)serialisation, registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pituning import EXPERT_KINDS, AdapterConfig, ConfigError, LoraConfig, PrefixConfig, config_from_dict


def test_import_is_light() -> None:
    code = (
        "import sys, pituning; heavy = [m for m in ('peft', 'matplotlib', 'lightning', 'efficientnet_lite_pytorch', "
        "'transformers.models.bert') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bank_list_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    """``pituning bank list`` reads the catalog alone (manifest and journal): no torch, no Lightning."""
    from bank_helpers import tiny_expert
    from pituning.bank import ExpertBank

    bank = ExpertBank(tmp_path / "bank")
    bank.add(tiny_expert("a"))
    bank.add(tiny_expert("b", seed=1, modality="vision"))
    code = (
        "import sys; from pituning.cli import main; status = main(['bank', 'list', '--bank', sys.argv[1]]); "
        "print([m for m in ('torch', 'lightning', 'transformers') if m in sys.modules], status)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bank")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[] 0"
    assert lines[-2] == f"2 expert(s) in {tmp_path / 'bank'}" and lines[1].split()[:3] == ["a", "lora", "text"]


def test_the_catalog_knows_the_built_in_kinds() -> None:
    """The catalog checks records' kinds against :data:`BUILTIN_KINDS` until the experts (and torch) are imported."""
    from pituning.bank.format import BUILTIN_KINDS, known_kinds

    assert set(BUILTIN_KINDS) <= set(EXPERT_KINDS) and known_kinds() is EXPERT_KINDS  # the registry once imported
    assert {k for k, c in EXPERT_KINDS.items() if c.__module__.startswith("pituning.")} == set(BUILTIN_KINDS)


def test_registry_has_the_three_kinds() -> None:
    assert set(EXPERT_KINDS) >= {"lora", "adapter", "prefix"}


@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=3, include_mlp=True), AdapterConfig(bottleneck=7, activation="gelu"), PrefixConfig(num_tokens=5)],
)
def test_config_round_trips_through_json(config: object) -> None:
    data = json.loads(json.dumps(config.to_dict()))  # type: ignore[attr-defined]
    assert data["kind"] == config.kind  # type: ignore[attr-defined]
    assert config_from_dict(data) == config


def test_config_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown expert kind 'ia3'"):
        config_from_dict({"kind": "ia3"})
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['rank'\] for a lora expert"):
        config_from_dict({"kind": "lora", "rank": 4})


def test_every_config_field_is_documented() -> None:
    import ast
    import inspect

    for cls in EXPERT_KINDS.values():
        for klass in cls.__mro__:
            if klass.__module__.startswith("pituning") and hasattr(klass, "__dataclass_fields__"):
                tree = ast.parse(inspect.getsource(klass))
                body = tree.body[0].body  # type: ignore[attr-defined]
                for i, node in enumerate(body):
                    if isinstance(node, ast.AnnAssign) and "ClassVar" not in ast.unparse(node.annotation):
                        doc = body[i + 1] if i + 1 < len(body) else None
                        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), (
                            f"{klass.__name__}.{ast.unparse(node.target)} has no docstring"
                        )

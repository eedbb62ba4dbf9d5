"""``pituning.suite`` helpers (whole suites run in tests/integration/test_cli_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pituning.backbones
from pituning import ExpertBank
from pituning.suite import make_probe


def test_make_probe_reuses_a_matching_probe_and_replaces_a_stale_one(
    tiny_backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # regression: a probe left by a run with another expert config was reused, and embedding the new experts at it
    # failed ("the embedding covers other tensors than its weights")
    bank = ExpertBank(tmp_path / "bank")
    assert make_probe(tiny_backbone, {"kind": "lora", "r": 2}, bank) == "probe"
    with monkeypatch.context() as patch:  # same backbone, config and seed: kept, nothing is rebuilt
        patch.setattr(pituning.backbones, "load_backbone", lambda *a, **k: pytest.fail("the probe was rebuilt"))
        make_probe(tiny_backbone, {"kind": "lora", "r": 2}, bank)
    make_probe(tiny_backbone, {"kind": "adapter", "bottleneck": 4}, bank)
    assert bank.get("probe").config.kind == "adapter"
    make_probe(tiny_backbone, {"kind": "adapter", "bottleneck": 4}, bank, seed=1)
    assert bank.get("probe").provenance["probe_seed"] == 1

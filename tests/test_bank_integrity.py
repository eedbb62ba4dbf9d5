"""ExpertBank integrity: concurrent gc, paths that try to leave the bank, sealed records, derived files, locations."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bank_helpers import FAKE_BACKBONE, tiny_expert
from pituning.backbones import Fingerprint
from pituning.bank import BackboneIdentity, ExpertBank
from pituning.bank.format import decode_line, encode_line, encode_manifest, sha256
from pituning.cli import main
from pituning.errors import BackboneMismatchError, BankCorruptionError, BankError, ExpertError, PiTuningError


def _bank(tmp_path: Path, *names: str) -> ExpertBank:
    bank = ExpertBank(tmp_path / "bank")
    for i, name in enumerate(names):
        bank.add(tiny_expert(name, i))
    return bank


def _journal_ops(root: Path) -> list[dict]:
    return [decode_line(line, "test") for line in (root / "journal.jsonl").read_bytes().splitlines() if line.strip()]


def _write_journal(root: Path, ops: list[dict]) -> None:
    (root / "journal.jsonl").write_bytes(b"".join(encode_line(op) for op in ops))


def _observe(location: Path) -> object:
    """Everything a user sees of a bank (names, records, tensors, rankings), or the pituning error it raises."""
    try:
        bank = ExpertBank(location, create=False)
        seen: list[object] = [[dataclasses.asdict(e) for e in bank.list()]]
        for name in bank.names():
            expert = bank.get(name)
            seen.append((expert.task, expert.config, {k: v.tolist() for k, v in expert.state.items()}))
            seen.append(bank.similar(name, k=5))
        problems, _ = bank.verify()
        return ("problems", problems) if problems else seen
    except PiTuningError as err:
        return ("error", type(err).__name__)


# ---------------------------------------------------------------------------------------------------- 1. gc races
def test_gc_loop_beside_a_writer_loses_no_acknowledged_add(tmp_path: Path) -> None:
    location = tmp_path / "bank"
    bank = ExpertBank(location)
    script = Path(__file__).parent / "integration" / "bank_writer.py"
    writer = subprocess.Popen([sys.executable, str(script), str(location), "w", "40"], stderr=subprocess.PIPE)
    rounds = 0
    while writer.poll() is None:
        bank.gc()
        bank.verify()
        rounds += 1
    _, err = writer.communicate()
    assert writer.returncode == 0, err.decode()
    assert rounds > 3
    assert len(bank) == 40 and len(bank.select(bank.names())) == 40
    assert bank.verify()[0] == []


def test_gc_keeps_intact_unlisted_folders_and_recover_registers_them(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a", "b", "c")
    root = tmp_path / "bank"
    ops = _journal_ops(root)
    _write_journal(root, ops[:1])  # a journal truncated by a bad copy: b and c are forgotten
    fresh = ExpertBank(root)
    assert fresh.names() == ["a"]
    problems, warnings = fresh.verify()
    assert problems == [] and sum("`pituning bank recover` registers it" in w for w in warnings) == 2
    assert fresh.gc() == []  # never an intact expert
    report = ExpertBank.recover(root)
    assert report.registered == ["b", "c"] and report.dropped == [] and report.entries == 3
    assert (root / report.backup / "journal.jsonl").exists()  # type: ignore[operator]
    again = ExpertBank(root)
    assert again.names() == ["a", "b", "c"] and again.verify() == ([], [])
    assert torch.equal(
        again.get("c").state["layers.0.q.pi_lora.lora_A"], bank.get("c").state["layers.0.q.pi_lora.lora_A"]
    )


def test_removed_and_replaced_folders_are_collected_not_resurrected(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a", "b")
    root = tmp_path / "bank"
    old_a, old_b = bank.entry("a").folder, bank.entry("b").folder
    real_remove = type(bank.storage).remove_tree
    type(bank.storage).remove_tree = lambda self, path: None  # type: ignore[method-assign]  # crash before deleting
    try:
        bank.remove("b")
        bank.add(tiny_expert("a", 7), overwrite=True)
    finally:
        type(bank.storage).remove_tree = real_remove  # type: ignore[method-assign]
    assert (root / old_a).is_dir() and (root / old_b).is_dir()
    assert ExpertBank.recover(root).registered == []  # dead folders are never re-registered
    assert sorted(bank.gc()) == sorted([old_a, old_b])
    assert bank.names() == ["a"] and bank.verify() == ([], [])


# ---------------------------------------------------------------------------------------------------- 2. escapes
@pytest.mark.parametrize("folder", ["experts/../../victim", "/tmp/victim", "experts/a--0123456789ab/../../.."])
def test_a_record_pointing_outside_the_bank_is_refused(tmp_path: Path, folder: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    _bank(tmp_path, "a", "b")
    root = tmp_path / "bank"
    ops = _journal_ops(root)
    ops[0]["entry"]["folder"] = folder  # re-sealed: a hostile bank, not a damaged one
    _write_journal(root, ops)
    bank = ExpertBank(root)
    for action in (
        bank.names,
        bank.verify,
        bank.gc,
        lambda: bank.remove("a"),
        lambda: bank.add(tiny_expert("a"), overwrite=True),
    ):
        try:
            result = action()
        except BankCorruptionError as err:
            assert "outside the bank" in str(err) or "not a bank folder" in str(err)
        else:
            assert action == bank.verify and result[0] and "not a bank folder" in result[0][0]  # type: ignore[index]
    assert main(["bank", "remove", "--bank", str(root), "a"]) == 2
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_symlinked_expert_folder_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    bank = _bank(tmp_path, "a")
    root = tmp_path / "bank"
    folder = root / bank.entry("a").folder
    for f in folder.iterdir():
        (victim / f.name).write_bytes(f.read_bytes())
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    folder.symlink_to(victim)  # the expert's folder now leads outside the bank
    (root / "experts" / "stray--0123456789ab").symlink_to(victim)
    bank = ExpertBank(root)
    with pytest.raises(BankError, match="outside the bank"):
        bank.get("a")
    with pytest.raises(BankError, match="outside the bank"):
        bank.remove("a")
    problems, _ = bank.verify()
    assert any("outside the bank" in p for p in problems)
    assert bank.gc() == []
    assert (victim / "precious.txt").read_text() == "keep me" and (victim / "weights.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- 3. sealed
@pytest.mark.parametrize("target", ["journal.jsonl", "manifest.json"])
def test_every_one_bit_flip_is_detected_or_harmless(tmp_path: Path, target: str) -> None:
    bank = _bank(tmp_path, "a", "b", "c")
    root = tmp_path / "bank"
    if target == "manifest.json":
        with bank.storage.lock():
            bank._compact()
    clean = _observe(root)
    original = (root / target).read_bytes()
    rng = random.Random(0)
    outcomes = {"detected": 0, "harmless": 0}
    for _ in range(40):
        data = bytearray(original)
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        (root / target).write_bytes(bytes(data))
        seen = _observe(root)  # a raw exception fails the test here
        if seen == clean:
            outcomes["harmless"] += 1
        else:
            assert isinstance(seen, tuple) and seen[0] in ("error", "problems"), f"silent change at bit {bit}"
            outcomes["detected"] += 1
            assert callable(ExpertBank.gc)
            with pytest.raises(BankError):  # gc refuses a damaged bank instead of deleting what it cannot see
                ExpertBank(root, create=False).gc()
        assert sorted(p.name.split("--")[0] for p in (root / "experts").iterdir()) == ["a", "b", "c"]
    assert outcomes["detected"] >= 30
    (root / target).write_bytes(original)


def test_recover_after_a_damaged_journal_line(tmp_path: Path) -> None:
    _bank(tmp_path, "a", "b", "c")
    root = tmp_path / "bank"
    lines = (root / "journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"task":"b"', b'"task":"x"')
    (root / "journal.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(BankCorruptionError, match=r"journal\.jsonl line 2 does not match its checksum"):
        ExpertBank(root).names()
    assert main(["bank", "verify", "--bank", str(root), "--gc"]) == 1
    assert len(list((root / "experts").iterdir())) == 3
    assert main(["bank", "recover", "--bank", str(root)]) == 0
    bank = ExpertBank(root)
    assert bank.names() == ["a", "b", "c"] and bank.entry("b").task == "b" and bank.verify() == ([], [])


def test_unknown_fields_and_raw_key_errors_are_corruption(tmp_path: Path) -> None:
    _bank(tmp_path, "a")
    root = tmp_path / "bank"
    ops = _journal_ops(root)
    del ops[0]["entry"]["kind"]
    _write_journal(root, ops)
    with pytest.raises(BankCorruptionError, match=r"line 1: entry fields differ .*missing \['kind'\]"):
        ExpertBank(root).names()


def test_a_schema_1_bank_is_read_and_sealed_on_its_first_write(tmp_path: Path) -> None:
    _bank(tmp_path, "a", "b")
    root = tmp_path / "bank"
    ops = _journal_ops(root)
    (root / "manifest.json").write_text(
        json.dumps({"format": "pituning-bank", "schema": 1, "library": "pituning 0.1.0", "entries": {}})
    )
    (root / "journal.jsonl").write_bytes(b"".join(json.dumps(op).encode() + b"\n" for op in ops))
    bank = ExpertBank(root)
    assert bank.names() == ["a", "b"] and bank.verify() == ([], [])
    bank.add(tiny_expert("c", 2))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["schema"] == 2 and "sha256" in manifest and sorted(manifest["entries"]) == ["a", "b"]
    assert [op["entry"]["name"] for op in _journal_ops(root)] == ["c"]
    assert ExpertBank(root).names() == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------------- 4. derived
def test_the_embedding_cache_is_checked_and_rebuilt(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a", "b", "c", "d")
    ranking = bank.similar("a", k=3)
    (cache,) = (tmp_path / "bank" / "cache").iterdir()
    from safetensors.torch import load, save

    blob = load(cache.read_bytes())
    blob["raw"] = blob["raw"].flip(0)  # an edited cache: rows swapped
    cache.write_bytes(bytes(save(blob)))
    assert ExpertBank(tmp_path / "bank").similar("a", k=3) == ranking
    cache.write_bytes(cache.read_bytes()[:50])  # truncated
    fresh = ExpertBank(tmp_path / "bank")
    assert any("damaged cache file" in w for w in fresh.verify()[1])
    assert fresh.similar("a", k=3) == ranking
    cache.write_bytes(b"garbage")
    assert ExpertBank(tmp_path / "bank").gc() == [f"cache/{cache.name}"]


def _reseal_file(root: Path, name: str, role: str, data: bytes) -> None:
    """Replace one file of expert ``name`` and re-seal its record, as a careless (or hostile) tool would."""
    ops = _journal_ops(root)
    entry = next(op["entry"] for op in ops if op["op"] == "add" and op["entry"]["name"] == name)
    (root / entry["files"][role]["path"]).write_bytes(data)
    entry["files"][role]["sha256"] = sha256(data)
    _write_journal(root, ops)


def test_a_consistent_expert_json_with_missing_fields_is_a_pituning_error(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a")
    root = tmp_path / "bank"
    meta = json.loads((root / bank.entry("a").files["expert"]["path"]).read_text())
    del meta["task"]
    _reseal_file(root, "a", "expert", json.dumps(meta).encode())
    with pytest.raises(BankCorruptionError, match=r"expert\.json: field 'task' is missing"):
        ExpertBank(root).get("a")


def test_get_checks_tensor_names_and_shapes_against_the_record(tmp_path: Path) -> None:
    from safetensors.torch import save

    _bank(tmp_path, "a")
    root = tmp_path / "bank"
    _reseal_file(root, "a", "weights", bytes(save({"other": torch.zeros(3)})))
    with pytest.raises(BankCorruptionError, match="do not match the names and shapes"):
        ExpertBank(root).get("a")
    assert ExpertBank(root).verify()[0]


def test_leftover_temporary_files_are_reported_and_collected(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a")
    root = tmp_path / "bank"
    leftover = root / f".manifest.json.{'0' * 32}.tmp"
    leftover.write_bytes(b"{")
    assert any("leftover temporary file" in w for w in bank.verify()[1])
    assert bank.gc() == [leftover.name] and not leftover.exists()


def test_non_finite_weights_are_never_stored(tmp_path: Path) -> None:
    bank = _bank(tmp_path)
    expert = tiny_expert("nan")
    expert.state["layers.0.q.pi_lora.lora_A"][0, 0] = float("nan")
    with pytest.raises(ExpertError, match="non-finite weights"):
        bank.add(expert)
    assert bank.names() == [] and not list((tmp_path / "bank").glob("experts/*"))


# ---------------------------------------------------------------------------------------------------- 5. locations
def test_bad_locations_are_bank_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    monkeypatch.chdir(tmp_path)
    for location, message in [
        (afile, "is a file"),
        (afile / "bank", "which is a file"),
        ("", "location is empty"),
        ("  ", "location is empty"),
        ("nosuchproto://bank", "Cannot open a bank"),
    ]:
        with pytest.raises(BankError, match=message):
            ExpertBank(location)
        assert main(["bank", "list", "--bank", str(location)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no bank appeared in the working directory


def test_a_bank_without_its_manifest_is_not_recreated_empty(tmp_path: Path) -> None:
    _bank(tmp_path, "a")
    (tmp_path / "bank" / "manifest.json").unlink()
    with pytest.raises(BankCorruptionError, match="recover"):
        ExpertBank(tmp_path / "bank")
    assert ExpertBank.recover(tmp_path / "bank").entries == 1  # from the journal
    assert ExpertBank(tmp_path / "bank").names() == ["a"]
    (tmp_path / "bank" / "manifest.json").unlink()
    (tmp_path / "bank" / "journal.jsonl").unlink()
    assert ExpertBank.recover(tmp_path / "bank").registered == ["a"]  # from its folder alone
    assert ExpertBank(tmp_path / "bank").names() == ["a"]


# ---------------------------------------------------------------------------------------------------- 6. average
def test_average_refuses_experts_of_different_backbone_weights(tmp_path: Path) -> None:
    bank = _bank(tmp_path, "a")
    other = tiny_expert("b", 1)
    fp = FAKE_BACKBONE.fingerprint
    other.backbone = BackboneIdentity("toy-finetuned", "toy", Fingerprint(fp.structure, "v" * 64, fp.num_parameters))
    bank.add(other)
    with pytest.raises(BackboneMismatchError, match="allow_backbone_mismatch=True"):
        bank.average(["a", "b"], name="ab")
    assert "ab" not in bank
    mixed = bank.average(["a", "b"], name="ab", allow_backbone_mismatch=True)
    assert [b["source"] for b in mixed.provenance["backbones"]] == ["toy-backbone", "toy-finetuned"]


def test_flips_in_an_unsealed_field_of_a_hand_made_manifest_are_caught(tmp_path: Path) -> None:
    _bank(tmp_path, "a")
    root = tmp_path / "bank"
    entry = _journal_ops(root)[0]["entry"]
    (root / "manifest.json").write_bytes(encode_manifest({"a": entry}, "pituning test"))
    (root / "journal.jsonl").write_bytes(b"")
    data = json.loads((root / "manifest.json").read_text())
    data["entries"]["a"]["modality"] = "vision"  # edited without re-sealing
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BankCorruptionError, match="manifest.json does not match its checksum"):
        ExpertBank(root).names()


def test_gc_loop_process_beside_writer_process(tmp_path: Path) -> None:
    """Both sides in their own process, as `pituning bank verify --gc` beside a training job."""
    location = tmp_path / "bank"
    ExpertBank(location)
    script = Path(__file__).parent / "integration" / "bank_writer.py"
    writer = subprocess.Popen([sys.executable, str(script), str(location), "w", "25"], stderr=subprocess.PIPE)
    gc_code = (
        "import sys, time\nfrom pituning.cli import main\n"
        "while True:\n    main(['bank', 'verify', '--bank', sys.argv[1], '--gc'])\n    time.sleep(0.05)\n"
    )
    collector = subprocess.Popen(
        [sys.executable, "-c", gc_code, str(location)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err.decode()
        time.sleep(0.2)
        assert collector.poll() is None, collector.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        collector.kill()
        collector.wait()
    bank = ExpertBank(location)
    assert len(bank.select(bank.names())) == 25 and bank.verify()[0] == []
    assert os.path.isdir(location / "experts")

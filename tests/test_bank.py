"""ExpertBank: format, API and safety, on a local directory and on memory://."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import pituning.bank as bank_module
from bank_helpers import FAKE_BACKBONE, tiny_expert
from families import FAMILIES
from pituning import AdapterConfig, ConfigError, ExpertModel, LoraConfig
from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.errors import BackboneMismatchError, BankCorruptionError, BankError


@pytest.fixture(params=["local", "memory"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "bank")
    return f"memory://bank-{uuid.uuid4().hex}"


def _bert() -> ExpertModel:
    return ExpertModel(FAMILIES["bert"].build()).eval()


def _trained(model: ExpertModel, name: str, config: object, seed: int) -> None:
    model.add_expert(name, config)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_format_on_disk(tmp_path: Path) -> None:
    model = _bert()
    _trained(model, "ua", LoraConfig(r=2), 0)
    task = TaskInfo("tweets/ua", modality="text", label_names=["neg", "neu", "pos"], num_examples=48, shots=16)
    emb = {k: torch.rand(v.shape) for k, v in model.expert_state_dict("ua").items()}
    head = {"weight": torch.randn(3, 32), "bias": torch.zeros(3)}
    bank = ExpertBank(tmp_path / "bank")
    entry = bank.add(Expert.from_model(model, "ua", task, metrics={"acc": 0.8}, embedding=emb, head=head))
    folder = tmp_path / "bank" / entry.folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "embedding.safetensors",
        "expert.json",
        "head.safetensors",
        "weights.safetensors",
    ]
    meta = json.loads((folder / "expert.json").read_text())
    assert meta["kind"] == "lora" and meta["config"]["r"] == 2 and meta["schema"] == 2
    assert meta["library"].startswith("pituning ")
    assert meta["backbone"]["source"] == "config:bert" and len(meta["backbone"]["weights"]) == 64
    assert meta["backbone"]["num_parameters"] == sum(p.numel() for p in model.backbone.parameters() if p.ndim) - sum(
        p.numel() for p in model.expert_parameters("ua").values()
    )
    assert meta["task"] == {
        "name": "tweets/ua",
        "modality": "text",
        "label_names": ["neg", "neu", "pos"],
        "num_examples": 48,
        "shots": 16,
    }
    assert meta["metrics"] == {"acc": 0.8} and meta["created"]
    assert set(meta["modules"]) == set(model.expert_modules("ua"))
    # the manifest (manifest.json + journal) lists every file with its sha256
    records = [json.loads(line) for line in (tmp_path / "bank" / "journal.jsonl").read_text().splitlines()]
    files = records[-1]["entry"]["files"]
    assert set(files) == {"expert", "weights", "embedding", "head"}
    for info in files.values():
        assert hashlib.sha256((tmp_path / "bank" / info["path"]).read_bytes()).hexdigest() == info["sha256"]


def test_round_trip_and_load_into(location: str) -> None:
    model = _bert()
    _trained(model, "ua", LoraConfig(r=2), 0)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    bank = ExpertBank(location)
    bank.add(Expert.from_model(model, "ua", TaskInfo("ua")))
    again = ExpertBank(location, create=False)  # a second handle sees it
    expert = again.get("ua")
    assert expert.config == model.experts["ua"]
    for key, value in model.expert_state_dict("ua").items():
        assert torch.equal(expert.state[key], value)
    fresh = _bert()
    again.load_into(fresh, "ua", as_name="loaded")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, expected, rtol=0, atol=0)


def test_list_filters_remove_select(location: str) -> None:
    bank = ExpertBank(location)
    bank.add(tiny_expert("a", 0, modality="text", task="t1"))
    bank.add(tiny_expert("b", 1, modality="vision", task="t2"))
    ad = tiny_expert("c", 2, modality="vision", task="t2", embedding=False)
    ad.config = AdapterConfig(bottleneck=2)
    bank.add(ad)
    assert [e.name for e in bank.list()] == ["a", "b", "c"] and len(bank) == 3
    assert [e.name for e in bank.list(modality="vision")] == ["b", "c"]
    assert [e.name for e in bank.list(kind="adapter")] == ["c"]
    assert [e.name for e in bank.list(task="t1")] == ["a"]
    assert [e.name for e in bank.list(backbone="toy-backbone", has_embedding=True)] == ["a", "b"]
    assert [e.name for e in bank.list(backbone="sss")] == ["a", "b", "c"]  # structure fingerprint prefix
    assert bank.list(backbone="other") == []
    assert [e.name for e in bank.select(["b", "a"])] == ["b", "a"]
    bank.remove("b")
    assert bank.names() == ["a", "c"] and "b" not in bank
    with pytest.raises(BankError, match="No expert 'b'"):
        bank.get("b")


def test_name_taken_and_overwrite(location: str) -> None:
    bank = ExpertBank(location)
    first = bank.add(tiny_expert("a", 0))
    with pytest.raises(BankError, match=r"already in the bank; remove them or pass overwrite=True"):
        bank.add(tiny_expert("a", 1))
    second = bank.add(tiny_expert("a", 1), overwrite=True)
    assert second.folder != first.folder
    assert torch.equal(
        bank.get("a").state["layers.0.q.pi_lora.lora_A"], tiny_expert("a", 1).state["layers.0.q.pi_lora.lora_A"]
    )
    assert bank.verify() == ([], [])  # the old folder is gone


@pytest.mark.parametrize("name", ["../evil", "a/b", "a.b", ""])
def test_names_are_validated(location: str, name: str) -> None:
    with pytest.raises(ConfigError, match="Invalid expert name"):
        ExpertBank(location).add(tiny_expert(name))


def test_bf16_storage_loads_as_fp32(location: str) -> None:
    bank = ExpertBank(location, dtype=torch.bfloat16)
    expert = tiny_expert("a")
    bank.add(expert)
    loaded = bank.get("a")
    for key, value in expert.state.items():
        assert loaded.state[key].dtype == torch.float32
        assert torch.equal(loaded.state[key], value.to(torch.bfloat16).float())


def test_average_params_and_delta(location: str) -> None:
    bank = ExpertBank(location)
    a, b = tiny_expert("a", 0), tiny_expert("b", 1)
    bank.add_many([a, b])
    avg = bank.average(["a", "b"], [0.25, 0.75], name="avg")
    stored = bank.get("avg")
    for key in a.state:
        torch.testing.assert_close(stored.state[key], 0.25 * a.state[key] + 0.75 * b.state[key])
    assert stored.provenance["average_of"] == ["a", "b"] and avg.config == a.config
    c = tiny_expert("c", 2, rank=3)
    bank.add(c)
    with pytest.raises(ConfigError, match="lora='delta'"):
        bank.average(["a", "c"], name="bad")
    delta = bank.average(["a", "c"], [0.5, 0.5], name="delta", lora="delta")
    assert delta.config.r == 5  # type: ignore[attr-defined]
    for module in ("layers.0.q", "layers.1.q"):
        got = delta.state[f"{module}.pi_lora.lora_B"] @ delta.state[f"{module}.pi_lora.lora_A"]
        want = sum(
            0.5 * e.config.scaling * e.state[f"{module}.pi_lora.lora_B"] @ e.state[f"{module}.pi_lora.lora_A"]  # type: ignore[attr-defined]
            for e in (a, c)
        )
        torch.testing.assert_close(got * delta.config.scaling, want)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="one finite weight per expert"):
        bank.average(["a", "b"], [1.0], name="x")


def test_average_heads_and_overwrite(location: str) -> None:
    bank = ExpertBank(location)
    a, b, c = tiny_expert("a", 0), tiny_expert("b", 1), tiny_expert("c", 2)
    a.head = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    b.head = {"weight": torch.zeros(3, 4), "bias": torch.ones(3)}
    c.head = {"weight": torch.ones(5, 4), "bias": torch.zeros(5)}  # another label set
    bank.add_many([a, b, c])
    bank.average(["a", "b"], [0.25, 0.75], name="avg")
    head = bank.get("avg").head
    assert head is not None
    torch.testing.assert_close(head["weight"], torch.full((3, 4), 0.25))
    torch.testing.assert_close(head["bias"], torch.full((3,), 0.75))
    assert bank.average(["a", "c"], name="mixed").head is None  # heads of other shapes are not averaged
    with pytest.raises(BankError, match="avg"):
        bank.average(["a", "b"], name="avg")
    again = bank.average(["b", "a"], [0.5, 0.5], name="avg", overwrite=True)
    assert bank.get("avg").provenance["average_of"] == ["b", "a"] and again.head is not None


def test_similar_ranks_by_fisher_similarity(location: str) -> None:
    bank = ExpertBank(location)
    target = tiny_expert("target", 0)
    assert target.embedding is not None
    close = tiny_expert("close", 1)
    close.embedding = {k: v * 3.0 + 0.01 * torch.rand(v.shape) for k, v in target.embedding.items()}  # same shape
    far = tiny_expert("far", 2)
    far.embedding = {k: torch.where(v > 0.5, 0.0, 1.0) + 1e-3 for k, v in target.embedding.items()}
    other = tiny_expert("other_modality", 3, modality="vision")
    bank.add_many([target, close, far, other, tiny_expert("no_emb", 4, embedding=False)])
    ranked = bank.similar("target", k=2)
    assert [n for n, _ in ranked] == ["close", "other_modality"] or ranked[0][0] == "close"
    assert ranked[0][1] > 0.99
    assert [n for n, _ in bank.similar("target", k=5, modality="text")][-1] == "far"
    assert "no_emb" not in dict(bank.similar("target", k=10))
    # a second handle answers from the persisted cache; a changed embedding invalidates it
    again = ExpertBank(location)
    assert again.similar("target", k=1) == bank.similar("target", k=1)
    again.set_embedding("far", target.embedding)
    assert again.similar("target", k=1)[0][0] == "far"
    with pytest.raises(BankError, match="has no task embedding"):
        bank.similar("no_emb")


def test_flipped_byte_is_reported_with_the_file(tmp_path: Path) -> None:
    bank = ExpertBank(tmp_path / "bank")
    entry = bank.add(tiny_expert("a"))
    path = tmp_path / "bank" / entry.files["weights"]["path"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BankCorruptionError, match=r"weights\.safetensors of expert 'a' is corrupt"):
        bank.get("a")
    problems, _ = bank.verify()
    assert len(problems) == 1 and "weights.safetensors" in problems[0]


def test_backbone_fingerprint_mismatch(location: str) -> None:
    model = _bert()
    _trained(model, "a", LoraConfig(r=2), 0)
    bank = ExpertBank(location)
    bank.add(Expert.from_model(model, "a", TaskInfo("a")))
    torch.manual_seed(123)
    other = ExpertModel(FAMILIES["bert"].build())
    with torch.no_grad():
        other.backbone.encoder.layer[0].output.dense.weight.add_(0.5)
    with pytest.raises(BackboneMismatchError, match="weights fingerprint.*allow_backbone_mismatch=True"):
        bank.load_into(other, "a")
    assert other.experts == {}
    bank.load_into(other, "a", allow_backbone_mismatch=True)
    assert list(other.experts) == ["a"]
    # a bf16 copy of the same backbone has the same fingerprint
    same = _bert()
    same.backbone.to(torch.bfloat16)
    bank.load_into(same, "a")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = ExpertBank(tmp_path / "bank")
    bank.add(tiny_expert("keep"))
    calls = {"n": 0}
    original = type(bank.storage).write_atomic

    def failing(self: object, path: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(self, path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(type(bank.storage), "write_atomic", failing)
    with pytest.raises(OSError, match="disk full"):
        bank.add(tiny_expert("new"))
    monkeypatch.undo()
    assert bank.names() == ["keep"]
    assert bank.verify() == ([], [])
    assert sorted(p.name.split("--")[0] for p in (tmp_path / "bank" / "experts").iterdir()) == ["keep"]


def test_uncommitted_journal_tail_and_orphans_are_ignored(tmp_path: Path) -> None:
    bank = ExpertBank(tmp_path / "bank")
    bank.add(tiny_expert("a"))
    with open(tmp_path / "bank" / "journal.jsonl", "ab") as handle:
        handle.write(b'{"op": "add", "entry": {"name": "half')  # a crash mid-append: no newline
    (tmp_path / "bank" / "experts" / "ghost--123").mkdir()
    fresh = ExpertBank(tmp_path / "bank")
    assert fresh.names() == ["a"]
    problems, warnings = fresh.verify()
    assert problems == [] and len(warnings) == 2
    assert "interrupted write (never committed)" in warnings[0] and "ghost--123" in warnings[1]
    assert fresh.gc() == ["experts/ghost--123"]
    fresh.add(tiny_expert("b", 1))  # the torn tail is cut off, not glued to the new line
    assert ExpertBank(tmp_path / "bank").names() == ["a", "b"] and fresh.verify() == ([], [])


def test_journal_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bank_module, "COMPACT_EVERY", 3)
    bank = ExpertBank(tmp_path / "bank")
    for i in range(7):
        bank.add(tiny_expert(f"e{i}", i, embedding=False))
    bank.remove("e0")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert len(manifest["entries"]) >= 5
    assert (tmp_path / "bank" / "journal.jsonl").read_text().count("\n") < 3
    assert ExpertBank(tmp_path / "bank").names() == [f"e{i}" for i in range(1, 7)]


def test_only_json_and_safetensors_are_read(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = ExpertBank(location)
    bank.add(tiny_expert("a"))
    bank.add(tiny_expert("b", 1))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bank must never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    fresh = ExpertBank(location)
    fresh.get("a")
    fresh.similar("a", k=1)
    fresh.verify()


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    location = str(tmp_path / "bank")
    ExpertBank(location)
    script = Path(__file__).parent / "integration" / "bank_writer.py"
    procs = [subprocess.Popen([sys.executable, str(script), location, prefix, "50"]) for prefix in ("p", "q")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    bank = ExpertBank(location)
    assert len(bank) == 100
    assert bank.verify() == ([], [])
    assert len(bank.select(bank.names())) == 100


def test_expert_from_model_errors() -> None:
    with pytest.raises(Exception, match="No expert named 'x'"):
        Expert.from_model(_bert(), "x", TaskInfo("x"))
    with pytest.raises(ConfigError, match="TaskInfo.modality"):
        TaskInfo("t", modality="audio")
    assert FAKE_BACKBONE.to_dict()["source"] == "toy-backbone"


def test_dual_encoder_experts_round_trip(tmp_path: Path) -> None:
    from families import tiny_dual

    model = ExpertModel(tiny_dual()).eval()
    _trained(model, "vl", AdapterConfig(bottleneck=4), 0)
    inputs = FAMILIES["dual"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = FAMILIES["dual"].output(model, inputs)
    bank = ExpertBank(tmp_path / "bank")
    head = {"image_proj.weight": torch.randn(32, 24), "logit_scale": torch.tensor(2.6592)}
    bank.add(Expert.from_model(model, "vl", TaskInfo("vl", modality="vision-language"), head=head))
    stored = bank.get("vl")
    assert stored.backbone.family == "dual" and stored.backbone.fingerprint == model.fingerprint()
    assert stored.head is not None and torch.equal(stored.head["image_proj.weight"], head["image_proj.weight"])
    fresh = ExpertModel(tiny_dual()).eval()  # same seed, same weights
    bank.load_into(fresh, "vl")
    with torch.no_grad():
        torch.testing.assert_close(FAMILIES["dual"].output(fresh, inputs), expected, rtol=0, atol=0)
    other = tiny_dual()
    with torch.no_grad():
        other.image._conv_head.weight.add_(1.0)  # another image tower: the fingerprint sees it
    with pytest.raises(BackboneMismatchError, match="weights fingerprint"):
        bank.load_into(ExpertModel(other), "vl")

"""Loading, freezing and describing backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from families import FAMILIES, _cfg
from pituning import (
    Backbone,
    BackboneDescription,
    BackboneError,
    ConfigError,
    ExpertModel,
    LoraConfig,
    PrefixConfig,
    describe,
    load_backbone,
)

# family -> (layers, hidden sizes, {role: count})
EXPECTED = {
    "bert": (2, (32,), {"query": 2, "key": 2, "value": 2, "attn_out": 2, "ffn_in": 2, "ffn_out": 2, "self_attn": 2}),
    "roberta": (2, (32,), {"query": 2, "attn_out": 2, "ffn_out": 2, "self_attn": 2}),
    "distilbert": (2, (32,), {"query": 2, "key": 2, "value": 2, "attn_out": 2, "ffn_out": 2, "self_attn": 2}),
    "vit": (2, (32,), {"query": 2, "attn_out": 2, "ffn_in": 2, "ffn_out": 2, "self_attn": 2}),
    "clip": (4, (24, 32), {"query": 4, "attn_out": 4, "ffn_out": 4, "self_attn": 4}),
    # T5: 2 encoder + 2 decoder blocks; the decoder has self- and cross-attention
    "t5": (4, (32,), {"query": 6, "key": 6, "value": 6, "attn_out": 6, "ffn_in": 4, "ffn_out": 4, "self_attn": 4}),
    "gpt2": (2, (32,), {"query": 2, "attn_out": 2, "ffn_in": 2, "ffn_out": 2, "self_attn": 2}),
    "llama": (2, (32,), {"query": 2, "key": 2, "attn_out": 2, "ffn_in": 4, "ffn_out": 2, "self_attn": 2}),
    "cnn": (2, (8,), {"blocks": 2, "conv": 5, "head": 1}),
    # the image tower's 2 blocks, then the text tower's 2 layers; widths per tower (blocks 8, 12; text 32)
    "dual": (
        4,
        (8, 12, 32),
        {"image.blocks": 2, "image.pointwise": 4, "image.head": 1, "text.blocks": 2, "text.query": 2},
    ),
}
OUTSIDE_BLOCKS = {"cnn": {"stem", "head"}, "dual": {"image._conv_head"}}


@pytest.mark.parametrize("fam", list(EXPECTED))
def test_presets_find_every_insertion_point(fam: str) -> None:
    backbone = FAMILIES[fam].build()
    layers, sizes, counts = EXPECTED[fam]
    info = backbone.info
    assert info.num_layers == layers
    assert info.hidden_sizes == sizes
    for role, n in counts.items():
        assert len(info.names(role)) == n, role
    outside = {p.name for p in info.points if p.layer is None}
    assert outside == OUTSIDE_BLOCKS.get(fam, set())
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert fam.split("-")[0] in repr(backbone) or info.family in repr(backbone)


def test_t5_reports_cross_attention_and_gpt2_fused_qkv() -> None:
    t5 = FAMILIES["t5"].build().info
    assert "decoder.block.0.layer.1.EncDecAttention.q" in t5.names("query")
    assert "decoder.block.0.layer.0.SelfAttention" in t5.names("self_attn")
    gpt2 = FAMILIES["gpt2"].build().info
    assert gpt2.names("query") == gpt2.names("key") == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    point = gpt2.point("h.0.attn.c_attn")
    assert point is not None and (point.in_features, point.out_features) == (32, 96)


def test_load_from_a_local_directory_with_a_task_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_config(_cfg("bert")).save_pretrained(tmp_path)
    backbone = load_backbone(tmp_path, task="sequence-classification", num_labels=2)
    assert type(backbone.model).__name__ == "BertForSequenceClassification"
    assert backbone.source == str(tmp_path)
    assert backbone.info.names("query")[0] == "bert.encoder.layer.0.attention.self.query"
    model = ExpertModel(backbone)
    model.add_expert("a", LoraConfig(r=2))
    out = model(input_ids=torch.randint(3, 99, (2, 5))).logits
    assert out.shape == (2, 2)


def test_load_in_bf16(tmp_path: Path) -> None:
    backbone = load_backbone(_cfg("bert"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in backbone.model.parameters())


def test_missing_directory_and_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"No backbone directory at .*nowhere.*fix the path"):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match=r"from the local directory .*empty.*config.json"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(ConfigError, match="Unknown backbone task 'speech'"):
        load_backbone(_cfg("bert"), task="speech")


class Toy(nn.Module):
    """An attention-style model of no known family."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            att = torch.softmax(self.wq(x) @ self.wk(x).transpose(1, 2) / 8**0.5, dim=-1)
            return self.wo(att @ self.wv(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Toy.Attn()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x)
            return x + self.down(torch.relu(self.up(x)))

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Toy.Layer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


TOY = BackboneDescription(
    family="toy",
    roles={
        "blocks": r"layers\.\d+",
        "query": r"layers\.\d+\.attn\.wq",
        "key": r"layers\.\d+\.attn\.wk",
        "value": r"layers\.\d+\.attn\.wv",
        "attn_out": r"layers\.\d+\.attn\.wo",
        "ffn_in": r"layers\.\d+\.up",
        "ffn_out": r"layers\.\d+\.down",
    },
)


def test_an_unknown_family_works_once_described() -> None:
    with pytest.raises(BackboneError, match="no preset"):
        load_backbone(Toy())
    model = ExpertModel(Toy(), description=TOY)
    assert model.info.num_layers == 3 and model.info.hidden_sizes == (8,)
    assert len(model.add_expert("a", LoraConfig(r=2, include_mlp=True))) == 18
    from pituning import AdapterConfig

    assert model.add_expert("b", AdapterConfig(bottleneck=2)) == [
        f"layers.{i}.{m}" for i in range(3) for m in ("attn.wo", "down")
    ]
    assert model(torch.randn(2, 4, 8)).shape == (2, 4, 8)
    # it has no self-attention role, so a prefix is refused with the fix
    with pytest.raises(Exception, match="prefix experts do not fit the toy backbone: they attach to self-attention"):
        model.add_expert("p", PrefixConfig())


def test_description_errors() -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        BackboneDescription(family="x", roles={"query": "("})
    bad = BackboneDescription(family="x", roles={"query": r"nothing\.here"}, lora_roles=("query",))
    with pytest.raises(BackboneError, match="role 'query' .* matches no module"):
        describe(Toy(), bad)


def test_from_module_freezes_in_place() -> None:
    toy = Toy()
    backbone = Backbone.from_module(toy, TOY)
    assert backbone.model is toy and not any(p.requires_grad for p in toy.parameters())


def test_dual_numbers_the_blocks_of_both_towers_together() -> None:
    info = FAMILIES["dual"].build().info
    assert [info.point(n).layer for n in info.names("image.blocks", "text.blocks")] == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert info.point("text.encoder.layer.1.attention.self.query").layer == 3  # type: ignore[union-attr]
    assert info.point("image._blocks.1._project_conv").layer == 1  # type: ignore[union-attr]
    assert info.description.prefix_role == "text.self_attn"


def test_dual_spec_errors() -> None:
    for bad in ("dual:efficientnet-lite0", "dual:a+b+c", "dual:+text", "dual:"):
        with pytest.raises(ConfigError, match=r"not a dual-encoder name: write dual:<image spec>\+<text spec>"):
            load_backbone(bad)
    with pytest.raises(ConfigError, match="loads both towers with task='base'"):
        load_backbone("dual:a+b", task="sequence-classification")
    with pytest.raises(ConfigError, match=r"loading options \['revision'\] are ambiguous for two towers"):
        load_backbone("dual:a+b", revision="main")


def test_dual_checks_the_tower_families(tmp_path: Path) -> None:
    from transformers import BertModel

    BertModel(_cfg("bert")).save_pretrained(tmp_path / "bert")
    with pytest.raises(
        ConfigError, match="the image tower .* is a bert backbone, but the dual preset takes an efficientnet"
    ):
        load_backbone(f"dual:{tmp_path / 'bert'}+{tmp_path / 'bert'}")


def test_a_hub_name_fails_fast_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that is no local directory is a hub name; with the hub unreachable (or ``HF_HUB_OFFLINE``) and the
    model not cached, the error comes at once and names both ways a backbone loads, with no network retries."""
    import time

    import pituning.backbones as backbones

    backbones._hub_reachable.cache_clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the test session sets it
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    start = time.perf_counter()
    with pytest.raises(BackboneError, match=r"No local backbone directory 'org/no-such-model'.*hub is unreachable"):
        load_backbone("org/no-such-model")
    assert time.perf_counter() - start < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"HF_HUB_OFFLINE is set.*local model directory"):
        backbones.pretrained_path("org/no-such-model", "tokenizer")
    backbones._hub_reachable.cache_clear()


def test_a_cached_hub_model_loads_from_its_snapshot_when_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a hub name in the Hugging Face cache resolves to its cached snapshot directory."""
    import pituning.backbones as backbones

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert backbones.pretrained_path("org/tiny") == str(snapshot)

"""Bad input gives a pituning error that names the problem and the fix, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from families import FAMILIES
from pituning import (
    AdapterConfig,
    BackboneError,
    ConfigError,
    ExpertError,
    ExpertModel,
    InterpolationError,
    LoraConfig,
    PiTuningError,
    PrefixConfig,
    UnsupportedExpertError,
    load_backbone,
)
from pituning.experts.base import ExpertHost
from pituning.experts.lora.layer import LoraHost
from pituning.experts.prefix.layer import PrefixHost


def _bert() -> ExpertModel:
    model = ExpertModel(FAMILIES["bert"].build())
    model.eval()
    return model


def _snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor], int, str]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.backbone.config._attn_implementation  # type: ignore[union-attr]
    return [n for n, _ in model.named_modules()], state, hooks, impl


def _assert_unchanged(model: nn.Module, snap: tuple[list[str], dict[str, torch.Tensor], int, str]) -> None:
    names, state, hooks, impl = _snapshot(model)
    assert names == snap[0]
    assert state.keys() == snap[1].keys()
    assert all(torch.equal(state[k], snap[1][k]) for k in state)
    assert hooks == snap[2]
    assert impl == snap[3]


def test_errors_share_one_base() -> None:
    for cls in (ConfigError, BackboneError, UnsupportedExpertError, ExpertError, InterpolationError):
        assert issubclass(cls, PiTuningError)


def test_unknown_target_module_names_the_patterns() -> None:
    model = _bert()
    snap = _snapshot(model)
    with pytest.raises(BackboneError, match=r"target_modules=\['nope'\] matched no module.*encoder"):
        model.add_expert("a", LoraConfig(target_modules=["nope"]))
    _assert_unchanged(model, snap)


def test_lora_refuses_a_module_without_weights() -> None:
    model = _bert()
    snap = _snapshot(model)
    with pytest.raises(UnsupportedExpertError, match=r"LayerNorm.*cannot host a lora expert.*nn.Linear"):
        model.add_expert("a", LoraConfig(target_modules=[r"encoder\.layer\.0\.output\.LayerNorm"]))
    _assert_unchanged(model, snap)


def test_container_targets_are_refused() -> None:
    model = _bert()
    with pytest.raises(UnsupportedExpertError, match="is a container"):
        model.add_expert("a", AdapterConfig(target_modules=[r"encoder\.layer"]))


def test_prefix_needs_a_supported_attention_implementation() -> None:
    model = _bert()
    model.backbone.config._attn_implementation = "flash_attention_2"  # type: ignore[union-attr]
    with pytest.raises(UnsupportedExpertError, match="attn_implementation='sdpa' or 'eager'"):
        model.add_expert("p", PrefixConfig())
    assert model.experts == {}


def test_duplicate_expert_name() -> None:
    model = _bert()
    model.add_expert("a", LoraConfig(r=2))
    snap = _snapshot(model)
    with pytest.raises(ExpertError, match=r"'a' \(lora\) already exists; remove_expert\('a'\) first"):
        model.add_expert("a", AdapterConfig())
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a.b", "has space", "-lead", "x" * 129])
def test_invalid_expert_names(name: str) -> None:
    with pytest.raises(ConfigError, match="Invalid expert name"):
        _bert().add_expert(name, LoraConfig())


@pytest.mark.parametrize("name", ["eval", "train", "forward", "to"])
def test_reserved_expert_names(name: str) -> None:
    with pytest.raises(ConfigError, match=f"Expert name '{name}' is reserved"):
        _bert().add_expert(name, LoraConfig())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LoraConfig(r=0), r"LoraConfig.r must be a positive integer"),
        (lambda: LoraConfig(alpha=-1), r"LoraConfig.alpha must be > 0"),
        (lambda: LoraConfig(dropout=1.0), r"LoraConfig.dropout must be in \[0, 1\)"),
        (lambda: AdapterConfig(bottleneck=0), r"AdapterConfig.bottleneck must be a positive integer"),
        (lambda: AdapterConfig(activation="swish"), r"AdapterConfig.activation must be one of"),
        (lambda: PrefixConfig(num_tokens=0), r"PrefixConfig.num_tokens must be a positive integer"),
    ],
)
def test_config_validation(make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()  # type: ignore[operator]


def test_shape_mismatch_on_load_names_the_key() -> None:
    source = _bert()
    source.add_expert("a", LoraConfig(r=4))
    state = source.expert_state_dict("a")
    model = _bert()
    snap = _snapshot(model)
    with pytest.raises(
        ExpertError, match=r"Shape mismatch for '.*lora_A' of expert 'b': saved \(4, 32\), model expects \(8, 32\)"
    ):
        model.load_expert("b", LoraConfig(r=8), state)
    _assert_unchanged(model, snap)


def test_kind_mismatch_on_load() -> None:
    source = _bert()
    source.add_expert("a", AdapterConfig(bottleneck=4))
    state = source.expert_state_dict("a")
    model = _bert()
    snap = _snapshot(model)
    with pytest.raises(ExpertError, match=r"keys of another kind .*pi_adapter.* but the config is lora"):
        model.load_expert("b", LoraConfig(), state)
    _assert_unchanged(model, snap)


def test_missing_keys_on_load() -> None:
    source = _bert()
    source.add_expert("a", LoraConfig(r=4))
    state = source.expert_state_dict("a")
    state.pop(next(iter(state)))
    with pytest.raises(ExpertError, match=r"do not fit the model: missing \['.*'\]"):
        _bert().load_expert("b", LoraConfig(r=4), state)


def test_interpolating_different_kinds() -> None:
    model = _bert()
    model.add_expert("l", LoraConfig(r=2))
    model.add_expert("ad", AdapterConfig(bottleneck=4))
    with pytest.raises(InterpolationError, match="different kinds.*'l': 'lora'.*'ad': 'adapter'"):
        model.interpolate(["l", "ad"])


@pytest.mark.parametrize(
    ("first", "second", "match"),
    [
        (AdapterConfig(bottleneck=4), AdapterConfig(bottleneck=8), "parameter shapes differ"),
        (AdapterConfig(activation="relu"), AdapterConfig(activation="gelu"), "scale/activation differ"),
        (PrefixConfig(num_tokens=2), PrefixConfig(num_tokens=3), "parameter shapes differ"),
        (LoraConfig(r=2), LoraConfig(r=2, include_mlp=True), "are not on .*intermediate"),
    ],
)
def test_interpolating_incompatible_experts(first: object, second: object, match: str) -> None:
    model = _bert()
    model.add_expert("a", first)  # type: ignore[arg-type]
    model.add_expert("b", second)  # type: ignore[arg-type]
    with pytest.raises(InterpolationError, match=match):
        model.interpolate(["a", "b"])
    with pytest.raises(InterpolationError, match="repeats a name"):
        model.interpolate(["a", "a"])
    with pytest.raises(InterpolationError, match="empty"):
        model.interpolate([])


def test_lora_of_different_ranks_interpolates() -> None:
    model = _bert()
    model.add_expert("a", LoraConfig(r=2))
    model.add_expert("b", LoraConfig(r=6))
    model.interpolate(["a", "b"])
    assert model.collapse("ab").r == 8  # type: ignore[attr-defined]


def test_collapse_without_interpolation() -> None:
    model = _bert()
    model.add_expert("a", LoraConfig(r=2))
    with pytest.raises(InterpolationError, match="Nothing to collapse"):
        model.collapse("b")


def test_unknown_expert_operations() -> None:
    model = _bert()
    with pytest.raises(ExpertError, match="No expert named 'x'"):
        model.remove_expert("x")
    with pytest.raises(ExpertError, match="Cannot activate unknown"):
        model.set_active("x")
    with pytest.raises(InterpolationError, match="Unknown expert"):
        model.interpolate(["x"])


@pytest.mark.parametrize("config", [LoraConfig(r=2), AdapterConfig(bottleneck=4), PrefixConfig(num_tokens=2)])
def test_failed_injection_leaves_the_model_exactly_as_it_was(
    monkeypatch: pytest.MonkeyPatch, config: LoraConfig
) -> None:
    model = _bert()
    model.add_expert("keep", LoraConfig(r=2))  # existing hosts must survive the rollback untouched
    snap = _snapshot(model)
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    calls = {"n": 0}
    original = ExpertHost.add

    def failing_add(self: ExpertHost, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # after one module already got the new expert
            raise RuntimeError("disk full")
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ExpertHost, "add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        model.add_expert("new", config)
    _assert_unchanged(model, snap)
    assert list(model.experts) == ["keep"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, before, rtol=0, atol=0)


def test_removing_the_last_prefix_restores_attention() -> None:
    model = _bert()
    model.add_expert("p", PrefixConfig(num_tokens=2))
    assert model.backbone.config._attn_implementation == "pituning_sdpa"  # type: ignore[union-attr]
    model.remove_expert("p")
    assert model.backbone.config._attn_implementation == "sdpa"  # type: ignore[union-attr]
    assert not any(isinstance(m, (PrefixHost, LoraHost)) for m in model.modules())


def test_unknown_family_explains_how_to_describe_it() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(BackboneError, match=r"no preset for this backbone \(class Custom\).*BackboneDescription"):
        load_backbone(Custom())

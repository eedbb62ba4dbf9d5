"""The expert-kind registry: one call registers a kind, duplicates raise, and generic code finds a new kind unaided."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pituning import (
    EXPERT_KINDS,
    AdapterConfig,
    Backbone,
    BackboneDescription,
    BackboneInfo,
    ConfigError,
    ExpertError,
    ExpertModel,
    LoraConfig,
    PrefixConfig,
    config_from_dict,
)
from pituning.experts import base
from pituning.experts.base import (
    ExpertConfig,
    ExpertHost,
    expert_kind,
    host_key_pattern,
    register_expert_kind,
    unsupported,
)
from pituning.experts.lora.layer import LoraHost
from pituning.experts.prefix.layer import PrefixHost
from pituning.interpolation import weighted_sum


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Every test leaves the registry as it found it."""
    saved = dict(base._CONFIGS)
    yield
    base._CONFIGS.clear()
    base._CONFIGS.update(saved)


# ---------------------------------------------------------------- a toy kind, defined outside pituning
@dataclass
class ScaleConfig(ExpertConfig):
    """Multiplies a module's output by ``1 + gain`` (one learned gain per output feature, zero at init)."""

    init: float = 0.0
    """Initial gain."""

    def default_roles(self, info: BackboneInfo) -> tuple[str, ...]:
        return info.description.adapter_roles


class ScaleHost(ExpertHost):
    param_names = ("gain",)

    def plan(self, module: nn.Module, config: ExpertConfig) -> dict[str, Any]:
        if not isinstance(module, nn.Linear):
            raise unsupported(self.kind, self.module_name, module, "scale experts go on nn.Linear layers.")
        return {"dim": module.out_features}

    def create(self, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        assert isinstance(config, ScaleConfig)
        return {"gain": torch.full((int(plan["dim"]),), config.init, device=device)}

    def _gain(self, names: Sequence[str], alpha: Tensor | None) -> Tensor:
        gains = [self.params("gain")[n] for n in names]
        return weighted_sum(gains, alpha) if alpha is not None else torch.stack(gains).sum(0)

    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        names, alpha = self.selection()
        return {"gain": self._gain(names, alpha).detach().clone()}

    def apply_experts(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, names: tuple[str, ...], alpha: Tensor | None
    ) -> Any:
        return output * (1 + self._gain(names, alpha).to(output.dtype))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)))


MLP_DESC = BackboneDescription(
    family="mlp", roles={"blocks": "inp|out", "proj": "inp|out"}, lora_roles=("proj",), adapter_roles=("proj",)
)


def _mlp() -> ExpertModel:
    torch.manual_seed(0)
    return ExpertModel(Backbone.from_module(MLP(), MLP_DESC))


def _register_scale() -> None:
    register_expert_kind(kind="scale", config=ScaleConfig, host=ScaleHost, prefix="pi_scale", override=True)


# ---------------------------------------------------------------- the built-in kinds
def test_builtin_kinds_are_registered_with_host_and_prefix() -> None:
    assert set(EXPERT_KINDS) >= {"lora", "adapter", "prefix"}
    lora = expert_kind("lora")
    assert (lora.config, lora.host, lora.prefix) == (LoraConfig, LoraHost, "pi_lora")
    assert expert_kind("prefix").host is PrefixHost
    assert expert_kind("adapter").prefix == "pi_adapter"
    assert LoraConfig.host_cls is LoraHost and LoraHost.attr == "pi_lora" and LoraHost.kind == "lora"


def test_expert_kinds_is_a_read_only_view() -> None:
    with pytest.raises(TypeError):
        EXPERT_KINDS["x"] = LoraConfig  # type: ignore[index]
    with pytest.raises(ConfigError, match="Unknown expert kind 'nope'"):
        expert_kind("nope")


def test_host_key_pattern_matches_the_builtin_prefixes_only() -> None:
    pattern = host_key_pattern()
    for key in ("a.pi_lora.lora_A", "a.b.pi_adapter.down_weight", "x.pi_prefix.prefix_key"):
        assert pattern.search(key), key
    for key in ("a.pi_lorax.lora_A", "a.lora.lora_A", "pi_lora.lora_A"):
        assert not pattern.search(key), key


# ---------------------------------------------------------------- duplicates and bad registrations
def test_duplicate_kind_raises_and_override_replaces() -> None:
    _register_scale()

    @dataclass
    class OtherScale(ScaleConfig):
        """Another scale config."""

    class OtherHost(ScaleHost):
        pass

    with pytest.raises(ConfigError, match="Expert kind 'scale' is already registered"):
        register_expert_kind(kind="scale", config=OtherScale, host=OtherHost, prefix="pi_scale2")
    assert EXPERT_KINDS["scale"] is ScaleConfig
    register_expert_kind(kind="scale", config=OtherScale, host=OtherHost, prefix="pi_scale2", override=True)
    assert EXPERT_KINDS["scale"] is OtherScale
    assert expert_kind("scale").prefix == "pi_scale2"


def test_duplicate_builtin_kind_raises() -> None:
    with pytest.raises(ConfigError, match="'lora' is already registered"):
        register_expert_kind(kind="lora", config=ScaleConfig, host=ScaleHost)
    with pytest.raises(ConfigError, match="'lora' is already registered"):
        register_expert_kind(LoraConfig)  # the decorator form checks too
    assert EXPERT_KINDS["lora"] is LoraConfig


def test_duplicate_prefix_raises() -> None:
    with pytest.raises(ConfigError, match="Prefix 'pi_lora' is already used by expert kind 'lora'"):
        register_expert_kind(kind="scale", config=ScaleConfig, host=ScaleHost, prefix="pi_lora")
    assert "scale" not in EXPERT_KINDS


def test_a_class_serves_one_kind() -> None:
    with pytest.raises(ConfigError, match="LoraHost is already registered as the host of expert kind 'lora'"):
        register_expert_kind(kind="scale", config=ScaleConfig, host=LoraHost, prefix="pi_scale")
    with pytest.raises(ConfigError, match="LoraConfig is already registered as the config of expert kind 'lora'"):
        register_expert_kind(kind="scale", config=LoraConfig, host=ScaleHost, prefix="pi_scale")
    assert "scale" not in EXPERT_KINDS


@pytest.mark.parametrize(
    ("kind", "prefix", "match"),
    [
        ("my-kind", None, "must be a Python identifier"),
        ("scale", "scale", "must be an identifier starting with 'pi_'"),
        ("scale", "pi_a.b", "must be an identifier starting with 'pi_'"),
    ],
)
def test_invalid_kind_or_prefix_raises(kind: str, prefix: str | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        register_expert_kind(kind=kind, config=ScaleConfig, host=ScaleHost, prefix=prefix)


def test_a_class_that_declares_another_kind_raises() -> None:
    @dataclass
    class Declared(ExpertConfig):
        """Declares its kind."""

        kind = "declared"

    with pytest.raises(ConfigError, match="declares kind='declared' but is registered with kind='scale'"):
        register_expert_kind(kind="scale", config=Declared, host=ScaleHost)


def test_wrong_classes_raise_type_error() -> None:
    with pytest.raises(TypeError, match="config must be a dataclass subclass of ExpertConfig"):
        register_expert_kind(kind="scale", config=dict, host=ScaleHost)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="host must be a subclass of ExpertHost"):
        register_expert_kind(kind="scale", config=ScaleConfig, host=nn.Linear)  # type: ignore[arg-type]


def test_decorator_form_still_registers_a_config() -> None:
    @register_expert_kind
    @dataclass
    class Legacy(ExpertConfig):
        """Registered the old way."""

        kind = "legacy"

    class LegacyHost(ScaleHost):
        kind = "legacy"
        attr = "pi_legacy"

    assert EXPERT_KINDS["legacy"] is Legacy
    assert expert_kind("legacy").host is None
    Legacy.host_cls = LegacyHost  # set later, as the old layer modules did
    assert expert_kind("legacy").prefix == "pi_legacy"
    assert host_key_pattern().search("m.pi_legacy.gain")
    assert config_from_dict({"kind": "legacy"}) == Legacy()


# ---------------------------------------------------------------- a new kind through the generic code
def test_new_kind_defaults_prefix_and_round_trips_through_config_from_dict() -> None:
    register_expert_kind(kind="scale", config=ScaleConfig, host=ScaleHost)
    assert (ScaleHost.kind, ScaleHost.attr, ScaleConfig.kind) == ("scale", "pi_scale", "scale")
    config = ScaleConfig(init=0.5, target_modules=["inp"])
    assert config.to_dict()["kind"] == "scale"
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['r'\] for a scale expert"):
        config_from_dict({"kind": "scale", "r": 4})


def test_new_kind_injects_interpolates_collapses_and_loads() -> None:
    _register_scale()
    model = _mlp()
    x = torch.randn(3, 6)
    plain = model(x)
    assert model.add_expert("a", ScaleConfig()) == ["inp", "out"]
    assert torch.equal(model(x), plain)  # zero gain: an identity
    model.add_expert("b", ScaleConfig(init=0.5))
    model.set_active("b")
    assert not torch.allclose(model(x), plain)
    state = model.expert_state_dict("b")
    assert sorted(state) == ["inp.pi_scale.gain", "out.pi_scale.gain"]

    model.interpolate(["a", "b"])
    assert set(model.interpolation_parameters()) == {
        "backbone.inp.pi_scale.scale_logits",
        "backbone.out.pi_scale.scale_logits",
    }
    mixed = model(x)
    config = model.collapse("ab")
    assert config == ScaleConfig() and config is not model.experts["a"]  # the default rule: a copy of the first
    torch.testing.assert_close(model(x), mixed)

    model.load_expert("b2", ScaleConfig(init=0.5), state)
    model.set_active("b2")
    model.set_active("b")
    expected = model(x)
    model.set_active("b2")
    assert torch.equal(model(x), expected)
    model.remove_expert("b2")
    assert "b2" not in model.experts


def test_keys_of_a_new_kind_are_recognised_as_another_kind() -> None:
    """load_expert tells "keys of another kind" from a plain mismatch with the registered prefixes only."""
    model = _mlp()
    scale_keys = {"inp.pi_scale.gain": torch.zeros(5), "out.pi_scale.gain": torch.zeros(4)}
    with pytest.raises(ExpertError, match="do not fit the model") as unregistered:
        model.load_expert("l", LoraConfig(r=2), scale_keys)
    assert "another kind" not in str(unregistered.value)
    _register_scale()
    with pytest.raises(ExpertError, match=r"keys of another kind \('inp.pi_scale.gain'\) but the config is lora"):
        model.load_expert("l", LoraConfig(r=2), scale_keys)
    assert model.experts == {}

    model.add_expert("lo", LoraConfig(r=2))
    lora_state = model.expert_state_dict("lo")
    with pytest.raises(ExpertError, match=r"keys of another kind \('inp.pi_lora.lora_A'\) but the config is scale"):
        model.load_expert("s", ScaleConfig(), lora_state)
    assert list(model.experts) == ["lo"]


def test_a_registered_subclass_of_a_builtin_kind_is_its_own_kind() -> None:
    @dataclass
    class Lora2Config(LoraConfig):
        """LoRA under another name."""

        kind = ""  # not "lora": the registration names it

    class Lora2Host(LoraHost):
        kind = ""
        attr = ""

    register_expert_kind(kind="lora2", config=Lora2Config, host=Lora2Host, prefix="pi_lora2")
    model = _mlp()
    model.add_expert("a", LoraConfig(r=2, target_modules=["inp"]))
    model.add_expert("b", Lora2Config(r=3, target_modules=["inp"]))
    assert list(model.expert_state_dict("b")) == ["inp.pi_lora2.lora_A", "inp.pi_lora2.lora_B"]
    assert config_from_dict(Lora2Config(r=3).to_dict()) == Lora2Config(r=3)
    with pytest.raises(ExpertError, match="keys of another kind"):
        model.load_expert("c", LoraConfig(r=3, target_modules=["inp"]), model.expert_state_dict("b"))
    # the subclass inherits LoRA's collapse rule
    assert Lora2Config.collapsed([Lora2Config(r=3), Lora2Config(r=1)]) == Lora2Config(r=4, alpha=4.0)


# ---------------------------------------------------------------- collapsed configs
def test_lora_collapsed_config_is_rank_sum_with_alpha_rank() -> None:
    configs = [LoraConfig(r=4, alpha=8, include_mlp=True), LoraConfig(r=2, alpha=1, dropout=0.1)]
    assert LoraConfig.collapsed(configs) == LoraConfig(r=6, alpha=6.0, dropout=0.1, include_mlp=True)
    assert LoraConfig.collapsed(configs, rank=3) == LoraConfig(r=3, alpha=3.0, dropout=0.1, include_mlp=True)
    assert LoraConfig.collapsed([LoraConfig(r=5, alpha=2)]) == LoraConfig(r=5, alpha=5.0)
    with pytest.raises(ConfigError, match="at least one config"):
        LoraConfig.collapsed([])
    with pytest.raises(ConfigError, match="LoRA configs only"):
        LoraConfig.collapsed([LoraConfig(), AdapterConfig()])


@pytest.mark.parametrize(
    "configs",
    [
        [AdapterConfig(bottleneck=8, scale=2.0), AdapterConfig(bottleneck=8, scale=2.0)],
        [PrefixConfig(num_tokens=4), PrefixConfig(num_tokens=4, init_std=0.1)],
    ],
)
def test_adapter_and_prefix_collapse_to_a_copy_of_the_first_config(configs: list[ExpertConfig]) -> None:
    for rank in (None, 3):  # the rank only concerns LoRA
        collapsed = type(configs[0]).collapsed(configs, rank)
        assert collapsed == configs[0] and collapsed is not configs[0]
    with pytest.raises(ConfigError, match="at least one config"):
        type(configs[0]).collapsed([])


def test_model_collapse_uses_the_config_rule() -> None:
    model = _mlp()
    model.add_expert("a", LoraConfig(r=2, alpha=4, target_modules=["inp"]))
    model.add_expert("b", LoraConfig(r=3, dropout=0.2, target_modules=["inp"]))
    model.interpolate(["a", "b"])
    assert model.collapse("ab") == LoraConfig(r=5, alpha=5.0, dropout=0.2, target_modules=["inp"])
    model.interpolate(["a", "b"])
    assert model.collapse("ab2", rank=2) == LoraConfig(r=2, alpha=2.0, dropout=0.2, target_modules=["inp"])


def test_lora_hooks_run_before_other_hosts() -> None:
    assert LoraHost.prepend_hook and not PrefixHost.prepend_hook and not ExpertHost.prepend_hook

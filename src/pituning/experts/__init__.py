"""Expert kinds (adapter, LoRA, prefix), their registry, and the functions that inject and combine them."""

from pituning.experts.adapter import AdapterConfig, AdapterHost
from pituning.experts.base import (
    EXPERT_KINDS,
    ExpertConfig,
    ExpertHost,
    ExpertKind,
    config_from_dict,
    expert_kind,
    host_key_pattern,
    iter_hosts,
    register_expert_kind,
)
from pituning.experts.inject import (
    active_experts,
    add_expert,
    bitfit_parameter_names,
    collapse,
    expert_configs,
    expert_state_dict,
    interpolation_weights,
    load_expert,
    merge_expert,
    remove_expert,
    set_active,
    set_trainable,
    start_interpolation,
    stop_interpolation,
)
from pituning.experts.lora import LoraConfig, LoraHost
from pituning.experts.prefix import PrefixConfig, PrefixHost

__all__ = [
    "EXPERT_KINDS",
    "AdapterConfig",
    "AdapterHost",
    "ExpertConfig",
    "ExpertHost",
    "ExpertKind",
    "LoraConfig",
    "LoraHost",
    "PrefixConfig",
    "PrefixHost",
    "active_experts",
    "add_expert",
    "bitfit_parameter_names",
    "collapse",
    "config_from_dict",
    "expert_configs",
    "expert_kind",
    "expert_state_dict",
    "host_key_pattern",
    "interpolation_weights",
    "iter_hosts",
    "load_expert",
    "merge_expert",
    "register_expert_kind",
    "remove_expert",
    "set_active",
    "set_trainable",
    "start_interpolation",
    "stop_interpolation",
]

"""Inject, select, interpolate, collapse and (de)serialise named experts on any ``nn.Module``.

These functions are the plain-torch core; :class:`pituning.ExpertModel` wraps them around a backbone. A failed
injection or load leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pituning.backbones import BackboneInfo
from pituning.errors import ConfigError, ExpertError, InterpolationError, UnsupportedExpertError
from pituning.experts.base import (
    ExpertConfig,
    ExpertHost,
    host_key_pattern,
    iter_hosts,
    module_device,
    validate_name,
)

__all__ = [
    "active_experts",
    "add_expert",
    "bitfit_parameter_names",
    "collapse",
    "expert_configs",
    "expert_modules",
    "expert_state_dict",
    "interpolation_weights",
    "load_expert",
    "merge_expert",
    "remove_expert",
    "set_active",
    "set_trainable",
    "start_interpolation",
    "stop_interpolation",
]

TRAIN_MODES = ("experts_and_weights", "weights_only")


def expert_configs(model: nn.Module) -> dict[str, ExpertConfig]:
    """Expert name -> config of every expert in ``model``, in the order they were first found."""
    out: dict[str, ExpertConfig] = {}
    for _, _, host in iter_hosts(model):
        for name, config in host.configs.items():
            out.setdefault(name, config)
    return out


def _hosts_of(model: nn.Module, name: str) -> list[tuple[str, nn.Module, ExpertHost]]:
    hosts = [(m, mod, h) for m, mod, h in iter_hosts(model) if name in h.configs]
    if not hosts:
        known = sorted(expert_configs(model))
        raise ExpertError(f"No expert named {name!r} in the model; experts present: {known or 'none'}.")
    return hosts


def _release(model: nn.Module, hosts: Iterable[tuple[nn.Module, ExpertHost]]) -> None:
    """Let each host class undo its model-wide changes on the modules whose hosts lost an expert
    (:meth:`ExpertHost.release`)."""
    by_class: dict[type[ExpertHost], list[nn.Module]] = {}
    for module, host in hosts:
        by_class.setdefault(type(host), []).append(module)
    for host_cls, modules in by_class.items():
        host_cls.release(model, modules)


def add_expert(
    model: nn.Module, name: str, config: ExpertConfig, info: BackboneInfo, *, activate: bool = True
) -> list[str]:
    """Inject a freshly initialised expert ``name`` of ``config``'s kind into ``model``.

    Args:
        model: the backbone (changed in place: hosts are added under its target modules).
        name: unique expert name.
        config: the expert's config; its targets come from ``config.target_modules`` or ``info``'s roles.
        info: the backbone's description (:func:`pituning.backbones.describe`).
        activate: add the expert to the active set of its hosts.

    Returns:
        Names of the modules the expert was attached to.

    Raises:
        ConfigError: invalid name.
        ExpertError: the name exists.
        BackboneError: no valid target (``UnsupportedExpertError`` when the targets cannot host this kind).

    On any error the model is left exactly as it was.
    """
    validate_name(name)
    existing = expert_configs(model)
    if name in existing:
        raise ExpertError(
            f"An expert named {name!r} ({existing[name].kind}) already exists; remove_expert({name!r}) first or "
            "choose another name."
        )
    host_cls = type(config).host_cls
    targets = config.resolve_targets(model, info)
    plans: list[tuple[str, nn.Module, ExpertHost, bool, dict[str, Any]]] = []
    for target in targets:
        module = model.get_submodule(target)
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            raise UnsupportedExpertError(
                f"{target} is a container ({type(module).__name__}) whose children are iterated, so it cannot host "
                f"{config.kind} experts; target its elements (e.g. '{target}\\.\\d+') or a module that wraps it."
            )
        host = module._modules.get(host_cls.attr)
        fresh = host is None
        if host is None:
            host = host_cls(target)
        assert isinstance(host, ExpertHost)
        plans.append((target, module, host, fresh, host.plan(module, config)))
    done: list[tuple[nn.Module, ExpertHost, bool]] = []
    try:
        for _, module, host, fresh, plan in plans:
            host.add(name, config, plan, module_device(module))
            done.append((module, host, fresh))
            if fresh:
                host.attach(module)
                host.train(module.training)  # a new nn.Module starts in train mode: follow its host's mode
            if activate:
                host.active = (*host.active, name)
    except BaseException:
        _rollback(model, name, done)
        raise
    return targets


def _rollback(model: nn.Module, name: str, done: Sequence[tuple[nn.Module, ExpertHost, bool]]) -> None:
    for module, host, fresh in reversed(done):
        if name in host.configs:
            host.remove(name)
        if fresh and module._modules.get(host.attr) is host:
            host.detach(module)
    _release(model, [(m, h) for m, h, _ in done])


def remove_expert(model: nn.Module, name: str) -> None:
    """Delete expert ``name`` from every module; hosts left empty are detached."""
    hosts = _hosts_of(model, name)
    for _, module, host in hosts:
        host.remove(name)
        if not host.configs:
            host.detach(module)
    _release(model, [(m, h) for _, m, h in hosts])


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` the active experts (an empty list disables all). Ends any interpolation."""
    names = [names] if isinstance(names, str) else list(names)
    known = expert_configs(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ExpertError(f"Cannot activate unknown expert(s) {unknown}; experts present: {sorted(known)}.")
    for _, _, host in iter_hosts(model):
        host.stop_interpolation()
        host.active = tuple(n for n in names if n in host.configs)


def active_experts(model: nn.Module) -> list[str]:
    """Names of the active experts (the pool while interpolating)."""
    out: dict[str, None] = {}
    for _, _, host in iter_hosts(model):
        for name in host.pool or host.active:
            out.setdefault(name, None)
    return list(out)


def start_interpolation(
    model: nn.Module,
    pool: Sequence[str],
    *,
    mixing: str = "softmax",
    share: str = "module",
    init: Sequence[float] | None = None,
) -> dict[str, int]:
    """Interpolate the experts of ``pool`` on every module they share.

    Args:
        model: the model holding the experts.
        pool: the experts to interpolate, in order.
        mixing: ``softmax`` (weights ``softmax(logits)``, summing to one: the paper's) or ``linear`` (the logits are
            the weights: a learned merge's coefficients, any sign).
        share: which modules share one logits vector: ``module`` (each insertion point its own, the paper's),
            ``layer`` (the insertion points of one block, by the first number in the module's name) or ``task``
            (one vector for the whole model).
        init: initial logits (default zeros: equal weights under ``softmax``, no expert under ``linear``).

    Returns:
        Module name -> pool size for every module that now interpolates.

    Raises:
        InterpolationError: fewer than one expert, repeated or unknown names, experts of different kinds, experts that
            cover different modules, or shapes that cannot be combined.
    """
    pool = list(pool)
    if not pool:
        raise InterpolationError("The interpolation pool is empty; give at least one expert name.")
    if len(set(pool)) != len(pool):
        raise InterpolationError(f"The interpolation pool {pool} repeats a name; list each expert once.")
    configs = expert_configs(model)
    unknown = [n for n in pool if n not in configs]
    if unknown:
        raise InterpolationError(f"Unknown expert(s) {unknown} in the pool; experts present: {sorted(configs)}.")
    kinds = {configs[n].kind for n in pool}
    if len(kinds) > 1:
        raise InterpolationError(
            f"Cannot interpolate experts of different kinds ({ {n: configs[n].kind for n in pool} }); every pool "
            "member must be of one kind (all LoRA, all adapter or all prefix)."
        )
    kind = kinds.pop()
    hosts = [(m, h) for m, _, h in iter_hosts(model, kind) if any(n in h.configs for n in pool)]
    for module_name, host in hosts:
        missing = [n for n in pool if n not in host.configs]
        if missing:
            raise InterpolationError(
                f"Experts {missing} are not on {module_name} while other pool members are; interpolate experts that "
                "were injected with the same targets."
            )
        host.check_compatible(pool)
    if share not in SHARES:
        raise InterpolationError(f"share must be one of {list(SHARES)}, got {share!r}.")
    start = torch.zeros(len(pool)) if init is None else torch.as_tensor(list(init), dtype=torch.float32)
    if start.shape != (len(pool),) or not bool(torch.isfinite(start).all()):
        raise InterpolationError(f"init needs {len(pool)} finite logits (one per pool member), got {list(init or [])}.")
    for _, _, host in iter_hosts(model):
        host.stop_interpolation()
        host.active = ()
    shared: dict[str, nn.Parameter] = {}
    for module_name, host in hosts:
        group = _share_group(module_name, share)
        if group not in shared:
            device = next(iter(host.params(host.param_names[0]).values())).device
            shared[group] = nn.Parameter(start.clone().to(device))
        host.start_interpolation(pool, mixing=mixing, logits=shared[group])
    return {m: len(pool) for m, _ in hosts}


#: ``share`` options of :func:`start_interpolation`: which insertion points share one logits vector.
SHARES = ("module", "layer", "task")


def _share_group(module_name: str, share: str) -> str:
    """The logits group of ``module_name``: itself, its block (the first number in its dotted name), or all."""
    if share == "task":
        return ""
    if share == "layer":
        number = next((part for part in module_name.split(".") if part.isdigit()), None)
        return number if number is not None else module_name
    return module_name


def stop_interpolation(model: nn.Module, *, activate: Sequence[str] = ()) -> None:
    """End interpolation everywhere (the logits are dropped) and activate ``activate``."""
    set_active(model, list(activate))


def interpolation_weights(model: nn.Module) -> dict[str, dict[str, float]]:
    """Module name -> {expert: alpha} of every interpolating module."""
    out: dict[str, dict[str, float]] = {}
    for module_name, _, host in iter_hosts(model):
        if host.pool:
            alpha = host.mixing().detach().cpu().tolist()
            out[module_name] = dict(zip(host.pool, alpha, strict=True))
    return out


def collapse(model: nn.Module, name: str, *, rank: int | None = None, activate: bool = True) -> ExpertConfig:
    """Turn the current interpolation into one plain expert ``name`` of the same kind, exactly.

    Adapter and prefix experts become the weighted parameter sum. LoRA experts become one LoRA of rank
    ``sum_i r_i`` (``A_i`` concatenated, ``B_i`` scaled by ``alpha_i s_i``; scaling 1), or, with ``rank``, an SVD
    factorisation of the interpolated update at that rank (exact when ``rank`` reaches the update's rank).

    Returns:
        The config of the new expert. Interpolation ends; the new expert is active if ``activate``.
    """
    validate_name(name)
    if name in expert_configs(model):
        raise ExpertError(f"An expert named {name!r} already exists; choose a new name for the collapsed expert.")
    hosts = [(mod, h) for _, mod, h in iter_hosts(model) if h.pool]
    if not hosts:
        raise InterpolationError("Nothing to collapse: call start_interpolation(model, pool) first.")
    first = hosts[0][1]
    pool_configs = [first.configs[n] for n in first.pool]
    tensors = [(mod, host, host.collapse(rank)) for mod, host in hosts]
    config = type(pool_configs[0]).collapsed(pool_configs, rank)
    for _, host, values in tensors:
        host.configs[name] = config
        for pname, value in values.items():
            host.params(pname)[name] = nn.Parameter(value)
    set_active(model, [name] if activate else [])
    return config


def merge_expert(model: nn.Module, name: str) -> None:
    """Add LoRA expert ``name``'s update into the backbone weights and delete the expert (like PEFT's
    ``merge_and_unload``). The model's output is unchanged (to rounding); the backbone weights change."""
    from pituning.experts.lora.layer import LoraHost

    hosts = _hosts_of(model, name)
    if not all(isinstance(h, LoraHost) for _, _, h in hosts):
        raise ExpertError(f"Only LoRA experts merge into the backbone weights; {name!r} is not a LoRA expert.")
    with torch.no_grad():
        for _, module, host in hosts:
            assert isinstance(host, LoraHost)
            saved = (host.active, host.pool)
            host.active, host.pool = (name,), ()
            delta = host.delta_weight()
            host.active, host.pool = saved
            weight = module.weight
            assert isinstance(weight, Tensor)
            if type(module).__name__ == "Conv1D":
                delta = delta.t()
            weight.add_(delta.to(weight.dtype))
    remove_expert(model, name)


def expert_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The tensors of expert ``name``, keyed ``<module>.<host attr>.<parameter role>`` (no expert name in the key).

    The keys do not depend on the expert's name, so the weights load back under any name.
    """
    out: dict[str, Tensor] = {}
    for module_name, _, host in _hosts_of(model, name):
        for pname, param in host.expert_tensors(name).items():
            out[f"{module_name}.{host.attr}.{pname}"] = param.detach().clone()
    return out


def expert_modules(model: nn.Module, name: str) -> dict[str, dict[str, Any]]:
    """Module name -> ``{"type": class name, **host layout}`` of every module expert ``name`` is attached to."""
    return {m: {"type": type(mod).__name__, **host.layout()} for m, mod, host in _hosts_of(model, name)}


def load_expert(
    model: nn.Module,
    name: str,
    config: ExpertConfig,
    state_dict: Mapping[str, Tensor],
    info: BackboneInfo,
    *,
    activate: bool = True,
) -> None:
    """Inject expert ``name`` and load its weights from ``state_dict`` (as written by :func:`expert_state_dict`).

    Raises:
        ExpertError: a missing or unexpected key, a key of another kind, or a shape mismatch; the message names the
            key and the shapes. The model is left exactly as it was.
    """
    targets = add_expert(model, name, config, info, activate=activate)
    try:
        host_attr = type(config).host_cls.attr
        expected: dict[str, nn.Parameter] = {}
        for target in targets:
            host = model.get_submodule(target)._modules[host_attr]
            assert isinstance(host, ExpertHost)
            for pname, param in host.expert_tensors(name).items():
                expected[f"{target}.{host_attr}.{pname}"] = param
        host_key = host_key_pattern()
        other_kind = [k for k in state_dict if k not in expected and host_key.search(k)]
        other_kind = [k for k in other_kind if f".{host_attr}." not in k]
        if other_kind:
            raise ExpertError(
                f"Weights for expert {name!r} hold keys of another kind ({other_kind[0]!r}) but the config is "
                f"{config.kind}; load them with the config they were saved with."
            )
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ExpertError(
                f"Weights for expert {name!r} do not fit the model: missing {_few(missing)}, unexpected "
                f"{_few(unexpected)}. Check that the config "
                "(target_modules, include_mlp) and the backbone are the ones the expert was trained with."
            )
        for key, param in expected.items():
            value = state_dict[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ExpertError(
                    f"Shape mismatch for {key!r} of expert {name!r}: saved {tuple(value.shape)}, model expects "
                    f"{tuple(param.shape)}. The config (r, bottleneck, num_tokens) or the backbone differs from the "
                    "one the expert was trained with."
                )
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state_dict[key].to(param.dtype))
    except BaseException:
        remove_expert(model, name)
        raise


def _few(keys: Sequence[str], n: int = 3) -> str:
    return f"{list(keys[:n])}{' ...' if len(keys) > n else ''}"


def bitfit_parameter_names(model: nn.Module) -> list[str]:
    """Names of the backbone's bias parameters (BitFit, a baseline that trains only biases)."""
    return [n for n, _ in model.named_parameters() if n.endswith(".bias") and ".pi_" not in n]


def set_trainable(
    model: nn.Module,
    experts: Sequence[str] | None = None,
    *,
    interpolation: bool = True,
    bitfit: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """Freeze everything, then unfreeze the chosen parameters.

    Args:
        model: the model.
        experts: experts whose parameters train; default the active ones (the pool while interpolating).
        interpolation: train the interpolation logits.
        bitfit: also train the backbone's biases (a baseline).
        extra: regular expressions (search) over parameter names that also train, such as a head.

    Returns:
        The names of the trainable parameters.
    """
    chosen = set(active_experts(model) if experts is None else experts)
    known = expert_configs(model)
    unknown = sorted(chosen - set(known))
    if unknown:
        raise ExpertError(f"Cannot train unknown expert(s) {unknown}; experts present: {sorted(known)}.")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, _, host in iter_hosts(model):
        for name in chosen & set(host.configs):
            for param in host.expert_tensors(name).values():
                param.requires_grad_(True)
        logits = host.logits
        if logits is not None:
            logits.requires_grad_(interpolation)
    patterns = [re.compile(p) for p in extra]
    bias = set(bitfit_parameter_names(model)) if bitfit else set()
    for pname, param in model.named_parameters():
        if pname in bias or any(p.search(pname) for p in patterns):
            param.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_train_mode(mode: str) -> str:
    """Validate an interpolation training mode (``experts_and_weights`` or ``weights_only``)."""
    if mode not in TRAIN_MODES:
        raise ConfigError(f"Unknown interpolation mode {mode!r}; choose one of {list(TRAIN_MODES)}.")
    return mode

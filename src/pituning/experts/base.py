"""Expert configs, the kind registry, and the per-module host that holds named experts.

An expert of one kind lives in *hosts*: one :class:`ExpertHost` submodule per target module of the backbone,
registered on that module under the kind's attribute (``pi_lora``, ``pi_adapter``, ``pi_prefix``). A host holds any
number of named experts (parameters in ``ParameterDict``\\ s keyed by expert name, so parameter names read
``<module>.pi_lora.lora_A.<expert>``), an *active set*, and optionally an *interpolation pool* with its learnable
logits ``<module>.pi_lora.lora_logits``. The backbone's own modules and parameter names never change.

A kind is one call to :func:`register_expert_kind`, which ties its name, config class, host class and host attribute
(the *prefix*) together; generic code (injection, loading, collapse, :func:`config_from_dict`) asks the registry and the
classes instead of naming kinds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, overload

import torch
from torch import Tensor, nn

from pituning.backbones import BackboneInfo
from pituning.errors import BackboneError, ConfigError, ExpertError, InterpolationError, UnsupportedExpertError
from pituning.interpolation import init_logits, mixing_weights

__all__ = [
    "EXPERT_KINDS",
    "MIXINGS",
    "ExpertConfig",
    "ExpertHost",
    "ExpertKind",
    "config_from_dict",
    "expert_kind",
    "host_key_pattern",
    "iter_hosts",
    "register_expert_kind",
    "validate_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")

#: The registry: kind name -> config class, in registration order (written only by :func:`register_expert_kind`).
_CONFIGS: dict[str, type[ExpertConfig]] = {}

#: Read-only view of the registry: kind name -> config class (live: kinds registered later appear in it).
EXPERT_KINDS: Mapping[str, type[ExpertConfig]] = MappingProxyType(_CONFIGS)

#: How interpolation logits become weights: ``softmax`` (the paper's) or ``linear`` (the logits are the weights).
MIXINGS = ("softmax", "linear")

#: Every host attribute starts with this, so generic code (fingerprints, BitFit) can tell expert parameters apart.
HOST_PREFIX = "pi_"


def validate_name(name: str) -> str:
    """Check an expert name: 1-128 letters, digits, ``_`` or ``-``, starting with a letter or digit.

    Raises:
        ConfigError: the name has another character (a path separator, ``.``, a space) or is empty.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"Invalid expert name {name!r}: use 1-128 letters, digits, '_' or '-', starting with a letter or digit "
            "(no '.', '/', '..' or spaces), e.g. 'airline_ua'."
        )
    if hasattr(nn.ParameterDict, name):
        raise ConfigError(
            f"Expert name {name!r} is reserved (a torch module attribute); choose another, e.g. '{name}_1'."
        )
    return name


@dataclass
class ExpertConfig:
    """Base of every expert config. Subclasses are dataclasses registered with :func:`register_expert_kind`."""

    kind: ClassVar[str] = ""
    attaches_to: ClassVar[str] = "the backbone's linear layers"
    """What this kind attaches to, for error messages."""
    host_cls: ClassVar[type[ExpertHost]]

    target_modules: list[str] | None = None
    """Regular expressions (full match) over module names that replace the backbone's default targets."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the ``kind`` first."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> ExpertConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def default_roles(self, info: BackboneInfo) -> tuple[str, ...]:
        """Roles of the backbone description this kind targets when ``target_modules`` is not set."""
        raise NotImplementedError

    @classmethod
    def collapsed(cls, configs: Sequence[ExpertConfig], rank: int | None = None) -> ExpertConfig:
        """The config of the one plain expert that an interpolated pool of ``configs`` collapses into.

        Args:
            configs: the pool members' configs, in pool order (all of this kind).
            rank: the rank asked of :func:`pituning.experts.collapse` (only kinds whose size it changes use it).

        The default, for kinds whose collapse is the weighted parameter sum (adapter, prefix), is a copy of the first
        config: the pool members share their shapes.

        Raises:
            ConfigError: ``configs`` is empty.
        """
        if not configs:
            raise ConfigError(f"{cls.__name__}.collapsed needs at least one config (the pool is empty).")
        return configs[0].replace()

    def resolve_targets(self, model: nn.Module, info: BackboneInfo) -> list[str]:
        """Names of the modules this expert attaches to, in model order.

        Raises:
            BackboneError: ``target_modules`` matches no module.
            UnsupportedExpertError: the backbone has no default target for this kind.
        """
        if self.target_modules:
            patterns = [re.compile(p) for p in self.target_modules]
            names = [
                name
                for name, module in model.named_modules()
                if name and not isinstance(module, ExpertHost) and any(p.fullmatch(name) for p in patterns)
            ]
            if not names:
                sample = [n for n, m in model.named_modules() if n and not isinstance(m, ExpertHost)][:8]
                raise BackboneError(
                    f"{type(self).__name__}.target_modules={self.target_modules} matched no module of "
                    f"{type(model).__name__}; patterns must match whole module names such as {sample}."
                )
            return names
        roles = self.default_roles(info)
        names = info.names(*roles)
        if not roles:  # the family lacks what this kind attaches to at all: name the kinds that fit it
            fitting = []
            for kind, config_class in EXPERT_KINDS.items():
                with contextlib.suppress(Exception):
                    if kind != self.kind and info.names(*config_class().default_roles(info)):
                        fitting.append(kind)
            raise UnsupportedExpertError(
                f"{self.kind} experts do not fit the {info.family} backbone: they attach to {self.attaches_to}, and "
                f"it has none. Use {' or '.join(fitting) or 'another kind'} instead"
                + (", which fit its layers." if fitting else ".")
            )
        if not names:
            raise UnsupportedExpertError(
                f"The {info.family} backbone has no default insertion point for {self.kind} experts (roles "
                f"{list(roles)} are not in its description); pass target_modules=[...] with module-name patterns."
            )
        return names


_C = TypeVar("_C", bound="type[ExpertConfig]")


@dataclass(frozen=True)
class ExpertKind:
    """One registered kind as the registry sees it (:func:`expert_kind`)."""

    kind: str
    """The kind's name (``"lora"``), the ``kind`` of its configs and hosts and of ``to_dict()`` output."""
    config: type[ExpertConfig]
    """The config class."""
    host: type[ExpertHost] | None
    """The host class (``None`` only for a config registered alone whose ``host_cls`` is not set yet)."""
    prefix: str | None
    """The host attribute on a target module (``"pi_lora"``), which appears in every parameter and state-dict key."""


def _own(cls: type, attr: str) -> Any:
    """``attr`` as ``cls`` itself declares it (not inherited), or ``None``."""
    return cls.__dict__.get(attr)


@overload
def register_expert_kind(cls: _C, /, *, override: bool = ...) -> _C: ...


@overload
def register_expert_kind(
    *, kind: str, config: _C, host: type[ExpertHost], prefix: str | None = ..., override: bool = ...
) -> _C: ...


def register_expert_kind(
    cls: _C | None = None,
    /,
    *,
    kind: str | None = None,
    config: _C | None = None,
    host: type[ExpertHost] | None = None,
    prefix: str | None = None,
    override: bool = False,
) -> _C:
    """Register an expert kind: its name, config class, host class and host attribute, in one call.

    ::

        register_expert_kind(kind="lora", config=LoraConfig, host=LoraHost, prefix="pi_lora")

    The call sets ``config.kind``, ``config.host_cls``, ``host.kind`` and ``host.attr``, so the classes need not (a
    value they declare themselves must agree). From then on :func:`config_from_dict`, :func:`host_key_pattern` and the
    functions of :mod:`pituning.experts.inject` handle the kind without naming it.

    The older decorator form, ``@register_expert_kind`` on a config class that sets ``kind`` (its ``host_cls`` set
    later), still registers the config alone.

    Args:
        cls: (decorator form) a config class with its ``kind`` set.
        kind: the kind's name, a Python identifier (it names the interpolation logits, ``<kind>_logits``).
        config: the config class, a dataclass subclass of :class:`ExpertConfig`.
        host: the host class, a subclass of :class:`ExpertHost`.
        prefix: the host attribute; default ``pi_<kind>``. It must start with ``pi_``, which marks expert parameters
            for the backbone fingerprint and BitFit.
        override: replace a kind registered under the same name (tests, reloading a plugin).

    Returns:
        The config class (so the decorator form keeps the class).

    Raises:
        ConfigError: the kind, prefix, config class or host class is already registered (for another kind), an
            invalid kind or prefix, or a class that declares another kind or prefix.
        TypeError: ``config`` or ``host`` is not a subclass of :class:`ExpertConfig` / :class:`ExpertHost`.
    """
    if cls is not None:
        if kind is not None or config is not None or host is not None or prefix is not None:
            raise TypeError("register_expert_kind takes a config class or keyword arguments, not both")
        if not cls.kind:
            raise TypeError(f"{cls.__name__} must set the class attribute 'kind'")
        _check_new_kind(cls.kind, cls, None, None, override)
        _CONFIGS[cls.kind] = cls
        return cls
    if kind is None or config is None or host is None:
        raise TypeError("register_expert_kind(kind=..., config=..., host=...) needs all three")
    if not (isinstance(config, type) and issubclass(config, ExpertConfig) and dataclasses.is_dataclass(config)):
        raise TypeError(f"config must be a dataclass subclass of ExpertConfig, got {config!r}")
    if not (isinstance(host, type) and issubclass(host, ExpertHost)):
        raise TypeError(f"host must be a subclass of ExpertHost, got {host!r}")
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ConfigError(f"An expert kind must be a Python identifier such as 'lora', got {kind!r}.")
    prefix = f"{HOST_PREFIX}{kind}" if prefix is None else prefix
    if not isinstance(prefix, str) or not prefix.isidentifier() or not prefix.startswith(HOST_PREFIX):
        raise ConfigError(
            f"The prefix of expert kind {kind!r} must be an identifier starting with {HOST_PREFIX!r} (expert "
            f"parameters are told apart by it), got {prefix!r}; e.g. prefix='{HOST_PREFIX}{kind}'."
        )
    _check_new_kind(kind, config, host, prefix, override)
    for klass, attr, value in ((config, "kind", kind), (host, "kind", kind), (host, "attr", prefix)):
        declared = _own(klass, attr)
        if declared and declared != value:
            raise ConfigError(
                f"{klass.__name__} declares {attr}={declared!r} but is registered with {attr}={value!r}; drop the "
                "class attribute or register it with the same value."
            )
    config.kind = kind
    config.host_cls = host
    host.kind = kind
    host.attr = prefix
    _CONFIGS[kind] = config
    return config


def _check_new_kind(
    kind: str, config: type[ExpertConfig], host: type[ExpertHost] | None, prefix: str | None, override: bool
) -> None:
    """Raise :class:`ConfigError` if registering ``kind`` would clash with another registered kind."""
    if kind in _CONFIGS and not override:
        raise ConfigError(
            f"Expert kind {kind!r} is already registered (config {_CONFIGS[kind].__name__}); choose another kind "
            "name, or pass override=True to replace it."
        )
    for other in (expert_kind(k) for k in _CONFIGS if k != kind):
        if other.config is config:
            raise ConfigError(
                f"{config.__name__} is already registered as the config of expert kind {other.kind!r}; a config class "
                "serves one kind (subclass it for another)."
            )
        if host is not None and other.host is host:
            raise ConfigError(
                f"{host.__name__} is already registered as the host of expert kind {other.kind!r}; a host class "
                "serves one kind (subclass it for another)."
            )
        if prefix is not None and other.prefix == prefix:
            raise ConfigError(
                f"Prefix {prefix!r} is already used by expert kind {other.kind!r}; give kind {kind!r} another prefix."
            )


def expert_kind(kind: str) -> ExpertKind:
    """The registry's entry for ``kind``.

    Raises:
        ConfigError: ``kind`` is not registered.
    """
    if kind not in _CONFIGS:
        raise ConfigError(f"Unknown expert kind {kind!r}; known kinds: {sorted(_CONFIGS)}.")
    config = _CONFIGS[kind]
    host: type[ExpertHost] | None = getattr(config, "host_cls", None)
    return ExpertKind(kind=kind, config=config, host=host, prefix=host.attr if host is not None else None)


def host_key_pattern() -> re.Pattern[str]:
    """A regex that finds the host attribute of any registered kind in a parameter or state-dict key.

    It searches for ``.<prefix>.`` (``.pi_lora.``, ``.pi_adapter.``, ...), built from the registered prefixes.

    Example:
        >>> bool(host_key_pattern().search("encoder.layer.0.attention.self.query.pi_lora.lora_A"))
        True
    """
    prefixes = sorted({p for p in (expert_kind(k).prefix for k in _CONFIGS) if p}, key=lambda p: (-len(p), p))
    if not prefixes:
        return re.compile(r"(?!)")
    return re.compile(r"\.(?:" + "|".join(re.escape(p) for p in prefixes) + r")\.")


def config_from_dict(data: Mapping[str, Any]) -> ExpertConfig:
    """Rebuild an expert config from :meth:`ExpertConfig.to_dict` output.

    Raises:
        ConfigError: unknown kind or unknown field.
    """
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _CONFIGS:
        raise ConfigError(f"Unknown expert kind {kind!r}; known kinds: {sorted(_CONFIGS)}.")
    cls = _CONFIGS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown} for a {kind} expert; valid options: {sorted(fields)}.")
    return cls(**data)


class ExpertHost(nn.Module, ABC):
    """Holds the named experts of one kind on one backbone module.

    Subclasses define the parameters (:attr:`param_names`), how to create them, how the module's computation changes,
    and how a pool collapses into one expert.
    """

    kind: ClassVar[str] = ""
    attr: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()
    prepend_hook: ClassVar[bool] = False
    """Run this host's forward hook before the module's other forward hooks (LoRA: its update is part of the module's
    own output, which later hooks then see)."""

    def __init__(self, module_name: str) -> None:
        super().__init__()
        self.module_name = module_name
        self.configs: dict[str, ExpertConfig] = {}
        self.active: tuple[str, ...] = ()
        self.pool: tuple[str, ...] = ()
        self.mixing_mode = "softmax"
        """How the logits become weights: ``softmax`` or ``linear`` (see :meth:`start_interpolation`)."""
        for pname in self.param_names:
            self.add_module(pname, nn.ParameterDict())
        self.register_parameter(self.logits_name, None)
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    # ----------------------------------------------------------------- structure
    @property
    def logits_name(self) -> str:
        """Attribute name of the interpolation logits (``lora_logits`` ...)."""
        return f"{self.kind}_logits"

    @property
    def logits(self) -> nn.Parameter | None:
        """The interpolation logits ``(k,)``, or ``None`` when not interpolating."""
        value = getattr(self, self.logits_name)
        return value if isinstance(value, nn.Parameter) else None

    def params(self, pname: str) -> nn.ParameterDict:
        """The ``ParameterDict`` of one parameter role (``lora_A`` ...), keyed by expert name."""
        pdict = self._modules[pname]
        assert isinstance(pdict, nn.ParameterDict)
        return pdict

    def expert_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """Parameter role -> parameter of expert ``name`` on this module."""
        return {pname: self.params(pname)[name] for pname in self.param_names}

    @abstractmethod
    def plan(self, module: nn.Module, config: ExpertConfig) -> dict[str, Any]:
        """Check that ``module`` can host ``config`` and return what :meth:`create` needs. Must not change anything.

        Raises:
            UnsupportedExpertError: the module cannot host this kind.
        """

    @abstractmethod
    def create(self, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        """Freshly initialised tensors of one expert, keyed by parameter role."""

    def add(self, name: str, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> None:
        """Add expert ``name`` (fp32, trainable) to this host."""
        if name in self.configs:
            raise ExpertError(f"Expert {name!r} already exists on {self.module_name}; remove it first.")
        tensors = self.create(config, plan, device)
        for pname in self.param_names:
            self.params(pname)[name] = nn.Parameter(tensors[pname])
        self.configs[name] = config

    def remove(self, name: str) -> None:
        """Remove expert ``name`` (and from the active set and pool)."""
        for pname in self.param_names:
            del self.params(pname)[name]
        del self.configs[name]
        self.active = tuple(n for n in self.active if n != name)
        if name in self.pool:
            self.stop_interpolation()

    def attach(self, module: nn.Module) -> None:
        """Register on ``module`` (submodule + forward hook)."""
        module.add_module(self.attr, self)
        self._handle = module.register_forward_hook(self._forward_hook, prepend=self.prepend_hook)

    def detach(self, module: nn.Module) -> None:
        """Undo :meth:`attach`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        del module._modules[self.attr]

    @classmethod
    def release(cls, model: nn.Module, modules: Sequence[nn.Module]) -> None:
        """Undo what attaching hosts of this kind changed outside them, on those of ``modules`` that no host of this
        kind in ``model`` needs any more. Called after hosts of this kind on ``modules`` lost an expert or were
        detached. Default: nothing (prefix hosts switch the attention implementation back)."""

    # ----------------------------------------------------------------- interpolation
    def check_compatible(self, pool: Sequence[str]) -> None:
        """Raise :class:`InterpolationError` if the pool's experts cannot be interpolated on this module."""
        shapes = {n: {p: tuple(t.shape) for p, t in self.expert_tensors(n).items()} for n in pool}
        first = pool[0]
        for n in pool[1:]:
            if shapes[n] != shapes[first]:
                raise InterpolationError(
                    f"Cannot interpolate {self.kind} experts {first!r} and {n!r} on {self.module_name}: parameter "
                    f"shapes differ ({shapes[first]} vs {shapes[n]}). Interpolate experts with the same config."
                )

    def start_interpolation(
        self, pool: Sequence[str], *, mixing: str = "softmax", logits: nn.Parameter | None = None
    ) -> None:
        """Interpolate ``pool`` on this module with new equal logits (or ``logits``, shared with other modules).

        ``mixing``: ``softmax`` (weights ``softmax(logits)``, the paper's) or ``linear`` (the logits are the weights
        themselves, any sign, no normalisation: a learned merge's coefficients)."""
        missing = [n for n in pool if n not in self.configs]
        if missing:
            raise InterpolationError(
                f"Experts {missing} are not on {self.module_name}; every pool member must cover the same modules."
            )
        if mixing not in MIXINGS:
            raise InterpolationError(f"mixing must be one of {list(MIXINGS)}, got {mixing!r}.")
        self.check_compatible(pool)
        self.pool = tuple(pool)
        self.mixing_mode = mixing
        if logits is None:
            device = next(iter(self.params(self.param_names[0]).values())).device
            logits = nn.Parameter(init_logits(len(pool), device=device))
        elif logits.shape != (len(pool),):
            raise InterpolationError(f"Shared logits of shape {tuple(logits.shape)} for a pool of {len(pool)}.")
        setattr(self, self.logits_name, logits)

    def stop_interpolation(self) -> None:
        """Leave interpolation mode (the logits are dropped)."""
        self.pool = ()
        self.mixing_mode = "softmax"
        setattr(self, self.logits_name, None)

    def mixing(self) -> Tensor:
        """Current interpolation weights ``(k,)``: ``softmax(logits)``, or the logits themselves (``linear``)."""
        logits = self.logits
        if logits is None:
            raise InterpolationError(f"{self.module_name} is not interpolating; call interpolate(pool) first.")
        return logits.float() if self.mixing_mode == "linear" else mixing_weights(logits)

    def layout(self) -> dict[str, Any]:
        """What an exporter needs to know about this module beyond the tensors (JSON-ready)."""
        return {}

    @abstractmethod
    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        """Tensors of one plain expert equal to the current interpolation (``rank``: LoRA only); its config is
        :meth:`ExpertConfig.collapsed` of the pool's configs."""

    # ----------------------------------------------------------------- forward
    def selection(self) -> tuple[tuple[str, ...], Tensor | None]:
        """The experts in use and their weights: the pool with ``alpha``, or the active set with ``None``."""
        if self.pool:
            return self.pool, self.mixing()
        return self.active, None

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if module.__dict__.get("_pi_inner_call", False):  # a host re-running the module (LoRA on a Conv subclass)
            return None
        names, alpha = self.selection()
        if not names:
            return None
        return self.apply_experts(module, args, output, names, alpha)

    def apply_experts(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, names: tuple[str, ...], alpha: Tensor | None
    ) -> Any:
        """Change the module's ``output`` with experts ``names`` (weights ``alpha`` when interpolating)."""
        raise NotImplementedError


def iter_hosts(model: nn.Module, kind: str | None = None) -> Iterator[tuple[str, nn.Module, ExpertHost]]:
    """``(module name, module, host)`` for every expert host in ``model`` (of ``kind`` if given), in model order."""
    for name, module in model.named_modules():
        for child in module._modules.values():
            if isinstance(child, ExpertHost) and (kind is None or child.kind == kind):
                yield name, module, child


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (CPU if it has none)."""
    for tensor in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        return tensor.device
    return torch.device("cpu")


def unsupported(kind: str, module_name: str, module: nn.Module, fix: str) -> UnsupportedExpertError:
    """The error for a module that cannot host ``kind``."""
    return UnsupportedExpertError(f"{module_name} ({type(module).__name__}) cannot host a {kind} expert; {fix}")


def positive(value: float, option: str, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is positive (or zero when allowed)."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{option} must be {bound}, got {value!r}.")

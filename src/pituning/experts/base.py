"""Expert configs, the kind registry, and the per-module host that holds named experts.

An expert of one kind lives in *hosts*: one :class:`ExpertHost` submodule per target module of the backbone,
registered on that module under the kind's attribute (``pi_lora``, ``pi_adapter``, ``pi_prefix``). A host holds any
number of named experts (parameters in ``ParameterDict``\\ s keyed by expert name, so parameter names read
``<module>.pi_lora.lora_A.<expert>``), an *active set*, and optionally an *interpolation pool* with its learnable
logits ``<module>.pi_lora.lora_logits``. The backbone's own modules and parameter names never change.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pituning.backbones import BackboneInfo
from pituning.errors import BackboneError, ConfigError, ExpertError, InterpolationError, UnsupportedExpertError
from pituning.interpolation import init_logits, mixing_weights

__all__ = [
    "EXPERT_KINDS",
    "ExpertConfig",
    "ExpertHost",
    "config_from_dict",
    "iter_hosts",
    "register_expert_kind",
    "validate_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")

#: kind name -> config class; filled by :func:`register_expert_kind`.
EXPERT_KINDS: dict[str, type[ExpertConfig]] = {}


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
        if not names:
            raise UnsupportedExpertError(
                f"The {info.family} backbone has no default insertion point for {self.kind} experts (roles "
                f"{list(roles)} are not in its description); pass target_modules=[...] with module-name patterns."
            )
        return names


def register_expert_kind(cls: type[ExpertConfig]) -> type[ExpertConfig]:
    """Class decorator that registers an expert config class under its ``kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} must set the class attribute 'kind'")
    EXPERT_KINDS[cls.kind] = cls
    return cls


def config_from_dict(data: Mapping[str, Any]) -> ExpertConfig:
    """Rebuild an expert config from :meth:`ExpertConfig.to_dict` output.

    Raises:
        ConfigError: unknown kind or unknown field.
    """
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in EXPERT_KINDS:
        raise ConfigError(f"Unknown expert kind {kind!r}; known kinds: {sorted(EXPERT_KINDS)}.")
    cls = EXPERT_KINDS[kind]
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

    def __init__(self, module_name: str) -> None:
        super().__init__()
        self.module_name = module_name
        self.configs: dict[str, ExpertConfig] = {}
        self.active: tuple[str, ...] = ()
        self.pool: tuple[str, ...] = ()
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
        self._handle = module.register_forward_hook(self._forward_hook, prepend=self.kind == "lora")

    def detach(self, module: nn.Module) -> None:
        """Undo :meth:`attach`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        del module._modules[self.attr]

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

    def start_interpolation(self, pool: Sequence[str]) -> None:
        """Interpolate ``pool`` on this module with new equal logits."""
        missing = [n for n in pool if n not in self.configs]
        if missing:
            raise InterpolationError(
                f"Experts {missing} are not on {self.module_name}; every pool member must cover the same modules."
            )
        self.check_compatible(pool)
        self.pool = tuple(pool)
        device = next(iter(self.params(self.param_names[0]).values())).device
        setattr(self, self.logits_name, nn.Parameter(init_logits(len(pool), device=device)))

    def stop_interpolation(self) -> None:
        """Leave interpolation mode (the logits are dropped)."""
        self.pool = ()
        setattr(self, self.logits_name, None)

    def mixing(self) -> Tensor:
        """Current interpolation weights ``alpha = softmax(logits)`` ``(k,)``."""
        logits = self.logits
        if logits is None:
            raise InterpolationError(f"{self.module_name} is not interpolating; call interpolate(pool) first.")
        return mixing_weights(logits)

    def layout(self) -> dict[str, Any]:
        """What an exporter needs to know about this module beyond the tensors (JSON-ready)."""
        return {}

    @abstractmethod
    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        """Tensors of one plain expert equal to the current interpolation (``rank``: LoRA only)."""

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

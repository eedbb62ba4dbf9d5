"""Adapter host: a bottleneck adapter on the output of one module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.backbones import output_dim
from pituning.errors import InterpolationError
from pituning.experts.adapter.config import AdapterConfig
from pituning.experts.base import ExpertConfig, ExpertHost, register_expert_kind, unsupported
from pituning.interpolation import weighted_sum

__all__ = ["AdapterHost"]

_ACT: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class AdapterHost(ExpertHost):
    """Named bottleneck adapters on the output of one module.

    Parameters per expert: ``adapter_down_weight`` ``(b, d)``, ``adapter_down_bias`` ``(b,)``, ``adapter_up_weight``
    ``(d, b)``, ``adapter_up_bias`` ``(d,)``, where ``d`` is the module's output width (channels, for a CNN block
    whose output is ``(N, C, H, W)``). Several active adapters add their branches; an interpolated pool is exactly the
    adapter with parameters ``sum_i alpha_i theta_i`` (one ``alpha`` for down and up).
    """

    kind = "adapter"
    attr = "pi_adapter"
    param_names = ("adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias")

    def __init__(self, module_name: str) -> None:
        super().__init__(module_name)
        self.channels_first = False

    def plan(self, module: nn.Module, config: ExpertConfig) -> dict[str, Any]:
        dim = output_dim(module)
        if dim is None:
            raise unsupported(
                "adapter",
                self.module_name,
                module,
                "its output width is unknown (no Linear, convolution or norm layer inside); "
                "target a module that has one.",
            )
        conv_like = isinstance(module, nn.modules.conv._ConvNd) or (
            not isinstance(module, nn.Linear)
            and any(isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) for m in module.modules())
        )
        return {"dim": dim, "channels_first": conv_like}

    def create(self, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        assert isinstance(config, AdapterConfig)
        self.channels_first = bool(plan["channels_first"])
        d, b = int(plan["dim"]), config.bottleneck
        down = torch.randn(b, d, device=device) * config.init_std
        up = (
            torch.zeros(d, b, device=device)
            if config.zero_init_up
            else torch.randn(d, b, device=device) * config.init_std
        )
        return {
            "adapter_down_weight": down,
            "adapter_down_bias": torch.zeros(b, device=device),
            "adapter_up_weight": up,
            "adapter_up_bias": torch.zeros(d, device=device),
        }

    def check_compatible(self, pool: Sequence[str]) -> None:
        super().check_compatible(pool)
        first = self.configs[pool[0]]
        assert isinstance(first, AdapterConfig)
        for name in pool[1:]:
            other = self.configs[name]
            assert isinstance(other, AdapterConfig)
            if (other.scale, other.activation) != (first.scale, first.activation):
                raise InterpolationError(
                    f"Cannot interpolate adapters {pool[0]!r} and {name!r}: scale/activation differ "
                    f"({first.scale}, {first.activation}) vs ({other.scale}, {other.activation}); the interpolated "
                    "adapter must be one adapter, so use experts trained with the same scale and activation."
                )

    def _weighted(self, names: tuple[str, ...], alpha: Tensor) -> dict[str, Tensor]:
        return {p: weighted_sum([self.params(p)[n] for n in names], alpha) for p in self.param_names}

    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        names, alpha = self.selection()
        if alpha is None:
            raise InterpolationError(f"{self.module_name} is not interpolating; call interpolate(pool) first.")
        return {p: t.detach().float().clone() for p, t in self._weighted(names, alpha).items()}

    def _branch(self, z: Tensor, params: Mapping[str, Tensor], config: AdapterConfig) -> Tensor:
        dt = z.dtype
        h = F.linear(z, params["adapter_down_weight"].to(dt), params["adapter_down_bias"].to(dt))
        h = _ACT[config.activation](h)
        if config.dropout > 0.0:
            h = F.dropout(h, p=config.dropout, training=self.training)
        return F.linear(h, params["adapter_up_weight"].to(dt), params["adapter_up_bias"].to(dt)) * config.scale

    def apply_experts(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, names: tuple[str, ...], alpha: Tensor | None
    ) -> Any:
        y = output[0] if isinstance(output, tuple) else output
        z = y.movedim(1, -1) if self.channels_first else y
        if alpha is not None:
            config = self.configs[names[0]]
            assert isinstance(config, AdapterConfig)
            branch = self._branch(z, self._weighted(names, alpha), config)
        else:
            branch = sum(
                (self._branch(z, self.expert_tensors(n), self.configs[n]) for n in names),  # type: ignore[arg-type]
                torch.zeros((), dtype=z.dtype, device=z.device),
            )
        if self.channels_first:
            branch = branch.movedim(-1, 1)
        out = y + branch
        return (out, *output[1:]) if isinstance(output, tuple) else out


register_expert_kind(kind="adapter", config=AdapterConfig, host=AdapterHost, prefix="pi_adapter")

"""LoRA host: the low-rank update of one linear or convolution module."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.backbones import feature_dims
from pituning.experts.base import ExpertConfig, ExpertHost, register_expert_kind, unsupported
from pituning.experts.lora.config import LoraConfig
from pituning.interpolation import lora_concat, lora_delta, svd_factorize

__all__ = ["LoraHost"]


class LoraHost(ExpertHost):
    """Named LoRA experts of one module.

    ``lora_A[name]`` has shape ``(r, fan_in)`` and ``lora_B[name]`` ``(fan_out, r)``. For ``nn.Linear`` and GPT-2's
    ``Conv1D``, ``fan_in``/``fan_out`` are the feature sizes; for convolutions (``nn.Conv1d/2d/3d`` and subclasses such
    as EfficientNet's ``Conv2dStaticSamePadding``) ``fan_in = in_channels / groups * prod(kernel_size)`` and the update
    ``B @ A`` is reshaped to the kernel. Several active experts add their updates; an interpolated pool adds
    ``sum_i alpha_i s_i B_i A_i`` (the updates, never A and B separately).
    """

    kind = "lora"
    attr = "pi_lora"
    param_names = ("lora_A", "lora_B")
    prepend_hook = True  # the update belongs to the module's own output: hooks after it see it

    def __init__(self, module_name: str) -> None:
        super().__init__(module_name)
        self.conv = False
        self.weight_shape: tuple[int, ...] = ()
        self.plain_conv = False

    def plan(self, module: nn.Module, config: ExpertConfig) -> dict[str, Any]:
        assert isinstance(config, LoraConfig)
        if isinstance(module, nn.modules.conv._ConvNd):
            weight = module.weight
            return {
                "conv": True,
                "fan_in": int(weight.shape[1] * math.prod(weight.shape[2:])),
                "fan_out": int(weight.shape[0]),
                "weight_shape": tuple(weight.shape),
                "plain_conv": type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward),
            }
        fan_in, fan_out = feature_dims(module)
        if fan_in is None or fan_out is None:
            raise unsupported(
                "lora",
                self.module_name,
                module,
                "LoRA targets nn.Linear, convolutions and GPT-2 Conv1D layers; point target_modules at those.",
            )
        return {"conv": False, "fan_in": fan_in, "fan_out": fan_out, "weight_shape": (), "plain_conv": False}

    def create(self, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        assert isinstance(config, LoraConfig)
        self.conv = bool(plan["conv"])
        self.weight_shape = tuple(plan["weight_shape"])
        self.plain_conv = bool(plan["plain_conv"])
        a = torch.empty(config.r, plan["fan_in"], device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for A
        b = torch.zeros(plan["fan_out"], config.r, device=device)
        return {"lora_A": a, "lora_B": b}

    def layout(self) -> dict[str, Any]:
        return {"conv": self.conv, "weight_shape": list(self.weight_shape), "plain_conv": self.plain_conv}

    def check_compatible(self, pool: Sequence[str]) -> None:
        """LoRA experts of any ranks and scalings interpolate: their updates all have this module's shape."""

    # ----------------------------------------------------------------- math
    def _terms(self, names: tuple[str, ...], alpha: Tensor | None) -> tuple[list[Tensor], list[Tensor], Tensor, float]:
        """``(A_i, B_i, coef, dropout)``: the update is ``sum_i coef_i B_i A_i`` (coef = alpha_i * s_i, or s_i)."""
        a_dict, b_dict = self.params("lora_A"), self.params("lora_B")
        configs = [self.configs[n] for n in names]
        scales = torch.tensor([c.scaling for c in configs if isinstance(c, LoraConfig)], dtype=torch.float32)
        device = a_dict[names[0]].device
        coef = scales.to(device) if alpha is None else alpha * scales.to(alpha.device)
        dropout = max(c.dropout for c in configs if isinstance(c, LoraConfig))
        return [a_dict[n] for n in names], [b_dict[n] for n in names], coef, dropout

    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        a_list, b_list, coef, _ = self._terms(*self.selection())
        a, b = lora_concat([t.detach().float() for t in a_list], [t.detach().float() for t in b_list], coef.detach())
        if rank is not None:
            a, b = svd_factorize(b @ a, rank)
        return {"lora_A": a.clone(), "lora_B": b.clone()}

    def delta_weight(self) -> Tensor:
        """The current update ``Delta W`` in the layout of the module's weight (``(out, in)`` for Linear)."""
        a_list, b_list, coef, _ = self._terms(*self.selection())
        delta = lora_delta(a_list, b_list, coef)
        return delta.view(self.weight_shape) if self.conv else delta

    def _linear_update(self, x: Tensor, output: Tensor, names: tuple[str, ...], alpha: Tensor | None) -> Tensor:
        """``output + sum_i s_i (x A_i^T) (w_i B_i)^T`` (``w = alpha`` when interpolating, else 1).

        Each term is one ``addmm`` that adds into the output inside the matrix product (no separate pass over the
        output per expert), with the scaling ``s_i`` as ``addmm``'s ``alpha`` (no tensor built per call); terms after
        the first add in place, so a pool allocates one output-sized tensor per module, like a single expert. Terms
        stay separate so that one-hot weights give the single expert bit for bit (a zero-weight term adds zeros).
        """
        a_dict, b_dict = self.params("lora_A"), self.params("lora_B")
        configs = [self.configs[n] for n in names]
        p = max(c.dropout for c in configs if isinstance(c, LoraConfig))
        if p > 0.0:
            x = F.dropout(x, p=p, training=self.training)
        dtype = x.dtype
        weights = None if alpha is None else alpha.to(dtype)
        inputs = x.reshape(-1, x.shape[-1])
        flat = output.reshape(-1, output.shape[-1])
        for i, (name, config) in enumerate(zip(names, configs, strict=True)):
            assert isinstance(config, LoraConfig)
            b = b_dict[name].to(dtype)
            if weights is not None:
                b = b * weights[i]
            hidden = inputs @ a_dict[name].to(dtype).t()
            if i == 0:
                flat = torch.addmm(flat, hidden, b.t(), alpha=config.scaling)
            else:  # into the tensor the first term created (same kernel; one output-sized tensor per module)
                flat = flat.addmm_(hidden.to(flat.dtype), b.t().to(flat.dtype), alpha=config.scaling)
        return flat.reshape(output.shape)

    def apply_experts(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, names: tuple[str, ...], alpha: Tensor | None
    ) -> Any:
        x = args[0]
        if not self.conv:
            return self._linear_update(x, output, names, alpha)
        a_list, b_list, coef, p = self._terms(names, alpha)
        if p > 0.0:
            x = F.dropout(x, p=p, training=self.training)
        coef = coef.to(x.dtype)
        delta = lora_delta([a.to(x.dtype) for a in a_list], [b.to(x.dtype) for b in b_list], coef).view(
            self.weight_shape
        )
        if self.plain_conv:
            assert isinstance(module, nn.modules.conv._ConvNd)
            return output + module._conv_forward(x, delta, None)  # type: ignore[operator]
        # A Conv subclass may pad or reshape inside its forward: run that forward with the update as its weight.
        # Hosts skip this inner call (see ExpertHost._forward_hook).
        overrides = {"weight": delta}
        if getattr(module, "bias", None) is not None:
            overrides["bias"] = torch.zeros_like(module.bias)  # type: ignore[arg-type]
        module.__dict__["_pi_inner_call"] = True
        try:
            return output + torch.func.functional_call(module, overrides, (x,))
        finally:
            module.__dict__["_pi_inner_call"] = False


register_expert_kind(kind="lora", config=LoraConfig, host=LoraHost, prefix="pi_lora")

"""Prefix host: prepends learned keys and values inside one self-attention module.

``transformers`` attention modules compute their scores through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
after projecting (and rotating) queries and keys. pituning registers two implementations, ``pituning_eager`` and
``pituning_sdpa``, that prepend the prefix of the calling module (if it hosts one) to ``key`` and ``value``, extend
the attention mask and any position bias (T5) with ``L`` always-visible columns, and call the original ``eager`` or
``sdpa`` function. Hosting a prefix switches the module's config to the matching ``pituning_*`` name.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.errors import ExpertError
from pituning.experts.base import ExpertConfig, ExpertHost, iter_hosts, register_expert_kind, unsupported
from pituning.experts.prefix.config import PrefixConfig
from pituning.interpolation import weighted_sum

__all__ = ["PREFIX_IMPLEMENTATIONS", "PrefixHost", "restore_attention"]

#: Attention implementations a prefix supports -> the pituning name that wraps it.
PREFIX_IMPLEMENTATIONS = {"eager": "pituning_eager", "sdpa": "pituning_sdpa"}
_INNER = {v: k for k, v in PREFIX_IMPLEMENTATIONS.items()}
_KEY_CHILDREN = ("k_proj", "key", "k", "k_lin")
_registered = False


def _inner_function(module: nn.Module, inner: str) -> Any:
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # The eager path of each model lives in its own modeling file (T5's adds the position bias, for instance).
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ExpertError(f"{type(module).__name__} has no eager attention function; load the model with sdpa.")
    return eager


def _extend_mask(mask: Tensor, length: int) -> Tensor:
    pad_value: bool | float = True if mask.dtype == torch.bool else 0.0
    if mask.dtype == torch.bool:
        return torch.cat([mask.new_full((*mask.shape[:-1], length), True), mask], dim=-1)
    return F.pad(mask, (length, 0), value=float(pad_value))


def _make_attention(inner: str) -> Any:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        host = module._modules.get(PrefixHost.attr)
        if isinstance(host, PrefixHost):
            key, value, attention_mask, kwargs = host.extend(module, query, key, value, attention_mask, kwargs, inner)
        return _inner_function(module, inner)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"pituning_{inner}_attention"
    return attention


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for inner, name in PREFIX_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_attention(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    _registered = True


def restore_attention(module: nn.Module) -> None:
    """Switch the config of ``module`` back from ``pituning_*`` to its original attention implementation."""
    config = getattr(module, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in _INNER:
        config._attn_implementation = _INNER[current]  # type: ignore[union-attr]


class PrefixHost(ExpertHost):
    """Named prefixes of one self-attention module.

    Parameters per expert: ``prefix_key`` and ``prefix_value`` of shape ``(L, kv_dim)`` with
    ``kv_dim = num_key_value_heads * head_dim``. Several active prefixes are concatenated; an interpolated pool uses
    ``P = sum_i alpha_i P_i`` (same ``L`` required).
    """

    kind = "prefix"
    attr = "pi_prefix"
    param_names = ("prefix_key", "prefix_value")

    def plan(self, module: nn.Module, config: ExpertConfig) -> dict[str, Any]:
        attn_config = getattr(module, "config", None)
        implementation = getattr(attn_config, "_attn_implementation", None)
        if implementation is None:
            raise unsupported(
                "prefix",
                self.module_name,
                module,
                "prefixes need a transformers self-attention module that dispatches through its attention interface "
                "(plain torch backbones cannot host them); use a LoRA or adapter expert instead.",
            )
        if implementation not in PREFIX_IMPLEMENTATIONS and implementation not in _INNER:
            raise unsupported(
                "prefix",
                self.module_name,
                module,
                f"its attention implementation {implementation!r} is not supported by prefixes; load the backbone with "
                "attn_implementation='sdpa' or 'eager'.",
            )
        kv_dim = None
        for child_name in _KEY_CHILDREN:
            child = module._modules.get(child_name)
            if isinstance(child, nn.Linear):
                kv_dim = child.out_features
                break
        if kv_dim is None and "c_attn" in module._modules and hasattr(module, "embed_dim"):
            kv_dim = int(getattr(module, "embed_dim"))  # noqa: B009 - GPT-2: c_attn projects to 3 * embed_dim
        if kv_dim is None:
            raise unsupported(
                "prefix",
                self.module_name,
                module,
                f"no key projection ({', '.join(_KEY_CHILDREN)}) was found to size the prefix; target the module "
                "that owns the key projection.",
            )
        return {"kv_dim": kv_dim}

    def create(self, config: ExpertConfig, plan: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        assert isinstance(config, PrefixConfig)
        shape = (config.num_tokens, int(plan["kv_dim"]))
        return {
            "prefix_key": torch.randn(shape, device=device) * config.init_std,
            "prefix_value": torch.randn(shape, device=device) * config.init_std,
        }

    def attach(self, module: nn.Module) -> None:
        _register()
        module.add_module(self.attr, self)
        config: Any = getattr(module, "config")  # noqa: B009 - checked in plan()
        current = config._attn_implementation
        if current in PREFIX_IMPLEMENTATIONS:
            config._attn_implementation = PREFIX_IMPLEMENTATIONS[current]

    def detach(self, module: nn.Module) -> None:
        del module._modules[self.attr]

    @classmethod
    def release(cls, model: nn.Module, modules: Sequence[nn.Module]) -> None:
        """Switch prefix attention back on the configs of ``modules`` that no prefix host in ``model`` uses any more."""
        in_use = {id(getattr(mod, "config", None)) for _, mod, _ in iter_hosts(model, cls.kind)}
        for module in modules:
            if id(getattr(module, "config", None)) not in in_use:
                restore_attention(module)

    def _prefix(self, pname: str) -> Tensor | None:
        names, alpha = self.selection()
        if not names:
            return None
        tensors = [self.params(pname)[n] for n in names]
        if alpha is not None:
            return weighted_sum(tensors, alpha)
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)

    def collapse(self, rank: int | None = None) -> dict[str, Tensor]:
        out = {}
        for pname in self.param_names:
            tensor = self._prefix(pname)
            assert tensor is not None
            out[pname] = tensor.detach().float().clone()
        return out

    def extend(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        kwargs: dict[str, Any],
        inner: str,
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any]]:
        """Prepend the prefix to ``key``/``value`` ``(N, H_kv, T, d_head)`` and widen the mask and position bias."""
        pk, pv = self._prefix("prefix_key"), self._prefix("prefix_value")
        if pk is None or pv is None:
            return key, value, mask, kwargs
        batch, heads, t_k, d_head = key.shape
        length = pk.shape[0]
        if pk.shape[1] != heads * d_head:
            raise ExpertError(
                f"Prefix on {self.module_name} has width {pk.shape[1]} but the attention has {heads} key/value heads "
                f"of {d_head}; the prefix was made for another model."
            )

        def heads_first(p: Tensor) -> Tensor:
            return p.to(key.dtype).view(1, length, heads, d_head).transpose(1, 2).expand(batch, -1, -1, -1)

        key = torch.cat([heads_first(pk), key], dim=2)
        value = torch.cat([heads_first(pv), value], dim=2)
        t_q = query.shape[2]
        if mask is not None:
            mask = _extend_mask(mask, length)
        else:
            causal = kwargs.get("is_causal")
            if causal is None:
                causal = getattr(module, "is_causal", inner == "sdpa")
            if inner == "sdpa" and causal and t_q > 1:
                rows = torch.arange(t_q, device=key.device)[:, None] + (t_k - t_q)
                visible = torch.arange(t_k, device=key.device)[None, :] <= rows
                mask = _extend_mask(visible.view(1, 1, t_q, t_k), length)
        bias = kwargs.get("position_bias")
        if bias is not None:
            kwargs = {**kwargs, "position_bias": F.pad(bias, (length, 0))}
        return key, value, mask, kwargs


register_expert_kind(kind="prefix", config=PrefixConfig, host=PrefixHost, prefix="pi_prefix")

"""Arrow routing: reuse a library of LoRA experts token by token, without training or target data.

Arrow (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs") gives
each LoRA expert ``i`` one *prototype* per insertion point: the top right singular vector ``v_i`` of its update
``Delta W_i = B_i A_i`` (a direction of the layer's input space, defined up to sign). A token ``x`` entering that layer
scores every expert by ``|<v_i, x>|``, keeps the ``top_k`` best, turns their scores into weights with a softmax at
temperature ``T``, and the layer returns

    ``W x + sum_{i in top_k(x)} p_i(x) s_i B_i A_i x``,   ``p(x) = softmax(|<v, x>|_{top_k} / T)``,

where ``s_i = alpha_i / r_i`` is expert ``i``'s LoRA scaling. Each token and each layer is routed on its own.

The pure functions (:func:`lora_prototype`, :func:`arrow_prototypes`, :func:`arrow_weights`, :func:`arrow_update`)
hold the math; :func:`attach_arrow` loads the experts into a live :class:`~pituning.model.ExpertModel` and routes with
forward hooks, and the :class:`ArrowRouting` it returns detaches them again and counts which experts served.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from pituning.bank import Expert
from pituning.bank.records import check_backbone
from pituning.errors import ConfigError, ExpertError, UnsupportedExpertError
from pituning.experts.base import validate_name
from pituning.experts.lora import LoraConfig, LoraHost
from pituning.model import ExpertModel

__all__ = [
    "ArrowRouting",
    "arrow_prototypes",
    "arrow_update",
    "arrow_weights",
    "attach_arrow",
    "lora_prototype",
]

_NOT_LORA = "arrow needs LoRA experts; use merge or π-Tuning for adapter/prefix experts"


# --------------------------------------------------------------------------------------------------------- the math
def lora_prototype(a: Tensor, b: Tensor) -> Tensor:
    """The Arrow prototype of one LoRA: the top right singular vector of ``Delta W = B A``, without forming it.

    With the thin QR factorisations ``A^T = Q_a R_a`` and ``B = Q_b R_b``, ``Delta W = Q_b (R_b R_a^T) Q_a^T``; the
    SVD ``R_b R_a^T = U S V^T`` of this at most ``r x r`` core gives ``Delta W``'s right singular vectors ``Q_a V``.
    The cost is ``O((fan_in + fan_out) r^2)`` instead of the ``O(fan_in fan_out r)`` of forming ``Delta W``, and the
    result is exact (no power iteration). Computed in fp64.

    The sign of a singular vector is arbitrary and Arrow's scores use ``|<v, x>|``; for reproducibility the largest
    entry (in absolute value) is made positive. An update that is exactly zero (an untrained LoRA, ``B = 0``) has no
    direction: its prototype is the zero vector, so it scores 0 for every token.

    Args:
        a: ``A``, shape ``(r, fan_in)``.
        b: ``B``, shape ``(fan_out, r)``.

    Returns:
        The unit prototype ``v`` (or zeros), shape ``(fan_in,)``, fp32.

    Raises:
        ExpertError: the shapes do not chain (``A``'s rank differs from ``B``'s) or a factor is not finite.

    Example:
        >>> a, b = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[1.0], [1.0]])
        >>> lora_prototype(a, b)
        tensor([0., 1., 0.])
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ExpertError(
            f"A LoRA prototype needs A of shape (r, fan_in) and B of shape (fan_out, r); got A {tuple(a.shape)} and "
            f"B {tuple(b.shape)}. Pass the expert's lora_A and lora_B of one module."
        )
    a64, b64 = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ExpertError("A LoRA factor holds NaN or inf, so it has no Arrow prototype; drop or retrain that expert.")
    q_a, r_a = torch.linalg.qr(a64.t())  # (fan_in, m), (m, r)
    _, r_b = torch.linalg.qr(b64, mode="r")  # R of B = Q_b R_b: (p, r)
    _, s, vh = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)  # core (p, m)
    if s.numel() == 0 or not bool(s[0] > 0):
        return torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    v = q_a @ vh[0]
    v = v * torch.sign(v[v.abs().argmax()]) + 0.0  # + 0.0: no negative zeros
    return v.float()


def _lora_suffixes() -> tuple[str, str]:
    return f".{LoraHost.attr}.lora_A", f".{LoraHost.attr}.lora_B"


def _check_experts(experts: Sequence[Expert]) -> list[str]:
    """Validate an Arrow library and return its module names (the first expert's order).

    Raises:
        ConfigError: no experts, a repeated name, or an expert that is not LoRA.
        ExpertError: the experts do not cover the same modules, or a LoRA factor is missing.
    """
    if not experts:
        raise ConfigError("Arrow needs at least one LoRA expert; pass the experts of the library to route over.")
    names = [e.name for e in experts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"Arrow got expert name(s) {repeated} more than once; pass each expert of the library once.")
    others = {e.name: e.config.kind for e in experts if not isinstance(e.config, LoraConfig)}
    if others:
        raise ConfigError(f"{_NOT_LORA} (got {others}).")
    suffix_a, suffix_b = _lora_suffixes()
    coverage = []
    for expert in experts:
        modules = [k[: -len(suffix_a)] for k in expert.state if k.endswith(suffix_a)]
        missing = [m for m in modules if m + suffix_b not in expert.state]
        if not modules or missing:
            raise ExpertError(
                f"LoRA expert {expert.name!r} has no lora_A/lora_B pair for {missing or 'any module'}; its state must "
                "be keyed as ExpertModel.expert_state_dict writes it ('<module>.pi_lora.lora_A' and '...lora_B')."
            )
        coverage.append(modules)
    first = set(coverage[0])
    for expert, modules in zip(experts[1:], coverage[1:], strict=True):
        if set(modules) != first:
            only = sorted(set(modules) ^ first)[:3]
            raise ExpertError(
                f"Arrow routes experts that share their insertion points, but {expert.name!r} and {experts[0].name!r} "
                f"cover different modules (e.g. {only}); route experts trained with the same target_modules and "
                "include_mlp."
            )
    return coverage[0]


def arrow_prototypes(experts: Sequence[Expert]) -> dict[str, Tensor]:
    """The Arrow prototypes of a LoRA library, per insertion point (see :func:`lora_prototype`).

    Args:
        experts: LoRA experts that cover the same modules (their ranks and scalings may differ).

    Returns:
        Module name (relative to the backbone, as in the experts' state keys) -> prototypes of shape
        ``(n_experts, fan_in)``, fp32, row ``i`` for ``experts[i]``; modules in the first expert's order.

    Raises:
        ConfigError: no experts, a repeated name, or an adapter/prefix expert.
        ExpertError: experts that cover different modules, or factors whose shapes differ between experts.
    """
    modules = _check_experts(experts)
    suffix_a, suffix_b = _lora_suffixes()
    out: dict[str, Tensor] = {}
    for module in modules:
        rows = [lora_prototype(e.state[module + suffix_a], e.state[module + suffix_b]) for e in experts]
        widths = {e.name: int(r.shape[0]) for e, r in zip(experts, rows, strict=True)}
        if len(set(widths.values())) > 1:
            raise ExpertError(
                f"The LoRA experts have different input sizes on {module} ({widths}); they belong to different "
                "backbones. Route experts of one backbone."
            )
        out[module] = torch.stack(rows)
    return out


def arrow_weights(tokens: Tensor, prototypes: Tensor, top_k: int, temperature: float = 1.0) -> Tensor:
    """Arrow's routing weights: ``softmax`` over the ``top_k`` scores ``|<v_i, x>| / T``, zero elsewhere.

    Args:
        tokens: token vectors entering the layer, shape ``(t, d)``.
        prototypes: the layer's prototypes, shape ``(n, d)``.
        top_k: experts kept per token, ``1 <= top_k <= n``.
        temperature: softmax temperature ``T > 0`` (small: the best expert takes all; large: the ``top_k`` share
            equally).

    Returns:
        Weights ``p`` of shape ``(t, n)``: each row sums to 1 over at most ``top_k`` non-zero entries (dtype of
        ``tokens``; the softmax itself runs in fp32).

    Example:
        >>> p = arrow_weights(torch.tensor([[3.0, 0.0]]), torch.eye(2), top_k=1)
        >>> p
        tensor([[1., 0.]])
    """
    return _route(tokens, prototypes, top_k, temperature)[0]


def _route(tokens: Tensor, prototypes: Tensor, top_k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`arrow_weights` and the kept experts' indices ``(t, top_k)``."""
    scores = (tokens @ prototypes.to(tokens.dtype).t()).abs()
    values, index = scores.topk(top_k, dim=-1)
    weights = torch.softmax(values.float() / temperature, dim=-1).to(tokens.dtype)
    return torch.zeros_like(scores).scatter(-1, index, weights), index


def arrow_update(tokens: Tensor, weights: Tensor, a: Sequence[Tensor], b: Sequence[Tensor], scales: Tensor) -> Tensor:
    """The routed LoRA update ``sum_i p_i(x) s_i B_i A_i x`` of every token.

    All ``n`` experts are evaluated as one LoRA of rank ``sum_i r_i`` (the ``A_i`` stacked), whose rank-space
    activations are weighted per token before ``B``: two matrix products per layer, whatever ``n``.

    Args:
        tokens: shape ``(t, fan_in)``.
        weights: routing weights ``p``, shape ``(t, n)`` (:func:`arrow_weights`).
        a: ``A_i`` of shape ``(r_i, fan_in)``.
        b: ``B_i`` of shape ``(fan_out, r_i)``.
        scales: LoRA scalings ``s_i``, shape ``(n,)``.

    Returns:
        The update, shape ``(t, fan_out)``, in the dtype of ``tokens``.
    """
    dtype = tokens.dtype
    ranks = [int(t.shape[0]) for t in a]
    a_cat = torch.cat([t.to(dtype) for t in a])  # (R, fan_in)
    b_cat = torch.cat([t.to(dtype) for t in b], dim=1)  # (fan_out, R)
    coef = weights * scales.to(device=tokens.device, dtype=dtype)  # (t, n)
    if len(set(ranks)) == 1:  # one rank: no index tensor to build on the device
        coef = coef.repeat_interleave(ranks[0], dim=1)
    else:
        coef = coef.repeat_interleave(torch.tensor(ranks, device=coef.device), dim=1, output_size=sum(ranks))
    return ((tokens @ a_cat.t()) * coef) @ b_cat.t()  # (t, R) weighted per expert, then B


# --------------------------------------------------------------------------------------------------------- live pool
class _Layer:
    """The routing state of one insertion point: prototypes and scalings (fp32, on the device last used) and
    statistics."""

    def __init__(self, module_name: str, prototypes: Tensor, scales: Tensor) -> None:
        self.module_name = module_name
        self.prototypes = prototypes
        self.scales = scales
        self.handle: torch.utils.hooks.RemovableHandle | None = None
        self.pointwise = False  # a 1x1 convolution: each pixel's channel vector is a token
        self.tokens = 0
        self.selected: Tensor | None = None  # (n,) int64: tokens that kept expert i in their top-k
        self.weight: Tensor | None = None  # (n,) fp32: sum over tokens of p_i

    def reset(self) -> None:
        self.tokens, self.selected, self.weight = 0, None, None


class ArrowRouting:
    """Arrow routing over LoRA experts loaded into a live model (made by :func:`attach_arrow`).

    While attached, every insertion point the experts cover adds the routed update to its output (see the module
    docstring). :meth:`detach` (or leaving a ``with`` block) removes the hooks and the experts, which gives back the
    model's previous outputs exactly. Routing statistics are sums and counts over every token routed since
    attaching or :meth:`reset_statistics` (padding tokens included).
    """

    def __init__(
        self,
        model: ExpertModel,
        name: str,
        experts: Sequence[str],
        model_names: Sequence[str],
        scales: Sequence[float],
        prototypes: dict[str, Tensor],
        top_k: int,
        temperature: float,
        track: bool,
    ) -> None:
        self.model = model
        self.name = name
        self.experts: tuple[str, ...] = tuple(experts)
        """The experts' names (their names in the library), in routing order."""
        self.model_names: tuple[str, ...] = tuple(model_names)
        """The names they are loaded under in the model (``<name>-<expert>``)."""
        self.track = track
        """Whether the forward pass updates the statistics."""
        scale = torch.tensor(list(scales), dtype=torch.float32)
        self._layers = {m: _Layer(m, p, scale) for m, p in prototypes.items()}
        self._top_k = 1
        self._temperature = 1.0
        self.top_k = top_k
        self.temperature = temperature

    # ----------------------------------------------------------------- options
    @property
    def top_k(self) -> int:
        """Experts kept per token; set it to ``1 <= top_k``, values above ``n`` are clipped to ``n``."""
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"Arrow top_k must be an integer >= 1 (experts kept per token), got {value!r}; e.g. top_k=3."
            )
        self._top_k = min(value, len(self.experts))

    @property
    def temperature(self) -> float:
        """Softmax temperature over the kept scores, ``> 0``."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"Arrow temperature must be a finite number > 0, got {value!r}; e.g. temperature=1.0.")
        self._temperature = float(value)

    @property
    def modules(self) -> tuple[str, ...]:
        """The routed insertion points (module names relative to the backbone)."""
        return tuple(self._layers)

    @property
    def prototypes(self) -> dict[str, Tensor]:
        """Module name -> prototypes ``(n_experts, fan_in)`` (copies, on the CPU)."""
        return {m: layer.prototypes.detach().cpu().clone() for m, layer in self._layers.items()}

    @property
    def attached(self) -> bool:
        """Whether the routing still acts on the model."""
        return any(layer.handle is not None for layer in self._layers.values())

    # ----------------------------------------------------------------- life cycle
    def _attach(self) -> None:
        for module_name, layer in self._layers.items():
            module = self.model.backbone.get_submodule(module_name)
            host = module._modules[LoraHost.attr]
            assert isinstance(host, LoraHost)
            layer.handle = module.register_forward_hook(self._hook(layer, host), prepend=True)

    def detach(self) -> None:
        """Remove the routing hooks and the experts it loaded (idempotent). The model's outputs are then exactly
        what they were before :func:`attach_arrow`; the statistics stay readable."""
        for layer in self._layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        present = self.model.experts
        for model_name in self.model_names:
            if model_name in present:
                self.model.remove_expert(model_name)

    def __enter__(self) -> ArrowRouting:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def _hook(self, layer: _Layer, host: LoraHost) -> Any:
        names = self.model_names

        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            a_dict, b_dict = host.params("lora_A"), host.params("lora_B")
            if any(n not in a_dict for n in names):
                raise ExpertError(
                    f"Arrow routing {self.name!r} lost an expert on {layer.module_name} (removed from the model while "
                    "routing); call detach() and attach_arrow again."
                )
            a, b = [a_dict[n] for n in names], [b_dict[n] for n in names]
            if layer.prototypes.device != x.device:  # follow the model to its device once, not every call
                layer.prototypes, layer.scales = layer.prototypes.to(x.device), layer.scales.to(x.device)
            if layer.pointwise:  # (N, C, H, W): every pixel's channel vector is a token
                a = [t.reshape(t.shape[0], -1) for t in a]
                b = [t.reshape(t.shape[0], -1) for t in b]
                x = x.movedim(1, -1)
            tokens = x.reshape(-1, x.shape[-1])
            weights, index = _route(tokens, layer.prototypes, self._top_k, self._temperature)
            update = arrow_update(tokens, weights, a, b, layer.scales)
            if self.track:
                self._record(layer, weights.detach(), index)
            if layer.pointwise:
                shaped = update.reshape(*x.shape[:-1], update.shape[-1]).movedim(-1, 1)
                return output + shaped.to(output.dtype)
            return output + update.reshape(*output.shape[:-1], update.shape[-1]).to(output.dtype)

        return hook

    # ----------------------------------------------------------------- statistics
    def _record(self, layer: _Layer, weights: Tensor, index: Tensor) -> None:
        selected = torch.bincount(index.flatten(), minlength=len(self.experts))
        total = weights.float().sum(dim=0)
        layer.tokens += int(weights.shape[0])
        layer.selected = selected if layer.selected is None else layer.selected + selected
        layer.weight = total if layer.weight is None else layer.weight + total

    def reset_statistics(self) -> None:
        """Forget the statistics gathered so far."""
        for layer in self._layers.values():
            layer.reset()

    def tokens_routed(self) -> dict[str, int]:
        """Module name -> number of tokens routed there."""
        return {m: layer.tokens for m, layer in self._layers.items()}

    def selection_counts(self) -> dict[str, dict[str, int]]:
        """Module name -> {expert: number of tokens that kept it among their ``top_k``}."""
        out: dict[str, dict[str, int]] = {}
        for module, layer in self._layers.items():
            counts = [0] * len(self.experts) if layer.selected is None else layer.selected.cpu().tolist()
            out[module] = dict(zip(self.experts, (int(c) for c in counts), strict=True))
        return out

    def mean_routing(self) -> dict[str, dict[str, float]]:
        """Module name -> {expert: mean routing weight ``p_i`` over the tokens routed there} (each sums to 1; all
        zeros before any token)."""
        out: dict[str, dict[str, float]] = {}
        for module, layer in self._layers.items():
            if layer.weight is None or layer.tokens == 0:
                means = [0.0] * len(self.experts)
            else:
                means = (layer.weight.double() / layer.tokens).cpu().tolist()
            out[module] = dict(zip(self.experts, (float(m) for m in means), strict=True))
        return out

    def expert_usage(self) -> dict[str, float]:
        """Expert -> its mean routing weight averaged over the routed modules: the share of the library's work it did
        (sums to 1 once tokens were routed)."""
        per_module = [row for module, row in self.mean_routing().items() if self._layers[module].tokens]
        if not per_module:
            return dict.fromkeys(self.experts, 0.0)
        return {e: sum(row[e] for row in per_module) / len(per_module) for e in self.experts}

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"ArrowRouting(name={self.name!r}, experts={list(self.experts)}, top_k={self.top_k}, "
            f"temperature={self.temperature}, modules={len(self._layers)}, {state})"
        )


def _pointwise(module: nn.Module) -> bool:
    """Whether ``module`` is a 1x1 convolution with stride 1, no dilation effect and one group: per pixel, linear."""
    if not isinstance(module, nn.Conv2d):
        return False
    padding = module.padding if isinstance(module.padding, tuple) else (0, 0)
    return (
        tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
        and tuple(padding) in ((0, 0),)
    )


def attach_arrow(
    model: ExpertModel,
    experts: Sequence[Expert],
    *,
    top_k: int = 3,
    temperature: float = 1.0,
    name: str = "arrow",
    track: bool = True,
    allow_backbone_mismatch: bool = False,
) -> ArrowRouting:
    """Load LoRA experts into ``model`` and route every token through them with Arrow, layer by layer.

    The experts are loaded as ``<name>-<expert name>``, frozen and *inactive* (the model's own active experts and
    interpolation are left alone and keep acting); a forward hook on each insertion point they cover adds
    ``sum_{i in top_k(x)} p_i(x) s_i B_i A_i x`` for every token ``x`` (module docstring). No training and no target
    data: use it under ``model.eval()`` and ``torch.no_grad()`` for inference (gradients do flow, to train a head on
    top). LoRA dropout is not applied.

    Args:
        model: the live model; its backbone must be the experts' (fingerprint checked, as in
            :meth:`~pituning.bank.ExpertBank.load_into`).
        experts: the library, LoRA experts that cover the same linear modules (ranks and scalings may differ).
        top_k: experts kept per token (``>= 1``; clipped to the number of experts).
        temperature: softmax temperature over the kept scores (``> 0``).
        name: a name for this routing, the prefix of the experts' names in the model (an expert name itself).
        track: count which experts served (:meth:`ArrowRouting.mean_routing`, ...).
        allow_backbone_mismatch: load experts trained on a backbone with other weights (shapes must still fit).

    Returns:
        The attached :class:`ArrowRouting`; ``detach()`` it (or use it as a context manager) to restore the model.

    Raises:
        ConfigError: no experts, a repeated expert, an adapter or prefix expert, an invalid option or name.
        ExpertError: experts that cover different modules, or a routing of this ``name`` already attached.
        BackboneMismatchError: an expert belongs to another backbone (unless ``allow_backbone_mismatch``).
        UnsupportedExpertError: an expert targets a convolution (Arrow routes token vectors of linear layers).

    On any error the model is left exactly as it was.

    Example:
        >>> import torch
        >>> routing = attach_arrow(model, bank.select(["nli", "qa", "sum"]), top_k=2)  # doctest: +SKIP
        >>> with routing, torch.no_grad():  # doctest: +SKIP
        ...     logits = model(**batch).logits
        >>> routing.expert_usage()  # doctest: +SKIP
        {'nli': 0.52, 'qa': 0.31, 'sum': 0.17}
    """
    validate_name(name)
    prototypes = arrow_prototypes(experts)
    model_names = [f"{name}-{e.name}" for e in experts]
    for model_name in model_names:
        validate_name(model_name)
    present = model.experts
    if any(n in present for n in model_names):
        raise ExpertError(
            f"An Arrow routing named {name!r} is already attached to this model (experts {sorted(present)}); detach() "
            "it first or pass another name=..."
        )
    if not allow_backbone_mismatch:
        mine = model.fingerprint()
        for expert in experts:
            fix = "Route experts of this backbone, or pass allow_backbone_mismatch=True to load them anyway."
            check_backbone(expert, model, fix, mine=mine)
    scales = [e.config.scaling for e in experts if isinstance(e.config, LoraConfig)]
    routing = ArrowRouting(
        model, name, [e.name for e in experts], model_names, scales, prototypes, top_k, temperature, track
    )
    loaded: list[str] = []
    try:
        for expert, model_name in zip(experts, model_names, strict=True):
            model.load_expert(model_name, expert.config, expert.state, activate=False)
            loaded.append(model_name)
            for param in model.expert_parameters(model_name).values():
                param.requires_grad_(False)
        for module_name in prototypes:
            module = model.backbone.get_submodule(module_name)
            host = module._modules.get(LoraHost.attr)
            if not isinstance(host, LoraHost) or (host.conv and not _pointwise(module)):
                raise UnsupportedExpertError(
                    f"{module_name} is a convolution with a kernel larger than 1x1 (or a stride or groups); Arrow "
                    "routes token vectors: those of linear layers (nn.Linear, GPT-2 Conv1D) and of 1x1 convolutions "
                    "(each pixel's channels). Route LoRA experts trained with target_modules on such layers."
                )
            routing._layers[module_name].pointwise = bool(host.conv)
    except BaseException:
        for model_name in reversed(loaded):
            model.remove_expert(model_name)
        raise
    routing._attach()
    return routing

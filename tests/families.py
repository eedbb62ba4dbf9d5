"""Tiny backbones of every supported family, built offline from configs, and inputs for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pituning import Backbone, BackboneDescription, DualEncoder, load_backbone

VOCAB = 99


@dataclass
class Family:
    """A tiny backbone factory and an input factory."""

    name: str
    build: Callable[[], Backbone]
    inputs: Callable[[torch.Generator], dict[str, Tensor]]
    prefix: bool = True  # can host prefixes
    pick: Callable[[Any], Tensor] | None = None  # the output tensor, where the rules below do not find it

    def output(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        out = model(**inputs)
        if self.pick is not None:
            return self.pick(out)
        if isinstance(out, Tensor):
            return out
        for key in ("last_hidden_state", "logits", "logits_per_text"):
            value = getattr(out, key, None)
            if isinstance(value, Tensor):
                return value
        raise AssertionError(f"no tensor output for {self.name}")


def _ids(gen: torch.Generator, batch: int = 2, length: int = 7) -> Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def _text(gen: torch.Generator) -> dict[str, Tensor]:
    ids = _ids(gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _causal(gen: torch.Generator) -> dict[str, Tensor]:
    return {"input_ids": _ids(gen)}


def _pixels(gen: torch.Generator, size: int = 16) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(2, 3, size, size, generator=gen)}


def _clip(gen: torch.Generator) -> dict[str, Tensor]:
    return {**_text(gen), **_pixels(gen)}


def _t5(gen: torch.Generator) -> dict[str, Tensor]:
    return {**_text(gen), "decoder_input_ids": _ids(gen, length=5)}


def _cnn_inputs(gen: torch.Generator) -> dict[str, Tensor]:
    return {"x": torch.randn(2, 3, 16, 16, generator=gen)}


def _cfg(kind: str) -> Any:
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if kind == "bert":
        return T.BertConfig(**text)
    if kind == "roberta":
        return T.RobertaConfig(**text, pad_token_id=1)
    if kind == "distilbert":
        return T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    if kind == "vit":
        return T.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
    if kind == "clip":
        return T.CLIPConfig(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
            vision_config=dict(
                image_size=16,
                patch_size=8,
                hidden_size=24,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=16,
        )
    if kind == "t5":
        return T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise KeyError(kind)


class TinyCNN(nn.Module):
    """A plain torch CNN with blocks, a Conv2d subclass and a linear head."""

    class PaddedConv(nn.Conv2d):
        """Pads in its forward, like EfficientNet's Conv2dStaticSamePadding."""

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = TinyCNN.PaddedConv(8, 8, 3)
            self.norm = nn.BatchNorm2d(8)
            self.proj = nn.Conv2d(8, 8, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.proj(torch.relu(self.norm(self.conv(x))))

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(TinyCNN.Block() for _ in range(2))
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(dim=(2, 3)))


class EfficientNet(nn.Module):
    """A toy EfficientNet-Lite: the module names, blocks (expand, depthwise, project; ReLU6) and ``extract_features``
    of ``efficientnet_lite_pytorch.EfficientNet``, and its class name (the ``efficientnet`` preset finds it), so the
    image tower of a ``dual`` encoder is exercised without the vision extra."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int = 2) -> None:
            super().__init__()
            mid = cin * expand
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid)
            self._depthwise_conv = TinyCNN.PaddedConv(mid, mid, 3, groups=mid, bias=False)
            self._bn1 = nn.BatchNorm2d(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout)
            self.skip = cin == cout

        def forward(self, x: Tensor) -> Tensor:
            h = nn.functional.relu6(self._bn0(self._expand_conv(x)))
            h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
            h = self._bn2(self._project_conv(h))
            return h + x if self.skip else h

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList([EfficientNet.Block(8, 8), EfficientNet.Block(8, 12)])
        self._conv_head = nn.Conv2d(12, width, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(width)
        self._fc = nn.Linear(width, 5)

    def extract_features(self, x: Tensor) -> Tensor:
        h = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return nn.functional.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.extract_features(x).mean(dim=(2, 3)))


def tiny_dual() -> DualEncoder:
    """A dual encoder of a tiny EfficientNet-like image tower (head width 24) and a tiny BERT (width 32)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    return DualEncoder(EfficientNet().eval(), AutoModel.from_config(_cfg("bert")).eval())


def _dual_output(out: tuple[Tensor, Any]) -> Tensor:
    image, text = out
    return torch.cat([image.flatten(1), text.last_hidden_state.flatten(1)], dim=1)


CNN_DESCRIPTION = BackboneDescription(
    family="tiny-cnn",
    roles={"blocks": r"blocks\.\d+", "conv": r"stem|blocks\.\d+\.(?:conv|proj)", "head": r"head"},
    lora_roles=("conv", "head"),
    adapter_roles=("blocks",),
)


def _hf(kind: str, task: str = "base") -> Callable[[], Backbone]:
    def build() -> Backbone:
        torch.manual_seed(0)
        return load_backbone(_cfg(kind), task=task)

    return build


def _cnn() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_module(TinyCNN().eval(), CNN_DESCRIPTION)


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", _hf("bert"), _text),
    "roberta": Family("roberta", _hf("roberta"), _text),
    "distilbert": Family("distilbert", _hf("distilbert"), _text),
    "vit": Family("vit", _hf("vit"), _pixels),
    "clip": Family("clip", _hf("clip"), _clip),
    "t5": Family("t5", _hf("t5"), _t5),
    "gpt2": Family("gpt2", _hf("gpt2"), _causal),
    "llama": Family("llama", _hf("llama"), _text),
    "cnn": Family("cnn", _cnn, _cnn_inputs, prefix=False),
    # prefixes go to the text tower only
    "dual": Family("dual", lambda: load_backbone(tiny_dual()), _clip, pick=_dual_output),
}

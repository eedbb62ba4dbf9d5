"""Small experts for bank tests, with and without a live model."""

from __future__ import annotations

import torch

from pituning import LoraConfig
from pituning.backbones import Fingerprint
from pituning.bank import BackboneIdentity, Expert, TaskInfo

FAKE_BACKBONE = BackboneIdentity("toy-backbone", "toy", Fingerprint("s" * 64, "w" * 64, 1000))


def tiny_expert(
    name: str,
    seed: int = 0,
    *,
    modality: str = "text",
    task: str | None = None,
    embedding: bool = True,
    rank: int = 2,
) -> Expert:
    """A LoRA expert on two fake 8x8 modules, no model needed."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module in ("layers.0.q", "layers.1.q"):
        state[f"{module}.pi_lora.lora_A"] = torch.randn(rank, 8, generator=gen)
        state[f"{module}.pi_lora.lora_B"] = torch.randn(8, rank, generator=gen)
    emb = {k: torch.rand(v.shape, generator=gen) for k, v in state.items()} if embedding else None
    return Expert(
        name=name,
        config=LoraConfig(r=rank, alpha=2.0 * rank),
        state=state,
        task=TaskInfo(task or name, modality=modality, label_names=["neg", "pos"], num_examples=64, shots=16),
        backbone=FAKE_BACKBONE,
        metrics={"val_acc": 0.5},
        embedding=emb,
        modules={
            m: {"type": "Linear", "conv": False, "weight_shape": [], "plain_conv": False}
            for m in ("layers.0.q", "layers.1.q")
        },
    )

"""A zoo of real PEFT LoRA adapters for the tiny BERT, imported into a bank, and a toy target one of them solves.

The zoo is written from :data:`ZOO`: one PEFT ``LoraConfig`` per entry (ranks 2, 4 and 8; attention projections
``query``/``value`` or ``query``/``key``/``value``), built with ``peft.get_peft_model`` on the saved tiny BERT, given
random non-zero LoRA weights and saved with ``save_pretrained``; then every directory is imported with
``ExpertBank.import_peft``. ``import_peft`` refuses a trained ``modules_to_save`` classifier (it has no pituning
equivalent), so the imported experts carry no head, as zoo adapters usually do; tests that need stored heads add them.

The target is built so that one adapter is provably the right one: its labels are what a linear classifier reads
from the pooled features that adapter (:data:`RIGHT`) produces, on the sentences whose classifier margin is largest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pituning import ExpertModel
from pituning.bank import ExpertBank, TaskInfo
from pituning.heads import TaskModel

peft = pytest.importorskip("peft")

#: The zoo: name -> (rank, target modules). 21 adapters.
ZOO: dict[str, tuple[int, tuple[str, ...]]] = {
    f"zoo{i:02d}": ((2, 4, 8)[i % 3], ("query", "value") if i % 2 == 0 else ("query", "key", "value"))
    for i in range(21)
}
#: The adapter whose features generate the target's labels.
RIGHT = "zoo07"
#: A probe for ``fisher_at_source``: the layout of ``zoo00``, ``zoo06``, ``zoo12`` and ``zoo18`` (r=2, query/value).
PROBE = "probe"
PROBE_LAYOUT = (2, ("query", "value"))
FIRST_WORD, LAST_WORD = 5, 53  # token ids of the tokenizer's plain words


@dataclass
class Zoo:
    """The imported zoo and the toy target."""

    backbone: str
    """The tiny BERT's directory."""
    bank: ExpertBank
    """Every zoo adapter (no heads) and the probe."""
    names: list[str]
    """The zoo adapters' entries."""
    right: str
    """The adapter the target's labels come from."""
    shots: list[dict[str, Tensor]]
    """The target's labelled shots (two batches)."""
    head: dict[str, Tensor] = field(default_factory=dict)
    """The linear head (raw features) that labels the shots through ``right``: the target's true head."""
    layouts: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=lambda: dict(ZOO))
    """Each adapter's rank and target modules."""
    probe: str = PROBE
    """A probe entry (not in ``names``) for ``fisher_at_source``."""
    probe_layout: tuple[int, tuple[str, ...]] = PROBE_LAYOUT
    """The probe's rank and target modules."""


def sentences(n: int, seed: int, length: int = 10) -> dict[str, Tensor]:
    """``n`` random sentences of plain words."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, LAST_WORD, (n, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def features(model: ExpertModel, inputs: Mapping[str, Tensor]) -> Tensor:
    """The pooled features a classification head reads, with the model's active experts."""
    task = TaskModel(model, "classification", 2).eval()
    with torch.no_grad():
        return task.text_features(inputs["input_ids"], inputs["attention_mask"])


def label_by_head(
    feats: Tensor, inputs: Mapping[str, Tensor], n: int, seed: int, batches: int = 2
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Shots labelled by a random linear head over ``feats``: the ``n / 2`` sentences it scores highest are class 1,
    the ``n / 2`` lowest class 0 (a clear margin). Returns the shots, interleaved and split into ``batches``, and the
    head as a 2-class ``nn.Linear`` state over the raw features (class 1 minus class 0 logit = the score)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = feats.mean(0), feats.std(0)
    w = torch.randn(feats.shape[1], generator=gen) / std
    score = (feats - mean) @ w
    order = torch.argsort(score)
    low, high = order[: n // 2], order[-(n // 2) :]
    picked = torch.stack([low, high], dim=1).reshape(-1)  # alternate classes
    labels = torch.arange(n) % 2
    threshold = (score[low].max() + score[high].min()) / 2
    head = {
        "weight": torch.stack([torch.zeros_like(w), w]) * 4.0 / (score[high].min() - threshold),
        "bias": torch.stack([torch.zeros(()), -(mean @ w) - threshold]) * 4.0 / (score[high].min() - threshold),
    }
    shots = []
    for part in torch.arange(n).chunk(batches):
        rows = picked[part]
        shots.append({**{k: v[rows] for k, v in inputs.items()}, "labels": labels[part]})
    return shots, head


def _write_adapter(backbone: str, out: Path, rank: int, targets: tuple[str, ...], seed: int) -> Path:
    from transformers import BertModel

    base = BertModel.from_pretrained(backbone)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.4)
    model.save_pretrained(out)
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The tensors here are tiny: one thread is faster than several competing for a loaded machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test on one thread (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def zoo(tiny_backbone: str, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """21 PEFT LoRA adapters imported into a bank, a probe, and a target that :data:`RIGHT` solves."""
    with one_thread():
        return _build_zoo(tiny_backbone, tmp_path_factory.mktemp("zoo"))


def _build_zoo(tiny_backbone: str, root: Path) -> Zoo:
    bank = ExpertBank(root / "bank")
    model = ExpertModel(tiny_backbone).eval()
    for i, (name, (rank, targets)) in enumerate(ZOO.items()):
        adapter = _write_adapter(tiny_backbone, root / "adapters" / name, rank, targets, seed=100 + i)
        bank.import_peft(adapter, model, name, TaskInfo(f"zoo/{name}", label_names=["0", "1"]))
    probe = _write_adapter(tiny_backbone, root / "adapters" / PROBE, *PROBE_LAYOUT, seed=999)
    bank.import_peft(probe, model, PROBE, TaskInfo("probe"))
    pool = sentences(80, seed=1)
    bank.load_into(model, RIGHT)
    shots, head = label_by_head(features(model, pool), pool, 40, seed=2)
    model.remove_expert(RIGHT)
    return Zoo(tiny_backbone, bank, list(ZOO), RIGHT, shots, head)


@pytest.fixture
def shots_for() -> Callable[..., tuple[list[dict[str, Tensor]], dict[str, Tensor]]]:
    """``shots_for(model, n, seed)``: shots labelled by a random linear head over the model's current features, and
    that head (see :func:`label_by_head`)."""

    def make(model: ExpertModel, n: int = 32, seed: int = 0) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        pool = sentences(200, seed=seed + 10)
        return label_by_head(features(model, pool), pool, n, seed)

    return make

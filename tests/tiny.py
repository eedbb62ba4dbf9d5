"""A tiny BERT with a word-level tokenizer saved to a directory, and synthetic keyword tasks as jsonl files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

WORDS = [f"w{i}" for i in range(48)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EXTRA = ["neg", "pos", "yes", "no"]  # label words, for text-to-text targets


def tiny_tokenizer() -> Any:
    """A whitespace word-level tokenizer over the special tokens, ``WORDS`` and ``EXTRA``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + EXTRA)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]",
    )  # fmt: skip


def tiny_model_dir(path: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny T5 (``seq2seq-lm``) or CLIP with the word-level tokenizer, saved to ``path``."""
    import transformers as T

    torch.manual_seed(seed)
    vocab = len(SPECIAL) + len(WORDS) + len(EXTRA)
    if kind == "t5":
        config = T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)  # fmt: skip
        T.T5ForConditionalGeneration(config).save_pretrained(path)
    elif kind == "clip":
        config = T.CLIPConfig(
            text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0,
                         "bos_token_id": 2, "eos_token_id": 3},
            vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4},
            projection_dim=16,
        )  # fmt: skip
        T.CLIPModel(config).save_pretrained(path)
    else:
        raise KeyError(kind)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_bert_dir(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, domain_shift: float = 0.1) -> Path:
    """Save a randomly initialised tiny BERT and a whitespace word-level tokenizer to ``path``.

    The words of domain ``d`` (see :func:`domain`) get ``domain_shift`` added to embedding dimensions
    ``[8d, 8d + 8)``: like a pretrained model, the backbone then represents each domain along its own features.
    """
    from transformers import BertConfig, BertModel

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + EXTRA)}
    fast = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = BertModel(config)
    with torch.no_grad():
        for index, word in enumerate(WORDS):
            d = index // 16
            if 8 * (d + 1) <= hidden:
                model.embeddings.word_embeddings.weight[vocab[word], 8 * d : 8 * (d + 1)] += domain_shift
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def keyword_task(
    path: Path,
    keywords: tuple[list[str], list[str]],
    n: int,
    *,
    seed: int,
    length: int = 8,
    vocabulary: list[str] | None = None,
) -> Path:
    """A binary task: a sentence of filler words (from ``vocabulary``, a domain) with one keyword of its label."""
    rng = random.Random(seed)
    used = set(keywords[0]) | set(keywords[1])
    filler = [w for w in (vocabulary or WORDS) if w not in used]
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(filler, k=length - 1)
        words.insert(rng.randrange(length), rng.choice(keywords[label]))
        rows.append({"text": " ".join(words), "label": ["neg", "pos"][label]})
    rng.shuffle(rows)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def domain(index: int, size: int = 16) -> list[str]:
    """The words of domain ``index`` (``size`` consecutive words)."""
    return WORDS[index * size : (index + 1) * size]


def trainer(**kwargs: Any) -> Any:
    import lightning.pytorch as pl

    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def text_data(path: str, backbone: str, name: str, **kwargs: Any) -> Any:
    from pituning.data import TextClassificationDataModule

    options: dict[str, Any] = {"batch_size": 32, "max_length": 16}
    return TextClassificationDataModule(path, backbone, name, **{**options, **kwargs})


def task_keywords(index: int) -> tuple[list[str], list[str]]:
    """The keywords of domain ``index``: two per label."""
    words = domain(index)
    return words[:2], words[2:4]


def tiny_suite(backbone: str, tasks: dict[str, str], output: Path, **fields: Any) -> dict[str, Any]:
    """A ``pituning run`` suite on the tiny BERT: sources ``close`` and ``far1``, the ``target`` at 8 shots per class,
    one seed (1: the module and DataModule seeds then differ, and their hparams must not clash), CPU; ``fields``
    override any of it."""
    suite: dict[str, Any] = {
        "backbone": backbone,
        "data_class": "pituning.data.TextClassificationDataModule",
        "data": {"tokenizer": backbone, "max_length": 16, "batch_size": 16, "max_train_examples": 96},
        "sources": [{"name": n, "dataset": tasks[n]} for n in ("close", "far1")],
        "targets": [{"name": "target", "dataset": tasks["target"]}],
        "expert": {"kind": "lora", "r": 4, "alpha": 8},
        "k": 2,
        "shots": 8,
        "seeds": [1],
        "output": str(output),
        "source_epochs": 1,
        "target_epochs": 1,
        "accelerator": "cpu",
    }
    return {**suite, **fields}

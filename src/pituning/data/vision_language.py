"""Vision-language DataModule: image + text pair classification and contrastive image-text matching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.data.base import DataError, TaskDataModule, load_table, pad_collate
from pituning.data.vision import keep_classes, read_npz, to_pixels

__all__ = ["VisionLanguageDataModule"]

MODES = ("pair", "matching")


class VisionLanguageDataModule(TaskDataModule):
    """Image + text tasks from a table (csv / jsonl / parquet file, split files or a dataset name) or a ``.npz`` file.

    Tables serve both modes; a ``.npz`` file (images and labels, no texts) serves ``matching``.

    Modes:
        ``pair``: each row has an image, a text and a label (match / no-match, or an answer class for VQA as
            classification); batches carry ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels``.
        ``matching``: each row has an image and its label; the texts to match against are the class captions
            (``caption_template`` filled with each label name); batches carry ``pixel_values`` and ``labels``, and
            :meth:`candidates` gives the tokenised captions for the task model.

    Args:
        dataset: the table (image paths relative to its folder, or absolute); ``matching`` mode also reads a ``.npz``
            file with arrays ``images`` ``(N, H, W[, C])``, ``labels`` and ``label_names`` (as
            :class:`~pituning.data.ImageClassificationDataModule` does), whose class names fill the captions.
        tokenizer: tokenizer name or directory (the text tower's; a ``dual:<image>+<text>`` backbone name means its
            text tower's).
        task_name: the task's name in the bank.
        mode: ``pair`` or ``matching``.
        image_column: column with the image path (or image).
        text_column: column with the text (``pair`` mode).
        label_column: column with the label.
        caption_template: ``matching`` captions, e.g. ``"a photo of {}"``.
        classes: keep only these labels (class-subset tasks), in this order: the label order and, in ``matching``
            mode, the captions.
        image_size: side of the square model input.
        mean: per-channel mean of the image normalisation.
        std: per-channel standard deviation of the image normalisation.
        max_length: text tokens.
        **kwargs: :class:`~pituning.data.base.TaskDataModule` options.
    """

    modality = "vision-language"

    def __init__(
        self,
        dataset: str,
        tokenizer: str,
        task_name: str,
        *,
        mode: str = "pair",
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "label",
        caption_template: str = "{}",
        classes: Sequence[str] | None = None,
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        max_length: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(task_name=task_name, **kwargs)
        if mode not in MODES:
            raise DataError(f"VisionLanguageDataModule mode must be one of {list(MODES)}, got {mode!r}.")
        if mode == "pair" and Path(dataset).suffix == ".npz":
            raise DataError(
                f"{dataset}: a .npz file holds images and labels but no texts, so it serves mode='matching' only (the "
                f"captions come from its label names); mode='pair' reads a table with a {text_column!r} column."
            )
        self.save_hyperparameters()
        self.source = dataset
        self.tokenizer_name = tokenizer
        self.mode = mode
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.caption_template = caption_template
        self.classes = [str(c) for c in classes] if classes is not None else None
        if self.classes and not self.label_names:
            self.label_names = list(self.classes)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = max_length

    def read(self) -> dict[str, tuple[list[Any], list[Any]]]:
        path = Path(self.source)
        if path.suffix == ".npz":  # matching only: an image and its label per example
            arrays = read_npz(path)
            return keep_classes({s: ([(x, None) for x in xs], ys) for s, (xs, ys) in arrays.items()}, self.classes)
        tables = load_table(self.source, encoding=self.encoding)
        base = path.parent if path.is_file() else path
        out = {}
        for split, table in tables.items():
            images = [
                str(base / p) if isinstance(p, str) and not Path(p).is_absolute() else p
                for p in table[self.image_column]
            ]
            texts = list(table[self.text_column]) if self.mode == "pair" else [None] * len(images)
            out[split] = (list(zip(images, texts, strict=True)), list(table[self.label_column]))
        return keep_classes(out, self.classes)

    def encode(self, record: Any, label: int) -> dict[str, Tensor]:
        image, text = record
        if isinstance(image, str):
            from PIL import Image

            with Image.open(image) as img:
                image = img.convert("RGB")
        item = {"pixel_values": to_pixels(image, self.image_size, self.mean, self.std), "labels": torch.tensor(label)}
        if self.mode == "pair":
            enc = self.tokenizer(text, truncation=True, max_length=self.max_length)
            item["input_ids"] = torch.tensor(enc["input_ids"])
            item["attention_mask"] = torch.tensor(enc["attention_mask"])
        return item

    def candidates(self) -> dict[str, Tensor]:
        """``matching``: the tokenised class captions ``{"input_ids", "attention_mask"}`` ``(C, T)``, label order."""
        self.setup()
        captions = [self.caption_template.format(name) for name in self.label_names]
        items = []
        for caption in captions:
            enc = self.tokenizer(caption, truncation=True, max_length=self.max_length)
            items.append(
                {"input_ids": torch.tensor(enc["input_ids"]), "attention_mask": torch.tensor(enc["attention_mask"])}
            )
        return pad_collate(items, self._pad_ids)

"""Vision-language DataModule: image + text pair classification and contrastive image-text matching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.data.base import DataError, TaskDataModule, load_table, pad_collate
from pituning.data.vision import to_pixels

__all__ = ["VisionLanguageDataModule"]

MODES = ("pair", "matching")


class VisionLanguageDataModule(TaskDataModule):
    """Image + text tasks from a csv / jsonl / parquet file (or directory of split files, or a dataset name).

    Modes:
        ``pair``: each row has an image, a text and a label (match / no-match, or an answer class for VQA as
            classification); batches carry ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels``.
        ``matching``: each row has an image and its label; the texts to match against are the class captions
            (``caption_template`` filled with each label name); batches carry ``pixel_values`` and ``labels``, and
            :meth:`candidates` gives the tokenised captions for the task model.

    Args:
        dataset: the table (image paths relative to its folder, or absolute).
        tokenizer: tokenizer name or directory (the text tower's).
        task_name: the task's name in the bank.
        mode: ``pair`` or ``matching``.
        image_column: column with the image path (or image).
        text_column: column with the text (``pair`` mode).
        label_column: column with the label.
        caption_template: ``matching`` captions, e.g. ``"a photo of {}"``.
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
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        max_length: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(task_name=task_name, **kwargs)
        if mode not in MODES:
            raise DataError(f"VisionLanguageDataModule mode must be one of {list(MODES)}, got {mode!r}.")
        self.save_hyperparameters()
        self.source = dataset
        self.tokenizer_name = tokenizer
        self.mode = mode
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.caption_template = caption_template
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = max_length

    def read(self) -> dict[str, tuple[list[Any], list[Any]]]:
        tables = load_table(self.source)
        path = Path(self.source)
        base = path.parent if path.is_file() else path
        out = {}
        for split, table in tables.items():
            images = [
                str(base / p) if isinstance(p, str) and not Path(p).is_absolute() else p
                for p in table[self.image_column]
            ]
            texts = list(table[self.text_column]) if self.mode == "pair" else [None] * len(images)
            out[split] = (list(zip(images, texts, strict=True)), list(table[self.label_column]))
        return out

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

"""Text classification (and text-to-text for T5) DataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pituning.data.base import DataError, TaskDataModule, load_table

__all__ = ["TextClassificationDataModule"]


class TextClassificationDataModule(TaskDataModule):
    """Text (or text pair) classification from a Hugging Face dataset or local csv / jsonl / parquet files.

    Args:
        dataset: a file, a directory of ``train`` / ``validation`` / ``test`` files, or a dataset name.
        tokenizer: tokenizer name or directory (usually the backbone's).
        task_name: the task's name in the bank.
        text_column: column with the text.
        label_column: column with the label (strings or integers).
        text_pair_column: optional second text (sentence-pair tasks).
        max_length: tokens per example (truncation).
        text_to_text: encode labels as target text (``label_names``) for encoder-decoder backbones (T5); batches
            then carry ``decoder_input_ids`` and token ``labels``.
        dataset_config: the Hugging Face dataset config name, if any.
        **kwargs: :class:`~pituning.data.base.TaskDataModule` options (``shots``, ``seed``, splits,
            batch sizes, ``label_names``).
    """

    modality = "text"

    def __init__(
        self,
        dataset: str,
        tokenizer: str,
        task_name: str,
        *,
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: str | None = None,
        max_length: int = 128,
        text_to_text: bool = False,
        dataset_config: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task_name=task_name, **kwargs)
        self.save_hyperparameters()
        self.source = dataset
        self.tokenizer_name = tokenizer
        self.text_column = text_column
        self.label_column = label_column
        self.text_pair_column = text_pair_column
        self.max_length = max_length
        self.text_to_text = text_to_text
        self.dataset_config = dataset_config
        self._targets: dict[int, Tensor] = {}

    def read(self) -> dict[str, tuple[list[Any], list[Any]]]:
        options = {"name": self.dataset_config} if self.dataset_config else {}
        tables = load_table(self.source, encoding=self.encoding, **options)
        out = {}
        for split, table in tables.items():
            columns = set(table.column_names)
            needed = {self.text_column, self.label_column} | (
                {self.text_pair_column} if self.text_pair_column else set()
            )
            missing = needed - columns
            if missing:
                raise DataError(
                    f"Task {self.task_name!r}: split {split!r} lacks column(s) {sorted(missing)}; columns are "
                    f"{sorted(columns)}. Set text_column / label_column."
                )
            texts: list[Any] = list(table[self.text_column])
            if self.text_pair_column:
                texts = list(zip(texts, table[self.text_pair_column], strict=True))
            labels = table[self.label_column]
            feature = table.features.get(self.label_column)
            if type(feature).__name__ == "Json":  # datasets' type for a JSON column of mixed types ("1" and 1)
                raise DataError(
                    f"Task {self.task_name!r}: the labels in column {self.label_column!r} mix types (strings and "
                    'numbers, such as "1" and 1, which would be read as one class); give the label column one type '
                    "in every row."
                )
            names = getattr(feature, "names", None)
            if names and not self.label_names:
                self.label_names = list(names)
            out[split] = (texts, [names[y] if names else y for y in labels])
        return out

    def encode(self, record: Any, label: int) -> dict[str, Tensor]:
        tok = self.tokenizer
        pair = record if isinstance(record, tuple) else (record,)
        enc = tok(*pair, truncation=True, max_length=self.max_length)
        item = {
            "input_ids": torch.tensor(enc["input_ids"]),
            "attention_mask": torch.tensor(enc["attention_mask"]),
        }
        if self.text_to_text:
            target = self.target_ids(label)
            start = int(getattr(tok, "pad_token_id", 0) or 0)
            item["decoder_input_ids"] = torch.cat([torch.tensor([start]), target[:-1]])
            item["labels"] = target
        else:
            item["labels"] = torch.tensor(label)
        return item

    def target_ids(self, label: int) -> Tensor:
        """Token ids of the target text of ``label`` (text-to-text), ending with the end-of-sequence token."""
        if label not in self._targets:
            ids = self.tokenizer(self.label_names[label], truncation=True, max_length=16)["input_ids"]
            self._targets[label] = torch.tensor(ids)
        return self._targets[label]

    def class_targets(self) -> Sequence[Tensor]:
        """Target ids of every class, in label order."""
        return [self.target_ids(i) for i in range(self.num_classes)]

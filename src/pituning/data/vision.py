"""Image classification DataModule (Hugging Face datasets, image folders, ``.npz`` arrays)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pituning.data.base import DataError, TaskDataModule, load_table

__all__ = ["ImageClassificationDataModule", "keep_classes", "read_npz", "to_pixels"]


def to_pixels(
    image: Any, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
) -> Tensor:
    """A PIL image, ``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)`` array or tensor -> normalised ``(3, size, size)`` float.

    Integer inputs are scaled to [0, 1]; grey images are repeated to 3 channels; resizing is bilinear with
    antialiasing. The default normalisation ``(x - 0.5) / 0.5`` is EfficientNet-Lite's.
    """
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    x = torch.as_tensor(np.array(image))  # a copy: arrays from datasets or npz may be read-only
    if x.dtype == torch.uint8 or not x.is_floating_point():
        x = x.float() / 255.0
    if x.dim() == 2:
        x = x[None]
    elif x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
        x = x.permute(2, 0, 1)
    x = x[:3]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean_t = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - mean_t) / std_t


_Parts = dict[str, tuple[list[Any], list[Any]]]
"""``{split: (records, raw labels)}``, what :meth:`~pituning.data.base.TaskDataModule.read` returns."""


def read_npz(path: str | Path) -> _Parts:
    """The ``train`` split of a ``.npz`` file: arrays ``images`` ``(N, H, W[, C])`` and ``labels`` (integers); with an
    array ``label_names`` the labels index those names and the split carries the names. Read without pickle.

    Raises:
        DataError: ``images`` or ``labels`` is missing.
    """
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data or "labels" not in data:
            raise DataError(f"{path} must hold arrays 'images' and 'labels' (found {sorted(data.files)}).")
        images, labels = data["images"], data["labels"]
        if "label_names" in data:  # integer labels indexing stored class names
            names = [str(n) for n in data["label_names"]]
            return {"train": (list(images), [names[int(y)] for y in labels])}
    return {"train": (list(images), [int(y) for y in labels])}


def keep_classes(parts: _Parts, classes: Sequence[str] | None) -> _Parts:
    """Keep the examples whose label (compared as a string) is in ``classes`` (class-subset tasks); all if ``None``."""
    if classes is None:
        return parts
    keep = {str(c) for c in classes}
    return {
        split: ([r for r, y in zip(rs, ys, strict=True) if str(y) in keep], [y for y in ys if str(y) in keep])
        for split, (rs, ys) in parts.items()
    }


class ImageClassificationDataModule(TaskDataModule):
    """Image classification.

    Args:
        dataset: a ``.npz`` file (arrays ``images`` ``(N, H, W[, C])`` and ``labels``; optional ``label_names``), an
            image folder (``<class>/<image>``, read with ``datasets``' imagefolder builder), a csv / jsonl / parquet
            file with an image-path column, or a Hugging Face dataset name.
        task_name: the task's name in the bank.
        image_size: side of the square model input.
        mean: per-channel mean of the normalisation (default EfficientNet-Lite's ``(x - 0.5) / 0.5``).
        std: per-channel standard deviation of the normalisation.
        image_column: image column of tabular or Hugging Face sources.
        label_column: label column of tabular or Hugging Face sources.
        classes: keep only these labels (class-subset tasks), in this order.
        transform: optional callable applied to the normalised ``(3, S, S)`` tensor (augmentation).
        **kwargs: :class:`~pituning.data.base.TaskDataModule` options.
    """

    modality = "vision"

    def __init__(
        self,
        dataset: str,
        task_name: str,
        *,
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        image_column: str = "image",
        label_column: str = "label",
        classes: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task_name=task_name, **kwargs)
        self.save_hyperparameters(ignore=["transform"])
        self.source = dataset
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_column = image_column
        self.label_column = label_column
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.transform = transform
        if self.classes and not self.label_names:
            self.label_names = list(self.classes)

    def read(self) -> _Parts:
        path = Path(self.source)
        if path.suffix == ".npz":
            return keep_classes(read_npz(path), self.classes)
        if path.is_dir() and not any(p.suffix in (".csv", ".jsonl", ".parquet") for p in path.iterdir()):
            import datasets

            tables = dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
        else:
            tables = load_table(self.source, encoding=self.encoding)
        out = {}
        for split, table in tables.items():
            feature = table.features.get(self.label_column)
            names = getattr(feature, "names", None)
            labels = [names[y] if names else y for y in table[self.label_column]]
            images = list(table[self.image_column])
            if images and isinstance(images[0], str):
                base = path.parent if path.is_file() else path
                images = [str(base / p) if not Path(p).is_absolute() else p for p in images]
            out[split] = (images, labels)
        return keep_classes(out, self.classes)

    def encode(self, record: Any, label: int) -> dict[str, Tensor]:
        if isinstance(record, str):
            from PIL import Image

            with Image.open(record) as img:
                record = img.convert("RGB")
        pixels = to_pixels(record, self.image_size, self.mean, self.std)
        if self.transform is not None:
            pixels = self.transform(pixels)
        return {"pixel_values": pixels, "labels": torch.tensor(label)}

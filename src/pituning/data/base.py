"""Shared DataModule machinery: reading tables, deterministic splits, k-shot sampling, collation.

Every DataModule reads a Hugging Face dataset name (``datasets.load_dataset``) or local files (csv / jsonl / json /
parquet, and per modality image folders or ``.npz`` arrays), splits it deterministically, optionally keeps
``shots`` training examples per class (seeded), and reports the task's metadata for the bank.
"""

from __future__ import annotations

import numbers
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pituning.errors import ConfigError, PiTuningError
from pituning.tasks import TaskInfo

__all__ = ["DataError", "ListDataset", "TaskDataModule", "check_text_file", "load_table", "pad_collate"]

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(PiTuningError):
    """A dataset is missing, empty, single-class, or too small for the requested shots."""


def check_text_file(path: str | Path, encoding: str = "utf-8") -> None:
    """Raise a :class:`DataError` naming the line and the fix if the text file ``path`` does not decode with
    ``encoding`` (read in 1 MiB chunks)."""
    import codecs

    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError as err:
        raise ConfigError(f"Unknown encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1.") from err
    line = 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise DataError(
                    f"Data file {str(path)!r} is not valid {encoding} (line {line}: {err.reason}, byte "
                    f"{chunk[err.start : err.start + 1]!r}). Pass its encoding as the DataModule's encoding option "
                    "(data: {encoding: latin-1}, for example), or save the file as UTF-8."
                ) from err
            if not chunk:
                return
            line += chunk.count(b"\n")


def load_table(
    source: str, split_names: Sequence[str] = ("train", "validation", "test"), encoding: str = "utf-8", **kwargs: Any
) -> dict[str, Any]:
    """Load ``source`` into ``{split: datasets.Dataset}``.

    ``source`` is a local file (csv, tsv, jsonl, json, parquet), a directory holding ``train.*`` / ``validation.*``
    / ``test.*`` files of one of those types, or a Hugging Face dataset name (``load_dataset``; offline it must be in
    the local cache). Local text files are read with ``encoding`` (checked first: a file that does not decode is a
    :class:`DataError` naming the line); a file without rows (empty, or a header alone) is a :class:`DataError` too.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"Unsupported data file {source!r}; use csv, tsv, jsonl, json or parquet.")
        if path.suffix.lower() == ".tsv":
            kwargs.setdefault("delimiter", "\t")
        if path.stat().st_size == 0:
            raise DataError(f"Data file {source!r} is empty.")
        builder_args: tuple[Any, ...] = (builder,)
        files = {"train": str(path)}
    elif path.is_dir() and any(p.stem in split_names and p.suffix.lower() in _FILE_BUILDERS for p in path.iterdir()):
        files = {p.stem: str(p) for p in sorted(path.iterdir()) if p.stem in split_names}
        builder_args = (_FILE_BUILDERS[Path(next(iter(files.values()))).suffix.lower()],)
    else:
        builder_args, files = (source,), {}
    if files:
        kwargs = {"data_files": files, **kwargs}
        if builder_args[0] != "parquet":
            for file in files.values():
                check_text_file(file, encoding)
            kwargs.setdefault("encoding", encoding)
    try:
        loaded = dict(datasets.load_dataset(*builder_args, **kwargs))
    except Exception as err:
        if files and "corresponds to no data" in str(err):  # a CSV with its header alone, a JSON with no records
            raise DataError(
                f"Data file(s) {sorted(files.values())} hold no examples (a header alone?); add rows, one example "
                "per line."
            ) from err
        raise DataError(
            f"Could not load dataset {source!r} ({type(err).__name__}: {err}). Pass an existing local file or "
            "directory, or a dataset name available offline in the Hugging Face cache."
        ) from err
    empty = sorted(split for split, table in loaded.items() if len(table) == 0)
    if files and empty:
        raise DataError(f"Data file(s) of split(s) {empty} in {source!r} hold no examples (a header alone?); add rows.")
    return loaded


def pad_collate(items: Sequence[Mapping[str, Tensor]], pad_ids: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """Stack items; 1-D integer sequences of different lengths are right-padded (``input_ids`` with the pad id,
    ``attention_mask`` with 0, token ``labels`` with -100)."""
    pad_ids = dict(pad_ids or {})
    out: dict[str, Tensor] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if values[0].dim() == 1 and len({v.shape[0] for v in values}) > 1:
            pad = pad_ids.get(key, -100 if key == "labels" else 0)
            out[key] = torch.nn.utils.rnn.pad_sequence(list(values), batch_first=True, padding_value=pad)
        else:
            out[key] = torch.stack(list(values))
    return out


class ListDataset(Dataset[dict[str, Tensor]]):
    """Items built on access by ``make(i)``."""

    def __init__(self, size: int, make: Callable[[int], dict[str, Tensor]]) -> None:
        self.size = size
        self.make = make

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.make(index)


class TaskDataModule(pl.LightningDataModule):
    """Base of the modality DataModules: splits, k-shot sampling, loaders and task metadata.

    Subclasses implement :meth:`read` (returning ``{split: (records, labels)}``) and :meth:`encode` (one record to a
    dict of tensors).

    Args:
        task_name: the task's name in the bank.
        shots: keep this many training examples per class (k-shot, sampled with ``seed``); ``None`` keeps the full
            training split. The same name as the suite's ``shots`` and the bank's ``TaskInfo.shots``.
        holdout_shots: of each class's shots, hold this many out as the validation split (early stopping or
            interpolation weights learned on data the experts did not train on, without using more labels than the
            k shots); ``0`` keeps the validation split carved from the full training data.
        seed: seed of the k-shot sample, of the ``max_train_examples`` cap and of the training loader's shuffling.
        split_seed: seed of the validation / test examples held out when the data has no such split, and of the
            ``max_eval_examples`` cap; fixed per task, whatever ``seed``.
        val_fraction: share of the training data held out for validation when there is no ``validation`` split.
        test_fraction: share of the training data held out for testing when there is no ``test`` split.
        max_train_examples: cap the training split (full-data tasks; ignored with ``shots``).
        max_eval_examples: cap the validation and the test split.
        batch_size: training batch size.
        eval_batch_size: validation, test and embedding batch size (default ``batch_size``).
        num_workers: DataLoader worker processes.
        label_names: class names in label order (default: the labels found in the data, sorted: integers
            numerically, then names alphabetically). With integer labels, ``label_names[i]`` names label ``i``.
            A label column mixing strings and numbers (``"1"`` and ``1``) is refused.
        unseen_classes: label names whose examples never reach the training or validation split: they stay
            classes (a matching task's candidate captions, a head's outputs) and are tested, but no method sees one
            of their images or texts in training (open-vocabulary evaluation).
        encoding: text encoding of local csv / tsv / jsonl / json files (``latin-1``, ``cp1252`` ...); a file that
            does not decode with it is an error naming the line.
        shots_per_class: deprecated spelling of ``shots`` (a :class:`DeprecationWarning`; removed in the next
            release).
    """

    modality = "other"

    @property
    def hparams_initial(self) -> Any:
        """The DataModule's options as loggers record them, each under ``data/`` (so a DataModule option never clashes
        with a LightningModule's of the same name, such as a matching task's ``mode`` beside interpolation's)."""
        from lightning.fabric.utilities.data import AttributeDict

        return AttributeDict({f"data/{k}": v for k, v in super().hparams_initial.items()})

    def __init__(
        self,
        *,
        task_name: str,
        shots: int | None = None,
        holdout_shots: int = 0,
        seed: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        label_names: Sequence[str] | None = None,
        unseen_classes: Sequence[str] = (),
        encoding: str = "utf-8",
        shots_per_class: int | None = None,
    ) -> None:
        super().__init__()
        if shots_per_class is not None:
            if shots is not None:
                raise ConfigError(
                    f"shots={shots} and shots_per_class={shots_per_class} are given; pass only shots (the number of "
                    "training examples per class; shots_per_class is its deprecated spelling)."
                )
            warnings.warn(
                "shots_per_class is deprecated and will be removed in the next release; pass shots (the same number: "
                "training examples per class).",
                DeprecationWarning,
                stacklevel=3,  # the caller of the modality DataModule
            )
            shots = shots_per_class
        if shots is not None and shots < 1:
            raise ConfigError(f"shots must be >= 1 or None (full data), got {shots}.")
        for option, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{option} must be in [0, 1), got {value}.")
        self.task_name = task_name
        if holdout_shots < 0 or (holdout_shots and (shots is None or holdout_shots >= shots)):
            raise ConfigError(
                f"holdout_shots={holdout_shots} must be 0, or below shots={shots} (it holds out part of each class's "
                "shots as the validation split)."
            )
        self.shots = shots
        self.holdout_shots = holdout_shots
        self.seed = seed
        self.split_seed = split_seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.encoding = encoding
        self.label_names: list[str] = list(label_names or [])
        self.unseen_classes = [str(c) for c in unseen_classes]
        self.splits: dict[str, tuple[list[Any], list[int]]] = {}
        self._pad_ids: dict[str, int] = {}
        self.tokenizer_name: str | None = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer named by ``tokenizer_name`` (loaded once)."""
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise ConfigError(f"{type(self).__name__} has no tokenizer; pass tokenizer=... (the backbone's).")
            self._tokenizer = self.load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def load_tokenizer(self, name: str) -> Any:
        """The tokenizer ``name`` (``pkg:<module>`` resolved; a ``dual:<image>+<text>`` backbone name means its text
        tower's); sets the pad ids used by :func:`pad_collate`."""
        from transformers import AutoTokenizer

        from pituning.backbones import dual_specs, hub_load_error, pretrained_path, resolve_model_path

        if name.startswith("dual:"):
            name = dual_specs(name)[1]
        path = pretrained_path(resolve_model_path(name), "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise DataError(hub_load_error(name, "tokenizer", err)) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._pad_ids = {"input_ids": int(tokenizer.pad_token_id), "attention_mask": 0}
        return tokenizer

    # ------------------------------------------------------------------ to implement
    def read(self) -> dict[str, tuple[list[Any], list[Any]]]:
        """``{split: (records, raw labels)}`` with at least ``train``."""
        raise NotImplementedError

    def encode(self, record: Any, label: int) -> dict[str, Tensor]:
        """One example as tensors (``labels`` included)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.read()
        if "train" not in raw or not raw["train"][0]:
            raise DataError(f"Task {self.task_name!r}: the training split is empty.")
        values = [y for part in raw.values() for y in part[1]]
        numeric = [isinstance(y, numbers.Number) and not isinstance(y, bool) for y in values]
        integral = all(isinstance(y, numbers.Integral) and not isinstance(y, bool) for y in values)
        if any(numeric) and any(isinstance(y, str) for y in values):
            both = sorted(
                {str(y) for y in values if isinstance(y, str)} & {str(y) for y in values if not isinstance(y, str)}
            )
            raise DataError(
                f"Task {self.task_name!r}: the labels mix strings and numbers"
                + (f" ({both[0]!r} and {both[0]}, which would be read as one class)" if both else "")
                + "; give the label column one type in every row."
            )
        labels_seen = sorted({str(y) for y in values}, key=_natural)
        if not self.label_names:
            self.label_names = labels_seen
        index = {name: i for i, name in enumerate(self.label_names)}
        if integral and not set(labels_seen) & set(index):  # integer labels, named by position
            outside = sorted({int(y) for y in values if not 0 <= y < len(self.label_names)})
            if outside:
                raise DataError(
                    f"Task {self.task_name!r}: integer labels {outside[:5]} have no name in label_names "
                    f"{self.label_names} (label i is named label_names[i]); give one name per class."
                )
            index = {str(i): i for i in range(len(self.label_names))}
        unknown = [y for y in labels_seen if y not in index]
        if unknown:
            raise DataError(f"Task {self.task_name!r}: labels {unknown[:5]} are not in label_names {self.label_names}.")
        parts = {s: (list(r), [index[str(y)] for y in ys]) for s, (r, ys) in raw.items()}
        if len({y for y in parts["train"][1]}) < 2:
            raise DataError(
                f"Task {self.task_name!r}: the training data has a single class ({self.label_names}); a classifier "
                "needs at least two."
            )
        rng = random.Random(self.split_seed)
        train = parts["train"]
        if "test" not in parts and self.test_fraction > 0:
            train, parts["test"] = _split(train, self.test_fraction, rng)
        if "validation" not in parts and self.val_fraction > 0:
            train, parts["validation"] = _split(train, self.val_fraction, rng)
        parts["train"] = train
        if self.unseen_classes:
            self._hide_unseen(parts, index)
        if self.shots is not None:
            held = {split: len(part[1]) for split, part in parts.items() if split != "train"}
            parts["train"] = self._k_shot(parts["train"], held)
            if self.holdout_shots:
                parts["train"], parts["validation"] = self._hold_out(parts["train"])
        elif self.max_train_examples is not None:
            parts["train"] = _cap(parts["train"], self.max_train_examples, random.Random(self.seed))
        if self.max_eval_examples is not None:
            for split in ("validation", "test"):
                if split in parts:
                    parts[split] = _cap(parts[split], self.max_eval_examples, random.Random(self.split_seed))
        self.splits = parts

    def _hide_unseen(self, parts: dict[str, tuple[list[Any], list[int]]], index: dict[str, int]) -> None:
        """Drop the ``unseen_classes`` from the training and validation splits (the test split keeps them)."""
        missing = [c for c in self.unseen_classes if c not in index]
        if missing:
            raise DataError(
                f"Task {self.task_name!r}: unseen_classes {missing[:5]} are not among its classes {self.label_names}; "
                "name classes of the task."
            )
        hidden = {index[c] for c in self.unseen_classes}
        for split in ("train", "validation"):
            if split in parts:
                records, labels = parts[split]
                keep = [i for i, y in enumerate(labels) if y not in hidden]
                parts[split] = ([records[i] for i in keep], [labels[i] for i in keep])
        if len(set(parts["train"][1])) < 1:
            raise DataError(
                f"Task {self.task_name!r}: every class is in unseen_classes; leave at least one class to train on."
            )

    def _k_shot(
        self, part: tuple[list[Any], list[int]], held: Mapping[str, int] | None = None
    ) -> tuple[list[Any], list[int]]:
        """``shots`` examples of each class (seeded); ``held``: the sizes of the splits held out of the
        training data, for the message when a class has too few."""
        assert self.shots is not None
        rng = random.Random(self.seed)
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(part[1]):
            by_class.setdefault(y, []).append(i)
        chosen: list[int] = []
        for y in sorted(by_class):
            pool = by_class[y]
            if len(pool) < self.shots:
                out = ", ".join(f"{n} for {split}" for split, n in sorted((held or {}).items()))
                raise DataError(
                    f"Task {self.task_name!r}: class {self.label_names[y]!r} has {len(pool)} training examples, fewer "
                    f"than shots={self.shots}"
                    + (f" (what remains after holding out {out})" if out else "")
                    + "; lower the shots or add data."
                )
            chosen += rng.sample(pool, self.shots)
        rng.shuffle(chosen)
        return [part[0][i] for i in chosen], [part[1][i] for i in chosen]

    def _hold_out(self, part: tuple[list[Any], list[int]]) -> tuple[tuple[list[Any], list[int]], ...]:
        """Split the k-shot sample: the first ``holdout_shots`` of each class become the validation split."""
        seen: dict[int, int] = {}
        train: tuple[list[Any], list[int]] = ([], [])
        held: tuple[list[Any], list[int]] = ([], [])
        for record, label in zip(*part, strict=True):
            seen[label] = seen.get(label, 0) + 1
            into = held if seen[label] <= self.holdout_shots else train
            into[0].append(record)
            into[1].append(label)
        return train, held

    @property
    def num_classes(self) -> int:
        """Number of classes (after :meth:`setup`)."""
        return len(self.label_names)

    def task_info(self) -> TaskInfo:
        """Task metadata for the bank (after :meth:`setup`)."""
        self.setup()
        return TaskInfo(
            name=self.task_name,
            modality=self.modality,
            label_names=list(self.label_names),
            num_examples=len(self.splits["train"][1]),
            shots=self.shots,
        )

    # ------------------------------------------------------------------ loaders
    def dataset(self, split: str) -> ListDataset:
        """The encoded examples of ``split``."""
        self.setup()
        if split not in self.splits:
            raise DataError(f"Task {self.task_name!r} has no {split!r} split (splits: {sorted(self.splits)}).")
        records, labels = self.splits[split]
        return ListDataset(len(records), lambda i: self.encode(records[i], labels[i]))

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=lambda items: pad_collate(items, self._pad_ids),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("validation" if "validation" in self.splits else "test", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("test", False, self.eval_batch_size)

    def embedding_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """The training split in a fixed order (what the Fisher pass reads)."""
        return self._loader("train", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """The embedding stage runs in Lightning's predict loop: the training split in a fixed order."""
        return self.embedding_dataloader()


def _natural(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


def _split(part: tuple[list[Any], list[int]], fraction: float, rng: random.Random) -> tuple[Any, Any]:
    order = list(range(len(part[1])))
    rng.shuffle(order)
    cut = max(1, round(len(order) * fraction)) if len(order) > 1 else 0
    held, kept = order[:cut], order[cut:]
    return ([part[0][i] for i in kept], [part[1][i] for i in kept]), (
        [part[0][i] for i in held],
        [part[1][i] for i in held],
    )


def _cap(part: tuple[list[Any], list[int]], limit: int, rng: random.Random) -> tuple[list[Any], list[int]]:
    if len(part[1]) <= limit:
        return part
    keep = sorted(rng.sample(range(len(part[1])), limit))
    return [part[0][i] for i in keep], [part[1][i] for i in keep]

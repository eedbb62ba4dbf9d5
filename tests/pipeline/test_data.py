"""DataModules: local files, splits, k-shot sampling, determinism, task metadata, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pituning.data import (
    DataError,
    ImageClassificationDataModule,
    TextClassificationDataModule,
    VisionLanguageDataModule,
    to_pixels,
)
from pituning.errors import ConfigError
from tiny import text_data


def test_text_splits_shots_and_metadata(tiny_backbone: str, tasks: dict[str, str]) -> None:
    full = text_data(tasks["target"], tiny_backbone, "t", test_fraction=0.2, val_fraction=0.1)
    full.setup()
    sizes = {k: len(v[1]) for k, v in full.splits.items()}
    assert sizes == {"train": 432, "validation": 48, "test": 120}
    shots = text_data(tasks["target"], tiny_backbone, "t", shots=16, seed=3)
    shots.setup()
    labels = shots.splits["train"][1]
    assert len(labels) == 32 and labels.count(0) == labels.count(1) == 16
    assert shots.splits["test"] == full.splits["test"]  # the test set does not depend on the shots' seed
    again = text_data(tasks["target"], tiny_backbone, "t", shots=16, seed=3)
    again.setup()
    assert again.splits["train"] == shots.splits["train"]
    other = text_data(tasks["target"], tiny_backbone, "t", shots=16, seed=4)
    other.setup()
    assert other.splits["train"] != shots.splits["train"]
    info = shots.task_info()
    assert (info.name, info.modality, info.label_names, info.num_examples, info.shots) == (
        "t",
        "text",
        ["neg", "pos"],
        32,
        16,
    )
    batch = next(iter(shots.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 32
    assert batch["input_ids"][:, 0].eq(2).all()  # [CLS] first: the backbone's tokenizer is used


def test_shots_per_class_is_the_deprecated_spelling_of_shots(tiny_backbone: str, tasks: dict[str, str]) -> None:
    new = TextClassificationDataModule(tasks["target"], tiny_backbone, "t", max_length=16, shots=8, seed=1)
    with pytest.warns(DeprecationWarning, match="shots_per_class is deprecated.*pass shots") as caught:
        old = TextClassificationDataModule(
            tasks["target"], tiny_backbone, "t", max_length=16, shots_per_class=8, seed=1
        )
    assert caught[0].filename == __file__  # the warning points at the caller
    new.setup()
    old.setup()
    assert old.shots == 8 and old.splits == new.splits
    with pytest.raises(ConfigError, match="pass only shots"):
        text_data(tasks["target"], tiny_backbone, "t", shots=8, shots_per_class=8)


def _write(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_text_errors(tiny_backbone: str, tmp_path: Path) -> None:
    single = _write(tmp_path / "one.jsonl", [{"text": "w1 w2", "label": "pos"}] * 20)
    with pytest.raises(DataError, match="single class"):
        text_data(single, tiny_backbone, "one").setup()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        text_data(str(tmp_path / "empty.jsonl"), tiny_backbone, "empty").setup()
    few = _write(tmp_path / "few.jsonl", [{"text": "w1", "label": i % 2} for i in range(12)])
    with pytest.raises(DataError, match="fewer than shots=16"):
        text_data(few, tiny_backbone, "few", shots=16).setup()
    with pytest.raises(DataError, match=r"lacks column\(s\) \['sentence'\]"):
        text_data(few, tiny_backbone, "few", text_column="sentence").setup()
    with pytest.raises(DataError, match="Could not load dataset 'no/such-dataset'"):
        text_data("no/such-dataset", tiny_backbone, "x").setup()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_in_another_encoding_is_named_and_read_with_the_encoding_option(
    suffix: str, tiny_backbone: str, tmp_path: Path
) -> None:
    rows = [(f"caf\xe9 w{i % 2} d\xe9j\xe0", i % 2) for i in range(40)]
    path = tmp_path / f"latin{suffix}"
    if suffix == ".csv":
        path.write_bytes(("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode("latin-1"))
    else:
        lines = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows)
        path.write_bytes(lines.encode("latin-1"))
    line = 2 if suffix == ".csv" else 1
    with pytest.raises(DataError, match=rf"is not valid utf-8 \(line {line}: .*data: \{{encoding: latin-1\}}"):
        text_data(str(path), tiny_backbone, "latin").setup()
    data = text_data(str(path), tiny_backbone, "latin", encoding="latin-1")
    data.setup()
    records = data.splits["train"][0] + data.splits["test"][0]
    assert any("café" in str(r) for r in records)  # decoded, not mangled
    with pytest.raises(Exception, match="Unknown encoding 'latin-99'"):
        text_data(str(path), tiny_backbone, "latin", encoding="latin-99").setup()


def test_integer_labels_take_names_and_mixed_label_types_are_refused(tiny_backbone: str, tmp_path: Path) -> None:
    rows = [{"text": f"w{i % 2} w3", "label": i % 2} for i in range(40)]
    named = text_data(_write(tmp_path / "ints.jsonl", rows), tiny_backbone, "ints", label_names=["neg", "pos"])
    named.setup()
    assert named.label_names == ["neg", "pos"] and named.task_info().label_names == ["neg", "pos"]
    records, labels = named.splits["train"]
    assert all(lab == int(rec.split()[0][1:]) for rec, lab in zip(records, labels, strict=True))  # 0 -> neg, 1 -> pos
    with pytest.raises(DataError, match=r"integer labels \[1\] have no name in label_names \['only'\]"):
        text_data(_write(tmp_path / "ints.jsonl", rows), tiny_backbone, "ints", label_names=["only"]).setup()
    mixed = [{"text": "w1", "label": "1"}, {"text": "w2", "label": 1}, {"text": "w3", "label": 0}] * 10
    with pytest.raises(DataError, match=r"mix types \(strings and numbers, such as \"1\" and 1, which would be read"):
        text_data(_write(tmp_path / "mixed.jsonl", mixed), tiny_backbone, "mixed").setup()


def test_a_datamodule_whose_read_mixes_label_types_is_refused() -> None:
    from pituning.data import TaskDataModule

    class Mixed(TaskDataModule):
        def read(self) -> dict[str, tuple[list[object], list[object]]]:
            return {"train": (list(range(30)), ["1", 1, 0] * 10)}

    with pytest.raises(DataError, match=r"the labels mix strings and numbers \('1' and 1, which would be read as one"):
        Mixed(task_name="mixed").setup()


def test_a_header_without_rows_is_named(tiny_backbone: str, tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"hold no examples \(a header alone\?\); add rows") as err:
        text_data(str(tmp_path / "header.csv"), tiny_backbone, "header").setup()
    assert "Pass an existing local file" not in str(err.value)  # the file exists: that was the wrong fix


def test_text_to_text_targets(tiny_backbone: str, tasks: dict[str, str]) -> None:
    data = text_data(tasks["close"], tiny_backbone, "c", text_to_text=True, label_names=["neg", "pos"])
    data.setup()
    item = data.dataset("train")[0]
    assert set(item) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    assert torch.equal(item["decoder_input_ids"][1:], item["labels"][:-1])


def test_images_from_npz_and_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 28, 28), dtype=np.uint8)
    labels = np.arange(60) % 3
    np.savez(tmp_path / "x.npz", images=images, labels=labels, label_names=np.array(["a", "b", "c"]))
    data = ImageClassificationDataModule(str(tmp_path / "x.npz"), "imgs", image_size=16, shots=4, classes=["a", "c"])
    data.setup()
    assert data.label_names == ["a", "c"] and len(data.splits["train"][1]) == 8
    item = data.dataset("train")[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    folder = ImageClassificationDataModule(
        str(tmp_path / "folder"), "pets", image_size=8, test_fraction=0.25, val_fraction=0
    )
    folder.setup()
    assert folder.label_names == ["cat", "dog"] and len(folder.splits["test"][1]) == 3
    assert next(iter(folder.train_dataloader()))["pixel_values"].shape[1:] == (3, 8, 8)


def test_to_pixels_normalises_like_efficientnet() -> None:
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    assert torch.allclose(to_pixels(white, 4), torch.ones(3, 4, 4))
    assert to_pixels(np.zeros((5, 5)), 2).shape == (3, 2, 2)


def test_vision_language_pairs_and_matching(tiny_backbone: str, tmp_path: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(24):
        Image.fromarray(np.full((8, 8, 3), i * 10, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"w{i % 4} w5", "label": ["no", "yes"][i % 2]})
    table = _write(tmp_path / "pairs.jsonl", rows)
    pair = VisionLanguageDataModule(table, tiny_backbone, "vl", image_size=8, batch_size=4)
    pair.setup()
    batch = next(iter(pair.train_dataloader()))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    match = VisionLanguageDataModule(
        table, tiny_backbone, "vl", mode="matching", caption_template="w1 {}", image_size=8
    )
    candidates = match.candidates()
    assert candidates["input_ids"].shape[0] == 2 and match.task_info().modality == "vision-language"
    with pytest.raises(DataError, match="mode must be one of"):
        VisionLanguageDataModule(table, tiny_backbone, "vl", mode="retrieval")


def test_vision_language_matching_from_npz_with_a_class_subset(tiny_backbone: str, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 255, (30, 12, 12, 3), dtype=np.uint8)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=images, labels=np.arange(30) % 3, label_names=np.array(["w10", "w11", "w12"]))
    options = {"mode": "matching", "classes": ["w12", "w10"], "caption_template": "w1 {}", "image_size": 8}
    data = VisionLanguageDataModule(str(npz), tiny_backbone, "vl", batch_size=4, **options)
    data.setup()
    assert data.label_names == ["w12", "w10"]
    assert sum(len(labels) for _, labels in data.splits.values()) == 20  # class w11 left out
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (4, 3, 8, 8)
    captions = data.tokenizer.batch_decode(data.candidates()["input_ids"], skip_special_tokens=True)
    assert captions == ["w1 w12", "w1 w10"]
    # a dual backbone's name gives its text tower's tokenizer
    dual = VisionLanguageDataModule(str(npz), f"dual:efficientnet-lite0+{tiny_backbone}", "vl", **options)
    assert torch.equal(dual.candidates()["input_ids"], data.candidates()["input_ids"])
    with pytest.raises(DataError, match="no texts, so it serves mode='matching' only"):
        VisionLanguageDataModule(str(npz), tiny_backbone, "vl", mode="pair")


def test_unseen_classes_are_tested_but_never_trained_on(tiny_backbone: str, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 255, (60, 12, 12, 3), dtype=np.uint8)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=images, labels=np.arange(60) % 3, label_names=np.array(["w10", "w11", "w12"]))
    options = {"mode": "matching", "image_size": 8, "caption_template": "{}"}
    data = VisionLanguageDataModule(str(npz), tiny_backbone, "vl", unseen_classes=["w11"], **options)
    data.setup()
    unseen = data.label_names.index("w11")
    assert data.label_names == ["w10", "w11", "w12"]  # still a class: its caption is a candidate
    assert unseen not in data.splits["train"][1] and unseen not in data.splits["validation"][1]
    assert unseen in data.splits["test"][1]
    full = VisionLanguageDataModule(str(npz), tiny_backbone, "vl", **options)
    full.setup()
    assert data.splits["test"][1] == full.splits["test"][1]  # the same fixed test set
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(data.splits["test"][0], full.splits["test"][0], strict=True))
    shots = VisionLanguageDataModule(str(npz), tiny_backbone, "vl", unseen_classes=["w11"], shots=3,
                                     **options)  # fmt: skip
    shots.setup()
    assert sorted(shots.splits["train"][1]) == [0, 0, 0, 2, 2, 2]
    assert data.candidates()["input_ids"].shape[0] == 3
    with pytest.raises(DataError, match="unseen_classes \\['w13'\\] are not among its classes"):
        VisionLanguageDataModule(str(npz), tiny_backbone, "vl", unseen_classes=["w13"], **options).setup()


def test_text_module_rejects_bad_options(tiny_backbone: str, tasks: dict[str, str]) -> None:
    from pituning import ConfigError

    with pytest.raises(ConfigError, match="shots must be >= 1"):
        TextClassificationDataModule(tasks["close"], tiny_backbone, "c", shots=0)
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        TextClassificationDataModule(tasks["close"], tiny_backbone, "c", val_fraction=1.5)

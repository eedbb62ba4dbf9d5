"""Offline data of the quality suites (``benchmarks/quality/data.py``): rendered emoji with their names, Fashion-MNIST
captions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ["Food & Drink", "Flags"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_data", ROOT / "benchmarks" / "quality" / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data = _load()
needs_emoji = pytest.mark.skipif(
    not (data.EMOJI_FONT.exists() and data.EMOJI_TEST.exists()),
    reason=f"{data.EMOJI_FONT} or {data.EMOJI_TEST} is missing (apt-get install fonts-noto-color-emoji unicode-data)",
)


def _render(root: Path, seed: int = 0, groups: list[str] = GROUPS) -> Path:
    return data.emoji(root, size=32, renders=2, seed=seed, per_group=5, groups=groups)


def test_fashion_captions_cover_every_class() -> None:
    assert list(data.FASHION_CAPTIONS) == data.FASHION_CLASSES
    captions = list(data.FASHION_CAPTIONS.values())
    assert len(set(captions)) == len(captions)
    assert all(c.startswith(("a ", "an ")) for c in captions)
    assert data.FASHION_CAPTIONS["ankle-boot"] == "an ankle boot"


@needs_emoji
def test_emoji_arrays(tmp_path: Path) -> None:
    path = _render(tmp_path)
    assert _render(tmp_path) == path and path.parent == tmp_path  # written once
    with np.load(path, allow_pickle=False) as arrays:
        images, labels = arrays["images"], arrays["labels"]
        names = [str(n) for n in arrays["label_names"]]
        groups, subgroups, chars = arrays["groups"], arrays["subgroups"], arrays["emoji"]
    assert images.dtype == np.uint8 and images.shape == (2 * len(names), 32, 32, 3)
    assert labels.dtype == np.int64 and np.array_equal(labels, np.repeat(np.arange(len(names)), 2))
    assert len(names) == 10 and len(set(names)) == 10 and len(set(chars.tolist())) == 10
    assert len(groups) == len(subgroups) == len(chars) == len(names)
    assert [str(g) for g in groups] == ["Food & Drink"] * 5 + ["Flags"] * 5
    assert not any("skin tone" in n or "hair" in n for n in names)
    for image in images:  # the glyph, not only background: many pixels far from the image's commonest colour
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        far = np.abs(image.astype(int) - colours[counts.argmax()]).max(axis=-1) > 30
        assert far.mean() > 0.05


@needs_emoji
def test_emoji_is_deterministic(tmp_path: Path) -> None:
    first = np.load(_render(tmp_path / "a"))
    again = np.load(_render(tmp_path / "b"))
    other_seed = np.load(_render(tmp_path / "c", seed=1))
    food_only = np.load(_render(tmp_path / "d", groups=["Food & Drink"]))
    for key in ("images", "labels", "label_names", "groups", "subgroups", "emoji"):
        assert np.array_equal(first[key], again[key]), key
    assert not np.array_equal(first["images"], other_seed["images"])
    # an emoji's renderings depend on the seed and its name only, not on which other groups are drawn
    assert np.array_equal(food_only["label_names"], first["label_names"][:5])
    assert np.array_equal(food_only["images"], first["images"][:10])


@needs_emoji
def test_emoji_tasks(tmp_path: Path) -> None:
    path = _render(tmp_path)
    tasks = data.emoji_tasks(path, per_task=4)
    assert tasks == data.emoji_tasks(path, per_task=4)
    assert list(tasks) == ["emoji_food", "emoji_flags"]
    names = [str(n) for n in np.load(path)["label_names"]]
    for classes in tasks.values():
        assert len(classes) == len(set(classes)) == 4 and set(classes) <= set(names)
    every = [name for classes in tasks.values() for name in classes]
    assert len(every) == len(set(every))  # no emoji in two tasks
    assert len(data.emoji_tasks(path, per_task=99)["emoji_food"]) == 5

    from pituning.data import ImageClassificationDataModule

    module = ImageClassificationDataModule(str(path), "emoji_food", classes=tasks["emoji_food"], image_size=32)
    images, labels = module.read()["train"]
    assert len(images) == 8 and set(labels) == set(tasks["emoji_food"]) and images[0].shape == (32, 32, 3)


@needs_emoji
def test_emoji_skips_what_does_not_render() -> None:
    glyphs = data._Glyphs()
    assert glyphs("x") is None  # not in the emoji font: nothing drawn
    assert glyphs("\U0001f1e9\U0001f1ea\U0001f1e9\U0001f1ea") is None  # two flags: more than one glyph
    assert glyphs("\U0001f600").size[0] > 100
    with pytest.raises(ValueError, match="unknown emoji groups"):
        data.emoji(Path("unused"), groups=["Component"])

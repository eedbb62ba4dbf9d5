"""The :class:`ExpertBank` class: the bank's parts composed (see :mod:`pituning.bank`)."""

from __future__ import annotations

from collections.abc import Sequence

from pituning.bank.combine import CombineMixin
from pituning.bank.integrity import IntegrityMixin
from pituning.bank.interop import PeftMixin
from pituning.bank.records import Expert
from pituning.bank.search import SearchMixin
from pituning.distributed import sync_experts_
from pituning.model import ExpertModel

__all__ = ["ExpertBank"]


class ExpertBank(IntegrityMixin, PeftMixin, SearchMixin, CombineMixin):
    """A directory of experts with a checksummed manifest.

    Args:
        location: a local directory or an fsspec URL (``memory://bank``, ``s3://bucket/bank``).
        create: create an empty bank if none is there (else raise).
        dtype: storage dtype of expert weights, ``torch.float32`` (default) or ``torch.bfloat16``; experts always
            load as fp32.

    Example:
        >>> bank = ExpertBank("memory://doc-bank")
        >>> len(bank)
        0
    """

    # ------------------------------------------------------------------ distributed
    @staticmethod
    def sync_(target: ExpertModel | Expert | Sequence[Expert], names: Sequence[str] | None = None) -> None:
        """Mean-reduce experts across the ranks of the default process group, in place (see :func:`sync_experts_`)."""
        sync_experts_(target, names)

"""The package version, read once from the installed distribution's metadata.

A leaf module (it imports nothing from pituning), so :mod:`pituning` and the bank can both use it without importing
each other.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__: str = version("pituning")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

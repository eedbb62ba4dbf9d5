"""Compatibility alias of :mod:`pituning.bank.format`, the bank's on-disk record format (it moved there)."""

from __future__ import annotations

from pituning.bank.format import (
    FILENAMES,
    FORMAT,
    SCHEMA_VERSION,
    check_folder,
    check_meta,
    check_record,
    decode_line,
    decode_manifest,
    encode_line,
    encode_manifest,
    sha256,
)

__all__ = [
    "FILENAMES",
    "FORMAT",
    "SCHEMA_VERSION",
    "check_folder",
    "check_meta",
    "check_record",
    "decode_line",
    "decode_manifest",
    "encode_line",
    "encode_manifest",
    "sha256",
]

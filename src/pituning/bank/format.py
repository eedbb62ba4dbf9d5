"""The on-disk format of an expert bank: sealed (checksummed) records, validated field by field on read.

Every journal line and the manifest carry the sha256 of their own canonical JSON (``"sha256"``), so a flipped bit is
found when the file is read; every field is then checked for its type and form, so a record that parses but is
wrong (an unknown kind, a folder outside ``experts/``, a file path that is not the folder's own) is refused too. Any
damage is a :class:`~pituning.errors.BankCorruptionError` naming the file and, for the journal, the line.

Schema 1 banks (written before records were sealed) are still read; their first write seals them (schema 2).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Collection, Mapping
from typing import Any

from pituning.errors import BankCorruptionError, BankError
from pituning.tasks import MODALITIES

__all__ = [
    "BUILTIN_KINDS",
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
    "known_kinds",
    "sha256",
]

FORMAT = "pituning-bank"
SCHEMA_VERSION = 2
FILENAMES = {
    "expert": "expert.json",
    "weights": "weights.safetensors",
    "embedding": "embedding.safetensors",
    "head": "head.safetensors",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_FOLDER = re.compile(r"experts/([A-Za-z0-9][A-Za-z0-9_-]{0,127})--[0-9a-f]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,256}")
_LAYOUT = re.compile(r"[0-9a-f]{16}")
_RECORD_KEYS = {
    "name",
    "kind",
    "modality",
    "task",
    "backbone",
    "structure",
    "weights_fingerprint",
    "created",
    "folder",
    "files",
    "embedding_layout",
}


_FILE_KEYS = {"path", "sha256"}
_FOLDER_MATCH = _FOLDER.fullmatch
_TOKEN_MATCH = _TOKEN.fullmatch
_HEX64_MATCH = _HEX64.fullmatch


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _seal(body: Mapping[str, Any]) -> dict[str, Any]:
    return {**body, "sha256": sha256(_canonical(body))}


def _unseal(obj: Any, where: str, *, required: bool) -> dict[str, Any]:
    """``obj`` without its seal, after checking it; ``required=False`` accepts an unsealed (schema 1) object."""
    if not isinstance(obj, dict):
        raise BankCorruptionError(f"{where} is not a JSON object; the file is damaged. Run `pituning bank recover`.")
    body = dict(obj)
    seal = body.pop("sha256", None)
    if seal is None:
        if required:
            raise BankCorruptionError(f"{where} has no checksum; the file is damaged. Run `pituning bank recover`.")
        return body
    if seal != sha256(_canonical(body)):
        raise BankCorruptionError(
            f"{where} does not match its checksum: the file was damaged or edited. Run `pituning bank recover`."
        )
    return body


_SEAL_KEY = b',"sha256":"'


def _parse_sealed(data: bytes, where: str, *, required: bool) -> dict[str, Any]:
    """Parse a sealed JSON object and check its seal (:func:`_check_seal`)."""
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise _fail(where, f"unreadable JSON ({err})") from err
    return _check_seal(obj, data, where, required=required)


def _check_seal(obj: Any, data: bytes, where: str, *, required: bool) -> dict[str, Any]:
    """``obj`` (parsed from ``data``) without its seal, after checking it.

    The writer's canonical JSON puts ``"sha256"`` last (keys sorted), so the sealed body is the raw bytes up to that
    key: the seal is checked on them, without re-encoding (a 10,000-entry manifest reads several times faster).
    Anything else (an unsealed schema 1 object, re-formatted JSON) takes the slow path: re-encode, then check.
    """
    cut = data.rfind(_SEAL_KEY)
    tail = data[cut + len(_SEAL_KEY) :].rstrip()
    if (
        cut > 0
        and len(tail) == 66
        and tail.endswith(b'"}')
        and isinstance(obj, dict)
        and obj.get("sha256") == tail[:64].decode("ascii", "replace")
        and sha256(data[:cut] + b"}") == obj["sha256"]
    ):
        body = dict(obj)
        del body["sha256"]  # the bytes are exactly what was sealed
        return body
    return _unseal(obj, where, required=required)


def _fail(where: str, problem: str) -> BankCorruptionError:
    return BankCorruptionError(f"{where}: {problem}; the bank file is damaged. Run `pituning bank recover`.")


def check_folder(folder: Any, where: str) -> str:
    """Check that a record's folder is ``experts/<name>--<12 hex>`` (relative, inside ``experts/``, no ``..``).

    Returns:
        The expert name the folder was made for.

    Raises:
        BankCorruptionError: any other value (an absolute path, ``..``, another directory).
    """
    match = _FOLDER.fullmatch(folder) if isinstance(folder, str) else None
    if match is None:
        raise BankCorruptionError(
            f"{where}: folder {folder!r} is not a bank folder (experts/<name>--<id>); a record may never point "
            "outside the bank's experts/ directory. The bank is damaged or was tampered with: run "
            "`pituning bank recover`."
        )
    return match.group(1)


def _str(record: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
    value = record.get(key)
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise _fail(where, f"field {key!r} is missing or malformed ({value!r})")
    return value


def _record_ok(record: Any, kinds: Any) -> bool:
    """The common case of :func:`check_record` in one pass (no messages); ``False`` sends it to the detailed check."""
    if type(record) is not dict or record.keys() != _RECORD_KEYS:
        return False
    name, folder, files, layout = record["name"], record["folder"], record["files"], record["embedding_layout"]
    match = _FOLDER_MATCH(folder) if type(folder) is str else None
    if (
        match is None
        or match.group(1) != name
        or record["kind"] not in kinds
        or record["modality"] not in MODALITIES
        or type(record["task"]) is not str
        or type(record["backbone"]) is not str
        or type(record["created"]) is not str
        or type(record["structure"]) is not str
        or type(record["weights_fingerprint"]) is not str
        or not _TOKEN_MATCH(record["structure"])
        or not _TOKEN_MATCH(record["weights_fingerprint"])
        or type(files) is not dict
        or "expert" not in files
        or "weights" not in files
    ):
        return False
    prefix = folder + "/"
    for role, info in files.items():
        filename = FILENAMES.get(role)
        if (
            filename is None
            or type(info) is not dict
            or info.keys() != _FILE_KEYS
            or info["path"] != prefix + filename
            or type(info["sha256"]) is not str
            or not _HEX64_MATCH(info["sha256"])
        ):
            return False
    if layout is None:
        return "embedding" not in files
    return "embedding" in files and type(layout) is str and _LAYOUT.fullmatch(layout) is not None


BUILTIN_KINDS = ("lora", "adapter", "prefix")
"""The kinds pituning registers itself (a test keeps this in step with the registry)."""


def known_kinds() -> Collection[str]:
    """The expert kinds a record may name: the registry's (:data:`pituning.experts.EXPERT_KINDS`, kinds registered
    by users included) once the experts are imported; before that the built-in ones, so that reading the catalog
    (``pituning bank list``) needs no torch."""
    base = sys.modules.get("pituning.experts.base")
    return base.EXPERT_KINDS if base is not None else BUILTIN_KINDS  # type: ignore[no-any-return]


def check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one bank entry record (as stored in the manifest and in ``add`` journal lines).

    Raises:
        BankCorruptionError: a missing, unknown or malformed field, naming ``where``.
    """
    kinds = known_kinds()
    if _record_ok(record, kinds):
        return record  # type: ignore[no-any-return]
    if not isinstance(record, dict):
        raise _fail(where, "an entry is not a JSON object")
    if set(record) != _RECORD_KEYS:
        missing, extra = sorted(_RECORD_KEYS - set(record)), sorted(set(record) - _RECORD_KEYS)
        raise _fail(where, f"entry fields differ from the format (missing {missing}, unknown {extra})")
    name = _str(record, "name", where, _NAME)
    if _str(record, "kind", where) not in kinds:
        raise _fail(where, f"entry {name!r} has unknown kind {record['kind']!r}")
    if _str(record, "modality", where) not in MODALITIES:
        raise _fail(where, f"entry {name!r} has unknown modality {record['modality']!r}")
    for key in ("task", "backbone", "created"):
        _str(record, key, where)
    _str(record, "structure", where, _TOKEN)
    _str(record, "weights_fingerprint", where, _TOKEN)
    folder = record["folder"]
    if check_folder(folder, where) != name:
        raise _fail(where, f"entry {name!r} points at folder {folder!r}, made for another expert")
    files = record["files"]
    if not isinstance(files, dict) or not {"expert", "weights"} <= set(files) <= set(FILENAMES):
        raise _fail(where, f"entry {name!r} has a malformed file list")
    for role, info in files.items():
        if not isinstance(info, dict) or set(info) != {"path", "sha256"}:
            raise _fail(where, f"entry {name!r} file {role!r} is malformed")
        if info["path"] != f"{folder}/{FILENAMES[role]}":
            raise _fail(where, f"entry {name!r} file {role!r} has path {info['path']!r}, not in its own folder")
        _str(info, "sha256", where, _HEX64)
    layout = record["embedding_layout"]
    if ("embedding" in files) != (layout is not None) or (layout is not None and not _LAYOUT.fullmatch(str(layout))):
        raise _fail(where, f"entry {name!r} has a malformed embedding_layout {layout!r}")
    return record


def encode_line(op: Mapping[str, Any]) -> bytes:
    """One sealed journal line (with its newline)."""
    return _canonical(_seal(op)) + b"\n"


def decode_line(line: bytes, where: str, *, sealed: bool = True) -> dict[str, Any]:
    """Parse and validate one journal line: ``{"op": "add", "entry": record}`` or ``{"op": "remove", "name": ...}``.

    Args:
        line: the line's bytes (without its newline).
        where: file and line number, for messages.
        sealed: require the checksum (schema 2 banks); schema 1 lines have none.
    """
    body = _parse_sealed(line, where, required=sealed)
    if body.get("op") == "add" and set(body) == {"op", "entry"}:
        check_record(body["entry"], where)
    elif body.get("op") == "remove" and set(body) == {"op", "name"}:
        _str(body, "name", where, _NAME)
    else:
        raise _fail(where, f"record is neither an add nor a remove (fields {sorted(body)})")
    return body


def encode_manifest(entries: Mapping[str, Any], library: str) -> bytes:
    """The sealed manifest holding ``entries``."""
    body = {"format": FORMAT, "schema": SCHEMA_VERSION, "library": library, "entries": dict(entries)}
    return _canonical(_seal(body))


def decode_manifest(data: bytes, where: str) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse, unseal and validate a manifest.

    Returns:
        ``(entries, schema)``.

    Raises:
        BankCorruptionError: unreadable, checksum mismatch or a malformed entry.
        BankError: not a pituning bank, or one of a newer schema.
    """
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise BankCorruptionError(f"{where} is not valid JSON ({err}); run `pituning bank recover`.") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BankCorruptionError(f"{where} is not a pituning bank manifest; run `pituning bank recover`.")
    schema = obj.get("schema")
    if not isinstance(schema, int) or schema < 1:
        raise _fail(where, f"schema {schema!r} is not a bank schema")
    if schema > SCHEMA_VERSION:
        raise BankError(f"{where} is a bank of schema {schema}, newer than this pituning reads; upgrade pituning.")
    body = _check_seal(obj, data, where, required=schema >= 2)
    if set(body) != {"format", "schema", "library", "entries"} or not isinstance(body["entries"], dict):
        raise _fail(where, f"manifest fields differ from the format ({sorted(body)})")
    kinds = known_kinds()
    entries: dict[str, dict[str, Any]] = {}
    for name, record in body["entries"].items():
        if not _record_ok(record, kinds):
            check_record(record, f"{where} entry {name!r}")  # raises, naming the problem
        if record["name"] != name:
            raise _fail(where, f"entry {name!r} holds a record named {record['name']!r}")
        entries[name] = record
    return entries, schema


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "library": str,
    "name": str,
    "kind": str,
    "config": dict,
    "backbone": dict,
    "task": dict,
    "metrics": dict,
    "provenance": dict,
    "created": str,
    "dtype": str,
    "tensors": dict,
    "modules": dict,
}


def check_meta(meta: Any, where: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an ``expert.json`` against the format and against its bank record.

    Raises:
        BankCorruptionError: a missing or malformed field, or one that contradicts the record.
    """
    if not isinstance(meta, dict):
        raise _fail(where, "expert.json is not a JSON object")
    for key, types in _META_TYPES.items():
        if not isinstance(meta.get(key), types):
            raise _fail(where, f"field {key!r} is missing or malformed ({meta.get(key)!r})")
    if meta["dtype"] not in ("float32", "bfloat16"):
        raise _fail(where, f"dtype {meta['dtype']!r} is not float32 or bfloat16")
    task, backbone = meta["task"], meta["backbone"]
    if not isinstance(task.get("name"), str) or task.get("modality") not in MODALITIES:
        raise _fail(where, "field 'task' lacks a name or a known modality")
    if not all(isinstance(backbone.get(k), str) for k in ("source", "family", "structure", "weights")) or not (
        isinstance(backbone.get("num_parameters"), int)
    ):
        raise _fail(where, "field 'backbone' lacks source, family, structure, weights or num_parameters")
    for key, shape in meta["tensors"].items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _fail(where, f"tensor {key!r} has a malformed shape {shape!r}")
    expected = {
        "name": record["name"],
        "kind": record["kind"],
        "task": record["task"],
        "modality": record["modality"],
        "structure": record["structure"],
    }
    actual = {
        "name": meta["name"],
        "kind": meta["kind"],
        "task": task["name"],
        "modality": task["modality"],
        "structure": backbone["structure"],
    }
    wrong = [k for k in expected if expected[k] != actual[k]]
    if wrong:
        raise _fail(where, f"expert.json disagrees with the bank record on {wrong}")
    return meta

"""Read and write PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

LoRA lines up exactly: a pituning LoRA expert (a collapsed interpolation included) exported here loads with
``PeftModel.from_pretrained`` (or ``AutoPeftModelFor...``, see :func:`resolve_export_target`) and gives the same
outputs, and a PEFT LoRA adapter imports as a pituning expert only when pituning computes exactly what PEFT computes:
every config option that changes the math is either converted exactly (``use_rslora``) or refused with a
:class:`~pituning.errors.ConfigError` that names the option (:func:`check_lora_config`). Prefixes line up in *layout*
only (see :func:`prefix_to_peft`).

Every file is checked before use: malformed JSON, a safetensors file with a bad header, a pickle renamed to
``.safetensors``, non-finite weights or tensors of the wrong shape stop the import with a ``ConfigError`` naming the
file and the problem. Nothing is ever unpickled. PEFT itself is not needed to read or write these files; only its
loading (in tests and user code) is.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.errors import ConfigError, PiTuningError
from pituning.experts.lora.config import LoraConfig
from pituning.experts.prefix.config import PrefixConfig

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "SIDECAR_FILE",
    "WEIGHTS_FILE",
    "ExportTarget",
    "check_lora_config",
    "export_files",
    "imported_metadata",
    "loadable_base",
    "lora_from_peft",
    "lora_to_peft",
    "peft_lora_options",
    "prefix_from_peft",
    "prefix_to_peft",
    "read_peft_config",
    "read_sidecar",
    "resolve_export_target",
]

_PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "pituning.json"
"""pituning's metadata next to a PEFT adapter (task, backbone, provenance); PEFT ignores it."""
CARD_FILE = "README.md"
SIDECAR_FORMAT = "pituning-expert"
SIDECAR_SCHEMA = 1
_MAX_JSON_BYTES = 64 * 2**20
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_CONVERT_HINT = (
    "PEFT can turn such an adapter into a plain LoRA of the unchanged base model: save it with "
    "save_pretrained(out_dir, path_initial_model_for_weight_conversion=<dir of the adapter saved right after "
    "initialisation>) (convert_pissa_to_lora= in older PEFT), then import that directory."
)


# ---------------------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> Any:
    """Parse the JSON file ``path``; any problem is a ``ConfigError`` naming the file."""
    try:
        size = path.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {what} is {size} bytes, more than any {what} should be; it is not one.")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except PiTuningError:
        raise
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {what} is not UTF-8 text ({err}); replace it with the file PEFT wrote.") from err
    except ValueError as err:
        raise ConfigError(f"{path}: {what} is not valid JSON ({err}); replace it with the file PEFT wrote.") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err}).") from err


def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir``.

    Raises:
        ConfigError: the file is missing, not JSON, not a JSON object, or has no string ``peft_type``.
    """
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter_dir} is not a PEFT adapter directory: {CONFIG_FILE} is missing.")
    data = _read_json(path, "the adapter config")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the adapter config must be a JSON object, got a JSON {type(data).__name__}; replace it with "
            "the file PEFT wrote."
        )
    if not isinstance(data.get("peft_type"), str):
        raise ConfigError(f"{path}: 'peft_type' is missing or not a string; this is not a PEFT adapter config.")
    return data


def _check_safetensors(path: Path) -> None:
    """Validate the safetensors header of ``path`` without trusting it (no huge allocation, never a pickle)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
        length = int.from_bytes(head[:8], "little")
        if len(head) < 9 or not 2 <= length <= min(size - 8, _MAX_HEADER_BYTES) or head[8:9] != b"{":
            if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ConfigError(
                    f"{path} is a pickle or torch.save archive renamed to .safetensors, not a safetensors file; "
                    "pituning never unpickles. Load the adapter with PEFT where you trust it and save it again with "
                    "save_pretrained(..., safe_serialization=True)."
                )
            if len(head) < 9:
                raise ConfigError(f"{path} is {size} bytes, too short for a safetensors file; it is truncated.")
            raise ConfigError(
                f"{path}: the safetensors header claims {length} bytes but the file has {size}, or does not start "
                "with a JSON object; the file is truncated, corrupted or not safetensors. Re-save the adapter."
            )
        raw = head[8:] + handle.read(length - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupted.") from err
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: the safetensors header is not a JSON object; the file is corrupted.")
    data_size = size - 8 - length
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and 0 <= o <= data_size for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ConfigError(f"{path}: tensor {key!r} has invalid data offsets {offsets!r}; the file is corrupted.")


def _read_weights(adapter_dir: str | Path) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors``, checked (header, floating dtype, finite values)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        pickled = (path.parent / "adapter_model.bin").exists()
        raise ConfigError(
            f"{adapter_dir} has no {WEIGHTS_FILE}"
            + (" (only adapter_model.bin, a pickle, which is never read)" if pickled else "")
            + "; only safetensors adapters are read. Re-save the adapter with PEFT's "
            "save_pretrained(..., safe_serialization=True)."
        )
    _check_safetensors(path)
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on corrupt files
        raise ConfigError(f"{path} is not a readable safetensors file ({err}); re-save the adapter.") from err
    for key, value in weights.items():
        if not value.is_floating_point():
            raise ConfigError(f"{path}: tensor {key!r} has dtype {value.dtype}; adapter weights are floating point.")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ConfigError(
                f"{path}: tensor {key!r} has {bad} non-finite value(s) (NaN or inf) of {value.numel()}; the adapter "
                "diverged or is corrupted, so it is refused."
            )
    return weights


def read_sidecar(adapter_dir: str | Path) -> dict[str, Any] | None:
    """pituning's ``pituning.json`` next to a PEFT adapter (written by :meth:`pituning.ExpertBank.export_peft`), or
    ``None`` when there is none.

    Raises:
        ConfigError: the file is not JSON, not a pituning sidecar, or a field has the wrong type.
    """
    path = Path(adapter_dir) / SIDECAR_FILE
    if not path.exists():
        return None
    data = _read_json(path, "the pituning sidecar")
    fix = f"delete {SIDECAR_FILE} to import the adapter without pituning's metadata"
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ConfigError(f'{path} is not a pituning sidecar (no "format": {SIDECAR_FORMAT!r}); {fix}.')
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SIDECAR_SCHEMA:
        raise ConfigError(f"{path}: schema {schema!r} is not one this pituning reads (1..{SIDECAR_SCHEMA}); {fix}.")
    heads = data.get("peft", {}).get("head_from_base", []) if isinstance(data.get("peft"), dict) else []
    if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads):
        raise ConfigError(f"{path}: peft.head_from_base must be a list of module names, got {heads!r}; {fix}.")
    for key in ("provenance", "task", "backbone", "metrics", "config", "peft"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: {key!r} must be a JSON object, got {type(data[key]).__name__}; {fix}.")
    for key, value in data.get("metrics", {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: metric {key!r} is {value!r}, not a number; {fix}.")
    for key in ("name", "kind", "created", "library"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: {key!r} must be a string, got {type(data[key]).__name__}; {fix}.")
    return data


# ---------------------------------------------------------------------------------------------------------- LoRA
#: LoRA config options that do not change what the adapter computes (metadata, or selection of modules, which the
#: weights themselves record).
_NEUTRAL = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",  # only how PEFT merges into GPT-2's Conv1D; the forward is the same
    "use_rslora",  # converted exactly
    "layers_to_transform",  # which layers got a LoRA: the weights say
    "layers_pattern",
    "runtime_config",
    "init_lora_weights",  # checked below
    "bias",  # checked below
    "modules_to_save",  # the tensors decide: a trained module is refused, the base's own weights are left out
    "loftq_config",  # used only with init_lora_weights="loftq"
    "eva_config",  # EVA only initialises A (the base weights stay)
    "corda_config",  # used only with init_lora_weights="corda"
    "lora_ga_config",  # used only with init_lora_weights="lora_ga"
    "qalora_group_size",  # used only with use_qalora
    "megatron_core",  # used only with megatron_config
    "ensure_weight_tying",  # only with modules_to_save / trainable tokens
}

#: Options whose non-default value changes the math, with what it means.
_REFUSED = {
    "use_dora": "DoRA learns a magnitude per output on top of the update",
    "lora_bias": "it adds a trained bias to lora_B",
    "rank_pattern": "per-module ranks (a pituning LoRA has one r)",
    "alpha_pattern": "per-module alphas (a pituning LoRA has one alpha)",
    "target_parameters": "LoRA on raw parameters (MoE expert weights)",
    "trainable_token_indices": "trained token embeddings",
    "megatron_config": "Megatron tensor-parallel LoRA layers",
    "layer_replication": "layer replication changes the base model's depth",
    "alora_invocation_tokens": (
        "aLoRA applies the update only from the invocation tokens on, while pituning applies it to every token"
    ),
    "use_qalora": "QALoRA pools the LoRA input in groups",
    "velora_config": "a LoRA variant (VeLoRA)",
    "monteclora_config": "MonteCLoRA samples the update",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "kasa_config": "a LoRA variant (KaSA)",
}

#: ``init_lora_weights`` values that leave the base model unchanged (the adapter is a plain update of it).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
#: Values that change the base weights (the adapter only reproduces PEFT's outputs on the changed base).
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_default(value: Any) -> bool:
    return value in (None, False, "", [], {}, 0)


def _positive_int(adapter_dir: str | Path, cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"{Path(adapter_dir) / CONFIG_FILE}: {key!r} is missing; PEFT always writes it.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{Path(adapter_dir) / CONFIG_FILE}: {key!r} must be a positive integer, got {value!r}.")
    return value


def _number(adapter_dir: str | Path, cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{Path(adapter_dir) / CONFIG_FILE}: {key!r} must be a number, got {value!r}.")
    return float(value)


def check_lora_config(adapter_dir: str | Path, cfg: Mapping[str, Any]) -> None:
    """Refuse every LoRA config option pituning would not compute exactly as PEFT does.

    Supported: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` (converted), ``target_modules`` /
    ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` (the weights record the modules),
    ``fan_in_fan_out``, and ``init_lora_weights`` in ``True``, ``False``, ``"gaussian"``, ``"orthogonal"``, ``"eva"``
    (initialisations that leave the base weights alone). Unknown options with a non-default value are refused too, so
    a future PEFT feature cannot import silently wrong.

    Raises:
        ConfigError: naming the option, why, and what to do.
    """
    where = Path(adapter_dir) / CONFIG_FILE
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        name = str(init)
        if isinstance(init, str) and (init in _MUTATING_INITS or init.startswith("pissa_niter_")):
            raise ConfigError(
                f"{where}: init_lora_weights={init!r} also changes the base model's weights, so this adapter only "
                f"reproduces PEFT's outputs on that changed base; pituning keeps the base frozen. {_CONVERT_HINT}"
            )
        raise ConfigError(
            f"{where}: init_lora_weights={name!r} is not an initialisation pituning can reproduce (supported: "
            f"{', '.join(repr(v) for v in _PLAIN_INITS)}); it may change the base weights or the LoRA computation."
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise ConfigError(
            f"{where}: bias={bias!r} trains the base model's biases, which a pituning expert does not hold; train "
            "with bias='none'."
        )
    for option, why in _REFUSED.items():
        value = cfg.get(option)
        if not _is_default(value):
            raise ConfigError(
                f"{where}: {option}={value!r} has no pituning equivalent ({why}), so the adapter cannot be imported "
                "exactly; train or save it without this option."
            )
    unknown = sorted(k for k, v in cfg.items() if k not in _NEUTRAL and k not in _REFUSED and not _is_default(v))
    if unknown:
        raise ConfigError(
            f"{where}: option(s) {unknown} are unknown to pituning and may change what the adapter computes, so it "
            "is refused; save the adapter without them."
        )
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise ConfigError(f"{where}: 'use_rslora' must be true or false, got {cfg['use_rslora']!r}.")
    dropout = _number(adapter_dir, cfg, "lora_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}.")


def peft_lora_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a PEFT LoRA config says that a pituning config does not keep (``lora_alpha`` as written, ``use_rslora``,
    ``layers_to_transform``, ``layers_pattern``, ``task_type``), to write them back on export."""
    keys = ("r", "lora_alpha", "use_rslora", "layers_to_transform", "layers_pattern", "task_type")
    return {k: cfg[k] for k in keys if k in cfg}


def _resolve(adapter_dir: str | Path, module: str, names: set[str]) -> str:
    """Map a PEFT module path onto a module of our backbone (PEFT's base may add or drop a wrapper prefix)."""
    if module in names:
        return module
    matches = [n for n in names if n.endswith("." + module) or module.endswith("." + n)]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(
        f"{Path(adapter_dir) / WEIGHTS_FILE}: PEFT module {module!r} is not in this backbone ({len(matches)} "
        "candidates); load the adapter into the backbone it was trained on."
    )


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z_][\w-]*)?\.weight")
_KNOWN_EXTRAS = (
    ("lora_magnitude_vector", "use_dora", "DoRA magnitudes"),
    ("lora_embedding_", "target_modules", "LoRA on an embedding"),
    ("modules_to_save", "modules_to_save", "a fully trained module"),
    ("classifier", "modules_to_save", "a trained task head"),
    ("score", "modules_to_save", "a trained task head"),
    ("qa_outputs", "modules_to_save", "a trained task head"),
    ("trainable_tokens", "trainable_token_indices", "trained token embeddings"),
    (".bias", "lora_bias", "a LoRA bias"),
)


def lora_from_peft(
    adapter_dir: str | Path,
    module_names: set[str],
    *,
    backbone: torch.nn.Module | None = None,
    base_heads: Iterable[str] = (),
) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read a PEFT LoRA adapter as a pituning LoRA config and state.

    Tensors of a task head (``modules_to_save``) are refused unless they are the backbone's own, unchanged weights
    (compared with ``backbone``) or modules ``base_heads`` that pituning's sidecar lists as copied from the base
    model; those carry nothing trained and are left out.

    Args:
        adapter_dir: the PEFT directory.
        module_names: the module names of the target backbone (to resolve PEFT's paths).
        backbone: the target backbone, to recognise unchanged head weights.
        base_heads: head modules the export copied from the base model (``pituning.json``).

    Raises:
        ConfigError: not a LoRA adapter pituning computes exactly (see :func:`check_lora_config`), or a hostile or
            broken file (the message names the file and the problem).
    """
    cfg = read_peft_config(adapter_dir)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter, not LORA.")
    check_lora_config(adapter_dir, cfg)
    r = _positive_int(adapter_dir, cfg, "r")
    alpha = _number(adapter_dir, cfg, "lora_alpha", 8.0)
    if alpha <= 0:
        raise ConfigError(f"{Path(adapter_dir) / CONFIG_FILE}: lora_alpha must be positive, got {alpha!r}.")
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); pituning by alpha / r
    weights = _read_weights(adapter_dir)
    where = Path(adapter_dir) / WEIGHTS_FILE
    if not weights:
        raise ConfigError(f"{where} holds no tensors; the adapter is empty.")
    state: dict[str, Tensor] = {}
    heads = tuple(base_heads)
    own = dict(backbone.state_dict()) if backbone is not None else {}
    for key, value in weights.items():
        match = _LORA_KEY.fullmatch(key)
        plain = key.removeprefix(_PEFT_PREFIX)
        if match is None and any(plain.startswith(h + ".") for h in heads):
            continue  # a head the export copied unchanged from the base model
        if match is None:
            mine = next((own[k] for k in own if k == plain or k.endswith("." + plain)), None)
            if mine is not None and mine.shape == value.shape and torch.equal(mine.float(), value.float()):
                continue  # the backbone's own weights, unchanged (a task head PEFT saves with every adapter)
            for marker, option, what in _KNOWN_EXTRAS:
                if marker in key:
                    raise ConfigError(
                        f"{where}: tensor {key!r} is {what} ({option}), which has no pituning equivalent; import a "
                        "plain LoRA adapter."
                    )
            raise ConfigError(f"{where}: unexpected tensor {key!r}; a plain LoRA adapter holds only lora_A/lora_B.")
        module = _resolve(adapter_dir, match.group(1), module_names)
        part = match.group(2)
        if value.dim() < 2:
            raise ConfigError(f"{where}: {key!r} has shape {tuple(value.shape)}; LoRA matrices have two dimensions.")
        if part == "A" and value.shape[0] != r:
            raise ConfigError(f"{where}: {key!r} has shape {tuple(value.shape)}, but r={r} (first dimension).")
        if part == "B" and (value.shape[1] != r or any(d != 1 for d in value.shape[2:])):
            raise ConfigError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, but r={r} (second dimension, then 1s)."
            )
        target = f"{module}.pi_lora.lora_{part}"
        if target in state:
            raise ConfigError(f"{where}: two tensors hold lora_{part} of module {module!r} (one is {key!r}).")
        state[target] = value.float().reshape(value.shape[0], -1)
    modules = sorted({k.rsplit(".pi_lora.", 1)[0] for k in state})
    for module in modules:
        for part in ("A", "B"):
            if f"{module}.pi_lora.lora_{part}" not in state:
                raise ConfigError(f"{where}: module {module!r} has no lora_{part}; the adapter is incomplete.")
    try:
        config = LoraConfig(
            r=r,
            alpha=alpha,
            dropout=_number(adapter_dir, cfg, "lora_dropout", 0.0),
            target_modules=[re.escape(m) for m in modules],
        )
    except ConfigError as err:
        raise ConfigError(f"{Path(adapter_dir) / CONFIG_FILE}: {err}") from err
    return config, state


# ---------------------------------------------------------------------------------------------------------- export
def _write_dir(
    out_dir: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write the files into ``out_dir`` atomically (a sibling temp dir renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export into a new directory.")
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"Tensor {key!r} has non-finite values (NaN or inf); such an expert is not exported.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class ExportTarget:
    """Where an exported adapter loads: PEFT's ``task_type``, the model class, and module path renames."""

    task_type: str | None = None
    """PEFT task type (``SEQ_CLS``, ``CAUSAL_LM`` ...); ``None`` when PEFT has none for the class."""
    class_name: str | None = None
    """The transformers class the paths fit (``BertForSequenceClassification`` ...), when known."""
    auto_mapping: dict[str, str] | None = None
    """PEFT's ``auto_mapping`` (for ``AutoPeftModel``) when the class has no task type."""
    module_map: dict[str, str] = field(default_factory=dict)
    """pituning module path -> module path in the class (identity when empty)."""
    head_modules: list[str] = field(default_factory=list)
    """The class's task head modules that PEFT's task model expects in the adapter (``classifier`` for ``SEQ_CLS``):
    they are copied unchanged from the base model."""


def _norm(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _load_config(base_model_name_or_path: str | None) -> Any:
    """The transformers config of the base model, when it can be read without the network; else ``None``."""
    if not base_model_name_or_path:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base_model_name_or_path, local_files_only=True)
    except Exception:  # no config there (or not a transformers model): the export keeps its paths
        return None


def _meta_model(cls: Any, config: Any) -> Any:
    with torch.device("meta"):
        return cls(config)


def _class_task(cls_name: str, config: Any) -> tuple[str | None, bool]:
    """``(PEFT task type, whether the class is the bare base model)`` of a transformers class name."""
    base = cls_name.endswith("Model") and "For" not in cls_name and "LMHead" not in cls_name
    if base:
        return "FEATURE_EXTRACTION", True
    if cls_name.endswith("ForSequenceClassification"):
        return "SEQ_CLS", False
    if cls_name.endswith("ForTokenClassification"):
        return "TOKEN_CLS", False
    if cls_name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS", False
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder and (cls_name.endswith("ForConditionalGeneration") or cls_name.endswith("ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM", False
    if not encoder_decoder and (cls_name.endswith("ForCausalLM") or cls_name.endswith("LMHeadModel")):
        return "CAUSAL_LM", False
    return None, False


def _map_paths(modules: Iterable[str], cls: Any, config: Any) -> dict[str, str] | None:
    """pituning path -> path in ``cls`` for every module, or ``None`` if one has no counterpart."""
    model = _meta_model(cls, config)
    names = {_norm(n) for n, _ in model.named_modules() if n}
    _, base = _class_task(cls.__name__, config)
    prefix = getattr(cls, "base_model_prefix", "") or ""
    base_path = "" if base or not isinstance(getattr(model, prefix, None), torch.nn.Module) else prefix
    out: dict[str, str] = {}
    for module in modules:
        if _norm(module) in names:
            out[module] = module
            continue
        parts = module.split(".")
        for k in range(len(parts)):
            rest = ".".join(parts[k:])
            candidate = f"{base_path}.{rest}" if base_path else rest
            if _norm(candidate) in names:
                out[module] = candidate
                break
        else:
            return None
    return out


def _candidates(config: Any) -> list[Any]:
    """Model classes an expert of ``config``'s family may have come from, most likely first."""
    import transformers

    order = ["FEATURE_EXTRACTION"]
    names: list[str] = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        order += ["SEQ_2_SEQ_LM", "SEQ_CLS", "QUESTION_ANS"]
    else:
        causal = type(config) in transformers.AutoModelForCausalLM._model_mapping
        masked = type(config) in transformers.AutoModelForMaskedLM._model_mapping
        if causal and not masked:
            order += ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"]
        else:
            order += ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"]
    out: list[Any] = []
    for task in order[:1]:
        out.append(_auto_class_for(task, config))
    out += [getattr(transformers, n) for n in names if hasattr(transformers, n)]
    for task in order[1:]:
        out.append(_auto_class_for(task, config))
    return [c for c in out if c is not None]


def _auto_class_for(task_type: str, config: Any) -> Any:
    import transformers

    auto = getattr(transformers, _TASK_AUTO_CLASSES[task_type])
    mapping = auto._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def resolve_export_target(
    modules: Iterable[str],
    *,
    base_model_name_or_path: str | None,
    task_class: str | None = None,
    task_type: str | None = None,
) -> ExportTarget:
    """Find the transformers class an exported adapter loads into, its PEFT task type, and the module paths there.

    Args:
        modules: the expert's module paths (relative to the backbone pituning loaded).
        base_model_name_or_path: the base model (its config tells the family; read without the network).
        task_class: a transformers class name (``BertForSequenceClassification``); the paths are moved into it (a
            ``BertModel`` expert's ``encoder.layer.0...`` becomes ``bert.encoder.layer.0...``).
        task_type: a PEFT task type instead of a class (``SEQ_CLS``, ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``TOKEN_CLS``,
            ``QUESTION_ANS``, ``FEATURE_EXTRACTION``); the class is the auto class of the base model's config.

    Returns:
        The target; with neither option, the class the paths already fit (the one the expert came from), or an empty
        target (paths unchanged, no task type) when the base model's config cannot be read.

    Raises:
        ConfigError: an unknown class or task type, or a module the class does not have.
    """
    import transformers

    modules = list(modules)
    config = _load_config(base_model_name_or_path)
    if task_type is not None and task_type not in _TASK_TYPES:
        raise ConfigError(f"task_type must be one of {list(_TASK_TYPES)}, got {task_type!r}.")
    cls: Any = None
    if task_class is not None:
        cls = getattr(transformers, task_class, None)
        if not isinstance(cls, type) or not hasattr(cls, "config_class") or not hasattr(cls, "base_model_prefix"):
            raise ConfigError(f"task_class {task_class!r} is not a transformers model class (e.g. 'BertModel').")
        if config is None or not isinstance(config, cls.config_class):
            config = cls.config_class()
    elif task_type is not None:
        if config is None:
            raise ConfigError(
                f"task_type={task_type!r} needs the base model's config to find the class; the base model "
                f"{base_model_name_or_path!r} has none readable here. Pass task_class='...' (e.g. "
                "'BertForSequenceClassification') or base_model_name_or_path=<local model directory>."
            )
        cls = _auto_class_for(task_type, config)
        if cls is None:
            raise ConfigError(f"{type(config).__name__} has no {_TASK_AUTO_CLASSES[task_type]} class (task_type).")
    if cls is not None:
        try:
            mapping = _map_paths(modules, cls, config)
        except PiTuningError:
            raise
        except Exception as err:
            raise ConfigError(f"Cannot build {cls.__name__} to map the module paths ({err}).") from err
        if mapping is None:
            raise ConfigError(
                f"The expert's modules {modules[:3]} ... do not all exist in {cls.__name__}; export for the class of "
                "the backbone it was trained on (or its base model)."
            )
    elif config is not None:
        for candidate in _candidates(config):
            try:
                mapping = _map_paths(modules, candidate, config)
            except Exception:  # a class that cannot be built here is simply not the one
                continue
            if mapping is not None and all(k == v for k, v in mapping.items()):
                cls = candidate
                break
        if cls is None:
            return ExportTarget()
    else:
        return ExportTarget()
    assert mapping is not None
    peft_task, _ = _class_task(cls.__name__, config)
    auto = None if peft_task else {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    heads: list[str] = []
    if peft_task in _HEADS:
        names = [n for n, _ in _meta_model(cls, config).named_modules() if n]
        heads = [n for n in names if any(n.endswith(h) for h in _HEADS[peft_task])]
    return ExportTarget(peft_task, cls.__name__, auto, {k: v for k, v in mapping.items() if k != v}, heads)


#: Modules PEFT's task models keep trainable (``modules_to_save``) and expect in every adapter of that task type.
_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _head_tensors(base_model_name_or_path: str | None, target: ExportTarget) -> dict[str, Tensor]:
    """The base model's own weights of ``target.head_modules`` (so PEFT's task model loads them unchanged)."""
    import transformers

    why = (
        f"a {target.task_type} adapter must carry the task head ({', '.join(target.head_modules)}) for PEFT to load "
        "it, and pituning copies it from the base model"
    )
    if not base_model_name_or_path:
        raise ConfigError(f"{why}, which is unknown here; pass base_model_name_or_path=<local model directory>.")
    try:
        model = getattr(transformers, str(target.class_name)).from_pretrained(
            base_model_name_or_path, local_files_only=True
        )
    except Exception as err:
        raise ConfigError(
            f"{why}, but {target.class_name} could not be loaded from {base_model_name_or_path!r} ({err}); pass "
            "base_model_name_or_path=<local model directory>."
        ) from err
    out: dict[str, Tensor] = {}
    for name in target.head_modules:
        for key, value in model.get_submodule(name).state_dict().items():
            out[f"{name}.{key}"] = value.detach().float()
    return out


def lora_to_peft(
    config: LoraConfig,
    state: Mapping[str, Tensor],
    modules: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    target: ExportTarget | None = None,
    options: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a LoRA expert as a PEFT LoRA adapter directory.

    Args:
        config: the expert's config.
        state: its tensors (``<module>.pi_lora.lora_A`` / ``lora_B``).
        modules: module name -> layout, as :meth:`pituning.ExpertModel.expert_modules` reports it.
        out_dir: a new (or empty) directory.
        base_model_name_or_path: recorded in ``adapter_config.json`` (what ``AutoPeftModel...`` loads).
        target: the task type and module paths of the class it should load into (:func:`resolve_export_target`);
            default: no task type, paths as they are.
        options: what the PEFT config of an imported adapter said (:func:`peft_lora_options`): ``lora_alpha`` and
            ``use_rslora`` are written back when they still describe this config, ``layers_to_transform`` /
            ``layers_pattern`` always.
        extra_files: more files to write (name -> text), such as the model card and pituning's sidecar.

    Raises:
        ConfigError: a convolution PEFT cannot express (groups > 1, or a subclass that pads in its forward), or
            non-finite weights.
    """
    target = target or ExportTarget()
    tensors: dict[str, Tensor] = {}
    fan_in_fan_out = False
    paths: list[str] = []
    for module, layout in modules.items():
        a = state[f"{module}.pi_lora.lora_A"].float()
        b = state[f"{module}.pi_lora.lora_B"].float()
        if layout.get("conv"):
            shape = list(layout["weight_shape"])
            if not layout.get("plain_conv"):
                raise ConfigError(
                    f"{module} is a {layout.get('type')} that pads inside its forward; PEFT's convolution LoRA would "
                    "compute something else, so it cannot be exported. Keep it as a pituning expert."
                )
            if a.shape[1] != math.prod(shape[1:]) or len(shape) < 3:
                raise ConfigError(f"{module}: LoRA shape {tuple(a.shape)} does not fit kernel {shape}.")
            a = a.reshape(a.shape[0], *shape[1:])
            b = b.reshape(*b.shape, *([1] * (len(shape) - 2)))
        if layout.get("type") == "Conv1D":
            fan_in_fan_out = True
        path = target.module_map.get(module, module)
        paths.append(path)
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = b
    lora_alpha: float = config.alpha
    use_rslora = False
    options = dict(options or {})
    if options.get("r") == config.r and isinstance(options.get("lora_alpha"), (int, float)):
        original = float(options["lora_alpha"])
        if options.get("use_rslora") is True and math.isclose(original * math.sqrt(config.r), config.alpha):
            lora_alpha, use_rslora = options["lora_alpha"], True
        elif not options.get("use_rslora") and math.isclose(original, config.alpha):
            lora_alpha = options["lora_alpha"]
    if isinstance(lora_alpha, float) and lora_alpha.is_integer():
        lora_alpha = int(lora_alpha)
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": target.task_type,
        "r": config.r,
        "lora_alpha": lora_alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(paths),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": use_rslora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if target.auto_mapping is not None:
        peft_config["auto_mapping"] = target.auto_mapping
    if target.head_modules:
        tensors.update({f"{_PEFT_PREFIX}{k}": v for k, v in _head_tensors(base_model_name_or_path, target).items()})
    for key in ("layers_to_transform", "layers_pattern"):
        # harmless for PEFT: target_modules are full paths, which PEFT matches before it looks at layer indices
        if options.get(key) is not None:
            peft_config[key] = options[key]
    return _write_dir(out_dir, peft_config, tensors, extra_files)


# ---------------------------------------------------------------------------------------------------------- prefix
def prefix_to_peft(
    config: PrefixConfig,
    state: Mapping[str, Tensor],
    modules: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    num_attention_heads: int,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a prefix expert in PEFT's prefix-tuning layout.

    PEFT stores ``prompt_embeddings`` ``(L, num_layers * 2 * kv_dim)``: per layer the key then the value prefix,
    fed to the model as ``past_key_values``. The tensors line up with pituning's ``prefix_key``/``prefix_value``, but
    the computation does not quite: PEFT's prefix is a *cache*, so the model shifts the positions of the real tokens by
    ``L`` (absolute position embeddings and rotary queries see other positions), while pituning's prefix has no
    position and leaves the tokens' positions alone. Outputs therefore differ; use the export to move weights, not to
    reproduce outputs. Models with several attention stacks (T5, CLIP) have no PEFT prefix equivalent.
    """
    layers = list(modules)
    keys = [state[f"{m}.pi_prefix.prefix_key"].float() for m in layers]
    values = [state[f"{m}.pi_prefix.prefix_value"].float() for m in layers]
    kv_dim = keys[0].shape[1]
    if kv_dim % num_attention_heads:
        raise ConfigError(f"kv width {kv_dim} is not a multiple of num_attention_heads={num_attention_heads}.")
    embedding = torch.cat([t for pair in zip(keys, values, strict=True) for t in pair], dim=1)
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": config.num_tokens,
        "num_layers": len(layers),
        "token_dim": kv_dim,
        "num_attention_heads": num_attention_heads,
        "encoder_hidden_size": kv_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    return _write_dir(out_dir, peft_config, {"prompt_embeddings": embedding}, extra_files)


def prefix_from_peft(adapter_dir: str | Path, layers: list[str]) -> tuple[PrefixConfig, dict[str, Tensor]]:
    """Read a PEFT prefix-tuning adapter (without prefix projection) onto the self-attention modules ``layers``.

    Raises:
        ConfigError: prefix projection, a layer count or width that does not fit, a missing ``prompt_embeddings``, or
            a hostile or broken file (the message names the file and the problem).
    """
    cfg = read_peft_config(adapter_dir)
    where = Path(adapter_dir) / CONFIG_FILE
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ConfigError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter, not PREFIX_TUNING.")
    if cfg.get("prefix_projection"):
        raise ConfigError(f"{where}: prefix_projection=true (an MLP over the prefix); pituning stores the prefix.")
    num_layers = _positive_int(adapter_dir, cfg, "num_layers")
    kv_dim = _positive_int(adapter_dir, cfg, "token_dim")
    num_tokens = _positive_int(adapter_dir, cfg, "num_virtual_tokens")
    if num_layers != len(layers):
        raise ConfigError(
            f"{where}: prefixes for {num_layers} layers, but the backbone has {len(layers)} self-attention modules; "
            "import into the backbone the adapter was trained on."
        )
    weights = _read_weights(adapter_dir)
    wpath = Path(adapter_dir) / WEIGHTS_FILE
    if "prompt_embeddings" not in weights:
        raise ConfigError(
            f"{wpath} has no 'prompt_embeddings' tensor (found {sorted(weights)[:5]}); it is not a prefix-tuning "
            "adapter."
        )
    extra = sorted(set(weights) - {"prompt_embeddings"})
    if extra:
        raise ConfigError(f"{wpath}: unexpected tensors {extra[:5]} next to 'prompt_embeddings'.")
    embedding = weights["prompt_embeddings"].float()
    expected = (num_tokens, num_layers * 2 * kv_dim)
    if tuple(embedding.shape) != expected:
        raise ConfigError(
            f"{wpath}: 'prompt_embeddings' has shape {tuple(embedding.shape)}, but the config (num_virtual_tokens="
            f"{num_tokens}, num_layers={num_layers}, token_dim={kv_dim}) needs {expected}; the files do not belong "
            "together."
        )
    chunks = embedding.split(kv_dim, dim=1)
    state = {}
    for i, module in enumerate(layers):
        state[f"{module}.pi_prefix.prefix_key"] = chunks[2 * i]
        state[f"{module}.pi_prefix.prefix_value"] = chunks[2 * i + 1]
    return PrefixConfig(num_tokens=num_tokens), state


# ---------------------------------------------------------------------------------------------------------- metadata
_AUTO_PEFT = {
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def loadable_base(source: str) -> str | None:
    """The ``base_model_name_or_path`` to write for a backbone ``source``: a local directory (made absolute) or a hub
    name; ``None`` for descriptions that no loader can open (``config:bert``, ``module:MyNet``, ``dual:...``)."""
    if source.startswith(("config:", "module:", "dual:", "efficientnet-lite")):
        return None
    if source.startswith("pkg:"):
        from pituning.backbones import resolve_model_path

        try:
            source = resolve_model_path(source)
        except PiTuningError:
            return None
    path = Path(source)
    return str(path.resolve()) if path.is_dir() else source


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def export_files(
    expert: Any, *, base_model_name_or_path: str | None, target: ExportTarget | None, library: str
) -> dict[str, str]:
    """``README.md`` (a model card) and ``pituning.json`` (task, backbone, metrics, provenance) for an exported
    :class:`pituning.bank.Expert`; PEFT ignores both, :meth:`pituning.ExpertBank.import_peft` reads the sidecar."""
    from dataclasses import asdict

    target = target or ExportTarget()
    task = asdict(expert.task)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "schema": SIDECAR_SCHEMA,
        "library": library,
        "name": expert.name,
        "kind": expert.config.kind,
        "created": expert.created,
        "config": expert.config.to_dict(),
        "task": task,
        "backbone": expert.backbone.to_dict(),
        "metrics": dict(expert.metrics),
        "provenance": _jsonable(expert.provenance),
        "peft": {"task_type": target.task_type, "class": target.class_name, "head_from_base": target.head_modules},
    }
    front = ["---", "library_name: peft"]
    if base_model_name_or_path:
        front.append(f"base_model: {json.dumps(base_model_name_or_path)}")
    front += ["tags:", "- pituning", f"- {expert.config.kind}", "---", ""]
    loader = _AUTO_PEFT.get(target.task_type or "", "AutoPeftModel" if target.auto_mapping else "PeftModel")
    lines = [
        *front,
        f"# {expert.name}",
        "",
        f"A pituning {expert.config.kind} expert, exported as a PEFT adapter by {library}.",
        "",
        f"- Task: `{task['name']}` ({task['modality']})"
        + (f", labels {', '.join(map(str, task['label_names']))}" if task.get("label_names") else ""),
        f"- Backbone: `{expert.backbone.source}` ({expert.backbone.family}), structure fingerprint "
        f"`{expert.backbone.fingerprint.structure[:16]}`, weights `{expert.backbone.fingerprint.weights[:16]}`",
        f"- PEFT task type: `{target.task_type}`"
        + (f", model class `{target.class_name}`" if target.class_name else ""),
    ]
    if expert.metrics:
        lines.append("- Metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(expert.metrics.items())))
    lines += ["", "## Provenance", "", "```json", json.dumps(sidecar["provenance"], indent=2, sort_keys=True), "```"]
    lines += ["", "## Load", "", "```python", f"from peft import {loader}", ""]
    if loader == "PeftModel":
        lines.append('model = PeftModel.from_pretrained(base_model, "path/to/this/directory")')
    else:
        lines.append(f'model = {loader}.from_pretrained("path/to/this/directory")')
    lines += [
        "```",
        "",
        f"`{SIDECAR_FILE}` holds this metadata for `pituning`: `ExpertBank.import_peft` reads it back.",
        "",
    ]
    return {CARD_FILE: "\n".join(lines), SIDECAR_FILE: json.dumps(sidecar, indent=2, sort_keys=True)}


def imported_metadata(adapter_dir: str | Path, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """``(provenance, metrics)`` of an imported adapter: the sidecar's provenance and metrics when there is one (see
    :func:`read_sidecar`), where the export came from, the PEFT options pituning's config does not keep, and
    ``imported_from``."""
    provenance: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    sidecar = read_sidecar(adapter_dir)
    if sidecar is not None:
        provenance.update(sidecar.get("provenance", {}))
        provenance["pituning_export"] = {
            k: sidecar[k] for k in ("name", "kind", "task", "backbone", "created", "library") if k in sidecar
        }
        metrics = {k: float(v) for k, v in sidecar.get("metrics", {}).items()}
    if cfg.get("peft_type") == "LORA":
        provenance["peft"] = _jsonable(peft_lora_options(cfg))
    provenance["imported_from"] = str(adapter_dir)
    return provenance, metrics

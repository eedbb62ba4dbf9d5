"""Read and write PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

LoRA lines up exactly: a pituning LoRA expert (a collapsed interpolation included) exported here loads with
``PeftModel.from_pretrained`` and gives the same outputs, and any plain PEFT LoRA adapter imports as a pituning
expert. Prefixes line up in *layout* only (see :func:`prefix_to_peft`). PEFT itself is not needed to read or write
these files; only its loading (in tests and user code) is.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pituning.errors import ConfigError, ExpertError
from pituning.experts.lora.config import LoraConfig
from pituning.experts.prefix.config import PrefixConfig

__all__ = ["lora_from_peft", "lora_to_peft", "prefix_from_peft", "prefix_to_peft", "read_peft_config"]

_PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _write_dir(out_dir: str | Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write the two files into ``out_dir`` atomically (a sibling temp dir renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export into a new directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir``."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter_dir} is not a PEFT adapter directory: {CONFIG_FILE} is missing.")
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def _read_weights(adapter_dir: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{adapter_dir} has no {WEIGHTS_FILE}; only safetensors adapters are read (never a pickled .bin)."
        )
    return load_file(str(path))


def lora_to_peft(
    config: LoraConfig,
    state: Mapping[str, Tensor],
    modules: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a LoRA expert as a PEFT LoRA adapter directory.

    Args:
        config: the expert's config.
        state: its tensors (``<module>.pi_lora.lora_A`` / ``lora_B``).
        modules: module name -> layout, as :meth:`pituning.ExpertModel.expert_modules` reports it.
        out_dir: a new (or empty) directory.
        base_model_name_or_path: recorded in ``adapter_config.json``.

    Raises:
        ConfigError: a convolution PEFT cannot express (groups > 1, or a subclass that pads in its forward).
    """
    tensors: dict[str, Tensor] = {}
    fan_in_fan_out = False
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
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    return _write_dir(out_dir, peft_config, tensors)


def _resolve(module: str, names: set[str]) -> str:
    """Map a PEFT module path onto a module of our backbone (PEFT's base may add or drop a wrapper prefix)."""
    if module in names:
        return module
    matches = [n for n in names if n.endswith("." + module) or module.endswith("." + n)]
    if len(matches) == 1:
        return matches[0]
    raise ExpertError(
        f"PEFT module {module!r} is not in this backbone ({len(matches)} candidates); load the adapter into the "
        "backbone it was trained on."
    )


def lora_from_peft(adapter_dir: str | Path, module_names: set[str]) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read a PEFT LoRA adapter as a pituning LoRA config and state.

    Args:
        adapter_dir: the PEFT directory.
        module_names: the module names of the target backbone (to resolve PEFT's paths).

    Raises:
        ConfigError: not a plain LoRA adapter (DoRA, bias training, embedding LoRA, ``modules_to_save`` or
            per-module ranks are not pituning LoRA experts).
    """
    cfg = read_peft_config(adapter_dir)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter, not LORA.")
    for option, plain in (("use_dora", False), ("bias", "none"), ("modules_to_save", None)):
        if cfg.get(option, plain) not in (plain, [], False):
            raise ConfigError(f"{adapter_dir}: {option}={cfg[option]!r} has no pituning equivalent; use a plain LoRA.")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConfigError(f"{adapter_dir}: per-module ranks (rank_pattern/alpha_pattern) are not supported.")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); pituning by alpha / r
    weights = _read_weights(adapter_dir)
    state: dict[str, Tensor] = {}
    modules: list[str] = []
    pattern = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")
    for key, value in weights.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ConfigError(f"{adapter_dir}: unexpected tensor {key!r} (embedding LoRA, DoRA or extra modules).")
        module = _resolve(match.group(1), module_names)
        state[f"{module}.pi_lora.lora_{match.group(2)}"] = value.float().reshape(value.shape[0], -1)
        if match.group(2) == "A":
            modules.append(module)
    config = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=[re.escape(m) for m in sorted(modules)],
    )
    return config, state


def prefix_to_peft(
    config: PrefixConfig,
    state: Mapping[str, Tensor],
    modules: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    num_attention_heads: int,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
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
    return _write_dir(out_dir, peft_config, {"prompt_embeddings": embedding})


def prefix_from_peft(adapter_dir: str | Path, layers: list[str]) -> tuple[PrefixConfig, dict[str, Tensor]]:
    """Read a PEFT prefix-tuning adapter (without prefix projection) onto the self-attention modules ``layers``."""
    cfg = read_peft_config(adapter_dir)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ConfigError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter, not PREFIX_TUNING.")
    if cfg.get("prefix_projection"):
        raise ConfigError(f"{adapter_dir} uses prefix_projection (an MLP over the prefix); pituning stores the prefix.")
    if int(cfg["num_layers"]) != len(layers):
        raise ConfigError(
            f"{adapter_dir} has prefixes for {cfg['num_layers']} layers but the backbone has {len(layers)} "
            "self-attention modules."
        )
    embedding = _read_weights(adapter_dir)["prompt_embeddings"].float()
    kv_dim = int(cfg["token_dim"])
    chunks = embedding.split(kv_dim, dim=1)
    state = {}
    for i, module in enumerate(layers):
        state[f"{module}.pi_prefix.prefix_key"] = chunks[2 * i]
        state[f"{module}.pi_prefix.prefix_value"] = chunks[2 * i + 1]
    return PrefixConfig(num_tokens=int(cfg["num_virtual_tokens"])), state

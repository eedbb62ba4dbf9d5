"""PEFT interop of the bank: export an expert as a PEFT adapter directory, import one as an expert.

The file formats themselves are :mod:`pituning.peft_io`'s.
"""

from __future__ import annotations

from pathlib import Path

from pituning.bank.catalog import _library
from pituning.bank.records import Expert
from pituning.bank.store import BankStore
from pituning.errors import BankError, ConfigError, ExpertError
from pituning.experts.base import ExpertConfig, validate_name
from pituning.experts.lora import LoraConfig
from pituning.experts.prefix import PrefixConfig
from pituning.model import ExpertModel
from pituning.tasks import TaskInfo

__all__ = ["PeftMixin"]


class PeftMixin(BankStore):
    """:meth:`export_peft` and :meth:`import_peft` (part of :class:`~pituning.bank.ExpertBank`)."""

    def export_peft(
        self,
        name: str,
        out_dir: str | Path,
        *,
        num_attention_heads: int | None = None,
        task_class: str | None = None,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> Path:
        """Write expert ``name`` as a PEFT adapter directory (LoRA exactly; prefix in PEFT's layout, see
        :func:`pituning.peft_io.prefix_to_peft`, which needs ``num_attention_heads``: the key/value heads).

        The directory also gets ``README.md`` (a model card) and ``pituning.json`` (task, backbone, metrics and
        provenance, read back by :meth:`import_peft`); PEFT ignores both.

        Args:
            name: the expert.
            out_dir: a new (or empty) directory.
            num_attention_heads: key/value heads (prefix experts only).
            task_class: the transformers class the adapter should load into (``BertForSequenceClassification``); the
                module paths are moved into it. Default: the class the expert's paths fit (the one it came from).
            task_type: a PEFT task type instead (``SEQ_CLS``, ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``TOKEN_CLS``,
                ``QUESTION_ANS``, ``FEATURE_EXTRACTION``).
            base_model_name_or_path: what ``AutoPeftModel...`` loads; default the backbone's directory or hub name
                (``None`` for a backbone built from a config or module).
        """
        from pituning.peft_io import export_files, loadable_base, lora_to_peft, prefix_to_peft, resolve_export_target

        expert = self.get(name)
        if not expert.modules:
            raise BankError(f"Expert {name!r} was stored without its module layout; re-add it from a model.")
        base = base_model_name_or_path or loadable_base(expert.backbone.source)
        if expert.config.kind not in ("lora", "prefix"):
            raise ConfigError(
                f"Expert {name!r} is a {expert.config.kind} expert; PEFT has no bottleneck-adapter format, so only "
                "LoRA and prefix experts export."
            )
        if expert.config.kind == "prefix" and num_attention_heads is None:
            raise ConfigError("Exporting a prefix needs num_attention_heads (the model's key/value heads).")
        if expert.config.kind == "lora" or task_class is not None or task_type is not None:
            target = resolve_export_target(
                expert.modules, base_model_name_or_path=base, task_class=task_class, task_type=task_type
            )
        else:
            target = None
        files = export_files(expert, base_model_name_or_path=base, target=target, library=_library())
        if isinstance(expert.config, LoraConfig):
            options = expert.provenance.get("peft")
            return lora_to_peft(
                expert.config,
                expert.state,
                expert.modules,
                out_dir,
                base_model_name_or_path=base,
                target=target,
                options=options if isinstance(options, dict) else None,
                extra_files=files,
            )
        assert isinstance(expert.config, PrefixConfig) and num_attention_heads is not None
        return prefix_to_peft(
            expert.config,
            expert.state,
            expert.modules,
            out_dir,
            num_attention_heads=num_attention_heads,
            task_type=target.task_type if target is not None else None,
            base_model_name_or_path=base,
            extra_files=files,
        )

    def import_peft(
        self, adapter_dir: str | Path, model: ExpertModel, name: str, task: TaskInfo, *, overwrite: bool = False
    ) -> Expert:
        """Store a PEFT LoRA or prefix-tuning adapter directory as expert ``name`` of ``model``'s backbone.

        Only adapters pituning computes exactly import (see :func:`pituning.peft_io.check_lora_config`); every file is
        validated, and a problem raises a :class:`~pituning.errors.ConfigError` (or ``ExpertError`` when the weights do
        not fit the backbone) naming the file. A ``pituning.json`` sidecar (written by :meth:`export_peft`) brings the
        expert's provenance and metrics back. The weights are loaded into ``model`` once to check every shape (and
        removed again), so a bad adapter never reaches the bank.
        """
        from pituning.errors import PiTuningError
        from pituning.peft_io import imported_metadata, lora_from_peft, prefix_from_peft, read_peft_config, read_sidecar

        validate_name(name)
        cfg = read_peft_config(adapter_dir)
        sidecar = read_sidecar(adapter_dir) or {}
        peft_type = cfg["peft_type"]
        config: ExpertConfig
        if peft_type == "LORA":
            config, state = lora_from_peft(
                adapter_dir,
                {n for n, _ in model.backbone.named_modules()},
                backbone=model.backbone,
                base_heads=sidecar.get("peft", {}).get("head_from_base", []),
            )
        elif peft_type == "PREFIX_TUNING":
            config, state = prefix_from_peft(adapter_dir, model.info.names("self_attn"))
        else:
            raise ConfigError(f"{adapter_dir} holds a {peft_type} adapter; LORA and PREFIX_TUNING import.")
        provenance, metrics = imported_metadata(adapter_dir, cfg)
        try:
            model.load_expert(name, config, state, activate=False)
        except PiTuningError as err:
            raise ExpertError(f"{adapter_dir}: the adapter does not fit this backbone: {err}") from err
        try:
            expert = Expert.from_model(model, name, task, provenance=provenance, metrics=metrics)
        finally:
            model.remove_expert(name)
        self.add(expert, overwrite=overwrite)
        return expert

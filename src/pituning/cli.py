"""The ``pituning`` command.

Trainer stages (LightningCLI: ``--config file.yaml``, ``--model.*``, ``--data.*``, ``--trainer.*``, ``--help``):

- ``pituning train-expert``: stage 1, :class:`~pituning.modules.ExpertTrainingModule` (fit, then test).
- ``pituning embed``: stage 2, :class:`~pituning.modules.TaskEmbeddingModule` over the training split.
- ``pituning interpolate``: stage 3, :class:`~pituning.modules.InterpolationModule` (fit, then test).
- ``pituning evaluate``: test a stored expert (``--model.init_from NAME``).

Plain commands: ``pituning graph``, ``pituning export``, ``pituning run --config suite.yaml`` and
``pituning bank list | show | remove | verify | recover | merge | import-peft | export-peft``. ``main(args)`` is
callable from tests and returns the exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from pituning.config import SuiteConfig
from pituning.errors import BankError, ConfigError, PiTuningError

__all__ = ["build_parser", "main"]


def _bank_parser(help_text: str) -> ArgumentParser:
    parser = ArgumentParser(description=help_text)
    parser.add_argument("--bank", required=True, help="Bank directory or fsspec URL (memory://, s3://...).")
    return parser


STAGES = {
    "train-expert": "Stage 1: train one expert (and its head) on a task and store it in the bank.",
    "embed": "Stage 2: store a task's Fisher embedding in the bank.",
    "interpolate": "Stage 3: π-Tuning on a target: interpolate the k most similar experts, store the collapsed one.",
    "evaluate": "Test a stored expert on a task (--model.init_from NAME).",
}
"""The Trainer stages: LightningCLI commands (``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``)."""


def build_parser() -> ArgumentParser:
    """The argument parser of the plain commands (the Trainer stages are LightningCLI parsers)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    parser = ArgumentParser(
        prog="pituning",
        description="π-Tuning: experts, task similarity and interpolation. `pituning COMMAND --help` shows a "
        "command's options; the Trainer stages (" + ", ".join(STAGES) + ") take a LightningCLI config "
        "(--config, --model.*, --data.*, --trainer.*).",
    )
    commands = parser.add_subcommands(dest="command", required=True)
    for stage, text in STAGES.items():
        # listed here (help, "invalid choice" errors); main() hands a stage's own arguments to its LightningCLI
        # parser, which imports Lightning only when a stage runs
        commands.add_subcommand(stage, ArgumentParser(description=text), help=text)

    graph = ArgumentParser(description="Build the task graph from the bank's embeddings: JSON, CSV and PNG plots.")
    graph.add_argument("--bank", required=True, help="Bank directory or URL.")
    graph.add_argument("--out", required=True, help="Output folder.")
    graph.add_argument("--names", type=list[str] | None, default=None, help="Tasks (default: all embedded).")
    graph.add_argument("--rescale", default="unit_mean", help="Fisher rescaling: unit_mean or none.")
    graph.add_argument("--neighbours", type=int, default=2, help="Nearest tasks printed and drawn per task.")
    graph.add_argument("--k", type=int | None, default=None, help="Deprecated spelling of --neighbours.")
    graph.add_argument("--no-plot", action="store_true", help="Skip the PNG plots.")
    commands.add_subcommand("graph", graph, help="Build the task graph.")

    export = ArgumentParser(description="Export a stored expert: a PEFT adapter directory or plain safetensors.")
    export.add_argument("--bank", required=True, help="Bank directory or URL.")
    export.add_argument("name", help="Expert name.")
    export.add_argument("out", help="New directory to write.")
    export.add_argument("--format", default="peft", help="peft (LoRA, prefix) or safetensors (any kind).")
    export.add_argument(
        "--num-attention-heads", type=int | None, default=None, help="Key/value heads of the model (prefix to PEFT)."
    )
    commands.add_subcommand("export", export, help="Export an expert.")

    run = ArgumentParser(description="Run a whole suite (sources, targets, expert kind, k, shots, seeds) from YAML.")
    run.add_argument("--config", action="config", help="Suite YAML.")
    run.add_class_arguments(SuiteConfig, None)
    commands.add_subcommand("run", run, help="Run a π-Tuning suite.")

    bank = ArgumentParser(description="Manage an expert bank.")
    commands.add_subcommand("bank", bank, help="Manage an expert bank.")
    sub = bank.add_subcommands(dest="action", required=True)

    listing = _bank_parser("List experts, optionally filtered.")
    listing.add_argument("--modality", default=None, help="Only this modality (text, vision, vision-language).")
    listing.add_argument("--kind", default=None, help="Only this expert kind (lora, adapter, prefix).")
    listing.add_argument("--task", default=None, help="Only this task name.")
    listing.add_argument("--backbone", default=None, help="Only this backbone source or structure fingerprint prefix.")
    listing.add_argument("--json", action="store_true", help="Print JSON lines instead of a table.")
    sub.add_subcommand("list", listing, help="List experts.")

    show = _bank_parser("Show one expert's metadata and files.")
    show.add_argument("name", help="Expert name.")
    sub.add_subcommand("show", show, help="Show one expert.")

    remove = _bank_parser("Delete one expert.")
    remove.add_argument("name", help="Expert name.")
    sub.add_subcommand("remove", remove, help="Delete one expert.")

    verify = _bank_parser(
        "Re-check the manifest, the journal and every file's sha256; exit 1 on any problem. Warnings list what gc "
        "removes (interrupted writes, temporary files, damaged cache) and intact experts that recover registers."
    )
    verify.add_argument(
        "--gc",
        action="store_true",
        help="Also delete what is provably abandoned (never an intact expert; nothing on a damaged bank).",
    )
    sub.add_subcommand("verify", verify, help="Verify every checksum.")

    recover = _bank_parser(
        "Rebuild a damaged bank's manifest from its intact records and expert folders; the old manifest and journal "
        "are kept under backup/."
    )
    sub.add_subcommand("recover", recover, help="Rebuild a damaged bank.")

    imp = _bank_parser("Import a PEFT LoRA or prefix-tuning adapter directory as an expert.")
    imp.add_argument("adapter_dir", help="PEFT directory (adapter_config.json + adapter_model.safetensors).")
    imp.add_argument("--name", required=True, help="Name of the new expert.")
    imp.add_argument("--backbone", required=True, help="Hub name or local directory of the backbone it belongs to.")
    imp.add_argument("--backbone-task", default="base", help="Auto class of the backbone (base, causal-lm, ...).")
    imp.add_argument("--task", default=None, help="Task name (default: the expert name).")
    imp.add_argument("--modality", default="text", help="Task modality.")
    imp.add_argument("--overwrite", action="store_true", help="Replace an expert of the same name.")
    imp.add_argument(
        "--backbone-description",
        default=None,
        help="Where experts go in a family without a preset: a BackboneDescription as a JSON/YAML object or a path "
        'to a JSON/YAML file, e.g. \'{"family": "bart", "roles": {"query": "..."}}\'.',
    )
    sub.add_subcommand("import-peft", imp, help="Import a PEFT adapter.")

    merge = _bank_parser(
        "Merge stored experts into one plain expert of their kind (no training): linear (task arithmetic), ties, "
        "dare_linear, dare_ties, magnitude_prune, concat or svd; see docs/recycling.md."
    )
    merge.add_argument("names", nargs="+", help="Experts to merge (one kind, one backbone).")
    merge.add_argument("--name", required=True, help="Name of the merged expert.")
    merge.add_argument("--method", default="linear", help="Merge method (default linear).")
    merge.add_argument("--weights", type=list[float] | None, default=None, help="One weight per expert (default 1/n).")
    merge.add_argument("--density", type=float, default=1.0, help="Share of entries kept by ties, dare, prune.")
    merge.add_argument("--seed", type=int, default=0, help="Seed of DARE's random drop.")
    merge.add_argument("--rank", type=int | None, default=None, help="LoRA rank of the result (svd; others: exact).")
    merge.add_argument(
        "--lora-space", default="delta", help="delta (merge the updates B A, exact) or factors (A and B, as PEFT)."
    )
    merge.add_argument("--overwrite", action="store_true", help="Replace an expert of the same name.")
    sub.add_subcommand("merge", merge, help="Merge experts.")

    exp = _bank_parser("Export a LoRA (or prefix) expert as a PEFT adapter directory.")
    exp.add_argument("name", help="Expert name.")
    exp.add_argument("out_dir", help="New directory to write.")
    exp.add_argument("--num-attention-heads", type=int, default=None, help="Key/value heads (prefix experts only).")
    exp.add_argument(
        "--task-class", default=None, help="transformers class to load into (BertForSequenceClassification, ...)."
    )
    exp.add_argument(
        "--task-type", default=None, help="PEFT task type instead (SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM, ...)."
    )
    exp.add_argument(
        "--base-model", default=None, help="base_model_name_or_path to write (default: the backbone's directory)."
    )
    sub.add_subcommand("export-peft", exp, help="Export as a PEFT adapter.")

    return parser


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _backbone_description(value: str | None) -> Any:
    """``--backbone-description``: a JSON/YAML object, or a path to a JSON/YAML file, of
    :class:`~pituning.backbones.BackboneDescription` fields; ``None`` when not given."""
    if value is None:
        return None
    from pathlib import Path

    import yaml

    from pituning.backbones import BackboneDescription

    text, where = value, "--backbone-description"
    if not value.lstrip().startswith("{") and Path(value).is_file():
        text, where = Path(value).read_text(), value
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not a JSON/YAML object ({err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a JSON/YAML object of BackboneDescription fields (family, roles, lora_roles, ...) or a "
            "file holding one."
        )
    try:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return BackboneDescription(**fields)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}; the fields are those of BackboneDescription.") from err


def _list_bank(bank: Any, opts: Namespace) -> None:
    entries = bank.list(modality=opts.modality, kind=opts.kind, task=opts.task, backbone=opts.backbone)
    if opts.json:
        for e in entries:
            record = {"name": e.name, "kind": e.kind, "modality": e.modality, "task": e.task, "backbone": e.backbone}
            print(json.dumps({**record, "embedding": e.has_embedding, "created": e.created}))
        return
    rows = [["NAME", "KIND", "MODALITY", "TASK", "BACKBONE", "EMBEDDING", "CREATED"]]
    rows += [
        [e.name, e.kind, e.modality, e.task, e.backbone, "yes" if e.has_embedding else "no", e.created] for e in entries
    ]
    _print_table(rows)
    print(f"{len(entries)} expert(s) in {bank.location}")


def _run_bank(cfg: Namespace) -> int:
    action = cfg.action
    opts = cfg[action]
    if action == "list":  # the catalog alone: no torch, so listing starts fast
        from pituning.bank import BankCatalog

        _list_bank(BankCatalog(opts.bank, create=False), opts)
        return 0
    from pituning.bank import ExpertBank, TaskInfo

    if action == "recover":
        report = ExpertBank.recover(opts.bank)
        for line in report.dropped:
            print(f"dropped damaged record: {line}")
        for line in report.skipped:
            print(f"not registered: {line}")
        for name in report.registered:
            print(f"registered {name}")
        if report.backup:
            print(f"the previous manifest and journal are in {report.backup}")
        print(f"{report.entries} expert(s) in {opts.bank}")
        return 0
    bank = ExpertBank(opts.bank, create=action == "import-peft")
    if action == "show":
        entry = bank.entry(opts.name)
        meta: dict[str, Any] = bank._meta(entry)
        meta["files"] = entry.files
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    if action == "remove":
        bank.remove(opts.name)
        print(f"removed {opts.name}")
        return 0
    if action == "verify":
        problems, warnings = bank.verify()
        for line in warnings:
            print(f"warning: {line}")
        for line in problems:
            print(f"problem: {line}")
        try:
            checked = len(bank)
        except BankError:  # verify reported the damaged manifest or journal; gc never runs on such a bank
            print("the manifest or journal is damaged, so nothing was deleted; `pituning bank recover` repairs it")
            return 1
        if opts.gc:
            for folder in bank.gc():
                print(f"removed {folder}")
        print(f"{checked} expert(s) checked, {len(problems)} problem(s)")
        return 1 if problems else 0
    if action == "import-peft":
        from pituning.backbones import load_backbone
        from pituning.model import ExpertModel
        from pituning.peft_io import read_peft_config

        read_peft_config(opts.adapter_dir)  # a broken adapter stops before a (large) backbone is loaded
        description = _backbone_description(opts.backbone_description)
        model = ExpertModel(load_backbone(opts.backbone, task=opts.backbone_task, description=description))
        task = TaskInfo(name=opts.task or opts.name, modality=opts.modality)
        expert = bank.import_peft(opts.adapter_dir, model, opts.name, task, overwrite=opts.overwrite)
        print(f"imported {expert.name} ({expert.config.kind}) into {bank.location}")
        return 0
    if action == "merge":
        merged = bank.merge(
            opts.names,
            opts.weights,
            method=opts.method,
            name=opts.name,
            density=opts.density,
            seed=opts.seed,
            rank=opts.rank,
            lora_space=opts.lora_space,
            overwrite=opts.overwrite,
        )
        weights = merged.provenance.get("weights")
        print(
            f"merged {', '.join(opts.names)} ({opts.method}, weights {weights}) into {merged.name} in {bank.location}"
        )
        return 0
    if action == "export-peft":
        out = bank.export_peft(
            opts.name,
            opts.out_dir,
            num_attention_heads=opts.num_attention_heads,
            task_class=opts.task_class,
            task_type=opts.task_type,
            base_model_name_or_path=opts.base_model,
        )
        print(f"wrote {out}")
        return 0
    raise AssertionError(action)  # pragma: no cover - the parser only allows the actions above


def _fold_flat_stage_options(stage: str, args: list[str]) -> list[str]:
    """``args`` with the model options spelled flat (``model: {lr: ...}``, ``--model.lr``: the spelling before the
    typed configs) moved under ``model.optim`` / ``model.interpolation``, each move announced on stderr."""
    import dataclasses

    import yaml

    from pituning.config import InterpolationConfig, OptimConfig

    groups = {f.name: "optim" for f in dataclasses.fields(OptimConfig)}
    if stage == "interpolate":
        groups.update({f.name: "interpolation" for f in dataclasses.fields(InterpolationConfig)})
    moved: list[str] = []

    def fold(config: Any) -> Any:
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model, dict) or not set(model) & set(groups):
            return config
        model = dict(model)
        for key in [key for key in model if key in groups]:
            group = model.get(groups[key]) or {}
            if not isinstance(group, dict) or key in group:
                raise ConfigError(f"model.{key} is given twice: beside model.{groups[key]} and inside it; keep one.")
            model[groups[key]] = {**group, key: model.pop(key)}
            moved.append(f"model.{key} -> model.{groups[key]}.{key}")
        return {**config, "model": model}

    out: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        position += 1
        key, equals, value = arg.partition("=")
        is_config = key in ("--config", "-c")
        name = key.removeprefix("--model.") if key.startswith("--model.") else ""
        if not (is_config or name in groups):
            out.append(arg)
            continue
        if not equals:
            if position == len(args):
                out.append(arg)  # LightningCLI says the value is missing
                continue
            value = args[position]
            position += 1
        if name:
            moved.append(f"--model.{name} -> --model.{groups[name]}.{name}")
            out.append(f"--model.{groups[name]}.{name}={value}")
            continue
        try:
            with open(value, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            config = None  # not a readable YAML file (or a YAML string): LightningCLI reads it or names the problem
        folded = fold(config)
        _check_stage_keys(stage, folded, value)
        out += [key, value if folded is config else yaml.safe_dump(folded, sort_keys=False)]
    for move in moved:
        print(f"pituning {stage}: {move} (the flat spelling is deprecated and will be removed)", file=sys.stderr)
    return out


def _check_stage_keys(stage: str, config: Any, path: str) -> None:
    """A stage YAML's misspelt keys (``model:``, its ``optim:`` / ``interpolation:``, the DataModule's ``init_args:``)
    named with a "did you mean", before LightningCLI's plainer error."""
    if not isinstance(config, dict):
        return
    import dataclasses
    import importlib

    from pituning.config import InterpolationConfig, OptimConfig, did_you_mean
    from pituning.pipeline import data_options

    module = importlib.import_module("pituning.modules")
    model_class = getattr(module, _STAGE_MODULES[stage])
    checks: list[tuple[str, Any, list[str]]] = []
    model = config.get("model")
    if isinstance(model, dict):
        checks.append(("model", model, data_options(model_class)))
        for name, cls in (("optim", OptimConfig), ("interpolation", InterpolationConfig)):
            if isinstance(model.get(name), dict):
                checks.append((f"model.{name}", model[name], [f.name for f in dataclasses.fields(cls)]))
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict) and isinstance(data.get("class_path"), str):
        module_name, _, class_name = data["class_path"].rpartition(".")
        try:
            data_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            data_class = None  # LightningCLI names the class path
        if isinstance(data_class, type):
            checks.append(("data.init_args", data["init_args"], data_options(data_class)))
    for where, given, known in checks:
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"Unknown {where} option(s) {did_you_mean(unknown, known)} in {path}.")


_STAGE_MODULES = {
    "train-expert": "ExpertTrainingModule",
    "embed": "TaskEmbeddingModule",
    "interpolate": "InterpolationModule",
    "evaluate": "ExpertTrainingModule",
}


def _run_stage(stage: str, args: list[str]) -> int:
    """A Trainer stage through LightningCLI."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from pituning.pipeline import quiet

    quiet(offline=False)  # no accelerator lines, tips or progress bars of the libraries: the stage's own output
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # ``args`` is this command's own argv (after the stage name), never a mix with sys.argv
    warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)

    from pituning.data import TaskDataModule
    from pituning.modules import ExpertTrainingModule, InterpolationModule, TaskEmbeddingModule

    model_class = {
        "ExpertTrainingModule": ExpertTrainingModule,
        "TaskEmbeddingModule": TaskEmbeddingModule,
        "InterpolationModule": InterpolationModule,
    }[_STAGE_MODULES[stage]]
    defaults: dict[str, Any] = {"enable_checkpointing": False}
    if stage == "embed":
        defaults["inference_mode"] = False
    cli = LightningCLI(
        model_class,
        TaskDataModule,
        subclass_mode_data=True,
        run=False,
        args=_fold_flat_stage_options(stage, args),
        trainer_defaults=defaults,
        save_config_callback=None,
        seed_everything_default=0,
        parser_kwargs={"prog": f"pituning {stage}"},
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if stage == "embed":
        trainer.predict(model, datamodule=data)
        if trainer.is_global_zero:
            print(f"stored the task embedding of {model.hp.expert_name} ({model.examples} examples) in {model.hp.bank}")
        return 0
    if stage in ("train-expert", "interpolate"):
        trainer.fit(model, data)
        if trainer.is_global_zero and model.stored is not None:
            print(f"stored {model.stored.name} in {model.bank_location}")
    trainer.test(model, data)
    return 0


def _run_graph(opts: Namespace) -> int:
    from pituning.bank import ExpertBank
    from pituning.graph import TaskGraph

    neighbours = opts.neighbours
    if opts.k is not None:  # k names the number of sources everywhere else
        print("pituning graph: --k is deprecated and will be removed; use --neighbours", file=sys.stderr)
        neighbours = opts.k
    graph = TaskGraph.from_bank(ExpertBank(opts.bank, create=False), opts.names, rescale=opts.rescale)
    files = graph.save(opts.out)
    if not opts.no_plot:
        files.update(graph.plot(opts.out, k=neighbours))
    for name in graph.names:
        print(f"{name}: " + ", ".join(f"{n} {s:.3f}" for n, s in graph.top_k(name, neighbours)))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def _run_export(opts: Namespace) -> int:
    from pituning.bank import ExpertBank

    bank = ExpertBank(opts.bank, create=False)
    if opts.format == "peft":
        print(f"wrote {bank.export_peft(opts.name, opts.out, num_attention_heads=opts.num_attention_heads)}")
        return 0
    if opts.format != "safetensors":
        raise ConfigError(f"--format must be peft or safetensors, got {opts.format!r}.")
    from pathlib import Path

    from safetensors.torch import save_file

    expert = bank.get(opts.name)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=False)
    save_file(expert.state, str(out / "weights.safetensors"))
    if expert.head is not None:
        save_file(expert.head, str(out / "head.safetensors"))
    (out / "expert.json").write_text(json.dumps(bank._meta(bank.entry(opts.name)), indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


def _run_suite(opts: Namespace) -> int:
    from pituning.pipeline import quiet
    from pituning.suite import run_suite

    quiet(offline=False)  # the suite's progress lines, not the libraries'

    values = {k: v for k, v in vars(opts).items() if k != "config" and not k.startswith("__")}
    run_suite(SuiteConfig(**values))  # checks every field before anything loads
    return 0


def _check_suite_keys(args: list[str]) -> None:
    """A suite YAML's unknown top-level keys, named with a "did you mean" before the parser's plainer error."""
    import dataclasses

    import yaml

    from pituning.config import did_you_mean

    known = [f.name for f in dataclasses.fields(SuiteConfig)]
    for i, arg in enumerate(args):
        key, equals, value = arg.partition("=")
        if key not in ("--config", "-c") or not (equals or i + 1 < len(args)):
            continue
        path = value if equals else args[i + 1]
        try:
            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the parser names the problem
        unknown = sorted(set(config) - set(known)) if isinstance(config, dict) else []
        if unknown:
            raise ConfigError(
                f"Unknown suite option(s) {did_you_mean(unknown, known)} in {path}; `pituning run --help` lists them."
            )


def _interrupted() -> int:
    print("\npituning: interrupted; run the same command again to resume", file=sys.stderr)
    return 130


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line ``args`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(args) if args is not None else sys.argv[1:]
    try:
        if argv and argv[0] in STAGES:
            return _run_stage(argv[0], argv[1:])  # before build_parser: a stage's options are its LightningCLI's
        if argv and argv[0] == "run":
            _check_suite_keys(argv[1:])
        parser = build_parser()
        cfg = parser.parse_args(argv)
        if cfg.command == "bank":
            return _run_bank(cfg.bank)
        if cfg.command == "graph":
            return _run_graph(cfg.graph)
        if cfg.command == "export":
            return _run_export(cfg.export)
        if cfg.command == "run":  # the typed configs (module, interpolation, tasks) built by jsonargparse
            return _run_suite(parser.instantiate(cfg).run)
    except PiTuningError as err:
        print(f"pituning: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every write is atomic and every stage cached: the same command resumes
        return _interrupted()
    except SystemExit as exit_:  # a Trainer turns Ctrl-C into sys.exit(1) inside its KeyboardInterrupt handler
        if isinstance(exit_.__context__, KeyboardInterrupt):
            return _interrupted()
        if type(exit_).__name__ == "SIGTERMException":  # Lightning's, a SystemExit of status 0: never report success
            print("\npituning: terminated (SIGTERM); run the same command again to resume", file=sys.stderr)
            return 143
        raise
    raise AssertionError(cfg.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

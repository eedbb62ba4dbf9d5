"""Write the ``--help`` output of every ``pituning`` command into ``docs/cli/help/*.txt`` (committed; the CLI
reference page includes them).

Run from the repository root after changing an option, with pituning installed::

    python docs/cli/make_cli_help.py            # rewrite the files
    python docs/cli/make_cli_help.py --check    # exit 1 if a file is out of date

The help is rendered 100 columns wide. For the Trainer stages (LightningCLI) only the ``--model.*`` section is kept
(the ``--trainer.*`` options are Lightning's own), and the options of each DataModule come from
``--data.help CLASS``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HELP_DIR = Path(__file__).resolve().parent / "help"

PLAIN = {
    "pituning": [],
    "graph": ["graph"],
    "export": ["export"],
    "run": ["run"],
    "bank": ["bank"],
    "bank-list": ["bank", "list"],
    "bank-show": ["bank", "show"],
    "bank-remove": ["bank", "remove"],
    "bank-verify": ["bank", "verify"],
    "bank-recover": ["bank", "recover"],
    "bank-import-peft": ["bank", "import-peft"],
    "bank-merge": ["bank", "merge"],
    "bank-export-peft": ["bank", "export-peft"],
}
STAGES = ("train-expert", "embed", "interpolate", "evaluate")
DATA = {
    "data-text": "TextClassificationDataModule",
    "data-vision": "ImageClassificationDataModule",
    "data-vision-language": "VisionLanguageDataModule",
}


def _help(args: list[str]) -> str:
    """stdout of ``pituning ARGS --help`` (stderr, where Lightning puts its warnings, is dropped)."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    code = "import sys; from pituning.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"pituning {' '.join(args)} --help failed:\n{done.stderr}")
    return "\n".join(line.rstrip() for line in done.stdout.splitlines()).strip() + "\n"


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _model_section(text: str) -> str:
    """The ``--model.*`` group of a LightningCLI help (its title line is the module's docstring summary)."""
    for paragraph in _paragraphs(text):
        if "\n  --model CONFIG" in paragraph:
            return paragraph.strip() + "\n"
    raise SystemExit("no --model section in the stage help")


def _data_section(text: str) -> str:
    """The options of one DataModule from ``--data.help CLASS`` (without the generated usage line)."""
    paragraphs = _paragraphs(text)
    start = next(i for i, p in enumerate(paragraphs) if p.startswith("Help for --data.help="))
    return "\n\n".join(p.strip() for p in paragraphs[start + 1 :]) + "\n"


def render() -> dict[str, str]:
    """File name -> content of every help file."""
    files = {f"{name}.txt": _help(args) for name, args in PLAIN.items()}
    for stage in STAGES:
        files[f"{stage}.txt"] = _model_section(_help([stage]))
    for name, cls in DATA.items():
        files[f"{name}.txt"] = _data_section(_help(["train-expert", "--data.help", cls]))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate (or --check) docs/cli/help/*.txt.")
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 if a file differs.")
    args = parser.parse_args(argv)
    files = render()
    stale = [name for name, text in files.items() if not (HELP_DIR / name).is_file() or
             (HELP_DIR / name).read_text() != text]  # fmt: skip
    if args.check:
        for name in stale:
            print(f"out of date: docs/cli/help/{name}")
        return 1 if stale else 0
    HELP_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (HELP_DIR / name).write_text(text)
    print(f"wrote {len(files)} files to {HELP_DIR} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

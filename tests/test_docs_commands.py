"""Every ``pituning`` command shown in the README and the docs parses: the plain commands with the command's own
parser, the Trainer stages through their LightningCLI with ``--print_config`` (options, config files and class paths
checked; nothing trains). Synopsis lines (``DIR``, ``NAME``, ``[--flag]`` placeholders) are left out, and so are the
``python ...`` and ``make ...`` lines, which the example, benchmark and CI tests run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pituning.cli import STAGES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLACEHOLDER = re.compile(r"\[|\b(DIR|NAME|OUT_DIR|ADAPTER_DIR|MODEL_DIR|STAGE|COMMAND|TASK|H|M|K|T|B)\b")


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("pituning ") and not PLACEHOLDER.search(line):
                    found.append((page.relative_to(ROOT).as_posix(), line))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 40  # a change in the pages' format must not silently empty this test


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_docs_command_parses(page: str, command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the repository
    argv = shlex.split(command)[1:]
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), None)
    if config is not None and not (ROOT / config).exists():
        # a config written out on the same page (recycling.md's one_target.yaml): take it from the page
        text = (ROOT / page).read_text()
        match = re.search(rf"```yaml\n# {re.escape(config)}\n(.*?)```", text, re.S)
        assert match, f"{page}: {command!r} names {config}, which neither the repository nor the page holds"
        (tmp_path / config).write_text(match.group(1))
        argv[argv.index(config)] = str(tmp_path / config)
    if argv[0] in STAGES:
        if "--data.help" not in argv:
            argv.append("--print_config")
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None), f"{page}: {command!r} does not parse"
        return
    build_parser().parse_args(argv)  # a usage error exits 2 and fails the test

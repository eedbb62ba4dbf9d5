"""MkDocs hook: put every ``benchmarks/results/*.md`` on the benchmarks page.

A page that contains the marker ``<!-- benchmark-results -->`` gets, in its place, one section per result file in
``benchmarks/results/`` (sorted by file name), so a new result file shows up in the docs without editing them:

- each file's headings move one level down (its ``# Title`` becomes a section of the page), and a line names the
  source file;
- images next to the result files (``*.png``, ``*.svg``, ``*.jpg``) are copied into the site and their links
  rewritten, so a result file may show its plots with ``![caption](plot.png)``;
- any other relative link (to a script, a config, a JSON file) cannot be followed in the site: it becomes the link
  text followed by the repository path in code, so a result file never breaks ``mkdocs build --strict``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

MARKER = "<!-- benchmark-results -->"
RESULTS = Path("benchmarks") / "results"
IMAGES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _result_files(config: Any) -> list[Path]:
    return sorted((_root(config) / RESULTS).glob("*.md"))


def on_files(files: Files, config: Any) -> Files:
    """Add the images of ``benchmarks/results/`` to the site, under the same path."""
    root = _root(config)
    for path in sorted((root / RESULTS).rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGES:
            files.append(File.generated(config, path.relative_to(root).as_posix(), abs_src_path=str(path)))
    return files


def _rewrite_links(line: str, page_dir: str, root: Path) -> str:
    def replace(match: re.Match[str]) -> str:
        bang, text, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)  # absolute URL, anchor, or site-absolute: leave alone
        path = Path(os.path.normpath(RESULTS / target)).as_posix()  # relative to the repository root
        inside = path.startswith(RESULTS.as_posix() + "/")
        if inside and Path(path).suffix.lower() in IMAGES and (root / path).is_file():
            return f"{bang}[{text}]({page_dir}{path})"  # copied by on_files under the same path
        return f"{text} (`{path}`)" if text else f"`{path}`"

    return _LINK.sub(replace, line)


def _section(path: Path, page_dir: str, root: Path) -> str:
    lines, in_fence, titled = [], False, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            line = "#" + line
            if not titled:  # the file's first heading: name the source right under it
                lines += [line, "", f"*Source: `{(RESULTS / path.name).as_posix()}`*", ""]
                titled = True
                continue
        elif not in_fence:
            line = _rewrite_links(line, page_dir, root)
        lines.append(line)
    if not titled:
        lines = [f"## {path.stem}", "", f"*Source: `{(RESULTS / path.name).as_posix()}`*", "", *lines]
    return "\n".join(lines).strip() + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Replace the marker with the result files."""
    if MARKER not in markdown:
        return markdown
    depth = page.file.src_uri.count("/")
    page_dir = "../" * depth
    sections = [_section(path, page_dir, _root(config)) for path in _result_files(config)]
    body = "\n".join(sections) if sections else "No result files yet.\n"
    return markdown.replace(MARKER, body)

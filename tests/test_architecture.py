"""The import rules of docs/architecture.md: a layer imports only itself and the layers below it.

Every module's imports are read with ``ast`` (nothing is imported), at module level and inside functions alike (a
function-level import is a dependency too, only a later one), ``if TYPE_CHECKING:`` blocks included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pituning"

# lowest first; a module is in the layer of the longest prefix that names it
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("pituning.errors", "pituning._version", "pituning.tasks"),
    "math": (
        "pituning.backbones",
        "pituning.experts",
        "pituning.interpolation",
        "pituning.fisher",
        "pituning.graph",
        "pituning.heads",
        "pituning.model",
    ),
    "storage": (
        "pituning.storage",
        "pituning.bank",
        "pituning.peft_io",
        "pituning.distributed",
    ),
    "recycling": ("pituning.recycling",),
    "package": ("pituning",),  # the facade, pituning/__init__.py (this one by name only, not as a prefix)
    "config": ("pituning.config",),
    "lightning": ("pituning.modules", "pituning.data", "pituning.datasets"),
    "orchestration": ("pituning.pipeline", "pituning.report", "pituning.suite", "pituning.methods"),
    "cli": ("pituning.cli",),
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
# layers below "lightning" never import Lightning, not even inside a function
PLAIN_TORCH = {"foundation", "math", "storage", "recycling", "config"}
# siblings of one layer that stay independent: (importer prefix, forbidden prefix)
SEPARATE = [
    ("pituning.data", "pituning.bank"),
    ("pituning.data", "pituning.modules"),
    ("pituning.modules", "pituning.data"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            inside = module == prefix or (prefix != "pituning" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return best[1] if best else None


def _imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source`` (of ``module``), relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pituning import pipeline` imports the module pituning.pipeline
            found += [(node.lineno, _submodule(name, alias.name)) for alias in node.names]
    return found


def _submodule(package: str, name: str) -> str:
    """``package.name`` if that is a module of the source tree, else ``package`` (``name`` is an attribute)."""
    path = SRC.joinpath(*package.split("."), name)
    return f"{package}.{name}" if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else package


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(source: str, module: str, is_package: bool = False) -> list[str]:
    layer = _layer(module)
    assert layer is not None, f"{module} has no layer"
    problems = []
    for line, target in _imports(source, module, is_package):
        where = f"{module} line {line} imports {target}"
        if any(_is(target, name) for name in LIGHTNING) and layer in PLAIN_TORCH:
            problems.append(f"{where}: the {layer} layer is plain torch, no Lightning")
        if not _is(target, "pituning"):
            continue
        their = _layer(target)
        if their is not None and RANK[their] > RANK[layer]:
            problems.append(f"{where}: the {layer} layer may not import the higher {their} layer")
        for importer, forbidden in SEPARATE:
            if _is(module, importer) and _is(target, forbidden):
                problems.append(f"{where}: {importer} stays independent of {forbidden}")
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [_module_name(p) for p in MODULES if _layer(_module_name(p)) is None]
    assert not missing, (
        f"add these modules to a layer in tests/test_architecture.py and docs/architecture.md: {missing}"
    )


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_imports_follow_the_layers(path: Path) -> None:
    problems = _violations(path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_upward_imports() -> None:
    """Relative or absolute, at module level or inside a function (or a TYPE_CHECKING block), each is caught."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import pipeline\n"
        "if TYPE_CHECKING:\n"
        "    from pituning.suite import Suite\n"
        "def f():\n"
        "    import lightning.pytorch\n"
        "    from pituning.modules import x\n"
        "    from .errors import ConfigError\n"
    )
    problems = _violations(source, "pituning.graph")
    assert len(problems) == 4, problems
    assert _violations("from pituning.bank import TaskInfo\n", "pituning.data.base")  # a sibling rule
    assert _violations("from pituning import __version__\n", "pituning.bank.store")  # the facade is above the bank
    assert not _violations("from ..errors import ConfigError\nimport torch\n", "pituning.experts.base")

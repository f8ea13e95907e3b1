"""The house rules of ``memofill/``: imports go one way, and no module writes another's names.

Every module belongs to one layer. A module imports only from its own layer or the
layers above it in :data:`LAYERS`, type-only imports (``if TYPE_CHECKING:``) and
imports inside functions included, and the modules of one layer import each other
without a circle. So a reader can learn the package top to bottom, and a change to a
lower layer (the calls, the face) can never break a higher one (the stored format,
the algorithm). ``docs/internals.rst`` explains each layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import memofill

PACKAGE = Path(memofill.__file__).parent

#: The layers, from the bottom of the house (imports nothing of memofill) to its leaves.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({"errors", "repeats", "outcomes", "codec"})),
    ("model", frozenset({"keys", "tags", "policy", "project", "arguments", "values"})),
    ("decisions", frozenset({"freshness", "generations"})),
    (
        "mechanism",
        frozenset(
            {
                "failures",
                "scripts",
                "commands",
                "steps",
                "coordinator",
                "drivers",
                "lockstep",
                "fallback",
                "near",
                "listener",
                "singleflight",
                "refreshing",
                "clients",
            }
        ),
    ),
    ("telemetry", frozenset({"hooks", "metrics"})),
    ("wiring", frozenset({"snapshot"})),
    ("calls", frozenset({"meta_reads", "misses", "late", "lookup", "bulk"})),
    ("face", frozenset({"decorator", "instance", "__init__"})),
    (
        "tools",
        frozenset(
            {"cli", "codegen", "demo", "inspection", "purge", "timeline", "__main__", "contrib"}
        ),
    ),
    ("testing", frozenset({"testing"})),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(name: str) -> int:
    head = name.split(".", maxsplit=1)[0]
    for index, (_, members) in enumerate(LAYERS):
        if head in members:
            return index
    raise AssertionError(f"memofill.{name} is in no layer: add it to LAYERS in {__file__}")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str) -> set[str]:
    """The memofill modules ``name`` imports, anywhere in its body (type-only included)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("memofill."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "memofill":  # from memofill import codegen, demo ...
                found.update(f"memofill.{a.name}" for a in node.names if a.name in MODULES)
                found.add("memofill.__init__")
            elif node.module.startswith("memofill."):
                found.add(node.module)
    return {m.removeprefix("memofill.") for m in found} - {name}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_its_layer_and_the_layers_above(name: str) -> None:
    own = layer_of(name)
    below = sorted(
        f"memofill.{other} ({LAYERS[layer_of(other)][0]})"
        for other in imported(name)
        if other != "__init__" and layer_of(other) > own
    )
    assert not below, f"memofill.{name} ({LAYERS[own][0]}) imports from a lower layer: {below}"


def test_no_import_circle() -> None:
    graph = {name: {m for m in imported(name) if m in MODULES} for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circle = [*path[path.index(name) :], name]
            raise AssertionError("import circle: " + " -> ".join(circle))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        if name != "__init__":
            visit(name, [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_writes_another_modules_names(name: str) -> None:
    """A module changes its own state only; another module's is changed by calling it."""
    tree = ast.parse(MODULES[name].read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "memofill":
            modules.update(a.asname or a.name for a in node.names if a.name in MODULES)
    written = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id in modules
            ):
                written.append(f"line {target.lineno}: {target.value.id}.{target.attr}")
    assert not written, f"memofill.{name} writes another module's names: {written}"

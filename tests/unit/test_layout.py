"""The layout rules of the design's "Layers": imports run one way (no package imports one above it, no import
circle) and no two modules or classes share a name or differ by one letter."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top to bottom; a package may import those below it (and itself), never one above or beside it. bench measures the
# whole system (it composes configs with experiments) and nothing imports it.
LAYERS = [{"bench"}, {"experiments"}, {"evaluation"}, {"lightning_modules", "callbacks", "datamodules"}, {"contracts"}]
PACKAGES = set().union(*LAYERS)
# Names each package has on purpose: its own config section (the design: "each package owns the config of what it
# builds"), package markers, and the paper's axis names MLL, MRL and MEL (one letter apart by the paper's choice).
ALLOWED_MODULE_NAMES = {"config", "__init__", "__main__", "mll", "mrl", "mel"}
ALLOWED_CLASS_NAMES = {"MLL", "MRL", "MEL", "MLLConfig", "MRLConfig", "MELConfig"}


def layer_of(package: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if package in layer)


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Modules of the project that ``path`` imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def one_letter_apart(first: str, second: str) -> bool:
    """Edit distance 1 (one letter changed, added or removed), ignoring case."""
    first, second = sorted((first.lower(), second.lower()), key=len)
    if first == second or len(second) - len(first) > 1:
        return False
    if len(first) == len(second):
        return sum(a != b for a, b in zip(first, second)) == 1
    return any(second[:i] + second[i + 1:] == first for i in range(len(second)))


def clashes(places: dict[str, list[str]], allowed: set[str]) -> list[str]:
    """Names defined in two places, and pairs of names one letter apart, outside ``allowed``."""
    names = sorted(name for name in places if name not in allowed)
    found = [f"{name}: {places[name]}" for name in names if len(places[name]) > 1]
    found += [f"{a} {places[a]} ~ {b} {places[b]}" for a, b in itertools.combinations(names, 2)
              if one_letter_apart(a, b)]
    return found


def test_no_package_imports_one_above_or_beside_it():
    upward = []
    for path in source_files():
        package = path.relative_to(ROOT).parts[0]
        upward += [f"{module_name(path)} imports {name}" for name in sorted(project_imports(path))
                   if name.split(".")[0] != package and layer_of(name.split(".")[0]) <= layer_of(package)]
    assert upward == []


def test_no_import_circle():
    modules = {module_name(path): path for path in source_files()}
    graph = {name: {imported for imported in project_imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                circles.append(" -> ".join([*trail[trail.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_two_modules_or_classes_share_a_name_or_differ_by_one_letter():
    modules, classes = defaultdict(list), defaultdict(list)
    for path in source_files():
        relative = str(path.relative_to(ROOT))
        modules[path.parent.name if path.stem == "__init__" else path.stem].append(relative)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name].append(relative)
    assert clashes(modules, ALLOWED_MODULE_NAMES) == []
    assert clashes(classes, ALLOWED_CLASS_NAMES) == []


@pytest.mark.parametrize(("first", "second", "apart"), [("run", "runs", True), ("backbone", "backbones", True),
                                                        ("probe", "prober", True), ("mine", "mining", False),
                                                        ("cell", "call", True), ("export", "export", False)])
def test_one_letter_apart(first, second, apart):
    assert one_letter_apart(first, second) is apart

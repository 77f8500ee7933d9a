"""The house in rooms: each subpackage imports only the rooms below it (DESIGN.md).

Read from the source (every import statement, those inside functions too), so a rule is
broken the moment someone writes the import, whether or not a test runs that line.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "meshscale"
MODELS = PACKAGE.parent / "models"  # installed as meshscale.models

# room -> the rooms it may import (errors, the package's exceptions, is open to all)
ALLOWED = {
    "layout": set(),
    "runtime": set(),
    "model": {"layout"},
    "training": {"model", "layout", "runtime"},
    "store": {"training", "model", "layout", "runtime"},
    "planning": {"training", "model", "layout", "runtime"},
    "data": {"training", "model", "layout"},  # grain batches keyed by step; no loop
    "observe": {"layout"},  # records, writers, goodput: fed by the loop, knowing none of it
    "elastic": {"data", "observe", "planning", "store", "training", "model", "layout",
                "runtime"},
    "integrations": {"elastic", "observe", "store", "training", "layout", "runtime"},
    "app": {"integrations", "elastic", "data", "observe", "planning", "store", "training",
            "model", "layout", "runtime", "models", "__init__"},
    "models": {"model"},  # the example models see the contract only
}
# Libraries for people, not for the loop: only the app room imports them.
APP_ONLY = ("rich", "matplotlib", "meshscale.models")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield path, rel.parts[0] if len(rel.parts) > 1 else None
    for path in sorted(MODELS.rglob("*.py")):
        yield path, "models"


def imports(path: pathlib.Path, source: str | None = None) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    found = set()
    package = path.parent.relative_to(PACKAGE.parent).as_posix().replace("/", ".")
    if path.parent == MODELS:
        package = "meshscale.models"
    for node in ast.walk(ast.parse(source or path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # may be a module
    return found


def room_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "meshscale" or len(parts) < 2:
        return None
    if parts[1] in ALLOWED or parts[1] == "models":
        return parts[1]
    if parts[1] in ("errors", "__version__"):
        return None  # open to every room
    return "__init__"  # the public face, `meshscale.X` re-exported


@pytest.mark.parametrize("path,room", list(modules()),
                         ids=[str(p.relative_to(PACKAGE.parent)) for p, _ in modules()])
def test_every_module_imports_only_rooms_below_its_own(path, room):
    if room is None:
        return  # meshscale/__init__.py, errors.py, __main__.py: the top, not a room
    allowed = ALLOWED[room] | {room}
    wrong = sorted(name for name in imports(path)
                   if (r := room_of(name)) is not None and r not in allowed)
    assert not wrong, f"{room}/ may import {sorted(ALLOWED[room])}, but {path.name} imports {wrong}"
    if room != "app":
        people = sorted(name for name in imports(path) if name.startswith(APP_ONLY)
                        and not (room == "models" and name.startswith("meshscale.models")))
        assert not people, f"only app/ imports {APP_ONLY}; {path.name} imports {people}"


def test_the_rooms_form_floors_without_cycles():
    """The allowed imports have an order (each room only below), and every room exists."""
    floors, left = [], dict(ALLOWED)
    while left:
        ready = sorted(room for room, needs in left.items()
                       if needs & set(ALLOWED) <= set(floors))
        assert ready, f"a cycle among {sorted(left)}"
        floors += ready
        for room in ready:
            del left[room]
    on_disk = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert on_disk == set(ALLOWED) - {"models"}, on_disk ^ (set(ALLOWED) - {"models"})


def test_the_checker_sees_a_late_import_that_breaks_a_rule():
    mesh = PACKAGE / "layout" / "mesh.py"
    source = mesh.read_text() + "\n\ndef _late():\n    from ..training import trainer\n"
    wrong = {room_of(name) for name in imports(mesh, source)} - ALLOWED["layout"] - {None,
                                                                                    "layout"}
    assert wrong == {"training"}


def test_no_module_over_400_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for path, _ in modules():
        source = path.read_text()
        if len(source.splitlines()) > 400:
            long_modules.append(f"{path.name}: {len(source.splitlines())}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.name}:{node.name}: {length}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_every_room_is_a_package_pyproject_installs():
    """A room missing from pyproject's list works in an editable install and vanishes in a
    wheel (`meshscale.observe` did)."""
    import tomllib
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"meshscale"} | {
        "meshscale." + p.parent.relative_to(PACKAGE).as_posix().replace("/", ".")
        for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert found - listed == set(), f"add {sorted(found - listed)} to pyproject's packages"

"""Packaging: no name in the checkout hides an installed package, the wheel holds and imports every module, and
fachat's modules import each other without a circle."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where Python may start: the checkout's root (python -m pytest, python -c), tests/ and benchmarks/ (scripts).
START_FOLDERS = [".", "tests", "benchmarks"]
NOT_IN_THE_WHEEL = {"tests", "benchmarks"}
SHIPPED = (".py", ".metal", ".h")  # what the wheel holds from the package folders (setup.py's package_data)


def top_level_names(folder: Path) -> set[str]:
    """Names that `import NAME` could find in folder: packages (with or without __init__.py) and modules."""
    return {p.stem for p in folder.iterdir()
            if (p.is_dir() and not p.name.startswith((".", "_"))) or p.suffix == ".py"}


@pytest.mark.parametrize("start", START_FOLDERS)
def test_no_name_in_the_checkout_hides_an_installed_package(start):
    """Python started in the folder imports the installed package, not the checkout's folder or file of that
    name (transformers imports PyPI's `kernels`; a kernels/__init__.py at the root used to hide it)."""
    folder = ROOT / start
    installed = set(importlib.metadata.packages_distributions()) - {"fachat"}
    clashes = sorted(top_level_names(folder) & installed)
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    print(name, getattr(importlib.import_module(name), '__file__', None))\n")
    run = subprocess.run([sys.executable, "-c", script, *clashes], cwd=folder, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    hidden = [line for line in run.stdout.splitlines()
              if (file := line.split(" ", 1)[1]) != "None" and Path(file).resolve().is_relative_to(ROOT.resolve())]
    assert not hidden, f"started in {start}/, these came from the checkout instead of the install: {hidden}"


def test_transformers_and_fachat_import_from_the_checkout_root():
    run = subprocess.run([sys.executable, "-c", "import transformers, fachat; print(fachat.Engine)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Engine" in run.stdout, run.stderr


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    """Every .py below the checkout's package folders (folder X installs as fachat.X; fachat/ as fachat), and the
    Metal backend's kernel sources and emulation header, are in the wheel, and the installed wheel, not the
    sources, imports."""
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info",
                                                                "results"))
    expected = set()
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if path.suffix not in SHIPPED:
            continue
        if len(rel.parts) > 1 and rel.parts[0] not in NOT_IN_THE_WHEEL and not rel.parts[0].startswith("."):
            expected.add(rel.as_posix() if rel.parts[0] == "fachat" else f"fachat/{rel.as_posix()}")
    assert expected, "no package folder found"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = str(next((tmp_path / "dist").glob("*.whl")))
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(SHIPPED) and ".dist-info/" not in n}
    assert any(n.endswith(".metal") for n in expected), "no .metal source found: is SHIPPED out of date?"
    assert not expected - held, f"missing from the wheel: {sorted(expected - held)}"
    assert not held - expected, f"in the wheel but not in the checkout: {sorted(held - expected)}"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "wheel_imports.py"), wheel], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "imported" in run.stdout and "modules from the installed wheel" in run.stdout, run.stdout


def fachat_modules() -> dict[str, Path]:
    """Every module of the import package, by name, from setup.py's ROOTS (folder -> subpackage of fachat)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["ROOTS"])
    modules = {}
    for package, folder in roots.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join([package, *parts]).removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fachat modules that module `name` imports anywhere in its source: at the top, in functions and under
    `if TYPE_CHECKING:` alike. `from P import n` counts as importing P.n where that is a module, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}".rstrip(".")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a function or class: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as [a, b, ..., a], or None (a depth-first search)."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_fachat_modules_import_each_other_without_a_circle():
    """The modules' imports make a DAG: a circle (engine.py imports session.py, which imports engine.py, even if
    only for type hints) ties modules that should stand in layers. A package importing its own submodules
    (fachat/__init__.py re-exporting the API) is an edge like any other."""
    modules = fachat_modules()
    assert {"fachat", "fachat.engine.session", "fachat.engine.engine"} <= set(modules), sorted(modules)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["fachat.engine.engine"], "no import of engine.py was found: the parsing is off"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)

"""Packaging: no name in the checkout hides an installed package, and the wheel holds and imports every module."""
from __future__ import annotations

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
    hidden = [line for line in run.stdout.splitlines() if str(ROOT) in line.split(" ", 1)[1]]
    assert not hidden, f"started in {start}/, these came from the checkout instead of the install: {hidden}"


def test_transformers_and_fachat_import_from_the_checkout_root():
    run = subprocess.run([sys.executable, "-c", "import transformers, fachat; print(fachat.Engine)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Engine" in run.stdout, run.stderr


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    """Every .py below the checkout's package folders (folder X installs as fachat.X; fachat/ as fachat) is in
    the wheel, and the installed wheel, not the sources, imports."""
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info",
                                                                "results"))
    expected = set()
    for path in source.rglob("*.py"):
        rel = path.relative_to(source)
        if len(rel.parts) > 1 and rel.parts[0] not in NOT_IN_THE_WHEEL and not rel.parts[0].startswith("."):
            expected.add(rel.as_posix() if rel.parts[0] == "fachat" else f"fachat/{rel.as_posix()}")
    assert expected, "no package folder found"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = str(next((tmp_path / "dist").glob("*.whl")))
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
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

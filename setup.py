"""Packaging: the import package `fachat` is spread over the checkout's top-level folders (ROOTS); every
folder below them that holds Python files is a subpackage, found here rather than listed by hand."""
from pathlib import Path

from setuptools import setup

ROOTS = {"fachat": "fachat", "fachat.engine": "engine", "fachat.kernels": "kernels", "fachat.cache": "cache",
         "fachat.models": "models", "fachat.cli": "cli"}


def packages() -> list[str]:
    here = Path(__file__).resolve().parent
    found = set()
    for name, folder in ROOTS.items():
        for source in (here / folder).rglob("*.py"):
            found.add(".".join([name, *source.parent.relative_to(here / folder).parts]))
    return sorted(found)


# The Metal backend's kernel sources, and the header that builds them for the CPU in tests and emulation; the
# native CPU kernels' source, built where they run.
setup(package_dir=ROOTS, packages=packages(),
      package_data={"fachat.kernels.metal": ["*.metal", "*.h"], "fachat.kernels.cpu": ["*.cpp"]})

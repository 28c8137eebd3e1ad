"""python wheel_imports.py WHEEL: imports every module that WHEEL holds, as the running Python finds it, and
fails unless each one comes from outside this checkout (from an install of the wheel, never the sources).
Used by tests/test_packaging.py and by .ci/check-wheel (a clean virtual environment)."""
import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def modules(wheel: str) -> list[str]:
    names = [n[:-3].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist()
             if n.endswith(".py") and ".dist-info/" not in n]
    return sorted(n.removesuffix(".__init__") for n in names)


def main(wheel: str) -> None:
    names = modules(wheel)
    if importlib.util.find_spec("triton") is None:  # the triton backend's modules import triton itself
        print("triton is not installed: the fachat.kernels.triton modules are listed, not imported")
        names = [n for n in names if not n.startswith("fachat.kernels.triton")]
    for name in names:
        module = importlib.import_module(name)
        where = Path(module.__file__).resolve()
        if CHECKOUT in where.parents:
            raise SystemExit(f"{name} was imported from the checkout ({where}), not from the installed wheel")
    print(f"imported {len(names)} modules from the installed wheel")


if __name__ == "__main__":
    main(sys.argv[1])

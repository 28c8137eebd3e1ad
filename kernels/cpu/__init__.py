"""Native CPU kernels: decode_step.cpp, a C++ op (torch.ops.fachat_cpu.decode_step) built on first use by the
machine's C++ compiler against the installed torch, as the Metal and Triton kernels are compiled where they run.

The build takes some 10 s once and is cached in ~/.cache/fa-chat/cpu-kernels under a key of the source, torch,
the compiler and the CPU (it is built for this CPU's instruction set). load() says why the op is unavailable
where it is: FACHAT_CPU_KERNELS=0, no compiler, a failed build. The engine then runs the TorchScript step
(with FACHAT_CPU_KERNELS=1 its load fails instead, saying why).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fachat.kernels.common import cache_dir, env_flag

KERNELS_ENV = "FACHAT_CPU_KERNELS"  # "0": never build or load them; "1": a CPU step that cannot use them fails
SOURCE = Path(__file__).with_name("decode_step.cpp")
CACHE = "cpu-kernels"  # the cache folder (kernels.common.cache_dir)


def _command() -> list[str] | str:
    """The compile and link command without its input and output, or why there is none."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    root = Path(torch.__file__).parent
    if platform.machine() in ("x86_64", "AMD64"):
        tuned = ["-march=native"]
    else:  # Apple's clang may not take -mcpu=native; NEON is there anyway
        tuned = ["-mcpu=native"] if sys.platform.startswith("linux") else []
    # at::parallel_for is OpenMP pragmas in the header: without -fopenmp it runs serially. The library then uses
    # torch's own libgomp (torch/lib, found first), not a second thread pool.
    threads = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return [compiler, "-std=c++17", "-O3", *tuned, *threads, "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-I", str(root / "include"), "-I", str(root / "include" / "torch" / "csrc" / "api" / "include"),
            "-L", str(root / "lib"), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}"]


def _cpu() -> str:
    """What identifies this CPU's instruction set (the build targets it)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def load() -> str | None:
    """Makes torch.ops.fachat_cpu.decode_step available, building it first where the cache has none: None,
    or why it is unavailable (one line)."""
    if env_flag(KERNELS_ENV) is False:
        return f"{KERNELS_ENV}=0"
    return _loaded()


@functools.cache
def _loaded() -> str | None:
    if sys.platform == "win32":
        return "native CPU kernels are not built on Windows"
    command = _command()
    if isinstance(command, str):
        return command
    source = SOURCE.read_text()
    key = hashlib.sha256("\0".join([source, torch.__version__, *command, _cpu()]).encode()).hexdigest()[:32]
    path = cache_dir(CACHE) / f"{key}.so"
    if not path.exists():
        print("fa-chat: building the native CPU kernels (once, about 10 s)...", file=sys.stderr, flush=True)
        why = _build(command, path)
        if why is not None:
            return why
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"cannot load the native CPU kernels {path}: {e}"
    return None


def _build(command: list[str], path: Path) -> str | None:
    """Compiles into a temporary folder and renames the library into `path`: the cache never holds half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as work:
            part = Path(work) / path.name
            done = subprocess.run([*command[:1], str(SOURCE), "-o", str(part), *command[1:]],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode:
                error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
                return f"building the native CPU kernels failed ({command[0]}): {error}"
            os.replace(part, path)
    except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a compiler that hangs...
        return f"building the native CPU kernels failed: {e}"
    return None

"""Runs Metal Shading Language kernels on the CPU: `compile_shader(source)` is a stand-in for
`torch.mps.compile_shader` that takes CPU tensors, so that the .metal sources can be tested on Linux.

The source is compiled as C++ by clang (a system clang++ >= 15, else the one in the `ziglang` package) against
msl_cpu.h, which supplies the MSL types and functions and runs each threadgroup's threads as fibers. Python parses
each `kernel void` signature and generates an `extern "C"` entry that unpacks the bound arguments and the thread
ids into the kernel's parameters. SUBSET.md lists what a kernel may use and how the emulation differs from a GPU.
"""
import ctypes
import hashlib
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from fachat.kernels.common import cache_dir

HEADER = Path(__file__).with_name("msl_cpu.h")
MAX_THREADS_PER_THREADGROUP = 1024
SIMD_WIDTH = 32
# -nostdlib++: the header needs no C++ library, and building zig's libc++ on a fresh machine takes minutes.
FLAGS = ["-x", "c++", "-std=c++20", "-O2", "-shared", "-fPIC", "-fno-exceptions", "-fno-rtti", "-nostdlib++",
         "-Wno-unknown-attributes"]
# clang >= 17: no float16 excess precision, since Metal rounds every half operation to half.
HALF_FLAGS = ["-Xclang", "-ffloat16-excess-precision=none"]
# Parameter attributes the runner fills per thread (the fields of msl_ids in msl_cpu.h).
THREAD_ATTRIBUTES = {
    "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
    "threads_per_threadgroup", "dispatch_threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
    "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup", "threads_per_simdgroup"}
# The arg_casts that torch.mps accepts, and the dtype each writes.
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32, "int16": torch.int16,
         "int8": torch.int8, "uint8": torch.uint8}


class KernelError(RuntimeError):
    """A kernel failed while running: a deadlock at a barrier, divergent simd-group collectives, and the like."""


@lru_cache(maxsize=None)
def _compiler() -> tuple[list[str], str] | str:
    """The clang++ command with its flags and its version line, or why there is none."""
    candidates = []
    if shutil.which("clang++"):
        candidates.append(("clang++",))
    try:
        import ziglang  # noqa: F401  (only its presence matters: it is run as `python -m ziglang c++`)
        candidates.append((sys.executable, "-m", "ziglang", "c++"))
    except ImportError:
        pass
    for command in candidates:
        try:
            version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found = re.search(r"clang version (\d+)", version)
        if found and int(found.group(1)) >= 15:  # _Float16 on x86 needs clang 15
            return [*command, *FLAGS, *(HALF_FLAGS if int(found.group(1)) >= 17 else [])], version.splitlines()[0]
    return "no C++ compiler for the Metal emulation: need clang++ >= 15 on PATH or `pip install ziglang`"


def available() -> str | None:
    """None when kernels can be compiled here, else a one-line reason (for pytest.skip)."""
    found = _compiler()
    return found if isinstance(found, str) else None


# ---------------------------------------------------------------- source translation

def _strip_comments(source: str) -> str:
    """Blanks out comments, keeping line numbers, so that no regex below matches inside one."""
    source = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), source, flags=re.S)
    return re.sub(r"//[^\n]*", "", source)


def _translate(source: str) -> str:
    """The MSL source rewritten where C++ needs it; line numbers are kept for the compiler's messages."""
    source = re.sub(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>", "", source, flags=re.M)
    source = _shared_threadgroup(source)
    source = re.sub(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[hH]\b", r"half(\1)", source)  # 1.0h
    # clang rejects an attribute in an explicit instantiation; the entry wrappers carry the host names instead.
    source = re.sub(r"(\btemplate\s*)\[\[\s*host_name\s*\(\s*\"\w+\"\s*\)\s*\]\]", r"\1", source)
    # Read-only swizzles: `v.xy` becomes a call of msl_vec's swizzle; one that is assigned to stays and fails.
    return re.sub(r"\.([xyzw]{2,4}|[rgba]{2,4})\b(?!\s*(?:[-+*/%&|^]|<<|>>)?=(?!=))", _swizzle, source)


def _shared_threadgroup(source: str) -> str:
    """Every `threadgroup` variable declared in a body becomes `static thread_local`: the threads of a threadgroup
    share an OS thread, so that is one variable per threadgroup, as on the GPU. Pointers and references to
    threadgroup memory (declarations with a `*` or `&` outside brackets and template arguments, parameters,
    casts) keep `threadgroup`, which the header erases. Any other `threadgroup` is a SyntaxError: left as it is,
    it would silently be memory of each thread."""
    def line(at: int) -> int:
        return source.count("\n", 0, at) + 1

    if found := re.search(r"^[ \t]*#.*\bthreadgroup\b", source, flags=re.M):
        raise SyntaxError(f"Metal emulation: line {line(found.start())}: `threadgroup` in a preprocessor directive; "
                          "write threadgroup declarations out in the kernel body")
    code = re.sub(r"^[ \t]*#.*", lambda m: " " * len(m.group()), source, flags=re.M)  # offsets kept
    pieces, at = [], 0
    for m in re.finditer(r"(\S?)\s*(?:\b(?:const|volatile)\s+)*(?P<kw>\bthreadgroup\b)", code):
        before = m.group(1)
        if before and before in "(,<":  # a parameter, cast or template argument
            continue
        if before and before not in ";{}":
            raise SyntaxError(f"Metal emulation: line {line(m.start('kw'))}: cannot tell "
                              f"whether this `threadgroup` declares threadgroup memory (after {before!r}); "
                              "declare it as a statement of its own, `threadgroup T name[N];`")
        head = code[m.end():code.find(";", m.end())].split("=")[0]
        if not re.search(r"[*&]", re.sub(r"\[.*\]|<.*>", "", head, flags=re.S)):
            pieces += [source[at:m.start("kw")], "static thread_local"]
            at = m.end()
    return "".join(pieces) + source[at:]


def _swizzle(m: re.Match) -> str:
    lanes = ", ".join(str("xyzw".find(c) if c in "xyzw" else "rgba".find(c)) for c in m.group(1))
    return f".template swizzle<{lanes}>()"


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise SyntaxError(f"unbalanced parentheses after {text[max(0, open_at - 40):open_at]!r}")


def _split_params(text: str) -> list[str]:
    params, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            params.append(text[start:i])
            start = i + 1
    params.append(text[start:])
    return [p.strip() for p in params if p.strip()]


def _argument(param: str, host: str, callee: str, position: int, next_buffer: int) -> tuple[str, int | None]:
    """The C++ expression that feeds the kernel's parameter at `position`, and the buffer index it binds (None for
    a thread id). Types come from the compiler (msl_param), so template kernels need no type parsing here."""
    attrs = re.findall(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]", param)
    attr, index = attrs[0] if attrs else ("buffer", "")
    ptype = f"msl_param<{position}, decltype(&{callee})>"
    if attr in THREAD_ATTRIBUTES:
        return f"msl_id_as<{ptype}>(ids->{attr})", None
    if attr != "buffer":
        raise NotImplementedError(f"kernel {host}: the emulation has no [[{attr}]] parameters ({param!r})")
    slot = int(index) if index else next_buffer
    return f"msl_bind<{ptype}>(args[{slot}])", slot


def _kernels(source: str) -> dict[str, tuple[str, list[str], list[int]]]:
    """Each kernel's host name -> (the C++ callee, its parameters' argument expressions, the buffer indices).
    Plain `kernel void f(...)`, and template kernels through their `template [[host_name("x")]]` instantiations,
    whose parameters' attributes are read from the template's definition."""
    definitions, instances = {}, []
    pattern = (r"(?P<template>\btemplate\s*(?:\[\[\s*host_name\s*\(\s*\"(?P<host>\w+)\"\s*\)\s*\]\]|<[^;{]*?>))?\s*"
               r"(?:\[\[\s*kernel\s*\]\]|\bkernel)\s+void\s+(?P<name>\w+)\s*(?P<targs><[^;{(]*>)?\s*\(")
    for m in re.finditer(pattern, source):
        if m.group("host"):
            instances.append((m.group("host"), m.group("name") + m.group("targs")))
            continue
        params = _split_params(source[m.end():_matching_paren(source, m.end() - 1)])
        definitions[m.group("name")] = params
        if not m.group("template"):
            instances.append((m.group("name"), m.group("name")))
    kernels = {}
    for host, callee in instances:
        params = definitions.get(callee.split("<")[0])
        if params is None:
            raise SyntaxError(f"kernel {host}: no definition of {callee.split('<')[0]} found")
        exprs, buffers = [], []
        for position, param in enumerate(params):
            expr, slot = _argument(param, host, callee, position, len(buffers))
            exprs.append(expr)
            if slot is not None:
                buffers.append(slot)
        kernels[host] = (callee, exprs, buffers)
    return kernels


def _entries(kernels: dict) -> str:
    return "".join(f'\nextern "C" void msl_entry_{host}(void** args, const msl_ids* ids) {{ {callee}({", ".join(exprs)}); }}'
                   for host, (callee, exprs, _) in kernels.items())


# ---------------------------------------------------------------- building and loading

_build_lock = threading.Lock()
_libraries: dict[str, "Library"] = {}


def compile_shader(source: str) -> "Library":
    """Compiles MSL source for the CPU, like torch.mps.compile_shader; a compile error raises SyntaxError."""
    found = _compiler()
    if isinstance(found, str):
        raise RuntimeError(found)
    command, version = found
    text = _strip_comments(source)
    kernels = _kernels(text)
    unit = f'#include "{HEADER}"\n#line 1 "shader.metal"\n{_translate(text)}\n#line 1 "entries.cpp"{_entries(kernels)}\n'
    key = hashlib.sha256("\0".join([unit, HEADER.read_text(), version, *command]).encode()).hexdigest()[:32]
    with _build_lock:
        if key not in _libraries:
            path = cache_dir("metal-emulate") / f"{key}.so"
            if not path.exists():
                _build(command, unit, path)
            _libraries[key] = Library(ctypes.CDLL(str(path)), kernels)
    return _libraries[key]


def _build(command: list[str], unit: str, path: Path) -> None:
    """Compiles into a temporary file beside `path` and renames it there, so the cache never holds half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        cpp = Path(work) / "unit.cpp"
        cpp.write_text(unit)
        part = Path(work) / "unit.so"
        done = subprocess.run([*command, str(cpp), "-o", str(part), "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise SyntaxError(f"Metal emulation: the shader does not compile:\n{done.stderr.strip()[:6000]}")
        staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            shutil.copyfile(part, staged)
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)


# ---------------------------------------------------------------- running

_workers: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """The threads that run threadgroups; made again in a forked child, which has none of its parent's."""
    global _workers
    if _workers is None or _workers[0] != os.getpid():
        _workers = os.getpid(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="metal-emulate")
    return _workers[1]


def _dims(value, name: str) -> list[int]:
    try:
        dims = [operator.index(d) for d in (value if isinstance(value, (list, tuple)) else [value])]
    except TypeError:
        dims = []
    if not 1 <= len(dims) <= 3 or min(dims) < 0:
        raise ValueError(f"{name} must be an int or 1-3 non-negative ints, got {value!r}")
    return dims


def _bytes_of(arg, index: int, cast: str | None) -> torch.Tensor:
    """A non-tensor argument as the bytes Metal sees, held in a small CPU tensor: what torch.mps binds."""
    values = list(arg) if isinstance(arg, (list, tuple)) else [arg]
    if not values:
        raise ValueError(f"argument {index}: an empty list can not be an argument to a metal kernel")
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor([v.data_ptr() for v in values], dtype=torch.int64)  # a buffer of pointers
    if isinstance(values[0], float):
        held = torch.tensor(values, dtype=torch.float32)
    elif isinstance(values[0], int):
        held = torch.tensor(values, dtype=torch.int64)
    else:
        raise TypeError(f"argument {index}: unsupported argument type {type(arg).__name__}")
    if cast is None:
        return held
    if cast not in CASTS:
        raise ValueError(f"argument {index}: unsupported cast {cast!r} (known: {', '.join(CASTS)})")
    return held.to(CASTS[cast])


class Kernel:
    max_threads_per_threadgroup = MAX_THREADS_PER_THREADGROUP
    thread_execution_width = SIMD_WIDTH

    def __init__(self, lib: ctypes.CDLL, name: str, buffers: list[int]):
        self.name = name
        self._run = lib.msl_run
        self._entry = ctypes.cast(getattr(lib, f"msl_entry_{name}"), ctypes.c_void_p)
        self._buffers = buffers

    def __call__(self, *args, threads=None, group_size=None, arg_casts=None):
        casts = arg_casts if isinstance(arg_casts, dict) else {}
        default_cast = arg_casts if isinstance(arg_casts, str) else None
        held = []  # keeps the scalar and list buffers alive through the call
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu":
                    raise ValueError(f"{self.name}: argument {i} is on {arg.device}; the emulation takes CPU tensors")
                held.append(arg)
                threads = arg.numel() if threads is None else threads
            else:
                held.append(_bytes_of(arg, i, casts.get(i, default_cast)))
        missing = sorted(b for b in self._buffers if b >= len(args))
        if missing:
            raise TypeError(f"{self.name} reads buffer(s) {missing} but was given {len(args)} arguments")
        if threads is None:
            raise ValueError(f"{self.name}: number of threads is undefined (no tensor argument and no threads=)")
        grid = _dims(threads, "threads")
        # torch.mps: a 1-D group defaults to min(threads, max); a 2-D or 3-D one to (max, 1, 1).
        default_group = [min(grid[0], self.max_threads_per_threadgroup)] if len(grid) == 1 else [self.max_threads_per_threadgroup]
        group = _dims(group_size if group_size is not None else default_group, "group_size")
        if group_size is not None and len(group) != len(grid):
            raise ValueError(f"{self.name}: threads {grid} and group_size {group} have different numbers of dimensions")
        grid, group = (dims + [1] * (3 - len(dims)) for dims in (grid, group))
        if group[0] * group[1] * group[2] > self.max_threads_per_threadgroup:
            raise ValueError(f"{self.name}: threadgroup size {group} exceeds the {self.max_threads_per_threadgroup} limit")
        if 0 in grid:
            return
        if 0 in group:
            raise ValueError(f"{self.name}: group_size {group} has a zero dimension")
        self._dispatch(held, grid, group)

    def _dispatch(self, held: list[torch.Tensor], grid: list[int], group: list[int]) -> None:
        argv = (ctypes.c_void_p * max(1, len(held)))(*[t.data_ptr() for t in held])
        grid_c, group_c = (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*group)
        groups = 1
        for g, n in zip(grid, group):
            groups *= -(-g // n)
        chunk = max(1, -(-groups // (4 * (os.cpu_count() or 1))))

        def run(first: int) -> str:
            err = ctypes.create_string_buffer(2048)
            failed = self._run(self._entry, argv, grid_c, group_c, ctypes.c_uint64(first),
                               ctypes.c_uint64(min(first + chunk, groups)), err, len(err))
            return err.value.decode(errors="replace") if failed else ""

        results = _pool().map(run, range(0, groups, chunk)) if groups > chunk else [run(0)]
        errors = [e for e in results if e]
        if errors:
            raise KernelError(f"{self.name}: {errors[0]}")


class Library:
    """The compiled kernels, as attributes: lib.<kernel_name>(*args, threads=..., group_size=..., arg_casts=...)."""

    def __init__(self, lib: ctypes.CDLL, kernels: dict):
        lib.msl_run.restype = ctypes.c_int
        lib.msl_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64,
                                ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
        self._kernels = {name: Kernel(lib, name, buffers) for name, (_, _, buffers) in kernels.items()}

    def __getattr__(self, name: str) -> Kernel:
        kernels = self.__dict__.get("_kernels", {})
        if name not in kernels:
            raise AttributeError(f"no kernel {name!r} in this library (it has: {', '.join(sorted(kernels)) or 'none'})")
        return kernels[name]

    def __dir__(self):
        return sorted(self._kernels)

"""The one place that picks an attention backend for a device, dtype and head_dim: a table of backends
(BACKENDS), each imported on first use, and the order in which "auto" tries them on each device type
(PREFERENCE). A backend joins by an entry in both; nothing else names it."""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Callable

import torch

from fachat.kernels.common import KERNEL_DTYPES, KERNEL_HEAD_DIMS, env_flag

BACKEND_ENV = "FACHAT_ATTENTION_BACKEND"
METAL_EMULATE_ENV = "FACHAT_METAL_EMULATE"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use (backend_module): fachat imports where triton is absent, and off a Mac
    fits: Callable[[torch.device, torch.dtype, int], str | None]  # why it cannot run these arguments; None if it can
    switch: str | None = None  # an environment variable: 0 keeps the backend from running, 1 makes "auto" pick it
    cuda_graphs: bool = False  # its kernels read no lengths on the host, so a CUDA graph can capture them


@cache
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _kernel_unfit(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the compiled kernels have no specialization for this dtype and head_dim, or None."""
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {KERNEL_HEAD_DIMS}"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not float16, bfloat16 or float32"
    return None


def _triton_unfit(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if why := _kernel_unfit(dtype, head_dim):
        return why
    if device.type not in ("cuda", "cpu"):
        return f"device {device} is neither CUDA nor CPU"
    if not _installed("triton"):
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not backend_module("triton").INTERPRET:
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before fachat.kernels.triton is imported"
    return None


def _metal_unfit(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    emulate = env_flag(METAL_EMULATE_ENV)  # read first, so that a bad value fails wherever metal is considered
    if why := _kernel_unfit(dtype, head_dim):
        return why
    if device.type == "mps":
        # Public since PyTorch 2.7; the kernels are compiled from their .metal sources at run time.
        return None if hasattr(torch.mps, "compile_shader") else \
            f"torch {torch.__version__} has no torch.mps.compile_shader (PyTorch >= 2.7)"
    if device.type == "cpu":
        # The .metal sources built for the CPU by a C++ compiler: how tests run them without a Mac.
        return None if emulate else f"CPU tensors need the Metal emulation: set {METAL_EMULATE_ENV}=1"
    return f"device {device} is neither MPS nor CPU"


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("reference", "fachat.kernels.reference", lambda device, dtype, head_dim: None),
    Backend("triton", "fachat.kernels.triton", _triton_unfit, cuda_graphs=True),
    Backend("metal", "fachat.kernels.metal", _metal_unfit, switch="FACHAT_METAL"),
)}
# "auto" runs the first of these that fits the device's type (any other type: cpu's); the reference runs anything.
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("triton", "reference"), "mps": ("metal", "reference"),
                                          "cpu": ("reference",)}


def backend_module(name: str) -> ModuleType:
    """The module of the backend called `name`, imported on first use. A backend is chosen only where its fits
    has passed (triton installed, ...): a module that then does not import is a broken install, which raises
    rather than falls back."""
    try:
        return importlib.import_module(BACKENDS[name].module)
    except ImportError as e:
        raise ImportError(f"fa-chat's {name} attention backend does not import, although it can run here "
                          f"(a broken install?): {e}") from e


def _unfit(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the backend called `name` cannot run these arguments, or None if it can."""
    backend = BACKENDS[name]
    if backend.switch and env_flag(backend.switch) is False:
        return f"{backend.switch}=0"
    return backend.fits(device, dtype, head_dim)


def _asked(backend: str | None) -> tuple[str, str]:
    """(name, by what) of the backend asked for: `backend`, else $FACHAT_ATTENTION_BACKEND, else one whose switch
    is 1; ("auto", "") where none is."""
    named = os.environ.get(BACKEND_ENV)
    switched_on = [b for b in BACKENDS.values() if b.switch and env_flag(b.switch)]  # read all: bad values fail
    if backend:
        return backend, "asked for"
    if named:
        return named, f"{BACKEND_ENV}={named}"
    if switched_on:
        return switched_on[0].name, f"{switched_on[0].switch}=1"
    return "auto", ""


def _auto(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """(name, why) of the first backend in PREFERENCE[device type] that fits; why names those passed over."""
    passed = []
    for name in PREFERENCE.get(device.type, PREFERENCE["cpu"]):
        if (unfit := _unfit(name, device, dtype, head_dim)) is None:
            return name, "; ".join(passed) or f"the default on {device.type}"
        passed.append(f"{name}: {unfit}")
    raise ValueError(f"no attention backend runs on {device.type}: {'; '.join(passed)}")


def choose_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int,
                   backend: str | None = None) -> tuple[str, str]:
    """(name, why) of the backend to run: the one asked for (see _asked), which is a ValueError saying why where
    it cannot run, else "auto" (see _auto). The module is imported here: a broken install raises at once."""
    device = torch.device(device)
    name, why = _asked(backend)
    if name == "auto":
        name, why = _auto(device, dtype, head_dim)
    elif name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not available; choose from: auto, {', '.join(BACKENDS)}")
    elif (unfit := _unfit(name, device, dtype, head_dim)) is not None:
        raise ValueError(f"attention backend {name!r} cannot run here: {unfit} ({why})")
    backend_module(name)
    return name, why


def select_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str | None = None) -> str:
    """Name of the backend to run (see choose_backend)."""
    return choose_backend(device, dtype, head_dim, backend)[0]


def _check(q, k_cache, v_cache, kv_len, q_dims: int) -> None:
    if q.dim() != q_dims or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q with {q_dims} dims and k_cache, v_cache [B, Hkv, capacity, D] of one shape; "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match k_cache {tuple(k_cache.shape)} (batch, head_dim, GQA)")
    lengths = [kv_len] if isinstance(kv_len, int) else kv_len.tolist()
    q_len = q.shape[2] if q_dims == 4 else 1
    if isinstance(kv_len, torch.Tensor) and kv_len.shape != (B,):
        raise ValueError(f"kv_len must be an int or a tensor of shape [{B}], got shape {tuple(kv_len.shape)}")
    if any(n < q_len or n > k_cache.shape[2] for n in lengths):
        raise ValueError(f"kv_len must be in [{q_len}, capacity={k_cache.shape[2]}], got {kv_len}")


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None, backend=None):
    """Attention of one query position per row. q [B, Hq, D]; k_cache, v_cache [B, Hkv, capacity, D];
    kv_len an int or an int tensor [B]. Returns [B, Hq, D]."""
    _check(q, k_cache, v_cache, kv_len, 3)
    impl = backend_module(select_backend(q.device, q.dtype, q.shape[-1], backend))
    return impl.decode_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)


def prefill_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None, backend=None):
    """Bottom-right causal attention. q [B, Hq, Lq, D] holds the last Lq of the kv_len live positions.
    Returns [B, Hq, Lq, D]."""
    _check(q, k_cache, v_cache, kv_len, 4)
    impl = backend_module(select_backend(q.device, q.dtype, q.shape[-1], backend))
    return impl.prefill_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)

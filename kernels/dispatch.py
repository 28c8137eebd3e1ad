"""The one place that picks an attention backend for a device, dtype and head_dim."""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from fachat.kernels import reference

BACKEND_ENV = "FACHAT_ATTENTION_BACKEND"
# "triton" joins on first use (see _triton): fachat must import where triton is not installed.
BACKENDS: dict[str, ModuleType] = {"reference": reference}
NAMES = ("auto", "reference", "triton")
TRITON_HEAD_DIMS = (64, 128, 256)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@cache
def _triton() -> ModuleType | None:
    """The triton backend module, registered in BACKENDS; None where triton is not installed. A backend
    that does not import although triton is installed is a broken install: that raises, never falls back."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        module = importlib.import_module("fachat.kernels.triton")
    except ImportError as e:
        raise ImportError(f"fa-chat's triton attention backend does not import, although triton is installed "
                          f"(a broken install?): {e}") from e
    BACKENDS["triton"] = module
    return module


def _triton_unfit(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the triton backend cannot run these arguments, or None if it can."""
    if head_dim not in TRITON_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {TRITON_HEAD_DIMS}"
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} is not float16, bfloat16 or float32"
    if device.type not in ("cuda", "cpu"):
        return f"device {device} is neither CUDA nor CPU"
    module = _triton()
    if module is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not module.INTERPRET:
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before fachat.kernels.triton is imported"
    return None


def choose_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int,
                   backend: str | None = None) -> tuple[str, str]:
    """(name, why) of the backend to run: `backend`, else $FACHAT_ATTENTION_BACKEND, else "auto": triton on
    CUDA where it fits (head_dim, dtype, triton installed), otherwise the torch reference."""
    name = backend or os.environ.get(BACKEND_ENV) or "auto"
    if name not in NAMES:
        raise ValueError(f"backend {name!r} is not available; choose from: {', '.join(NAMES)}")
    device = torch.device(device)
    if name != "auto":
        why = _triton_unfit(device, dtype, head_dim) if name == "triton" else None
        if why is not None:
            raise ValueError(f"attention backend 'triton' cannot run here: {why}")
        return name, "asked for" if backend else f"{BACKEND_ENV}={name}"
    if device.type != "cuda":
        return "reference", f"the device is {device.type}; triton runs on CUDA"
    why = _triton_unfit(device, dtype, head_dim)
    return ("reference", why) if why is not None else ("triton", f"CUDA, {dtype}, head_dim {head_dim}")


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
    impl = BACKENDS[select_backend(q.device, q.dtype, q.shape[-1], backend)]
    return impl.decode_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)


def prefill_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None, backend=None):
    """Bottom-right causal attention. q [B, Hq, Lq, D] holds the last Lq of the kv_len live positions.
    Returns [B, Hq, Lq, D]."""
    _check(q, k_cache, v_cache, kv_len, 4)
    impl = BACKENDS[select_backend(q.device, q.dtype, q.shape[-1], backend)]
    return impl.prefill_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)

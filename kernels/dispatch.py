"""The one place that picks an attention backend for a device, dtype and head_dim."""
from __future__ import annotations

import os
from types import ModuleType

import torch

from fachat.kernels import reference

BACKEND_ENV = "FACHAT_ATTENTION_BACKEND"
BACKENDS: dict[str, ModuleType] = {"reference": reference}


def select_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str | None = None) -> str:
    """Name of the backend to run: `backend`, else $FACHAT_ATTENTION_BACKEND, else the best for the device."""
    name = backend or os.environ.get(BACKEND_ENV) or "auto"
    if name == "auto":
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not available; choose from: auto, {', '.join(BACKENDS)}")
    return name


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

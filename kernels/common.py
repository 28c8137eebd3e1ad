"""What every attention backend computes the same way, whatever language its kernels are written in."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

LOG2E = 1.4426950408889634
# What the compiled kernels (triton, metal) are specialized for; the reference takes anything.
KERNEL_HEAD_DIMS = (64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def score_scales(scale: float | None, softcap: float | None, head_dim: int) -> tuple[float, float]:
    """(qk_scale, softcap_log2e) for the kernels, in base 2: q.k times qk_scale is the score (with a
    softcap, tanh's argument, whose value times softcap_log2e is the score)."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if softcap is None:
        return scale * LOG2E, 0.0
    return scale / softcap, softcap * LOG2E


def output_for(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """out checked, or a new tensor: contiguous, shaped and typed as q, which the kernels fill whole."""
    if out is None:
        # empty_like: a third of torch.empty(shape, dtype=, device=)'s host time on the H100 host.
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} tensor of {q.dtype}")
    return out


def kernel_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """q, K and V as the compiled kernels read them: unit stride along head_dim, and V with K's strides (the
    engine's caches are already so; anything else is copied). The kernels take q's and K's strides."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    return q, k_cache, v_cache


def partitions(span: int, rows: int, units: int, tile: int, programs_per_unit: int, reduce_width: int) -> int:
    """How many partitions split-KV decode deals `span` live keys to, for `rows` (batch * KV heads) on a device
    of `units` parallel units (CUDA multiprocessors, GPU cores); the span's whole tiles of `tile` keys are dealt
    to them in turn. A short span gets a partition per tile while one wave of two programs a unit holds them all
    and the reduce merges them in one pass (`reduce_width` partials at most): each program then waits for one
    tile. A longer one gets `programs_per_unit` programs a unit at most, so that none waits for a second wave,
    and no more partitions than its longest one's tiles need."""
    tiles = max(1, span // tile)  # whole tiles: a ragged end goes with one of them
    if tiles * rows <= 2 * units and tiles <= reduce_width:
        return tiles
    most = max(1, programs_per_unit * units // rows)
    per_partition = -(-tiles // most)
    return -(-tiles // per_partition)


def cache_dir(name: str) -> Path:
    """The folder where kernels built on this machine are kept: fa-chat/`name` under $XDG_CACHE_HOME, else
    ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fa-chat" / name


def env_flag(name: str) -> bool | None:
    """An on/off environment variable: True for "1", False for "0", None where it is unset or empty."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (or unset), got {value!r}")
    return None if value == "" else value == "1"

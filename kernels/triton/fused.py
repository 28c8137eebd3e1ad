"""A Llama layer's steps around attention, one Triton kernel each: RMSNorm with the residual add, SiLU times up,
and RoPE with the K/V cache write. The contracts are those of fachat.kernels.reference; positions are read on
the device, so that a CUDA graph can capture a decode step.

Each computes in fp32 from its inputs and rounds its outputs once, except where the reference rounds in between
on purpose (the residual sum and the normalised activations of RMSNorm, which the model carries in its dtype).
"""
from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from fachat.kernels.triton.decode import Launcher


def _launch(launcher: Launcher, grid, tensors: tuple, scalars: tuple, meta: dict) -> None:
    # The scalars are strides, sizes and eps: with the dtypes they pin down what Triton specialises on.
    launcher(grid, (tuple(t.dtype for t in tensors), scalars), tensors, scalars, meta)


@triton.jit
def _rms_norm(X, R, W, Out, Sum, eps, stride_xr, stride_xc, stride_rr, stride_rc,
              H: tl.constexpr, BLOCK_H: tl.constexpr, RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    live = cols < H
    x = tl.load(X + row * stride_xr + cols * stride_xc, mask=live, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(R + row * stride_rr + cols * stride_rc, mask=live, other=0.0).to(tl.float32)
        s = (x + r).to(Sum.dtype.element_ty)  # rounded as eager x + residual rounds it: the stream goes on in T
        tl.store(Sum + row * H + cols, s, mask=live)
        x = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(W + cols, mask=live, other=0.0).to(tl.float32)
    y = (x * inv).to(Out.dtype.element_ty).to(tl.float32) * w  # normalised, rounded to T, then weighted
    tl.store(Out + row * H + cols, y.to(Out.dtype.element_ty), mask=live)


@cache
def _norm_meta(H: int, residual: bool) -> dict:
    block = triton.next_power_of_2(H)
    return dict(H=H, BLOCK_H=block, RESIDUAL=residual, num_warps=min(16, max(1, block // 256)))


_launch_norm = Launcher(_rms_norm)


def rms_norm(x, weight, eps, residual=None):
    """The contract of fachat.kernels.reference.rms_norm, in one launch (one program per row)."""
    H = x.shape[-1]
    rows = x.reshape(-1, H)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = rows if residual is None else residual.reshape(-1, H)
    total = out if residual is None else torch.empty_like(out)  # out stands in for the unused sum
    _launch(_launch_norm, (rows.shape[0], 1, 1), (rows, res, weight, out, total),
            (eps, *rows.stride(), *res.stride()), _norm_meta(H, residual is not None))
    return out if residual is None else (out, total)


@triton.jit
def _silu_mul(X, Out, stride_xr, stride_xc, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < I
    gate = tl.load(X + row * stride_xr + cols * stride_xc, mask=live, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_xr + (I + cols) * stride_xc, mask=live, other=0.0).to(tl.float32)
    tl.store(Out + row * I + cols, (gate * tl.sigmoid(gate) * up).to(Out.dtype.element_ty), mask=live)


SILU_BLOCK = 1024


@cache
def _silu_meta(I: int) -> dict:
    return dict(I=I, BLOCK=SILU_BLOCK, num_warps=4)


_launch_silu = Launcher(_silu_mul)


def silu_mul(gate_up):
    """The contract of fachat.kernels.reference.silu_mul, in one launch."""
    I = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * I)
    out = torch.empty((*gate_up.shape[:-1], I), dtype=gate_up.dtype, device=gate_up.device)
    _launch(_launch_silu, (rows.shape[0], triton.cdiv(I, SILU_BLOCK), 1), (rows, out), rows.stride(), _silu_meta(I))
    return out


@triton.jit
def _rope_write(QKV, Cos, Sin, Pos, K, V, Q, L, stride_xb, stride_xl, stride_pb, stride_pl, stride_cos,
                stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * L + l
    head = tl.program_id(1)  # the query heads, then the KV heads
    b = token // L
    l = token % L
    pos = tl.load(Pos + b * stride_pb + l * stride_pl).to(tl.int64)
    half = tl.arange(0, D // 2)
    x = QKV + b * stride_xb + l * stride_xl + head * D + half  # q and k heads lie in grid order
    x1 = tl.load(x).to(tl.float32)
    x2 = tl.load(x + D // 2).to(tl.float32)
    cos = Cos + pos * stride_cos + half
    sin = Sin + pos * stride_sin + half
    # x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1)
    y1 = x1 * tl.load(cos).to(tl.float32) - x2 * tl.load(sin).to(tl.float32)
    y2 = x2 * tl.load(cos + D // 2).to(tl.float32) + x1 * tl.load(sin + D // 2).to(tl.float32)
    if head < HQ:
        q = Q + (token * HQ + head) * D + half  # Q: contiguous [B, L, HQ, D]
        tl.store(q, y1.to(Q.dtype.element_ty))
        tl.store(q + D // 2, y2.to(Q.dtype.element_ty))
    else:
        h = head - HQ
        k = K + b * stride_kb + h * stride_kh + pos * stride_kn + half
        tl.store(k, y1.to(K.dtype.element_ty))
        tl.store(k + D // 2, y2.to(K.dtype.element_ty))
        v = V + b * stride_vb + h * stride_vh + pos * stride_vn + half
        tl.store(v, tl.load(x + HKV * D))  # v head h lies HKV heads past k head h
        tl.store(v + D // 2, tl.load(x + HKV * D + D // 2))


@cache
def _rope_meta(n_heads: int, n_kv_heads: int, D: int) -> dict:
    return dict(HQ=n_heads, HKV=n_kv_heads, D=D, num_warps=1 if D <= 128 else 2)


_launch_rope = Launcher(_rope_write)


def rope_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int, n_kv_heads: int):
    """The contract of fachat.kernels.reference.rope_write, in one launch (a program per token and q or k head),
    for head_dim a power of two with unit stride along head_dim everywhere. positions must lie within the
    caches' capacity: the kernel writes there unchecked."""
    B, L, _ = qkv.shape
    D = cos.shape[-1]
    q = torch.empty((B, L, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    _launch(_launch_rope, (B * L, n_heads + n_kv_heads, 1), (qkv, cos, sin, positions, k_cache, v_cache, q),
            (L, *qkv.stride()[:2], *positions.stride(), cos.stride(0), sin.stride(0), *k_cache.stride()[:3],
             *v_cache.stride()[:3]), _rope_meta(n_heads, n_kv_heads, D))
    return q.transpose(1, 2)

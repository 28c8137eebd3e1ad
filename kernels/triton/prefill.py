"""Tiled flash-attention prefill in Triton: q_len > 1 queries on top of a cached past.

Query i of q_len sits at position kv_len - q_len + i and sees keys at positions <= its own
(bottom-right causal), or only the last `window` of those. Each program owns BLOCK_M queries of one
head and streams K/V tiles of the head's KV head through an online softmax: no score matrix is
stored and K/V are never repeated per query head. Its key range splits into tiles that need a mask
(the window's lower edge, the causal diagonal) and tiles every query sees whole, which skip the
mask; tiles no query sees are never read.

On Hopper, prefill_attention hands the calls it can to prefill_hopper's warp-specialised Gluon kernel
(16-bit, head_dim 64 or 128, one kv_len for all rows, no softcap): 0.89-0.94x SDPA's TFLOP/s against
0.75-0.76x for this kernel at L = 32k on an H100 (benchmarks/attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from fachat.kernels.common import kernel_layout, output_for, score_scales
from fachat.kernels.triton.decode import INTERPRET, Launcher, _dot, sm_count, _tanh, dot_args


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # per thread; caps it low enough for two programs per multiprocessor


@cache
def config(head_dim: int, dtype: torch.dtype, two_per_sm: bool = False) -> PrefillConfig:
    """two_per_sm: the launch has query blocks enough for two programs on every multiprocessor."""
    if dtype == torch.float32:  # twice the bytes a tile: smaller tiles keep shared memory in bounds
        return PrefillConfig(64, 32, 4, 2) if head_dim == 256 else PrefillConfig(64, 64, 4, 2)
    if head_dim == 256:
        return PrefillConfig(64, 64, 8, 2)
    if head_dim == 128 and two_per_sm:
        # 128 registers and 2 stages (96 KB of shared memory) fit two programs per multiprocessor, which
        # then interleave one's softmax with the other's matrix products (one program's two warpgroups
        # move in step). Despite a few spilled registers: 0.80-0.81x SDPA against 0.78 at L = 8k, 0.75
        # against 0.69 at 32k (H100, in turns with SDPA). With fewer blocks it loses: 0.96x against
        # 1.59x for a 512-token chunk (128 programs).
        return PrefillConfig(128, 64, 8, 2, max_registers=128)
    # Fastest or tied within noise in benchmarks/attention.py --sweep on an H100 (bf16, L = 8k and 32k, D = 64, 128).
    return PrefillConfig(128, 64, 8 if head_dim == 128 else 4, 3)


def config_for(q_shape: torch.Size, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """This module's kernel configuration for queries of q_shape [B, Hq, Lq, D] over K/V of dtype."""
    B, Hq, Lq, D = q_shape
    cfg = config(D, dtype)
    if B * Hq * triton.cdiv(Lq, cfg.block_m) >= 2 * sm_count(device):
        cfg = config(D, dtype, two_per_sm=True)
    return cfg


@triton.jit
def _tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, pos, lo, hi, window, qk_scale, softcap_log2e,
           BLOCK_N: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
           PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over the keys [lo, hi); MASK applies causality, the window and hi per query."""
    for j in range(lo, hi, BLOCK_N):
        offs = j + tl.arange(0, BLOCK_N)
        if MASK:
            k = tl.load(k_base + offs[:, None] * stride_kn, mask=offs[:, None] < hi, other=0.0)
        else:
            k = tl.load(k_base + offs[:, None] * stride_kn)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST)
        # Scores go into exp2 as s * sc - m: the max is taken before scaling (sc > 0), so that the
        # scale and the shift are one fused multiply-add per score.
        if SOFTCAP:
            s = softcap_log2e * _tanh(s * qk_scale)
            sc = 1.0
        else:
            sc = qk_scale
        if MASK:
            seen = (offs[None, :] <= pos[:, None]) & (offs[None, :] < hi)
            if WINDOW:
                seen &= offs[None, :] > pos[:, None] - window
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            # A query that has seen no key yet has m = -inf: shift by 0 so that it gets p = 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_base + offs[:, None] * stride_kn, mask=offs[:, None] < hi, other=0.0)
        else:
            v = tl.load(v_base + offs[:, None] * stride_kn)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["kv_len", "window", "q_len"])
def _prefill(Q, K, V, Out, Lens, kv_len, q_len, window, qk_scale, softcap_log2e,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
             HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PER_ROW: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    # Heads vary fastest in launch order, and the last query blocks (the most keys) start first.
    mb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (bh // HQ).to(tl.int64)  # batch strides can pass 2**31 elements
    hq = bh % HQ
    hk = hq // G
    if PER_ROW:
        n = tl.load(Lens + b)
    else:
        n = kv_len
    past = n - q_len
    m0 = mb * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    # Rows past q_len pad the last block: they repeat the last query's position (so that no row is
    # fully masked, which would divide 0 by 0) and are never stored.
    pos = past + tl.minimum(rows, q_len - 1)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq * stride_qh + rows[:, None] * stride_qm + d[None, :],
                mask=rows[:, None] < q_len, other=0.0).to(K.dtype.element_ty)
    k_base = K + b * stride_kb + hk * stride_kh + d[None, :]
    v_base = V + b * stride_kb + hk * stride_kh + d[None, :]  # V has K's strides

    pos_min = past + m0
    pos_max = past + tl.minimum(m0 + BLOCK_M, q_len) - 1
    hi = pos_max + 1  # <= n
    # Whole tiles in [full_lo, full_hi) are seen by every query of the block.
    full_hi = (pos_min + 1) // BLOCK_N * BLOCK_N
    if WINDOW:
        lo = tl.maximum(pos_min - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(pos_max - window + 1, 0), BLOCK_N) * BLOCK_N
    else:
        lo = 0
        full_lo = 0
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if WINDOW:
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, pos, lo, full_lo, window,
                               qk_scale, softcap_log2e, BLOCK_N, True, WINDOW, SOFTCAP, PRECISION, UPCAST)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, pos, full_lo, full_hi, window,
                           qk_scale, softcap_log2e, BLOCK_N, False, WINDOW, SOFTCAP, PRECISION, UPCAST)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, pos, full_hi, hi, window,
                           qk_scale, softcap_log2e, BLOCK_N, True, WINDOW, SOFTCAP, PRECISION, UPCAST)
    out = acc / l_i[:, None]
    # Out is contiguous [B, Hq, q_len, D].
    tl.store(Out + ((b * HQ + hq) * q_len + rows[:, None]) * D + d[None, :], out.to(Out.dtype.element_ty),
             mask=rows[:, None] < q_len)


@cache
def _constexprs(Hq: int, G: int, D: int, dtype: torch.dtype, per_row: bool, window: bool, softcap: bool,
                cfg: PrefillConfig) -> dict:
    return dict(HQ=Hq, G=G, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PER_ROW=per_row, WINDOW=window,
                SOFTCAP=softcap, **dot_args(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}))


_launch = Launcher(_prefill)


@cache
def _hopper_module(device: torch.device):
    """prefill_hopper (Gluon) where it runs: compiled, on an sm_90 GPU; else None. Imported once."""
    if INTERPRET or device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    from fachat.kernels.triton import prefill_hopper
    return prefill_hopper


def gluon_kernel(q, k_cache, v_cache, kv_len, window, softcap):
    """prefill_hopper where its kernel takes this call (an sm_90 GPU, inputs its `supports` accepts), else None."""
    hopper = _hopper_module(q.device)
    return hopper if hopper is not None and hopper.supports(q, k_cache, v_cache, kv_len, window, softcap) else None


def prefill_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None,
                      out: torch.Tensor | None = None, cfg: PrefillConfig | None = None):
    """q [B, Hq, Lq, D] holding the last Lq of kv_len positions -> [B, Hq, Lq, D]; the contract of
    fachat.kernels.reference.prefill_attention. out, a contiguous [B, Hq, Lq, D] of q's dtype, receives
    the result. On Hopper the calls prefill_hopper.supports takes run its kernel, unless cfg (this
    module's kernel configuration) is given."""
    B, Hq, Lq, D = q.shape
    if not isinstance(kv_len, int) and B == 1:
        kv_len = int(kv_len)  # one row: its length as an int takes the fastest kernels (prefill is not captured)
    q, k_cache, v_cache = kernel_layout(q, k_cache, v_cache)
    q_strides, k_strides = q.stride(), k_cache.stride()
    if window is not None:
        window = min(window, k_cache.shape[2])  # no change in meaning; keeps it an int32 for the kernel
    out = output_for(q, out)
    hopper = None if cfg is not None else gluon_kernel(q, k_cache, v_cache, kv_len, window, softcap)
    if hopper is not None:
        return hopper.prefill_attention(q, k_cache, v_cache, kv_len, qk_scale=score_scales(scale, None, D)[0],
                                        window=window, out=out)
    cfg = cfg or config_for(q.shape, k_cache.dtype, q.device)
    per_row = not isinstance(kv_len, int)
    lens = kv_len.to(device=q.device, dtype=torch.int32) if per_row else q  # q stands in for the unused pointer
    _launch(
        (B * Hq, triton.cdiv(Lq, cfg.block_m), 1), (q.dtype, k_cache.dtype, q_strides, k_strides),
        (q, k_cache, v_cache, out, lens),
        (0 if per_row else kv_len, Lq, window or 0, *score_scales(scale, softcap, D),
         q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2]),
        _constexprs(Hq, Hq // k_cache.shape[1], D, k_cache.dtype, per_row, window is not None, softcap is not None,
                    cfg))
    return out

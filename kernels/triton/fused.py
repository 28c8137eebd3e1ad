"""A Llama layer's steps around attention, one Triton kernel each: RMSNorm, SiLU times up, and RoPE with the K/V
cache write. The contracts are those of fachat.kernels.reference; positions are read on
the device, so that a CUDA graph can capture a decode step.

Each computes in fp32 from its inputs and rounds its outputs once, except where the reference rounds in between
on purpose (the normalised activations of RMSNorm, and a projection's output, which the model carries in its dtype).
"""
from __future__ import annotations

from functools import cache

import torch
from torch import nn
import triton
import triton.language as tl

from fachat.kernels.triton.decode import INTERPRET, Launcher, use_pdl
from fachat.models.quant import Int4Linear


def _launch(launcher: Launcher, grid, tensors: tuple, scalars: tuple, meta: dict) -> None:
    # The scalars are strides, sizes and eps: with the dtypes they pin down what Triton specialises on.
    launcher(grid, (tuple(t.dtype for t in tensors), scalars), tensors, scalars, meta)


@triton.jit
def _rms_norm(X, W, Out, eps, stride_xr, stride_xc, H: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    live = cols < H
    x = tl.load(X + row * stride_xr + cols * stride_xc, mask=live, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(W + cols, mask=live, other=0.0).to(tl.float32)
    y = (x * inv).to(Out.dtype.element_ty).to(tl.float32) * w  # normalised, rounded to T, then weighted
    tl.store(Out + row * H + cols, y.to(Out.dtype.element_ty), mask=live)


@cache
def _norm_meta(H: int) -> dict:
    block = triton.next_power_of_2(H)
    return dict(H=H, BLOCK_H=block, num_warps=min(16, max(1, block // 256)))


_launch_norm = Launcher(_rms_norm)


def rms_norm(x, weight, eps):
    """The contract of fachat.kernels.reference.rms_norm, in one launch (one program per row)."""
    H = x.shape[-1]
    rows = x.reshape(-1, H)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_launch_norm, (rows.shape[0], 1, 1), (rows, weight, out), (eps, *rows.stride()), _norm_meta(H))
    return out


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
def _store_head(x1, x2, head, token, b, pos, half, Cos, Sin, K, V, Q, stride_cos, stride_sin, stride_kb, stride_kh,
                stride_kn, stride_vb, stride_vh, stride_vn, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """Stores the halves x1, x2 (fp32, values of Q's dtype) of head `head` of a token's q, k and v heads (in that
    order): q to Q [B, L, HQ, D] turned by RoPE at pos, k likewise to the K cache at pos, v as it is to V's."""
    if head >= HQ + HKV:
        v = V + b * stride_vb + (head - HQ - HKV) * stride_vh + pos * stride_vn + half
        tl.store(v, x1.to(V.dtype.element_ty))
        tl.store(v + D // 2, x2.to(V.dtype.element_ty))
    else:
        cos = Cos + pos * stride_cos + half
        sin = Sin + pos * stride_sin + half
        # x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1)
        y1 = x1 * tl.load(cos).to(tl.float32) - x2 * tl.load(sin).to(tl.float32)
        y2 = x2 * tl.load(cos + D // 2).to(tl.float32) + x1 * tl.load(sin + D // 2).to(tl.float32)
        if head < HQ:
            q = Q + (token * HQ + head) * D + half
            tl.store(q, y1.to(Q.dtype.element_ty))
            tl.store(q + D // 2, y2.to(Q.dtype.element_ty))
        else:
            k = K + b * stride_kb + (head - HQ) * stride_kh + pos * stride_kn + half
            tl.store(k, y1.to(K.dtype.element_ty))
            tl.store(k + D // 2, y2.to(K.dtype.element_ty))


@triton.jit
def _rope_write(QKV, Cos, Sin, Pos, K, V, Q, L, stride_xb, stride_xl, stride_pb, stride_pl, stride_cos,
                stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * L + l
    head = tl.program_id(1)  # the query heads, the KV heads, then the V heads
    b = token // L
    l = token % L
    pos = tl.load(Pos + b * stride_pb + l * stride_pl).to(tl.int64)
    half = tl.arange(0, D // 2)
    x = QKV + b * stride_xb + l * stride_xl + head * D + half  # heads lie in grid order
    _store_head(tl.load(x).to(tl.float32), tl.load(x + D // 2).to(tl.float32), head, token, b, pos, half, Cos, Sin,
                K, V, Q, stride_cos, stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                HQ, HKV, D)


@cache
def _rope_meta(n_heads: int, n_kv_heads: int, D: int) -> dict:
    return dict(HQ=n_heads, HKV=n_kv_heads, D=D, num_warps=1 if D <= 128 else 2)


_launch_rope = Launcher(_rope_write)


def rope_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int, n_kv_heads: int):
    """The contract of fachat.kernels.reference.rope_write, in one launch (a program per token and head),
    for head_dim a power of two with unit stride along head_dim everywhere. positions must lie within the
    caches' capacity: the kernel writes there unchecked."""
    B, L, _ = qkv.shape
    D = cos.shape[-1]
    q = torch.empty((B, L, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    _launch(_launch_rope, (B * L, n_heads + 2 * n_kv_heads, 1), (qkv, cos, sin, positions, k_cache, v_cache, q),
            (L, *qkv.stride()[:2], *positions.stride(), cos.stride(0), sin.stride(0), *k_cache.stride()[:3],
             *v_cache.stride()[:3]), _rope_meta(n_heads, n_kv_heads, D))
    return q.transpose(1, 2)


# ---------------------------------------------------------------- projections of a few rows (decode)
# A decode step's matrix products have one row per sequence: they stream their weights once, and the steps
# around them (RMSNorm before, the residual add, SiLU-mul or RoPE with the cache write after) cost a launch
# each, longer than their work. So for up to GEMV_ROWS rows each projection is one kernel with its neighbours
# fused; more rows (prefill) take torch's matmul and the kernels above.
GEMV_ROWS = 4


@triton.jit
def _inv_rms(X, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
        ss += x * x
    return tl.rsqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _weights(W, rows, live, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows, k0:k0 + BLOCK_K] of a float W [N, K]."""
    cols = k0 + tl.arange(0, BLOCK_K)
    return tl.load(W + rows[:, None].to(tl.int64) * K + cols[None, :], mask=live[:, None] & (cols < K)[None, :],
                   other=0.0)


@triton.jit
def _codes(W, S, rows, live, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Groups k0 / 32 to (k0 + BLOCK_K) / 32 of int4 rows (Int4Linear's portable layout) as (words 0 to 3 of each,
    scale-zero), each [BLOCK_R, BLOCK_K / 32] of int32: W [N, 4, K / 32] holds word j of group g at [n, j, g], with
    column 32g + 8j + i in bits 4i to 4i + 3; S [N, K / 32] each group's bf16 scale (low half) and zero (high half).
    A program's lanes then read consecutive groups of a row in each load, and a lane all of a group."""
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask = live[:, None] & (groups < K // 32)[None, :]
    # Loads of one word a lane, not four: a lane's groups then match its x's in _dot_codes (no layout conversion).
    at = tl.max_contiguous(rows[:, None].to(tl.int64) * (K // 32) + groups[None, :], [1, 1])
    w = W + 3 * rows[:, None].to(tl.int64) * (K // 32) + at  # word 0 of group g of row n lies at 4 n K / 32 + g
    q0 = tl.load(w, mask=mask, other=0)
    q1 = tl.load(w + K // 32, mask=mask, other=0)
    q2 = tl.load(w + 2 * (K // 32), mask=mask, other=0)
    q3 = tl.load(w + 3 * (K // 32), mask=mask, other=0)
    return q0, q1, q2, q3, tl.load(S + at, mask=mask, other=0)


@triton.jit
def _first(W, S, rows, live, K: tl.constexpr, BLOCK_K: tl.constexpr, INT4: tl.constexpr):
    """The rows' first BLOCK_K columns of weights: a float tile, or int4 _codes."""
    if INT4:
        w = _codes(W, S, rows, live, 0, K, BLOCK_K)
    else:
        w = _weights(W, rows, live, 0, K, BLOCK_K)
    return w


@triton.jit
def _input(X, NW, inv, cols, K: tl.constexpr, NORM: tl.constexpr):
    """X[cols] in fp32, normalised by inv and weighted by NW where NORM, rounded as
    fachat.kernels.reference.rms_norm rounds."""
    in_k = cols < K
    x = tl.load(X + cols, mask=in_k, other=0.0)
    if NORM:
        normed = (x.to(tl.float32) * inv).to(X.dtype.element_ty).to(tl.float32)
        x = (normed * tl.load(NW + cols, mask=in_k, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _nibble(word, mask, place: tl.constexpr):
    """(q - 8) * 16**place in fp32, q the code in word's bits 4 place to 4 place + 3, where word's bits 23 up are
    those of 2**23 (0x4B000000) and mask keeps them and the code: an and, and an exact subtraction."""
    return (word & mask).to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * 16 ** place)


@triton.jit
def _dot_word(q, x, qx):
    """qx plus the sum over a word's 8 columns of (q - 8) * x, [BLOCK_R, G]: q its words, x [G, 8] their columns'.
    Nibbles 0 to 4, and 5 to 7 shifted down by 12, under the exponent of 2**23 are floats 2**23 + q * 16**p (p
    the place); scaled by 16**-p (exact), x then multiplies them. An and, an add and an FMA a code: no shift, no
    int-to-float conversion, which runs at a fraction of the FMA rate."""
    i = tl.arange(0, 8)[None, :]
    x0 = tl.sum(tl.where(i == 0, x, -0.0), 1)  # column i of the lane's own x: the adds of -0.0 fold away
    x1 = tl.sum(tl.where(i == 1, x, -0.0), 1)
    x2 = tl.sum(tl.where(i == 2, x, -0.0), 1)
    x3 = tl.sum(tl.where(i == 3, x, -0.0), 1)
    x4 = tl.sum(tl.where(i == 4, x, -0.0), 1)
    x5 = tl.sum(tl.where(i == 5, x, -0.0), 1)
    x6 = tl.sum(tl.where(i == 6, x, -0.0), 1)
    x7 = tl.sum(tl.where(i == 7, x, -0.0), 1)
    lo = (q & 0xFFFFF) | 0x4B000000
    hi = (q.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True) | 0x4B000000
    qx += _nibble(lo, -8388593, 0) * x0[None, :]  # masks: 0xFF800000 and the nibble
    qx += _nibble(lo, -8388368, 1) * (x1 * 0.0625)[None, :]
    qx += _nibble(lo, -8384768, 2) * (x2 * 0.00390625)[None, :]
    qx += _nibble(lo, -8327168, 3) * (x3 * 0.000244140625)[None, :]
    qx += _nibble(lo, -7405568, 4) * (x4 * 1.52587890625e-05)[None, :]
    qx += _nibble(hi, -8384768, 2) * (x5 * 0.00390625)[None, :]
    qx += _nibble(hi, -8327168, 3) * (x6 * 0.000244140625)[None, :]
    qx += _nibble(hi, -7405568, 4) * (x7 * 1.52587890625e-05)[None, :]
    return qx


@triton.jit
def _dot_codes(X, NW, inv, codes, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """Per group of _codes' words: the sum over its 32 columns of weight times x (_input's x), as
    scale * sum((q - 8) x) + zero * sum(x), [BLOCK_R, BLOCK_K / 32] in fp32."""
    q0, q1, q2, q3, sz = codes
    cols = k0 + 32 * tl.arange(0, BLOCK_K // 32)[:, None] + tl.arange(0, 8)[None, :]
    x0 = _input(X, NW, inv, cols, K, NORM)
    x1 = _input(X, NW, inv, cols + 8, K, NORM)
    x2 = _input(X, NW, inv, cols + 16, K, NORM)
    x3 = _input(X, NW, inv, cols + 24, K, NORM)
    qx = _dot_word(q0, x0, tl.zeros(sz.shape, dtype=tl.float32))
    qx = _dot_word(q1, x1, qx)
    qx = _dot_word(q2, x2, qx)
    qx = _dot_word(q3, x3, qx)
    xs = tl.sum(x0 + x1 + x2 + x3, 1)
    scale = (sz << 16).to(tl.float32, bitcast=True)  # a bf16's bits are a float32's high half
    zero = (sz & -65536).to(tl.float32, bitcast=True)
    return scale * qx + zero * xs[None, :]


@triton.jit
def _dot_rows(X, NW, W, S, w0, rows, live, inv, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
              INT4: tl.constexpr):
    """fp32 sums over k of W[rows, k] * x[k] (_input's x), given w0, _first's weights of the rows."""
    if INT4:
        acc = _dot_codes(X, NW, inv, w0, 0, K, BLOCK_K, NORM)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            acc += _dot_codes(X, NW, inv, _codes(W, S, rows, live, k0, K, BLOCK_K), k0, K, BLOCK_K, NORM)
    else:
        acc = w0.to(tl.float32) * _input(X, NW, inv, tl.arange(0, BLOCK_K), K, NORM)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _weights(W, rows, live, k0, K, BLOCK_K)
            acc += w.to(tl.float32) * _input(X, NW, inv, k0 + tl.arange(0, BLOCK_K), K, NORM)[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _start(W, S, rows, live, K: tl.constexpr, BLOCK_K: tl.constexpr, INT4: tl.constexpr, PDL: tl.constexpr):
    """The rows' first weights, loaded before waiting (PDL) for the kernel ahead, which never writes weights:
    their reading overlaps its end."""
    w0 = _first(W, S, rows, live, K, BLOCK_K, INT4)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    return w0


@triton.jit
def _output(X, NW, W, S, w0, Bias, rows, live, inv, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
            BIAS: tl.constexpr, INT4: tl.constexpr):
    """W[rows] @ x (+ bias) rounded to X's dtype, as F.linear of _input's x gives it, in fp32."""
    y = _dot_rows(X, NW, W, S, w0, rows, live, inv, K, BLOCK_K, NORM, INT4)
    if BIAS:
        y += tl.load(Bias + rows, mask=live, other=0.0).to(tl.float32)
    return y.to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _paired(first, n, apart, BLOCK_R: tl.constexpr):
    """Rows first + r and first + r + apart for r < BLOCK_R, interleaved ([2 BLOCK_R]), and whether first + r < n.
    With int4 weights a program takes both halves of a SiLU or RoPE in one tile: it reads and unpacks x once."""
    r = tl.arange(0, 2 * BLOCK_R)
    return first + r // 2 + r % 2 * apart, first + r // 2 < n


@triton.jit
def _linear(X, NW, W, S, Bias, R, Out, eps, stride_xm, stride_rm, N, K: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_K: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, SILU: tl.constexpr,
            INT4: tl.constexpr, PDL: tl.constexpr):
    """Out[m, rows] for row m of X: W @ x, x = rms_norm(X[m]) where NORM, plus Bias, then with SILU
    silu(gate) * up of W's two halves (gate rows, then up rows N further), with ADD plus R[m]."""
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    PAIR: tl.constexpr = SILU and INT4
    if PAIR:  # gate and up rows in one tile
        tile, in_tile = _paired(tl.program_id(0) * BLOCK_R, N, N, BLOCK_R)
    else:
        tile, in_tile = rows, live
    w0 = _start(W, S, tile, in_tile, K, BLOCK_K, INT4, PDL)
    X += m * stride_xm
    inv = 1.0
    if NORM:
        inv = _inv_rms(X, eps, K, BLOCK_K)
    y = _output(X, NW, W, S, w0, Bias, tile, in_tile, inv, K, BLOCK_K, NORM, BIAS, INT4)
    if SILU:
        if PAIR:
            y, up = tl.split(tl.reshape(y, (BLOCK_R, 2)))
        else:
            up = _output(X, NW, W, S, _first(W, S, rows + N, live, K, BLOCK_K, INT4), Bias, rows + N, live, inv, K,
                         BLOCK_K, NORM, BIAS, INT4)
        y = y * tl.sigmoid(y) * up
    if ADD:
        y = y.to(Out.dtype.element_ty).to(tl.float32) + tl.load(R + m * stride_rm + rows, mask=live).to(tl.float32)
    tl.store(Out + m * N + rows, y.to(Out.dtype.element_ty), mask=live)


@triton.jit
def _norm_rope_write(X, NW, W, S, Bias, Cos, Sin, Pos, K, V, Q, eps, stride_xm, L, stride_pb, stride_pl,
                     stride_cos, stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     HIDDEN: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BIAS: tl.constexpr, INT4: tl.constexpr,
                     PDL: tl.constexpr):
    """For token m = b * L + l: the rows r and r + D/2 of one q, k or v head of W @ rms_norm(X[m]) (+ Bias), for
    BLOCK_R values of r; q and k turned by RoPE at the token's position, q stored to Q [B, L, HQ, D], k and v
    to the caches there."""
    m = tl.program_id(1).to(tl.int64)
    per_head: tl.constexpr = D // 2 // BLOCK_R
    head = tl.program_id(0) // per_head  # the query heads, then the KV heads, then the V heads
    first = (tl.program_id(0) % per_head) * BLOCK_R
    half = first + tl.arange(0, BLOCK_R)
    rows = head * D + half
    live = half < D // 2
    if INT4:  # the two halves' rows in one tile
        tile, in_tile = _paired(first, D // 2, D // 2, BLOCK_R)
        tile += head * D
    else:
        tile, in_tile = rows, live
    w0 = _start(W, S, tile, in_tile, HIDDEN, BLOCK_K, INT4, PDL)
    X += m * stride_xm
    inv = _inv_rms(X, eps, HIDDEN, BLOCK_K)
    x1 = _output(X, NW, W, S, w0, Bias, tile, in_tile, inv, HIDDEN, BLOCK_K, True, BIAS, INT4)
    if INT4:
        x1, x2 = tl.split(tl.reshape(x1, (BLOCK_R, 2)))
    else:
        x2 = _output(X, NW, W, S, _first(W, S, rows + D // 2, live, HIDDEN, BLOCK_K, INT4), Bias, rows + D // 2,
                     live, inv, HIDDEN, BLOCK_K, True, BIAS, INT4)
    b = m // L
    pos = tl.load(Pos + b * stride_pb + (m % L) * stride_pl).to(tl.int64)
    _store_head(x1, x2, head, m, b, pos, half, Cos, Sin, K, V, Q, stride_cos,
                stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, HQ, HKV, D)


def gemv_blocks(rows: int, K: int, int4: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K): output rows a program takes and the reduction's step. From benchmarks/projections.py
    --sweep on an H200 (bf16, SmolLM2-135M and Llama-3.2-1B shapes): many programs of two rows won, with up to
    8K weights a step (all of a row's at hidden sizes to 4096, loaded before the wait for the kernel ahead);
    a vocabulary's or a wide MLP's rows went best four a program, 4K weights a step. Int4 weights: up to 4K codes
    a step, a lane taking a group of them in all the tile's rows (SiLU's and RoPE's two halves in one tile); eight
    rows only for a vocabulary, as eight gave Llama-1B's gate/up too few programs (--weights int4 on the H200:
    18.9 µs, against 15.2 for the previous kernel)."""
    if INTERPRET:  # it runs the programs one at a time: the fewest
        return 64, triton.next_power_of_2(K)
    if int4:
        return 8 if rows > 16384 else 4 if rows > 1024 else 2, min(triton.next_power_of_2(K), 4096)
    block_r = 2 if rows <= 4096 else 4
    return block_r, min(triton.next_power_of_2(K), (8192 if rows <= 4096 else 4096) // block_r)


def _warps(block_k: int, int4: bool) -> int:
    """Four warps; with int4 weights no more than a lane a group of a step, so that a lane holds the 8 columns of x
    of each of its words whole (_dot_codes; with fewer groups than lanes the compiler splits them)."""
    return max(1, min(4, block_k // 1024)) if int4 else 4


@cache
def _linear_meta(N: int, K: int, norm: bool, bias: bool, add: bool, silu: bool, int4: bool, pdl: bool) -> dict:
    block_r, block_k = gemv_blocks(N, K, int4)
    return dict(K=K, BLOCK_R=block_r, BLOCK_K=block_k, NORM=norm, BIAS=bias, ADD=add, SILU=silu, INT4=int4, PDL=pdl,
                launch_pdl=pdl, num_warps=_warps(block_k, int4))


@cache
def _rope_linear_meta(hidden: int, n_heads: int, n_kv_heads: int, D: int, bias: bool, int4: bool, pdl: bool
                      ) -> dict:
    block_r, block_k = gemv_blocks((n_heads + 2 * n_kv_heads) * D // 2, hidden, int4)
    return dict(HIDDEN=hidden, HQ=n_heads, HKV=n_kv_heads, D=D, BLOCK_R=min(block_r, D // 2), BLOCK_K=block_k,
                BIAS=bias, INT4=int4, PDL=pdl, launch_pdl=pdl, num_warps=_warps(block_k, int4))


_launch_linear = Launcher(_linear)
_launch_rope_linear = Launcher(_norm_rope_write)


def _rows(x):
    """x [..., K] as rows [M, K] with unit stride along K, as the projection kernels read them."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _weight_args(linear) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(W, S, INT4) of the projection kernels: a float layer's weight, or an Int4Linear's codes and scales."""
    if isinstance(linear, Int4Linear):  # as _codes reads them
        return linear.packed, linear.scales_and_zeros.view(torch.int32).squeeze(-1), True
    weight = linear.weight.contiguous()
    return weight, weight, False


def _gemv(x, linear, N: int, norm=None, residual=None, silu=False):
    """_linear over the rows of x [..., K] -> [..., N] (silu: the layer has 2 * N outputs)."""
    K = x.shape[-1]
    rows = _rows(x)
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    weight, scales, int4 = _weight_args(linear)
    bias = linear.bias
    nw, eps = norm if norm is not None else (weight, 0.0)
    res = residual.reshape(-1, N) if residual is not None else out
    meta = _linear_meta(N, K, norm is not None, bias is not None, residual is not None, silu, int4,
                        use_pdl(x.device))
    block = meta["BLOCK_R"]
    _launch(_launch_linear, (triton.cdiv(N, block), rows.shape[0], 1),
            (rows, nw, weight, scales, weight if bias is None else bias, res, out),
            (float(eps), rows.stride(0), res.stride(0), N), meta)
    return out


def _gemv_fits(x, linear) -> bool:
    """Whether a projection runs as one _linear kernel: up to GEMV_ROWS rows through a float nn.Linear or an
    Int4Linear of the portable layout (other quantized layers run their own kernels)."""
    layer = isinstance(linear, nn.Linear) or isinstance(linear, Int4Linear) and linear.portable
    return layer and x.numel() // x.shape[-1] <= GEMV_ROWS


def norm_linear(x, norm_weight, eps, linear):
    """The contract of fachat.kernels.reference.norm_linear; one launch for up to GEMV_ROWS rows."""
    if not _gemv_fits(x, linear):
        return linear(rms_norm(x, norm_weight, eps))
    return _gemv(x, linear, linear.out_features, norm=(norm_weight, eps))


def norm_silu_mul(x, norm_weight, eps, linear):
    """The contract of fachat.kernels.reference.norm_silu_mul; one launch for up to GEMV_ROWS rows."""
    if not _gemv_fits(x, linear):
        return silu_mul(linear(rms_norm(x, norm_weight, eps)))
    return _gemv(x, linear, linear.out_features // 2, norm=(norm_weight, eps), silu=True)


def linear_add(x, linear, residual):
    """The contract of fachat.kernels.reference.linear_add; one launch for up to GEMV_ROWS rows."""
    if not _gemv_fits(x, linear):
        return residual + linear(x)
    return _gemv(x, linear, linear.out_features, residual=residual)


def norm_rope_write(x, norm_weight, eps, linear, cos, sin, positions, k_cache, v_cache, n_heads: int,
                    n_kv_heads: int):
    """The contract of fachat.kernels.reference.norm_rope_write (and rope_write's conditions); one launch for up
    to GEMV_ROWS tokens."""
    if not _gemv_fits(x, linear):
        return rope_write(linear(rms_norm(x, norm_weight, eps)), cos, sin, positions, k_cache, v_cache, n_heads,
                          n_kv_heads)
    B, L, hidden = x.shape
    D = cos.shape[-1]
    rows = _rows(x)
    weight, scales, int4 = _weight_args(linear)
    bias = linear.bias
    q = torch.empty((B, L, n_heads, D), dtype=x.dtype, device=x.device)
    meta = _rope_linear_meta(hidden, n_heads, n_kv_heads, D, bias is not None, int4, use_pdl(x.device))
    programs = (n_heads + 2 * n_kv_heads) * (D // 2 // meta["BLOCK_R"])
    _launch(_launch_rope_linear, (programs, B * L, 1),
            (rows, norm_weight, weight, scales, weight if bias is None else bias, cos, sin, positions, k_cache,
             v_cache, q),
            (float(eps), rows.stride(0), L, *positions.stride(), cos.stride(0), sin.stride(0), *k_cache.stride()[:3],
             *v_cache.stride()[:3]), meta)
    return q.transpose(1, 2)

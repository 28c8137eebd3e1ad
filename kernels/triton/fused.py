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
    """Columns k0:k0 + BLOCK_K of int4 rows as (words, scale, zero), each [BLOCK_R, BLOCK_K / 8]: W [N, K / 8]
    holds int32 words of 8 codes (column 8j + i in bits 4i to 4i + 3 of word j), S [N, K / 32] each group's
    bf16 scale (low half) and zero (high half); the weights are (q - 8) * scale + zero. Whole words and one
    scale load a word: unpacking is then a shift and a mask a code."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    r = rows[:, None].to(tl.int64)
    mask = live[:, None] & (words < K // 8)[None, :]
    q = tl.load(W + r * (K // 8) + words[None, :], mask=mask, other=0)
    sz = tl.load(S + r * (K // 32) + (words // 4)[None, :], mask=mask, other=0)
    scale = (sz << 16).to(tl.float32, bitcast=True)  # a bf16's bits are a float32's high half
    zero = (sz & -65536).to(tl.float32, bitcast=True)
    return q, scale, zero


@triton.jit
def _first(W, S, rows, live, K: tl.constexpr, BLOCK_K: tl.constexpr, INT4: tl.constexpr):
    """The rows' first BLOCK_K columns of weights: a float tile, or int4 (words, scale, zero)."""
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
def _dot_codes(X, NW, inv, codes, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """Per word of _codes' (words, scale, zero): the sum over its 8 columns of weight times x, as
    scale * sum((q - 8) x) + zero * sum(x), [BLOCK_R, BLOCK_K / 8] in fp32."""
    q, scale, zero = codes
    cols = k0 + 8 * tl.arange(0, BLOCK_K // 8)
    qx = tl.zeros(q.shape, dtype=tl.float32)
    xs = tl.zeros(cols.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        x = _input(X, NW, inv, cols + i, K, NORM)
        # A code or-ed into the mantissa of 2**23 (bits 0x4B000000) is the float 2**23 + code: exact, and cheaper
        # than an int-to-float conversion, which runs at a fraction of the FMA rate.
        code = (((q >> 4 * i) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8
        qx += code * x[None, :]
        xs += x
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
def _linear(X, NW, W, S, Bias, R, Out, eps, stride_xm, stride_rm, N, K: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_K: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, SILU: tl.constexpr,
            INT4: tl.constexpr, PDL: tl.constexpr):
    """Out[m, rows] for row m of X: W @ x, x = rms_norm(X[m]) where NORM, plus Bias, then with SILU
    silu(gate) * up of W's two halves (gate rows, then up rows N further), with ADD plus R[m]."""
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    w0 = _start(W, S, rows, live, K, BLOCK_K, INT4, PDL)
    X += m * stride_xm
    inv = 1.0
    if NORM:
        inv = _inv_rms(X, eps, K, BLOCK_K)
    y = _output(X, NW, W, S, w0, Bias, rows, live, inv, K, BLOCK_K, NORM, BIAS, INT4)
    if SILU:
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
    half = (tl.program_id(0) % per_head) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = head * D + half
    live = half < D // 2
    w0 = _start(W, S, rows, live, HIDDEN, BLOCK_K, INT4, PDL)
    X += m * stride_xm
    inv = _inv_rms(X, eps, HIDDEN, BLOCK_K)
    x1 = _output(X, NW, W, S, w0, Bias, rows, live, inv, HIDDEN, BLOCK_K, True, BIAS, INT4)
    x2 = _output(X, NW, W, S, _first(W, S, rows + D // 2, live, HIDDEN, BLOCK_K, INT4), Bias, rows + D // 2, live,
                 inv, HIDDEN, BLOCK_K, True, BIAS, INT4)
    b = m // L
    pos = tl.load(Pos + b * stride_pb + (m % L) * stride_pl).to(tl.int64)
    _store_head(x1, x2, head, m, b, pos, half, Cos, Sin, K, V, Q, stride_cos,
                stride_sin, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, HQ, HKV, D)


def gemv_blocks(rows: int, K: int, int4: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K): output rows a program takes and the reduction's step. From benchmarks/projections.py
    --sweep on an H200 (bf16, SmolLM2-135M and Llama-3.2-1B shapes): many programs of two rows won, with up to
    8K weights a step (all of a row's at hidden sizes to 4096, loaded before the wait for the kernel ahead);
    a vocabulary's or a wide MLP's rows went best four a program, 4K weights a step. Int4 weights (--weights int4,
    and whole decode steps, which ranked the choices differently at SmolLM2's hidden size of 576): up to 8 rows a
    program and 4K codes a step."""
    if INTERPRET:  # it runs the programs one at a time: the fewest
        return 64, triton.next_power_of_2(K)
    if int4:  # a program's unpacking and x are shared by its rows: more rows than bf16 takes
        block_r = 8 if rows > 4096 or rows > 1024 and K >= 2048 else 4 if rows > 1024 else 2
        return block_r, min(triton.next_power_of_2(K), 4096)
    block_r = 2 if rows <= 4096 else 4
    return block_r, min(triton.next_power_of_2(K), (8192 if rows <= 4096 else 4096) // block_r)


@cache
def _linear_meta(N: int, K: int, norm: bool, bias: bool, add: bool, silu: bool, int4: bool, pdl: bool) -> dict:
    block_r, block_k = gemv_blocks(N, K, int4)
    return dict(K=K, BLOCK_R=block_r, BLOCK_K=block_k, NORM=norm, BIAS=bias, ADD=add, SILU=silu, INT4=int4, PDL=pdl,
                launch_pdl=pdl, num_warps=4)


@cache
def _rope_linear_meta(hidden: int, n_heads: int, n_kv_heads: int, D: int, bias: bool, int4: bool, pdl: bool
                      ) -> dict:
    block_r, block_k = gemv_blocks((n_heads + 2 * n_kv_heads) * D // 2, hidden, int4)
    return dict(HIDDEN=hidden, HQ=n_heads, HKV=n_kv_heads, D=D, BLOCK_R=min(block_r, D // 2), BLOCK_K=block_k,
                BIAS=bias, INT4=int4, PDL=pdl, launch_pdl=pdl, num_warps=4)


_launch_linear = Launcher(_linear)
_launch_rope_linear = Launcher(_norm_rope_write)


def _rows(x):
    """x [..., K] as rows [M, K] with unit stride along K, as the projection kernels read them."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _weight_args(linear) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(W, S, INT4) of the projection kernels: a float layer's weight, or an Int4Linear's codes and scales."""
    if isinstance(linear, Int4Linear):  # as _codes reads them
        return linear.packed.view(torch.int32), linear.scales_and_zeros.view(torch.int32).squeeze(-1), True
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

"""Warp-specialised flash prefill for Hopper (sm_90), in Gluon, Triton's explicit-layout language.

The Triton kernel (prefill.py) keeps a program's warpgroups in step, with a barrier at each key tile, so
a program's exponentials never overlap its matrix products, and every thread issues its own copies.
Here a program (BLOCK_M queries of one head) runs three partitions: a one-warp producer streams the K/V
tiles by TMA into a ring of shared buffers, and two four-warp consumers, 64 query rows each, run the
online softmax on wgmma, each at its own pace, so that one's softmax overlaps the other's products.
TMA reads K/V through descriptors of shape [B, Hkv, kv_len, D]: rows at or past kv_len load as zeros,
whatever the spare capacity holds.

It takes what prefill.prefill_attention takes, less per-row lengths and softcap (`supports` says which
calls), and prefill.prefill_attention sends it those calls on Hopper.
"""
from __future__ import annotations

from functools import cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M, BLOCK_N, NUM_STAGES = 128, 128, 2
CONSUMER_REGS, PRODUCER_REGS, MAX_REGS = 232, 24, 168  # per thread; 3 warpgroups share 64K registers
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
# TMA load into shared memory: triton 3.6 names it async_copy_global_to_shared, later ones async_load.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _producer(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
              b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale):
    """Loads this program's queries, then K/V tiles t_lo..t_hi into the ring as consumers free slots."""
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [b, hq, m0, 0], q_bar, q_smem)
    for t in range(t_lo, t_hi):
        i = t - t_lo
        s = i % NUM_STAGES
        # A slot is free once both consumers arrived; a fresh barrier counts as freed (phase 1 done).
        mbarrier.wait(kv_empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma_load(k_desc, [b, hk, t * BLOCK_N, 0], k_ready.index(s), k_bufs.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma_load(v_desc, [b, hk, t * BLOCK_N, 0], v_ready.index(s), v_bufs.index(s))


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
              b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale,
              HALF_INDEX: gl.constexpr):
    """Online softmax of the program's query rows HALF_INDEX * 64 .. + 64 over the K/V ring."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    D: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    HALF: gl.constexpr = BLOCK_M // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    rows = m0 + HALF_INDEX * HALF + gl.arange(0, HALF, layout=rows_s)
    # Rows past q_len pad the block: they repeat the last query's position and are never stored.
    pos = past + gl.minimum(rows, q_len - 1)
    oldest = gl.where(window > 0, pos - window, -1)  # keys above this are in the window
    m_i = gl.full([HALF], float("-inf"), gl.float32, rows_s)
    l_i = gl.full([HALF], 0.0, gl.float32, rows_s)
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    no_scores = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    q = q_smem.reshape([BLOCK_M, D]).slice(HALF_INDEX * HALF, HALF, dim=0)
    for t in range(t_lo, t_hi):
        i = t - t_lo
        s = i % NUM_STAGES
        phase = (i // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(s), phase)
        scores = warpgroup_mma(q, k_bufs.index(s).reshape([BLOCK_N, D]).permute((1, 0)), no_scores, use_acc=False)
        j = t * BLOCK_N
        if (j < full_lo) | (j >= full_hi):  # a tile some query of the program does not see whole
            offs = j + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            seen = (offs[None, :] <= pos[:, None]) & (offs[None, :] > oldest[:, None])
            scores = gl.where(seen, scores, float("-inf"))
        # Scores go into exp2 as s * qk_scale - m, with the max taken before scaling (qk_scale > 0).
        m_new = gl.maximum(m_i, gl.max(scores, 1) * qk_scale)
        # A row that has seen no key yet has m = -inf: shift by 0 so that it gets p = 0, not NaN.
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(scores * qk_scale - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        p = gl.convert_layout(p.to(k_desc.dtype), p_layout)
        mbarrier.wait(v_ready.index(s), phase)
        acc = warpgroup_mma(p, v_bufs.index(s).reshape([BLOCK_N, D]), acc)
        mbarrier.arrive(kv_empty.index(s), count=1)
        m_i = m_new
    out = acc / gl.convert_layout(l_i, rows_o)[:, None]
    rows_out = m0 + HALF_INDEX * HALF + gl.arange(0, HALF, layout=rows_o)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    # Out is contiguous [B, Hq, q_len, D]: row_base is (b * Hq + hq) * q_len.
    ptrs = Out + (row_base.to(gl.int64) + rows_out[:, None]) * D + d[None, :]
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=rows_out[:, None] < q_len)


# A worker partition's arguments go through as values (constexprs among them would arrive as tensors),
# so each consumer gets its own entry point.
@gluon.jit
def _consumer0(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
               b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale):
    _consumer(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
              b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale, 0)


@gluon.jit
def _consumer1(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
               b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale):
    _consumer(q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
              b, hq, hk, row_base, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale, 1)


@gluon.jit(do_not_specialize=["kv_len", "q_len", "window"])
def _prefill_warp_specialized(q_desc, k_desc, v_desc, Out, kv_len, q_len, window, qk_scale,
                              HQ: gl.constexpr, G: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                              PRODUCER_REGS: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    bh = gl.program_id(0)
    # The last query blocks (the most keys) start first.
    mb = gl.num_programs(1) - 1 - gl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    hk = hq // G
    past = kv_len - q_len
    m0 = mb * BLOCK_M
    pos_min = past + m0
    pos_max = past + gl.minimum(m0 + BLOCK_M, q_len) - 1
    hi = pos_max + 1
    # Key tiles [t_lo, t_hi) hold keys some query of the program sees; those in [full_lo, full_hi) every
    # query sees whole.
    lo = gl.where(window > 0, gl.maximum(pos_min - window + 1, 0), 0)
    full_lo = gl.where(window > 0, gl.cdiv(gl.maximum(pos_max - window + 1, 0), BLOCK_N) * BLOCK_N, 0)
    full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
    full_hi = gl.minimum(gl.maximum((pos_min + 1) // BLOCK_N * BLOCK_N, full_lo), hi)
    t_lo = lo // BLOCK_N
    t_hi = gl.cdiv(hi, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=2)  # one arrival per consumer
    args = (q_desc, k_desc, v_desc, Out, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
            b, hq, hk, bh * q_len, m0, past, q_len, window, t_lo, t_hi, full_lo, full_hi, qk_scale)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_producer, args)], [4, 1],
                       [CONSUMER_REGS, PRODUCER_REGS])


def tma_ready(t: torch.Tensor) -> bool:
    """TMA's rules for a tensor it reads: 16-byte aligned base and strides, unit stride last."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1]))


def supports(q, k_cache, v_cache, kv_len, window, softcap) -> bool:
    """Whether this kernel takes a prefill_attention call that is already on an sm_90 GPU."""
    return (isinstance(kv_len, int) and q.shape[2] > 0 and softcap is None and q.dtype in GL_DTYPES
            and k_cache.dtype == v_cache.dtype == q.dtype and q.shape[-1] in (64, 128)
            and all(tma_ready(t) for t in (q, k_cache, v_cache)))


@cache
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [1, 1, rows, head_dim] TMA box of dtype."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], GL_DTYPES[dtype])


def prefill_attention(q, k_cache, v_cache, kv_len: int, *, qk_scale: float, window: int | None, out: torch.Tensor):
    """q [B, Hq, Lq, D] holding the last Lq of kv_len positions -> out, contiguous [B, Hq, Lq, D]; for
    calls `supports` takes. qk_scale is in base 2 (common.score_scales)."""
    B, Hq, Lq, D = q.shape
    Hkv = k_cache.shape[1]
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, BLOCK_M, D], _smem_layout(BLOCK_M, D, q.dtype))
    k_desc, v_desc = (TensorDescriptor(t, [B, Hkv, kv_len, D], list(t.stride()), [1, 1, BLOCK_N, D],
                                       _smem_layout(BLOCK_N, D, q.dtype)) for t in (k_cache, v_cache))
    _prefill_warp_specialized[(B * Hq, triton.cdiv(Lq, BLOCK_M))](
        q_desc, k_desc, v_desc, out, kv_len, Lq, window or 0, qk_scale, HQ=Hq, G=Hq // Hkv, NUM_STAGES=NUM_STAGES,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAX_REGS)
    return out

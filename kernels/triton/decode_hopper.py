"""Persistent, warp-specialised split-KV decode for Hopper (sm_90) at long context, in Gluon.

decode.py gives each partition a fixed share of the keys; at long context its programs finish at uneven
times (on an H100 at 128k keys, between 98 and 179 µs), and the last ones cannot keep DRAM busy. Here
one program per multiprocessor runs two partitions:
- a one-warp producer loads K/V tiles of BLOCK_N keys by TMA into a ring of shared buffers, with each
  stage's (KV group, tile) stored beside it, and the group's queries whenever the group changes. It
  streams a static share of the tiles first (in group-major order, split evenly over the programs),
  then takes single tiles of its home group's pool (the last POOL of each group's tiles; the home group
  is the one its static share ends in) from a per-group counter, claimed a tile ahead: programs that
  stream faster take more;
- a four-warp consumer runs the online softmax on wgmma (a group's query heads padded to 64 rows) and
  writes (m, l, unnormalised o) once per group its static share touches, into the slot of its rank among
  the programs that touch that group. decode._decode_reduce (RUNS) then combines each row's partials.

The pool counters are 0 when a call starts: the last producer of a call to finish claiming puts them
back, and counters_for keeps them per stream (per call under CUDA-graph capture). On an H100 with 8 KV
heads this runs from about 38k keys, where it beats decode.py's kernel (benchmarks/README.md has the
figures).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fachat.kernels.triton import decode
from fachat.kernels.triton.prefill_hopper import gluon_inputs, smem_layout, tma_load

BLOCK_N, NUM_STAGES = 64, 3
Q_ROWS = 64  # wgmma's rows: a group's query heads, padded
POOL = 0.75  # of each group's tiles, taken one at a time (best of 1/8 to 3/4 at 64k and 128k on an H100)
PRODUCER_REGS = 40
MIN_TILES_PER_SM = 36  # fewer: decode.py's kernel is faster (H100, 8 KV heads: it wins at 32k keys, loses at 40k)


@gluon.jit
def _issue(x, i, last_g, tiles, t_off, HKV, k_desc, v_desc, q_desc, k_bufs, v_bufs, q_bufs, meta, ready, empty):
    """Tile x of a group-major order of `tiles` tiles a group (tile index t_off + x % tiles) into ring slot
    i, with the group's queries if it is not last_g. Returns (i + 1, the group)."""
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[2]
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    g = x // tiles
    t = t_off + x % tiles
    s = i % NUM_STAGES
    mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)  # a fresh barrier counts as freed
    meta.index(s).store(gl.full([1], g * 65536 + t, gl.int32, ONE))  # seen by the consumer after `ready`
    b = g // HKV
    h = g % HKV
    if g != last_g:
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes + q_desc.block_type.nbytes)
        tma_load(q_desc, [b, h, 0, 0], ready.index(s), q_bufs.index(s).slice(0, q_desc.block_type.shape[2], dim=2))
    else:
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [b, h, t * BN, 0], ready.index(s), k_bufs.index(s))
    tma_load(v_desc, [b, h, t * BN, 0], ready.index(s), v_bufs.index(s))
    return i + 1, g


@gluon.jit
def _claim(counter):
    """A pool ticket that lane 0 of the producer warp asks for: nothing waits for it until _take."""
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    lane = gl.arange(0, 32, layout=ONE)
    return gl.atomic_add(counter + lane * 0, gl.full([32], 1, gl.int32, ONE), mask=lane == 0, sem="relaxed")


@gluon.jit
def _take(ticket):
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    return gl.max(gl.where(gl.arange(0, 32, layout=ONE) == 0, ticket, 0), 0)


@gluon.jit
def _producer(k_desc, v_desc, q_desc, Work, Counters, k_bufs, v_bufs, q_bufs, meta, ready, empty,
              kv_len, lo, t_lo, static_g, pool_g, n_groups, base, HKV, G, num_parts, qk_scale):
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    pid = gl.program_id(0)
    end = gl.minimum((pid + 1) * base, n_groups * static_g)
    home = (end - 1) // static_g  # the pool goes on from the last static tile, in the same group
    ticket = _claim(Counters + home)  # travels while the static share streams
    i = 0
    last_g = -1
    for y in range(pid * base, end):
        i, last_g = _issue(y, i, last_g, static_g, t_lo, HKV, k_desc, v_desc, q_desc, k_bufs, v_bufs, q_bufs, meta,
                           ready, empty)
    x = _take(ticket)
    while x < pool_g:
        ticket = _claim(Counters + home)  # the next ticket travels while this tile is issued
        i, last_g = _issue(home * pool_g + x, i, last_g, pool_g, t_lo + static_g, HKV, k_desc, v_desc, q_desc, k_bufs,
                           v_bufs, q_bufs, meta, ready, empty)
        x = _take(ticket)
    # Every claim of this program has landed. The last producer to get here puts the counters back to 0
    # for the next call on this stream (counters_for): no other claim can follow it.
    done = gl.atomic_add(Counters + n_groups, 1, sem="acq_rel", scope="gpu")
    if done == gl.num_programs(0) - 1:
        for g in range(0, n_groups + 1):
            gl.atomic_xchg(Counters + g, 0, sem="relaxed", scope="gpu")
    s = i % NUM_STAGES  # a stage tagged -1: the consumer stops there
    mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
    meta.index(s).store(gl.full([1], -1, gl.int32, ONE))
    mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _flush(Work, g, slot, m_i, l_i, acc, n_groups, G, num_parts):
    """Rows < G of (m, l, o) into slot `slot` of group g's rows, in decode._decode_partition's layout: m
    [rows, num_parts], then l likewise, then o [rows, num_parts, D]."""
    R: gl.constexpr = acc.type.shape[0]
    D: gl.constexpr = acc.type.shape[1]
    total = (n_groups * G * num_parts).to(gl.int64)
    r = gl.arange(0, R, layout=m_i.type.layout)
    at = (g * G + r).to(gl.int64) * num_parts + slot
    gl.store(Work + at, m_i, mask=r < G)
    gl.store(Work + total + at, l_i, mask=r < G)
    r_o = gl.arange(0, R, layout=gl.SliceLayout(1, acc.type.layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, acc.type.layout))
    at_o = 2 * total + ((g * G + r_o).to(gl.int64) * num_parts + slot) * D
    gl.store(Work + at_o[:, None] + d[None, :], acc, mask=(r_o < G)[:, None])


@gluon.jit
def _consumer(k_desc, v_desc, q_desc, Work, Counters, k_bufs, v_bufs, q_bufs, meta, ready, empty,
              kv_len, lo, t_lo, static_g, pool_g, n_groups, base, HKV, G, num_parts, qk_scale):
    """Online softmax over the ring's tiles in the order the producer loaded them; a partial per group."""
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[2]
    D: gl.constexpr = k_desc.block_type.shape[3]
    R: gl.constexpr = q_bufs.type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    pid = gl.program_id(0)
    no_scores = gl.zeros([R, BN], gl.float32, s_layout)
    q = gl.zeros([R, D], k_desc.dtype, q_layout)
    m_i = gl.full([R], float("-inf"), gl.float32, rows_s)
    l_i = gl.full([R], 0.0, gl.float32, rows_s)
    acc = gl.zeros([R, D], gl.float32, o_layout)
    cur = -1
    slot = 0
    i = 0
    mbarrier.wait(ready.index(0), 0)
    tag = gl.max(meta.index(0).load(ONE), 0)
    while tag >= 0:
        s = i % NUM_STAGES
        g = tag // 65536
        t = tag % 65536
        if g != cur:
            if cur >= 0:
                _flush(Work, cur, slot, m_i, l_i, acc, n_groups, G, num_parts)
            m_i = gl.full([R], float("-inf"), gl.float32, rows_s)
            l_i = gl.full([R], 0.0, gl.float32, rows_s)
            acc = gl.zeros([R, D], gl.float32, o_layout)
            cur = g
            slot = pid - (g * static_g) // base  # rank among the programs whose static share touches g
            # Rows past the query box were never written: their scores are garbage in rows never stored.
            q = q_bufs.index(s).reshape([R, D]).load(q_layout)
        scores = warpgroup_mma(q, k_bufs.index(s).reshape([BN, D]).permute((1, 0)), no_scores, use_acc=False)
        j = t * BN
        if (j < lo) | (j + BN > kv_len):  # a tile with keys outside [lo, kv_len)
            offs = j + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            scores = gl.where(((offs >= lo) & (offs < kv_len))[None, :], scores, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, 1) * qk_scale)  # finite: every tile holds a key in range
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(scores * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        p = gl.convert_layout(p.to(k_desc.dtype), p_layout)
        acc = warpgroup_mma(p, v_bufs.index(s).reshape([BN, D]), acc)
        mbarrier.arrive(empty.index(s), count=1)
        m_i = m_new
        i += 1
        s_next = i % NUM_STAGES
        mbarrier.wait(ready.index(s_next), (i // NUM_STAGES) & 1)
        tag = gl.max(meta.index(s_next).load(ONE), 0)
    _flush(Work, cur, slot, m_i, l_i, acc, n_groups, G, num_parts)


# Lengths and splits change from call to call: specialising on their values would recompile.
@gluon.jit(do_not_specialize=["kv_len", "lo", "t_lo", "static_g", "pool_g", "n_groups", "base", "HKV", "G",
                              "num_parts"])
def _decode_persistent(Work, Counters, k_desc, v_desc, q_desc, kv_len, lo, t_lo, static_g, pool_g, n_groups, base,
                       HKV, G, num_parts, qk_scale, NUM_STAGES: gl.constexpr, Q_ROWS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr):
    # Launched early (PDL): the counters' zeroing and the cache write are visible once this returns.
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_STAGES, 1, 1, Q_ROWS, q_desc.block_type.shape[3]],
                                       q_desc.layout)
    meta = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    args = (k_desc, v_desc, q_desc, Work, Counters, k_bufs, v_bufs, q_bufs, meta, ready, empty,
            kv_len, lo, t_lo, static_g, pool_g, n_groups, base, HKV, G, num_parts, qk_scale)
    gl.warp_specialize([(_consumer, args), (_producer, args)], [1], [PRODUCER_REGS])


@dataclass(frozen=True)
class Split:
    lo: int  # first key in the window
    t_lo: int  # its tile
    static_g: int  # tiles a group streamed as static shares
    pool_g: int  # tiles a group left to its pool
    base: int  # static tiles a program
    programs: int
    num_parts: int  # partial slots a row: the most programs whose static share touches one group


def _window_tiles(kv_len: int, window: int | None) -> tuple[int, int]:
    """(first key in the window, tiles from the one that holds it to kv_len)."""
    lo = max(kv_len - window, 0) if window else 0
    return lo, -(-kv_len // BLOCK_N) - lo // BLOCK_N


@lru_cache(maxsize=64)  # a decode step asks once a layer, the same each time
def split(kv_len: int, window: int | None, groups: int, sms: int) -> Split | None:
    """How a call splits, or None where it cannot: past what a stage's tag holds, or a split where some
    group would hold no program's last static tile (nobody would take its pool)."""
    lo, tiles = _window_tiles(kv_len, window)
    if kv_len > 65535 * BLOCK_N or groups >= 32768:  # a stage's tag packs group * 65536 + tile in an int32
        return None
    pool_g = int(tiles * POOL)
    static_g = tiles - pool_g
    base = -(-groups * static_g // sms)
    if base > static_g:
        return None
    programs = -(-groups * static_g // base)  # each with a static share, so a home pool
    num_parts = max(((g + 1) * static_g - 1) // base - g * static_g // base + 1 for g in range(groups))
    return Split(lo, lo // BLOCK_N, static_g, pool_g, base, programs, num_parts)


def supports(q, k_cache, v_cache, kv_len, window, softcap) -> bool:
    """Whether this kernel takes a decode_attention call that is already on an sm_90 GPU. The length comes
    first: every decode call on Hopper asks, and short contexts are turned away in a few operations."""
    if not isinstance(kv_len, int) or softcap is not None:
        return False
    groups, sms = q.shape[0] * k_cache.shape[1], decode._sm_count(q.device)
    return (groups * _window_tiles(kv_len, window)[1] >= MIN_TILES_PER_SM * sms
            and split(kv_len, window, groups, sms) is not None and q.shape[1] // k_cache.shape[1] <= Q_ROWS
            and gluon_inputs(q, k_cache, v_cache))


def _descriptor(base: torch.Tensor, shape: list, strides: list, block_shape: list, layout) -> TensorDescriptor:
    """TensorDescriptor(base, shape, strides, block_shape, layout) without its checks, which supports()
    has made: they took 15 µs of host time a descriptor on the H100 host, three a call."""
    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.layout, desc.padding = (
        base, shape, strides, block_shape, layout, "zero")
    return desc


@cache
def _constexprs() -> dict:
    return dict(NUM_STAGES=NUM_STAGES, Q_ROWS=Q_ROWS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, launch_pdl=True)


_launch = decode.Launcher(_decode_persistent)


@triton.jit(do_not_specialize=["n"])
def _zero_counters(Counters, n, BLOCK: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()  # the persistent kernel waits for this one to finish
    tl.extra.cuda.gdc_wait()  # the kernels ahead may still use this memory
    offs = tl.arange(0, BLOCK)
    tl.store(Counters + offs, tl.zeros([BLOCK], tl.int32), mask=offs < n)


_counters = {}  # (device, stream) -> int32 counters of eager calls, all 0 between calls
_launch_zero = decode.Launcher(_zero_counters)
CAPTURE_COUNTERS = 1 << 16  # set aside per device for captured calls: 256 KB, some 7000 calls of 8 KV groups
_capture_pools = {}  # device -> [zeroed counters for captured calls, how many are handed out]
_capture_lock = threading.Lock()


@cache
def _zero_constexprs(n: int) -> dict:
    return dict(BLOCK=1 << (n - 1).bit_length(), num_warps=1, launch_pdl=True)


def _pooled(n: int, device: torch.device) -> torch.Tensor | None:
    """n counters of the device's pool that no call had before, or None where it has no room (or none)."""
    with _capture_lock:
        pool = _capture_pools.get(device)
        if pool is None or pool[1] + n > pool[0].numel():
            return None
        pool[1] += n
        return pool[0][pool[1] - n:pool[1]]


def counters_for(target: tuple[int, int], n: int, device: torch.device) -> torch.Tensor:
    """At least n int32 counters at 0 for a call on launch target (device, stream).

    Eager calls on one stream share a buffer, zeroed once: they run in order, and each puts the counters
    back to 0 before it ends. A call captured in a CUDA graph needs counters of its own, since a graph
    may be replayed on any stream, next to other graphs: a slice of a pool that the first eager call on
    the device sets aside and zeroes, which the kernel puts back to 0 in turn. A slice is never handed
    out again (a graph may live for good). Where the pool has no room (or the device has run no eager
    call), the counters come from the graph's memory, zeroed by a small kernel ahead of the call: about
    1 µs more a call on an H100."""
    if torch.cuda.is_current_stream_capturing():
        buf = _pooled(n, device)
        if buf is None:
            buf = torch.empty(n, dtype=torch.int32, device=device)
            _launch_zero((1, 1, 1), None, (buf,), (n,), _zero_constexprs(n), target)
        return buf
    buf = _counters.get(target)
    if buf is None or buf.numel() < n:
        buf = _counters[target] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        if device not in _capture_pools:
            pool = torch.zeros(CAPTURE_COUNTERS, dtype=torch.int32, device=device)
            # Zeroed before any graph that takes a slice can replay, on whatever stream: once a device.
            torch.cuda.current_stream(device).synchronize()
            with _capture_lock:
                _capture_pools.setdefault(device, [pool, 0])
    return buf


def decode_attention(q, k_cache, v_cache, kv_len: int, *, qk_scale: float, window: int | None, out: torch.Tensor):
    """q [B, Hq, D] -> out [B, Hq, D] over the first kv_len keys; for calls `supports` takes. qk_scale is
    in base 2 (decode.score_scales)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    groups = B * Hkv
    sp = split(kv_len, window, groups, decode._sm_count(q.device))
    target = decode.launch_target()
    work = decode.workspace(B * Hq, sp.num_parts, D, q.device, target)
    counters = counters_for(target, groups + 1, q.device)  # a pool's tickets per group, producers done
    kv_layout = smem_layout(BLOCK_N, D, q.dtype)
    k_desc, v_desc = (_descriptor(t, [B, Hkv, kv_len, D], list(t.stride()), [1, 1, BLOCK_N, D], kv_layout)
                      for t in (k_cache, v_cache))
    q_box = max(8, 1 << (G - 1).bit_length())  # query heads loaded, of the Q_ROWS wgmma takes
    q_desc = _descriptor(q, [B, Hkv, G, D], [q.stride(0), G * q.stride(1), q.stride(1), 1], [1, 1, q_box, D],
                         smem_layout(Q_ROWS, D, q.dtype))
    # Triton specialises a descriptor on its block shape, dtype and layout: q_box and D, with q's dtype.
    _launch((sp.programs, 1, 1), (q.dtype, D, q_box), (work, counters),
            (k_desc, v_desc, q_desc, kv_len, sp.lo, sp.t_lo, sp.static_g, sp.pool_g, groups, sp.base, Hkv, G,
             sp.num_parts, qk_scale), _constexprs(), target)
    decode.reduce_partials(out, work, sp.num_parts, target, runs=(G, sp.static_g, sp.base))
    return out

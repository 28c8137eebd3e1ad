"""Split-KV decode attention (one query position per row) in Triton.

Each program takes one (batch row, KV head, partition of the live KV range) and all G query heads
that read that KV head, so K/V are read once per GQA group. It runs an online softmax in fp32 and
writes (max, sum, unnormalised output) for its partition; a second kernel rescales the partitions
by exp(m_i - m), sums them and divides. With one partition (short contexts) the first kernel
normalises and writes the output itself: one launch. On Hopper and later both kernels go out with
programmatic dependent launch: each is resident before the kernel ahead of it has finished and waits
for it on the device, which hides their launch latency.

The live range's tiles are dealt to the partitions in turn, and at long context each multiprocessor
runs the programs that keep 96 KB of K/V tiles in flight, one at head_dim 128 (split): on an H100 this
streams K/V faster than contiguous ranges, more programs, or a persistent kernel that balances tiles
while it runs (benchmarks/README.md).

Scores are kept in base 2 (scaled by log2(e)) so that the softmax uses exp2.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache, reduce
from operator import or_

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.interpreter import InterpretedFunction

from fachat.kernels.common import kernel_layout, output_for, partitions, score_scales


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    programs_per_sm: int  # at long context: partitions for about this many programs per multiprocessor


REDUCE_CHUNK = 8192  # fp32 elements of partial outputs the reduce holds at once: 8192 // head_dim partitions


@cache
def config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    block_n = 64 if head_dim * dtype.itemsize <= 256 else 32
    # From benchmarks/attention.py --sweep on an H100 (bf16, D = 128, 8 KV heads): one program per
    # multiprocessor (16 partitions, 128 programs) beat two (33) by 1.5 µs at 16k keys and 8 µs at 128k.
    # Smaller tiles (head_dim 64 in 16 bits: 8 KB) want more programs for as many bytes in flight.
    programs_per_sm = max(1, 16384 // (block_n * head_dim * dtype.itemsize))
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=3, programs_per_sm=programs_per_sm)


@cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: the fewest partitions the length rules allow
    return torch.cuda.get_device_properties(device).multi_processor_count


def split(span: int, rows: int, head_dim: int, sms: int, cfg: DecodeConfig) -> int:
    """Partitions for `span` live keys, `rows` = batch * KV heads and `sms` multiprocessors (common.partitions),
    with cfg's tile and programs per multiprocessor, and the partials the reduce holds in one chunk."""
    return partitions(span, rows, sms, cfg.block_n, cfg.programs_per_sm, REDUCE_CHUNK // head_dim)


@triton.jit
def _tanh(x):
    # From exp2 (tl.math has no tanh on every triton version); exp2 of -2|x| log2(e) cannot overflow.
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc (acc None: a @ b), accumulated in the matrix instruction itself."""
    # Triton's interpreter multiplies the bit patterns of bfloat16 operands (triton-lang/triton#11584), so
    # there they go in as float32: bf16 products are exact in float32, as on the GPU's tensor cores.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PRECISION)
    return c


# Triton compiles or interprets a function as TRITON_INTERPRET says when it decorates it, the helpers of
# triton.language included: the variable must not change between importing triton and this module.
INTERPRET = isinstance(_dot, InterpretedFunction)
if isinstance(tl.zeros, InterpretedFunction if not INTERPRET else triton.runtime.JITFunction):
    raise ImportError("TRITON_INTERPRET changed between importing triton and fachat.kernels.triton")


class Launcher:
    """Launches a @triton.jit kernel as kernel[grid](*tensors, *scalars, **meta) does, in a fraction of the
    host time.

    A decode step launches two kernels per layer, and JITFunction.run re-derives every argument's
    specialisation on each call: 15 to 25 µs a launch on the H100 host measured, longer than the
    kernels run at short context. Callers pass a key that pins down what Triton specialises on beyond
    `meta` (dtypes, and strides by value); a key's first launch goes through Triton, which compiles, and
    later ones call the compiled kernel's launcher directly, with the tensors' data pointers as integers
    (which also skips the launcher's per-pointer driver query). Pointers not all 16-byte aligned (say, a
    view one element in) and the interpreter take Triton's own path. Launch hooks
    (profilers) are called as Triton calls them.
    """

    def __init__(self, fn):
        self.fn = fn
        self.kernels = {}  # key -> (compiled kernel, compile-time argument values in signature order)
        self.direct = True  # False once this Triton's compiled-kernel launcher turned out to differ

    def __call__(self, grid: tuple[int, int, int], key, tensors: tuple, scalars: tuple, meta: dict,
                 target: tuple[int, int] | None = None) -> None:
        """target: launch_target()'s (device, stream), where the caller already has it."""
        # meta must live for good (callers take it from a functools.cache): its id is part of the key.
        if INTERPRET or not self.direct:
            self.fn[grid](*tensors, *scalars, **meta)
            return
        ptrs = [t.data_ptr() for t in tensors]
        if reduce(or_, ptrs) % 16:  # Triton's specialisation marks each aligned pointer: not in the key
            self.fn[grid](*tensors, *scalars, **meta)
            return
        device, stream = target or launch_target()
        key = (device, id(meta), key)
        entry = self.kernels.get(key)
        if entry is None:
            self.kernels[key] = (self.fn[grid](*tensors, *scalars, **meta),
                                 [meta[name] for name in self.fn.arg_names[len(tensors) + len(scalars):]])
            return
        kernel, consts = entry
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        try:
            # Triton asks for launch metadata only for a hook (3.6: a callable; later: a non-empty chain).
            hooked = enter is not None and getattr(enter, "calls", True)
            metadata = kernel.launch_metadata(grid, stream, *tensors, *scalars, *consts) if hooked else None
            kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave,
                       *ptrs, *scalars, *consts)
        except (TypeError, AttributeError):
            # An internal API that another Triton release may shape differently (checked on 3.6): a
            # mismatch fails before anything launches, so Triton's own path takes over for good.
            self.direct = False
            self.fn[grid](*tensors, *scalars, **meta)


def launch_target() -> tuple[int, int]:
    """(device, stream) that Triton launches on: the current CUDA device and its current stream."""
    device = driver.active.get_current_device()
    return device, driver.active.get_current_stream(device)


def dot_args(dtype: torch.dtype) -> dict:
    """The constexprs of _dot: float32 exactly (not tf32), 16-bit types natively."""
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=INTERPRET and dtype == torch.bfloat16)


# Lengths and partition counts change every step: specialising on their values would recompile.
@triton.jit(do_not_specialize=["kv_len", "window", "num_parts"])
def _decode_partition(Q, K, V, Out, Work, Lens, kv_len, window, num_parts, qk_scale, softcap_log2e,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                      HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PER_ROW: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                      SINGLE: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if PDL:
        # Launched early: what the kernels ahead wrote (q, the cache) is visible once this returns.
        tl.extra.cuda.gdc_wait()
        if not SINGLE:  # the reduce may launch now: it waits in turn until this grid has finished
            tl.extra.cuda.gdc_launch_dependents()
    group = tl.program_id(0)  # b * HKV + KV head
    part = tl.program_id(1)
    b = (group // HKV).to(tl.int64)  # batch strides can pass 2**31 elements
    h = group % HKV
    if PER_ROW:
        n = tl.load(Lens + b)
    else:
        n = kv_len
    lo = 0
    if WINDOW:  # the query at position n - 1 sees keys > n - 1 - window
        lo = tl.maximum(n - window, 0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    # Rows G..BLOCK_G pad the group up to a tile that tl.dot accepts; they load zeros and are not stored.
    q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < G, other=0.0).to(K.dtype.element_ty)
    k_base = K + b * stride_kb + h * stride_kh + d[None, :]
    v_base = V + b * stride_kb + h * stride_kh + d[None, :]  # V has K's strides

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    # Tiles dealt in turn: partition p takes tiles p, p + num_parts, ... of the span, so that a group's
    # programs stream neighbouring tiles at any moment (faster on an H100 than each a range of its own).
    for j in range(lo + part * BLOCK_N, n, num_parts * BLOCK_N):
        offs = j + tl.arange(0, BLOCK_N)
        live = offs < n
        k = tl.load(k_base + offs[:, None] * stride_kn, mask=live[:, None], other=0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST)
        if SOFTCAP:
            s = softcap_log2e * _tanh(s * qk_scale)
        else:
            s = s * qk_scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a live key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * stride_kn, mask=live[:, None], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    row = group * G + g  # b * Hq + query head
    if SINGLE:  # Out is contiguous [B, Hq, D]
        tl.store(Out + row[:, None] * D + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=g[:, None] < G)
    else:
        # Work holds m [B * Hq, P], l likewise, then o [B * Hq, P, D] for P partitions. An empty
        # partition (a row shorter than the longest) writes m = -inf, l = 0, o = 0: weight 0 in the reduce.
        total = tl.num_programs(0) * G * num_parts
        at = row * num_parts + part
        tl.store(Work + at, m_i, mask=g < G)
        tl.store(Work + total + at, l_i, mask=g < G)
        tl.store(Work + 2 * total + at[:, None] * D + d[None, :], acc, mask=g[:, None] < G)


@triton.jit
def _partials(Work, row, p0, num_parts, total, D: tl.constexpr, BLOCK_P: tl.constexpr):
    """(m, l, o) of a row's partitions p0 to p0 + BLOCK_P; those past num_parts weigh nothing."""
    p = p0 + tl.arange(0, BLOCK_P)
    valid = p < num_parts
    m = tl.load(Work + row * num_parts + p, mask=valid, other=float("-inf"))
    l = tl.load(Work + total + row * num_parts + p, mask=valid, other=0.0)
    o = tl.load(Work + 2 * total + (row * num_parts + p)[:, None] * D + tl.arange(0, D)[None, :],
                mask=valid[:, None], other=0.0)
    return m, l, o


@triton.jit(do_not_specialize=["num_parts"])
def _decode_reduce(Out, Work, num_parts, D: tl.constexpr, BLOCK_P: tl.constexpr, ONE_CHUNK: tl.constexpr,
                   PDL: tl.constexpr):
    """Rescales a row's partitions by exp(m_i - m) and sums them: at once where BLOCK_P holds them all
    (ONE_CHUNK; no loop, 0.1-0.3 µs faster on an H100), else BLOCK_P at a time with a running max."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)  # b * Hq + query head
    total = tl.num_programs(0) * num_parts
    m, l, o = _partials(Work, row, 0, num_parts, total, D, BLOCK_P)
    m_run = tl.max(m, 0)  # finite: partition 0 is never empty
    w = tl.exp2(m - m_run)
    l_run = tl.sum(w * l, 0)
    o_run = tl.sum(w[:, None] * o, 0)
    if not ONE_CHUNK:
        for p0 in range(BLOCK_P, num_parts, BLOCK_P):
            m, l, o = _partials(Work, row, p0, num_parts, total, D, BLOCK_P)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            w = tl.exp2(m - m_new)
            alpha = tl.exp2(m_run - m_new)
            l_run = l_run * alpha + tl.sum(w * l, 0)
            o_run = o_run * alpha + tl.sum(w[:, None] * o, 0)
            m_run = m_new
    tl.store(Out + row * D + tl.arange(0, D), (o_run / l_run).to(Out.dtype.element_ty))


_workspaces = threading.local()  # .buffers: (device, stream) -> this thread's partials buffer


def workspace(rows: int, num_parts: int, head_dim: int, device: torch.device,
              target: tuple[int, int] | None) -> torch.Tensor:
    """fp32 partials (m, l, o) of every partition, or a longer buffer; a separate function so that tests
    can poison it.

    Launches from one thread on one stream reuse one buffer (a new one took 5 µs of host time a call on
    the H100 host): they run in order, so a call's partition kernel writes only after the previous
    call's reduce has finished reading (a kernel launched early with PDL touches memory only once the
    kernel ahead of it has finished). Under CUDA-graph capture each call gets a buffer of the graph's
    own, since a graph may be replayed on any stream.
    """
    n = rows * num_parts * (head_dim + 2)
    if target is None or torch.cuda.is_current_stream_capturing():
        return torch.empty(n, dtype=torch.float32, device=device)
    buffers = getattr(_workspaces, "buffers", None)
    if buffers is None:
        buffers = _workspaces.buffers = {}
    buf = buffers.get(target)
    if buf is None or buf.numel() < n:
        buf = buffers[target] = torch.empty(n, dtype=torch.float32, device=device)
    return buf


@cache
def use_pdl(device: torch.device) -> bool:
    """Whether the kernels go out with programmatic dependent launch: compiled, on Hopper or later, with
    CUDA 12.3 or later, which records such launches under CUDA-graph capture as programmatic edges (on an
    H200 that took a SmolLM2-135M decode step from 0.60 to 0.48 ms, graph replay giving the eager tokens)."""
    cuda = tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])
    return (not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and cuda >= (12, 3))


@cache
def _constexprs(Hkv: int, G: int, D: int, dtype: torch.dtype, per_row: bool, window: bool, softcap: bool,
                single: bool, pdl: bool, cfg: DecodeConfig) -> dict:
    """The partition kernel's compile-time arguments, built once per combination (host time per step)."""
    return dict(HKV=Hkv, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=cfg.block_n,
                PER_ROW=per_row, WINDOW=window, SOFTCAP=softcap, SINGLE=single, PDL=pdl,
                launch_pdl=pdl, **dot_args(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@cache
def _reduce_constexprs(D: int, num_parts: int, pdl: bool) -> dict:
    # Chunks of at most REDUCE_CHUNK keep the reduce in registers however many partitions.
    block_p = min(triton.next_power_of_2(num_parts), REDUCE_CHUNK // D)
    return dict(D=D, BLOCK_P=block_p, ONE_CHUNK=num_parts <= block_p, PDL=pdl, launch_pdl=pdl, num_warps=4)


_launch_partition = Launcher(_decode_partition)
_launch_reduce = Launcher(_decode_reduce)


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None,
                     num_partitions: int | None = None, out: torch.Tensor | None = None,
                     cfg: DecodeConfig | None = None):
    """q [B, Hq, D] -> [B, Hq, D]; the contract of fachat.kernels.reference.decode_attention.
    num_partitions overrides the split heuristic and cfg the configuration; out, a contiguous [B, Hq, D]
    of q's dtype, receives the result."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    device, kv_dtype = q.device, k_cache.dtype
    cfg = cfg or config(D, kv_dtype)
    q, k_cache, v_cache = kernel_layout(q, k_cache, v_cache)
    q_strides, k_strides = q.stride(), k_cache.stride()
    per_row = not isinstance(kv_len, int)
    lens = kv_len.to(device=device, dtype=torch.int32) if per_row else q  # q: the unused lengths pointer
    if window is not None:
        window = min(window, k_cache.shape[2])  # no change in meaning; keeps it an int32 for the kernel
    num_parts = num_partitions
    if not num_parts:
        # Lengths on the device are not read on the host (a sync, which CUDA-graph capture refuses): their split
        # is the capacity's, the same at every step, so one captured graph serves every length.
        span = k_cache.shape[2] if per_row else kv_len
        num_parts = split(span if window is None else min(span, window), B * Hkv, D, sm_count(device), cfg)
    out = output_for(q, out)
    single = num_parts == 1
    pdl = use_pdl(device)
    target = None if INTERPRET else launch_target()
    work = out if single else workspace(B * Hq, num_parts, D, device, target)
    key = (q.dtype, kv_dtype, q_strides, k_strides)
    _launch_partition(
        (B * Hkv, num_parts, 1), key, (q, k_cache, v_cache, out, work, lens),
        (0 if per_row else kv_len, window or 0, num_parts, *score_scales(scale, softcap, D),
         q_strides[0], q_strides[1], k_strides[0], k_strides[1], k_strides[2]),
        _constexprs(Hkv, Hq // Hkv, D, kv_dtype, per_row, window is not None, softcap is not None, single, pdl, cfg),
        target)
    if not single:
        _launch_reduce((B * Hq, 1, 1), out.dtype, (out, work), (num_parts,), _reduce_constexprs(D, num_parts, pdl),
                       target)
    return out

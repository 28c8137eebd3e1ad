"""Metal decode and prefill attention: the .metal sources beside this file, compiled per specialisation by
torch.mps.compile_shader on MPS, or run on CPU tensors by fachat.kernels.metal.emulate (tests, and
FACHAT_METAL_EMULATE=1).

The first call for each (kernel, device type, head_dim, dtype) checks the kernel on a small input against
the reference backend; a kernel that does not compile or disagrees logs one warning and leaves that key to
the reference backend for good (`broken` says why), so that wrong numbers never come back silently.
"""
from __future__ import annotations

import logging
from functools import cache, lru_cache
from pathlib import Path

import torch

from fachat.kernels import reference
from fachat.kernels.common import kernel_layout, output_for, partitions, score_scales

log = logging.getLogger(__name__)

TYPES = {torch.float16: "half", torch.bfloat16: "bfloat", torch.float32: "float"}
# Decode: query heads of a GQA group per threadgroup (their q and O live in registers); keys a threadgroup
# (one simdgroup) scores at once; at long context, threadgroups per GPU core (each splits the live range
# once more); and the most parts the reduce merges. Guesses until measured on a Mac (benchmarks/kernels_mps.py).
MAX_HEADS = 8
CHUNK = 32
GROUPS_PER_CORE = 16
MAX_PARTS = 128

broken: dict[tuple, str] = {}  # key -> why its kernel is left to the reference backend
_verdicts: dict[tuple, bool] = {}


@cache
def library(name: str, device_type: str, dtype: torch.dtype, **defines: int):
    """name.metal compiled for a dtype (T) and the other #defines its header names."""
    source = f"#define T {TYPES[dtype]}\n" + "".join(f"#define {k} {v}\n" for k, v in defines.items())
    source += (Path(__file__).parent / f"{name}.metal").read_text()
    if device_type == "mps":
        return torch.mps.compile_shader(source)
    from fachat.kernels.metal import emulate
    return emulate.compile_shader(source)


@lru_cache(maxsize=256)
def _params(device: torch.device, *values: int) -> torch.Tensor:
    """The kernels' integer parameters as an int64 tensor (constant long*), built once per combination:
    building small tensors on every call costs hundreds of µs on MPS."""
    return torch.tensor(values, dtype=torch.int64, device=device)


@lru_cache(maxsize=64)
def _lengths(device: torch.device, batch: int, n: int) -> torch.Tensor:
    return torch.full((batch,), n, dtype=torch.int32, device=device)


def lengths(kv_len, batch: int, device: torch.device) -> torch.Tensor:
    """kv_len (an int or a tensor [B]) as the int32 [B] the kernels read."""
    if isinstance(kv_len, int):
        return _lengths(device, batch, kv_len)
    return kv_len.to(device=device, dtype=torch.int32).contiguous()


_workspaces: dict[torch.device, torch.Tensor] = {}


def workspace(numel: int, device: torch.device) -> torch.Tensor:
    """fp32 decode partials, grown and reused: calls on one device run in order, so a call's parts are
    written only after the previous call's reduce has read them. A function so that tests can poison it."""
    buf = _workspaces.get(device)
    if buf is None or buf.numel() < numel:
        buf = _workspaces[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def layout(q, k_cache, v_cache):
    """common.kernel_layout, for one dtype: the kernels are specialised on q's."""
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    return kernel_layout(q, k_cache, v_cache)


def prefill_tile(head_dim: int) -> int:
    """Query rows and keys of a prefill tile (prefill.metal's BN): its float K or V tile stays at 16 KB or less."""
    return 16 if head_dim > 128 else 32


@cache
def gpu_cores(device: torch.device) -> int:
    """The GPU's cores; 1 for the emulation, which then gets the fewest parts the length rules allow."""
    if device.type != "mps":
        return 1
    count = getattr(torch.backends.mps, "get_core_count", None)  # not in every torch that has compile_shader
    return count() if count else 8


def split(span: int, rows: int, device: torch.device) -> int:
    """Decode parts for `span` live keys and `rows` threadgroups a part (common.partitions, in 32-key chunks)."""
    return partitions(span, rows, gpu_cores(device), CHUNK, GROUPS_PER_CORE, MAX_PARTS)


def head_blocks(G: int) -> tuple[int, int]:
    """(query heads per decode threadgroup, blocks of them) for a GQA group of G: MAX_HEADS at most, as even
    as they go (G = 12: two blocks of 6, not 8 and 4 with 4 heads of padding)."""
    blocks = -(-G // MAX_HEADS)
    return -(-G // blocks), blocks


def _decode(q, k_cache, v_cache, kv_len, scale, window, softcap, out, num_parts=None):
    B, Hq, D = q.shape
    Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    heads, blocks = head_blocks(G)
    q, k_cache, v_cache = layout(q, k_cache, v_cache)
    # Lengths in a tensor are not read on the host (a sync): the launch is sized for the capacity, and each
    # row uses only the parts its own length has whole chunks for.
    span = kv_len if isinstance(kv_len, int) else capacity
    nwg = num_parts or split(span if window is None else min(span, window), B * Hkv * blocks, q.device)
    rows = B * Hq
    out = output_for(q, out)
    work = workspace(rows * nwg * (D + 2), q.device) if nwg > 1 else out  # out: the unused pointer
    params = _params(q.device, Hkv, G, blocks, nwg, min(window or 0, capacity), *q.stride()[:2],
                     *k_cache.stride()[:3], rows)
    lib = library("decode", q.device.type, q.dtype, D=D, GB=heads)
    lens = lengths(kv_len, B, q.device)
    lib.decode_partial(q, k_cache, v_cache, lens, params, *score_scales(scale, softcap, D), work, out,
                       threads=B * Hkv * blocks * nwg * 32, group_size=32)
    if nwg > 1:
        lib.decode_reduce(work, lens, params, out, threads=rows * 32, group_size=32)
    return out


def _prefill(q, k_cache, v_cache, kv_len, scale, window, softcap, out):
    B, Hq, Lq, D = q.shape
    Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    q, k_cache, v_cache = layout(q, k_cache, v_cache)
    out = output_for(q, out)
    tile = prefill_tile(D)
    blocks = -(-G * Lq // tile)
    params = _params(q.device, Hkv, G, Lq, min(window or 0, capacity), blocks, *q.stride()[:3],
                     *k_cache.stride()[:3])
    lib = library("prefill", q.device.type, q.dtype, D=D, BN=tile)
    threads = tile * 4  # a simdgroup of 32 lanes for each 8 rows
    lib.prefill(q, k_cache, v_cache, lengths(kv_len, B, q.device), params, *score_scales(scale, softcap, D), out,
                threads=B * Hkv * blocks * threads, group_size=threads)
    return out


def _self_check(key: tuple, device: torch.device) -> bool:
    """Whether key's kernel compiles and matches the reference on a small input with NaN spare capacity,
    a split decode and a prefill past a tile (checked once per key; one warning when not)."""
    if key in _verdicts:
        return _verdicts[key]
    name, _, D, dtype, heads = key
    gen = torch.Generator().manual_seed(0)
    G, n = heads or 2, 300  # decode: the key's heads per threadgroup
    k, v = (torch.randn(1, 1, n + 5, D, generator=gen).to(dtype) for _ in range(2))
    k[:, :, n:] = v[:, :, n:] = float("nan")
    q = torch.randn(1, G, 1 if name == "decode" else 40, D, generator=gen).to(dtype)
    q, k, v = q.to(device), k.to(device), v.to(device)
    try:
        if name == "decode":
            got = _decode(q[:, :, 0], k, v, n, None, None, None, None, 3)
            want = reference.decode_attention(q[:, :, 0], k, v, n)
        else:
            got = _prefill(q, k, v, n, None, None, None, None)
            want = reference.prefill_attention(q, k, v, n)
        tol = 1e-3 if dtype == torch.float32 else 2e-2 if dtype == torch.float16 else 8e-2
        err = (got.float() - want.float()).abs().max().item()
        why = None if err <= tol else f"differs from the reference by {err:.3g} (tolerance {tol})"
    except Exception as e:  # a compile failure (SyntaxError on MPS), or one at launch
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        broken[key] = why
        log.warning("Metal %s kernel (head_dim %d, %s) falls back to the reference backend: %s", name, D, dtype, why)
    _verdicts[key] = why is None
    return why is None


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None,
                     out: torch.Tensor | None = None, num_parts: int | None = None):
    """q [B, Hq, D] -> [B, Hq, D]; the contract of fachat.kernels.reference.decode_attention. out, a contiguous
    [B, Hq, D] of q's dtype, receives the result; num_parts overrides the split (a row still takes no more
    parts than its live range has whole 32-key chunks)."""
    heads = head_blocks(q.shape[1] // k_cache.shape[1])[0]
    if not _self_check(("decode", q.device.type, q.shape[-1], q.dtype, heads), q.device):
        got = reference.decode_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)
        return got if out is None else out.copy_(got)
    return _decode(q, k_cache, v_cache, kv_len, scale, window, softcap, out, num_parts)


def prefill_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None,
                      out: torch.Tensor | None = None):
    """q [B, Hq, Lq, D] holding the last Lq of kv_len positions -> [B, Hq, Lq, D]; the contract of
    fachat.kernels.reference.prefill_attention. out, a contiguous [B, Hq, Lq, D] of q's dtype, receives it."""
    if not _self_check(("prefill", q.device.type, q.shape[-1], q.dtype, 0), q.device):
        got = reference.prefill_attention(q, k_cache, v_cache, kv_len, scale=scale, window=window, softcap=softcap)
        return got if out is None else out.copy_(got)
    return _prefill(q, k_cache, v_cache, kv_len, scale, window, softcap, out)

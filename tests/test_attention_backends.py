"""The attention contract (fachat.kernels.reference's), the same for every compiled backend: each case runs
on triton and on metal against the float64 attention of test_kernels. What only one backend has (its tiles,
partitions, dispatch, fallback) is tested in test_triton_kernels.py and test_metal_kernels.py, which run
their kernels through the same Backend and fixtures.

Without CUDA (CI) triton runs in Triton's CPU interpreter, with CUDA compiled on the GPU; metal runs on CPU
tensors through fachat.kernels.metal.emulate (the .metal sources built by a C++ compiler; real Metal runs
in tests/test_mps.py). Both are slow next to native code: shapes are small, lengths only as long as a case
needs, and sizes cover both backends' tile edges (triton's 32 or 64 keys and 64 or 128 queries, metal's
32-key decode chunks and 16 or 32-row prefill tiles). Every call writes into an output poisoned with NaN and
reads its decode partials from a NaN-poisoned workspace, so that an element a kernel fails to write shows up
as NaN; spare cache capacity holds NaN or large garbage.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fachat.kernels.metal import attention as metal
from fachat.kernels.metal import emulate
from test_kernels import check, make_inputs, ref_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # triton's; metal takes CPU tensors here
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def nans(numel: int, device) -> torch.Tensor:
    return torch.full((numel,), float("nan"), device=device)


def run(attention, device, q, k, v, kv_len, **kw):
    """attention (a backend's decode or prefill) on device into a NaN-poisoned output, returned on the CPU."""
    q, k, v = q.to(device), k.to(device), v.to(device)
    if isinstance(kv_len, torch.Tensor):
        kv_len = kv_len.to(device)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    assert attention(q, k, v, kv_len, out=out, **kw) is out
    return out.cpu()


@dataclass(frozen=True)
class Backend:
    decode_attention: Callable
    prefill_attention: Callable
    parts_keyword: str  # the decode argument that overrides the backend's split
    decode_tile: Callable  # (head_dim, dtype) -> keys a decode program scores at once
    device: str

    def decode(self, q, k, v, kv_len, parts=None, **kw):
        """q [B, Hq, D]; parts: how many parts the decode splits the keys into, None for the backend's own split."""
        return run(self.decode_attention, self.device, q, k, v, kv_len, **{self.parts_keyword: parts}, **kw)

    def prefill(self, q, k, v, kv_len, **kw):
        return run(self.prefill_attention, self.device, q, k, v, kv_len, **kw)


def load_triton() -> Backend:
    """The triton backend, or a skip that says why it does not import. Without a GPU its kernels go to Triton's
    interpreter, which triton (and its triton.language helpers) choose when they are imported and decorated:
    TRITON_INTERPRET is set for this import, and again while tests run (triton_interpreter), so that other
    modules never see it."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from fachat.kernels.triton import decode, prefill
    except ImportError as e:
        pytest.skip(f"the triton backend does not import ({e}); the test extra installs triton on Linux",
                    allow_module_level=True)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return Backend(decode.decode_attention, prefill.prefill_attention, "num_partitions",
                   lambda D, dtype: decode.config(D, dtype).block_n, DEVICE)


def load_metal() -> Backend:
    """The metal backend on CPU tensors (fachat.kernels.metal.emulate), or a skip when there is no compiler."""
    if (why := emulate.available()) is not None:
        pytest.skip(why, allow_module_level=True)  # it names what is missing
    return Backend(metal.decode_attention, metal.prefill_attention, "num_parts", lambda D, dtype: metal.CHUNK, "cpu")


@pytest.fixture
def triton_backend(triton_interpreter, monkeypatch) -> Backend:
    """Triton, its decode partials NaN at first: a partition the kernel fails to write poisons the reduce."""
    backend = load_triton()
    monkeypatch.setattr("fachat.kernels.triton.decode.workspace",
                        lambda rows, parts, head_dim, device, target: nans(rows * parts * (head_dim + 2), device))
    return backend


@pytest.fixture
def metal_backend(monkeypatch):
    """Metal, its decode partials NaN at first; and no kernel may fall back to the reference during the test
    (the reference passes every comparison)."""
    backend = load_metal()
    monkeypatch.setattr(metal, "workspace", nans)
    yield backend
    assert not metal.broken, f"kernels fell back to the reference: {metal.broken}"


@pytest.fixture(params=["triton", "metal"])
def backend(request) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_decode_gqa_head_dims_dtypes(G, D, dtype, backend, gen, seed):
    """Up to four tiles over three parts: empty parts, a ragged last tile, parts with a tile more than others."""
    B, Hkv = 1, 2
    n = int(torch.randint(1, 4 * backend.decode_tile(D, dtype), (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 3, dtype=dtype)
    out = backend.decode(q[:, :, 0], k, v, n, parts=3)
    check(out, ref_attention(q, k, v, [n])[:, :, 0], dtype, f"G={G} D={D} {dtype} n={n} seed={seed}")


@pytest.mark.parametrize("parts", [None, 3])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [1, 5, 131, 10_000])
def test_decode_window_and_softcap(window, softcap, dtype, parts, backend, gen, seed):
    """parts None: the backend's own split (one part in Triton's interpreter; metal's splits long spans)."""
    B, Hkv, G, D = 2, 1, 4, 64
    n = 130 + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 9, dtype=dtype, q_scale=4.0)  # scores reach the cap
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = backend.decode(q[:, :, 0], k, v, n, parts=parts, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [n] * B, scale=scale, window=window, softcap=softcap)[:, :, 0]
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("parts", [None, 4])
@pytest.mark.parametrize("window", [None, 9, 40])
@pytest.mark.parametrize("fill", ["nan", "garbage"])
def test_decode_per_row_lengths(window, fill, parts, backend, gen, seed):
    """Rows of different lengths in one call: the split is sized for the capacity, and parts past a short row's
    end are empty (the reduce must read no others). Lengths come as int64 or int32 (both backends hand the
    kernels int32 converted on the host, so one of each fill is enough)."""
    B, Hkv, G, D = 4, 2, 3, 64
    capacity = 300
    lengths = torch.randperm(capacity, generator=gen)[:B] + 1
    lengths[0] = 1
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths.tolist(), capacity,
                          fill=float("nan") if fill == "nan" else fill)
    ref = ref_attention(q, k, v, lengths.tolist(), window=window)[:, :, 0]
    kv_len = lengths if fill == "nan" else lengths.to(torch.int32)
    out = backend.decode(q[:, :, 0], k, v, kv_len, parts=parts, window=window)
    check(out, ref, F32, f"lengths={lengths.tolist()} {kv_len.dtype} window={window} parts={parts} seed={seed}")


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("window", [None, 1, 37])
@pytest.mark.parametrize("Lq,past", [(1, 0), (2, 0), (7, 300), (31, 1), (33, 0), (63, 1), (65, 0), (130, 77)])
def test_prefill_bottom_right_causal_with_past(Lq, past, window, backend, gen, seed):
    """Chunks on each side of a query tile (32 rows and 64) on pasts that are not whole tiles; NaN spare capacity."""
    B, Hkv, G, D = 2, 2, 2, 64
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 11)
    out = backend.prefill(q, k, v, n, window=window)
    check(out, ref_attention(q, k, v, [n] * B, window=window), F32, f"Lq={Lq} past={past} window={window} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_prefill_gqa_head_dims_dtypes(G, D, dtype, backend, gen, seed):
    B, Hkv = 1, 1  # one KV head: Triton's interpreter takes as long again for each (test_strided_query has two)
    Lq = int(torch.randint(2, 80, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 150, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 2, dtype=dtype)
    out = backend.prefill(q, k, v, n)
    check(out, ref_attention(q, k, v, [n]), dtype, f"G={G} D={D} {dtype} Lq={Lq} n={n} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("window,softcap", [(None, 4.0), (20, 4.0), (70, None)])
def test_prefill_window_and_softcap(window, softcap, dtype, backend, gen, seed):
    B, Hkv, G, D = 1, 2, 2, 64
    Lq = int(torch.randint(30, 140, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 5, dtype=dtype, q_scale=3.0)
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = backend.prefill(q, k, v, n, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [n], scale=scale, window=window, softcap=softcap)
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} Lq={Lq} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_per_row_lengths(window, backend, gen, seed):
    B, Hkv, G, D, Lq = 3, 2, 2, 64, 6
    lengths = [Lq, Lq + 150, Lq + 11]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 170, fill="garbage")
    out = backend.prefill(q, k, v, torch.tensor(lengths), window=window)
    check(out, ref_attention(q, k, v, lengths, window=window), F32, f"lengths={lengths} window={window} seed={seed}")


# ---------------------------------------------------------------- layouts


def test_strided_query(backend, gen, seed):
    """The model hands over q as a transposed view [B, L, H, D] -> [B, H, L, D]: its strides go to the kernels.
    Two KV heads of three query heads each: a query head's KV head (h // G) differs with G and Hkv swapped."""
    B, Hkv, G, D, Lq, past = 1, 2, 3, 64, 20, 30
    n = Lq + past
    _, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n)
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).transpose(1, 2)
    check(backend.prefill(q, k, v, n), ref_attention(q, k, v, [n]), F32, f"seed={seed}")
    check(backend.decode(q[:, :, -1], k, v, n), ref_attention(q[:, :, -1:], k, v, [n])[:, :, 0], F32, f"seed={seed}")


@pytest.mark.parametrize("fn,parts", [("decode", None), ("decode", 2), ("prefill", None)])
def test_unaligned_views(fn, parts, backend, gen, seed):
    """q, K and V one float16 into their buffers (not 16-byte aligned): Triton's own launch path; Metal binds
    them at their storage offsets, as torch.mps binds tensors."""
    B, Hkv, G, D, Lq, n = 1, 2, 2, 64, 5, 150
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n, dtype=F16)
    bufs = [torch.empty(t.numel() + 1, dtype=F16) for t in (q, k, v)]
    qv, kv, vv = (b[1:].view(t.shape).copy_(t) for b, t in zip(bufs, (q, k, v), strict=True))
    if fn == "decode":
        out = backend.decode(qv[:, :, -1], kv, vv, n, parts=parts)
        ref = ref_attention(q[:, :, -1:], k, v, [n])[:, :, 0]
    else:
        out, ref = backend.prefill(qv, kv, vv, n), ref_attention(q, k, v, [n])
    check(out, ref, F16, f"{fn} parts={parts} seed={seed}")

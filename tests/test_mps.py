"""The Metal kernels on a real Apple GPU (`python -m pytest -m mps` on a Mac): against the float64 attention
of test_kernels, and timed against MPS scaled_dot_product_attention (printed with -s, never asserted).
Everywhere else these skip; CI checks the same sources through the CPU emulation (test_metal_kernels.py).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from test_kernels import check, make_inputs, ref_attention

MPS = torch.backends.mps.is_available() and hasattr(torch.mps, "compile_shader")
pytestmark = [pytest.mark.mps, pytest.mark.skipif(not MPS, reason="needs an Apple GPU (MPS) and torch >= 2.7")]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def metal():
    from fachat.kernels.metal import attention

    yield attention
    assert not attention.broken, f"kernels fell back to the reference on this Mac: {attention.broken}"


def mps(*tensors):
    return [t.to("mps") for t in tensors]


def ms_per_call(fn, calls: int = 20) -> float:
    fn()
    torch.mps.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.mps.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("n", [1, 127, 129, 5000])
def test_decode(n, D, dtype, metal, gen, seed):
    B, Hkv, G = 2, 2, 4
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 17, dtype=dtype)
    got = metal.decode_attention(*mps(q[:, :, 0], k, v), n).cpu()
    check(got, ref_attention(q, k, v, [n] * B)[:, :, 0], dtype, f"n={n} D={D} {dtype} seed={seed}")


@pytest.mark.parametrize("window,softcap,per_row", [(100, None, False), (None, 5.0, False), (33, 3.0, True)])
def test_decode_window_softcap_per_row(window, softcap, per_row, metal, gen, seed):
    B, Hkv, G, D = 3, 2, 3, 128
    lengths = [1, 700, 3000] if per_row else [3000] * B
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths, 3100, dtype=F16, q_scale=3.0)
    kv_len = torch.tensor(lengths, device="mps") if per_row else lengths[0]
    got = metal.decode_attention(*mps(q[:, :, 0], k, v), kv_len, window=window, softcap=softcap).cpu()
    check(got, ref_attention(q, k, v, lengths, window=window, softcap=softcap)[:, :, 0], F16, f"seed={seed}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Lq,past", [(7, 0), (100, 37), (513, 1000)])
def test_prefill(Lq, past, D, dtype, metal, gen, seed):
    B, Hkv, G = 1, 2, 4
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 9, dtype=dtype)
    got = metal.prefill_attention(*mps(q, k, v), n).cpu()
    check(got, ref_attention(q, k, v, [n]), dtype, f"Lq={Lq} past={past} D={D} {dtype} seed={seed}")


@pytest.mark.parametrize("window,softcap", [(64, None), (None, 4.0)])
def test_prefill_window_softcap_per_row(window, softcap, metal, gen, seed):
    B, Hkv, G, D, Lq = 2, 2, 2, 128, 300
    lengths = [Lq + 5, Lq + 900]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 950, dtype=F16, q_scale=3.0)
    got = metal.prefill_attention(*mps(q, k, v), torch.tensor(lengths, device="mps"), window=window,
                                  softcap=softcap).cpu()
    check(got, ref_attention(q, k, v, lengths, window=window, softcap=softcap), F16, f"seed={seed}")


@pytest.mark.parametrize("n", [1024, 8192, 32768])
def test_decode_time_against_sdpa(n, metal, gen):
    """Batch 1, 32 query heads over 8 KV heads, head_dim 128, float16 (SDPA given the live prefix, which it copies)."""
    q, k, v = mps(*make_inputs(gen, 1, 8, 4, 1, 128, [n], n, dtype=F16, fill=0.0))
    ours = ms_per_call(lambda: metal.decode_attention(q[:, :, 0], k, v, n))
    sdpa = ms_per_call(lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True))
    print(f"\ndecode n={n}: metal {ours * 1e3:.0f} µs, MPS SDPA {sdpa * 1e3:.0f} µs")


@pytest.mark.parametrize("L", [512, 2048])
def test_prefill_time_against_sdpa(L, metal, gen):
    q, k, v = mps(*make_inputs(gen, 1, 8, 4, L, 128, [L], L, dtype=F16, fill=0.0))
    ours = ms_per_call(lambda: metal.prefill_attention(q, k, v, L), calls=5)
    sdpa = ms_per_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), calls=5)
    print(f"\nprefill L={L}: metal {ours:.2f} ms, MPS SDPA {sdpa:.2f} ms")

"""decode_attention / prefill_attention (reference backend) against a float64 softmax attention written here."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fachat
from fachat.kernels import reference
from fachat.kernels.dispatch import BACKEND_ENV

P = 256  # lengths around its multiples: partitions of a split-KV decode
F64 = torch.float64
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def ref_attention(q, k, v, lengths, *, scale=None, window=None, softcap=None):
    """Plain float64 attention. q [B, Hq, Lq, D] are the last Lq of lengths[b] positions; k, v
    [B, Hkv, capacity, D] of which only [:lengths[b]] is read; K/V are repeated per query group."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Lq, D, dtype=F64)
    for b in range(B):
        n = int(lengths[b])
        kk = k[b, :, :n].to(F64).repeat_interleave(G, dim=0)  # query head h reads kv head h // G
        vv = v[b, :, :n].to(F64).repeat_interleave(G, dim=0)
        s = q[b].to(F64) @ kk.transpose(-1, -2) * scale  # [Hq, Lq, n]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(n - Lq, n)[:, None]  # absolute position of each query
        keys = torch.arange(n)[None, :]
        visible = keys <= pos
        if window is not None:
            visible &= keys > pos - window
        s = s.masked_fill(~visible, -math.inf)
        out[b] = torch.softmax(s, dim=-1) @ vv
    return out


def make_inputs(gen, B, Hkv, G, Lq, D, lengths, capacity, dtype=torch.float32, fill=float("nan"), q_scale=1.0):
    """Random q, k, v in `dtype`; K/V positions at or past each row's length hold `fill`
    (a number, or "garbage" for large finite random values)."""
    q = (torch.randn(B, Hkv * G, Lq, D, generator=gen) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, capacity, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, capacity, D, generator=gen).to(dtype)
    for b, n in enumerate(lengths):
        if fill == "garbage":
            k[b, :, n:] = (torch.randn(Hkv, capacity - n, D, generator=gen) * 1e3).to(dtype)
            v[b, :, n:] = (torch.randn(Hkv, capacity - n, D, generator=gen) * 1e3).to(dtype)
        else:
            k[b, :, n:] = fill
            v[b, :, n:] = fill
    return q, k, v


def check(out, ref, dtype, msg):
    assert out.dtype == dtype, msg
    assert not torch.isnan(out).any(), f"NaN in output; {msg}"
    err = (out.to(F64) - ref).abs().max().item()
    assert torch.allclose(out.to(F64), ref, **TOL[dtype]), f"max abs err {err:.3g}; {msg}"


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("length", [1, 2, P - 1, P, P + 1, 2 * P + 37, 3 * P])
@pytest.mark.parametrize("len_as", ["int", "tensor"])
def test_decode_lengths_and_nan_spare_capacity(length, len_as, gen, seed):
    B, Hkv, G, D = 2, 2, 2, 64
    capacity = length + int(torch.randint(1, 40, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [length] * B, capacity)  # spare capacity is NaN
    kv_len = length if len_as == "int" else torch.full((B,), length)
    out = fachat.decode_attention(q[:, :, 0], k, v, kv_len)
    assert out.shape == (B, Hkv * G, D)
    check(out, ref_attention(q, k, v, [length] * B)[:, :, 0], torch.float32,
          f"length={length} capacity={capacity} seed={seed}")


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode_gqa_and_head_dims(G, D, gen, seed):
    B, Hkv = 1, 2
    length = int(torch.randint(1, 3 * P, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [length], length + 3)
    out = fachat.decode_attention(q[:, :, 0], k, v, length)
    check(out, ref_attention(q, k, v, [length])[:, :, 0], torch.float32, f"G={G} D={D} length={length} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_dtypes(dtype, D, gen, seed):
    B, Hkv, G = 2, 2, 4
    length = int(torch.randint(P // 2, 3 * P, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [length] * B, length + 7, dtype=dtype)
    out = fachat.decode_attention(q[:, :, 0], k, v, length)
    # The reference reads the same (already rounded) inputs, so only the kernel's own rounding is measured.
    check(out, ref_attention(q, k, v, [length] * B)[:, :, 0], dtype, f"{dtype} D={D} length={length} seed={seed}")


@pytest.mark.parametrize("window", [1, 5, 100, P + 3, 10_000])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_window_and_softcap(window, softcap, gen, seed):
    B, Hkv, G, D = 2, 1, 4, 64
    length = 2 * P + int(torch.randint(0, P, (1,), generator=gen))
    # Larger queries so that scores reach the softcap's non-linear range.
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [length] * B, length + 9, q_scale=4.0)
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = fachat.decode_attention(q[:, :, 0], k, v, length, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [length] * B, scale=scale, window=window, softcap=softcap)[:, :, 0]
    check(out, ref, torch.float32, f"window={window} softcap={softcap} scale={scale} length={length} seed={seed}")
    if softcap is not None:  # the cap must matter at this input scale, or the test proves nothing
        uncapped = ref_attention(q, k, v, [length] * B, scale=scale, window=window)[:, :, 0]
        assert window == 1 or not torch.allclose(uncapped, ref, atol=1e-3), "softcap had no effect on the reference"


@pytest.mark.parametrize("window", [None, 9])
def test_decode_per_row_lengths(window, gen, seed):
    """kv_len as a tensor [B] of different lengths; positions past a row's length hold large garbage."""
    B, Hkv, G, D = 4, 2, 3, 64
    capacity = 2 * P + 50
    lengths = torch.randperm(capacity, generator=gen)[:B] + 1
    lengths[0] = 1  # a single-position row next to long ones
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths.tolist(), capacity, fill="garbage")
    out = fachat.decode_attention(q[:, :, 0], k, v, lengths, window=window)
    ref = ref_attention(q, k, v, lengths.tolist(), window=window)[:, :, 0]
    check(out, ref, torch.float32, f"lengths={lengths.tolist()} window={window} seed={seed}")
    # int32 lengths are accepted too
    out32 = fachat.decode_attention(q[:, :, 0], k, v, lengths.to(torch.int32), window=window)
    check(out32, ref, torch.float32, f"int32 lengths={lengths.tolist()} seed={seed}")


@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_per_row_lengths_nan_spare_capacity(fn, gen, seed):
    B, Hkv, G, D = 3, 2, 2, 64
    lengths = [5, P + 20, 40]
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths, P + 30)  # NaN past each row's length
    kv = torch.tensor(lengths)
    if fn == "decode":
        out = fachat.decode_attention(q[:, :, 0], k, v, kv)
        ref = ref_attention(q, k, v, lengths)[:, :, 0]
    else:
        out = fachat.prefill_attention(q, k, v, kv)
        ref = ref_attention(q, k, v, lengths)
    check(out, ref, torch.float32, f"{fn} lengths={lengths} seed={seed}")


# ---------------------------------------------------------------- split-KV partitions


@pytest.mark.parametrize("case", ["plain", "window", "per-row", "softcap"])
def test_partition_size_does_not_change_result(case, gen, seed):
    """Split-KV with tiny partitions (many of them, some fully masked) equals one big partition."""
    B, Hkv, G, D = 3, 2, 2, 64
    capacity = 300
    lengths = [capacity] * B if case != "per-row" else [1, 97, capacity]
    window = 6 if case == "window" else None  # with partitions of 4, the early ones are fully masked
    softcap = 3.0 if case == "softcap" else None
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths, capacity, fill="garbage", q_scale=3.0)
    kv_len = capacity if case != "per-row" else torch.tensor(lengths)
    ref = ref_attention(q, k, v, lengths, window=window, softcap=softcap)[:, :, 0]
    outs = {}
    for ps in [1, 4, 17, 64, P, 10 ** 6]:
        outs[ps] = reference.decode_attention(q[:, :, 0], k, v, kv_len, window=window, softcap=softcap,
                                              partition_size=ps)
        check(outs[ps], ref, torch.float32, f"partition_size={ps} case={case} seed={seed}")
    for ps, out in outs.items():
        assert torch.allclose(out, outs[10 ** 6], atol=1e-5, rtol=1e-5), f"partition_size={ps} case={case} seed={seed}"


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("Lq,past", [(1, 0), (1, 40), (7, 0), (7, 300), (33, 1), (64, P)])
@pytest.mark.parametrize("window", [None, 1, 8])
def test_prefill_with_past_bottom_right_causal(Lq, past, window, gen, seed):
    B, Hkv, G, D = 2, 2, 2, 64
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 11)  # NaN spare capacity
    out = fachat.prefill_attention(q, k, v, n, window=window)
    assert out.shape == q.shape
    check(out, ref_attention(q, k, v, [n] * B, window=window), torch.float32,
          f"Lq={Lq} past={past} window={window} seed={seed}")


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_prefill_gqa_and_head_dims(G, D, gen, seed):
    B, Hkv, Lq = 1, 1, 9
    n = Lq + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 2)
    check(fachat.prefill_attention(q, k, v, n), ref_attention(q, k, v, [n]), torch.float32,
          f"G={G} D={D} n={n} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_prefill_dtypes_softcap(dtype, softcap, gen, seed):
    B, Hkv, G, D, Lq = 2, 2, 4, 64, 12
    n = Lq + int(torch.randint(0, 300, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 5, dtype=dtype, q_scale=3.0)
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = fachat.prefill_attention(q, k, v, n, scale=scale, softcap=softcap)
    check(out, ref_attention(q, k, v, [n] * B, scale=scale, softcap=softcap), dtype,
          f"{dtype} softcap={softcap} n={n} seed={seed}")


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_per_row_lengths(window, gen, seed):
    B, Hkv, G, D, Lq = 3, 2, 2, 64, 6
    lengths = [Lq, Lq + 50, Lq + 11]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 70, fill="garbage")
    out = fachat.prefill_attention(q, k, v, torch.tensor(lengths), window=window)
    check(out, ref_attention(q, k, v, lengths, window=window), torch.float32,
          f"lengths={lengths} window={window} seed={seed}")


@pytest.mark.parametrize("window,softcap,per_row", [(None, None, False), (4, None, False), (None, 3.0, False),
                                                    (None, None, True), (7, 2.0, True)])
def test_decode_equals_prefill_with_one_query(window, softcap, per_row, gen, seed):
    B, Hkv, G, D = 3, 2, 4, 64
    capacity = P + 60
    lengths = [1, P + 1, capacity] if per_row else [P + 1] * B
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths, capacity, fill="garbage", q_scale=2.0)
    kv_len = torch.tensor(lengths) if per_row else lengths[0]
    dec = fachat.decode_attention(q[:, :, 0], k, v, kv_len, window=window, softcap=softcap)
    pre = fachat.prefill_attention(q, k, v, kv_len, window=window, softcap=softcap)[:, :, 0]
    assert torch.allclose(dec, pre, atol=1e-5, rtol=1e-5), \
        f"max diff {(dec - pre).abs().max():.3g}; lengths={lengths} seed={seed}"


# ---------------------------------------------------------------- argument checks and dispatch


def _good(B=2, Hkv=2, G=2, Lq=3, D=16, cap=10):
    return (torch.randn(B, Hkv * G, Lq, D), torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D))


@pytest.mark.parametrize("case", ["q-dims", "kv-dims", "k-v-mismatch", "batch", "head-dim", "gqa", "len-zero",
                                  "len-over-capacity", "len-tensor-shape", "len-tensor-over", "len-below-q"])
@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_bad_shapes_raise_value_error(case, fn):
    q, k, v = _good()
    if fn == "decode":
        q = q[:, :, 0]
    kv_len = 5
    if case == "q-dims":
        q = q[..., None]
    elif case == "kv-dims":
        k, v = k[0], v[0]
    elif case == "k-v-mismatch":
        v = v[:, :, :-1]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "head-dim":
        k, v = k[..., :8], v[..., :8]
    elif case == "gqa":
        k, v = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)  # 4 query heads over 3 kv heads
    elif case == "len-zero":
        kv_len = 0
    elif case == "len-over-capacity":
        kv_len = 11
    elif case == "len-tensor-shape":
        kv_len = torch.tensor([5, 5, 5])
    elif case == "len-tensor-over":
        kv_len = torch.tensor([5, 11])
    elif case == "len-below-q":
        kv_len = 2 if fn == "prefill" else 0  # prefill's 3 queries need at least 3 positions
    attn = fachat.decode_attention if fn == "decode" else fachat.prefill_attention
    with pytest.raises(ValueError):
        attn(q, k, v, kv_len)


def test_unknown_backend_named_in_error():
    q, k, v = _good()
    with pytest.raises(ValueError, match="nope"):
        fachat.decode_attention(q[:, :, 0], k, v, 5, backend="nope")
    with pytest.raises(ValueError, match="nope"):
        fachat.prefill_attention(q, k, v, 5, backend="nope")


def test_backend_from_environment(monkeypatch, gen, seed):
    q, k, v = make_inputs(gen, 2, 2, 2, 4, 32, [20, 20], 24)
    ref = ref_attention(q, k, v, [20, 20])
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert BACKEND_ENV == "FACHAT_ATTENTION_BACKEND"
    check(fachat.prefill_attention(q, k, v, 20), ref, torch.float32, f"env backend, seed={seed}")
    check(fachat.decode_attention(q[:, :, -1], k, v, 20), ref[:, :, -1], torch.float32, f"env backend, seed={seed}")
    check(fachat.decode_attention(q[:, :, -1], k, v, 20, backend="reference"), ref[:, :, -1], torch.float32,
          f"explicit backend, seed={seed}")
    monkeypatch.setenv(BACKEND_ENV, "bogus-backend")
    with pytest.raises(ValueError, match="bogus-backend"):
        fachat.decode_attention(q[:, :, -1], k, v, 20)


def test_auto_backend_choice(monkeypatch):
    """auto: triton on CUDA for the head dims and dtypes it covers (where triton imports), else the reference."""
    from fachat.kernels.dispatch import select_backend

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    try:
        import fachat.kernels.triton  # noqa: F401
        gpu = "triton"
    except ImportError:
        gpu = "reference"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            assert select_backend("cuda", dtype, D) == gpu
            assert select_backend("cpu", dtype, D) == "reference"
            assert select_backend("cuda", dtype, D, backend="reference") == "reference"
    assert select_backend("cuda", torch.bfloat16, 32) == "reference"
    assert select_backend("cuda", torch.float64, 64) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert select_backend("cuda", torch.bfloat16, 128) == "reference"


@pytest.mark.parametrize("D,dtype,match", [(32, torch.float32, "head_dim 32"), (64, torch.float64, "float64")])
def test_triton_backend_refuses_what_it_does_not_cover(D, dtype, match):
    from fachat.kernels.dispatch import select_backend

    with pytest.raises(ValueError, match=match):
        select_backend("cuda", dtype, D, backend="triton")


@pytest.mark.parametrize("case", ["no-triton", "cpu-without-interpreter"])
def test_triton_backend_where_it_cannot_run(case):
    """In a fresh interpreter: fachat imports without triton, auto falls back to the reference, and
    asking for triton explicitly is a ValueError that says why."""
    if case == "cpu-without-interpreter":
        pytest.importorskip("triton", reason="needs triton installed, to show the interpreter is what is missing")
    script = textwrap.dedent("""
        import sys
        if sys.argv[1] == 'no-triton':
            sys.modules['triton'] = None  # import triton now raises ImportError
        import torch, fachat
        from fachat.kernels.dispatch import select_backend
        assert select_backend('cuda', torch.bfloat16, 128) == ('reference' if sys.argv[1] == 'no-triton' else 'triton')
        try:
            fachat.decode_attention(torch.randn(1, 2, 64), torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64), 8,
                                    backend='triton')
        except ValueError as e:
            print(e)
        else:
            raise SystemExit('no ValueError')
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    run = subprocess.run([sys.executable, "-c", script, case], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    expected = "triton is not installed" if case == "no-triton" else "TRITON_INTERPRET=1"
    assert "attention backend 'triton' cannot run here" in run.stdout and expected in run.stdout, run.stdout


def test_a_broken_triton_backend_is_an_error_not_a_fallback():
    """triton installed but fa-chat's backend module missing (as a wheel without kernels/triton was): choosing
    a backend for CUDA raises, instead of quietly running the reference."""
    pytest.importorskip("triton", reason="needs triton installed, to tell a broken backend from a missing triton")
    script = textwrap.dedent("""
        import sys
        import torch
        from fachat.kernels.dispatch import choose_backend
        print(choose_backend('cpu', torch.float32, 64))
        sys.modules['fachat.kernels.triton'] = None  # importing the backend now raises ImportError
        try:
            choose_backend('cuda', torch.bfloat16, 128)
        except ImportError as e:
            print('ImportError:', e)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "('reference', 'the default on cpu')" in run.stdout, run.stdout
    assert "ImportError: fa-chat's triton attention backend does not import" in run.stdout, run.stdout

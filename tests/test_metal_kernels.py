"""The Metal backend's decode and prefill kernels (kernels/metal/*.metal) against the float64 attention of
test_kernels, run on the CPU by fachat.kernels.metal.emulate: the .metal sources built by a C++ compiler
with the threads of a threadgroup as fibers, so that barriers and simd-group collectives synchronize.

Every call writes into an output poisoned with NaN and reads its decode partials from a NaN-poisoned
workspace, so an element a kernel fails to write shows up as NaN; spare cache capacity holds NaN or
large garbage. The harness is slow next to native code: shapes are small, lengths only as long as a case
needs. Real Metal runs in tests/test_mps.py (`pytest -m mps` on a Mac).
"""
from __future__ import annotations

import logging

import pytest
import torch

import fachat
from fachat.kernels.metal import attention as metal
from fachat.kernels.metal import emulate
from test_kernels import check, make_inputs, ref_attention

if (why := emulate.available()) is not None:
    pytest.skip(f"no compiler for the Metal emulation: {why}", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CHUNK = metal.CHUNK  # keys a decode simdgroup scores at once


@pytest.fixture(autouse=True)
def poisoned_and_no_fallback(monkeypatch):
    """Decode partials start as NaN; and no kernel may have fallen back to the reference (which would pass
    every comparison) during the test."""
    monkeypatch.setattr(metal, "workspace", lambda numel, device: torch.full((numel,), float("nan"), device=device))
    yield
    assert not metal.broken, f"kernels fell back to the reference: {metal.broken}"


def run(fn, q, k, v, kv_len, **kw):
    """The Metal decode or prefill into a NaN-poisoned output."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    assert fn(q, k, v, kv_len, out=out, **kw) is out
    return out


def run_decode(q, k, v, kv_len, **kw):
    return run(metal.decode_attention, q[:, :, 0], k, v, kv_len, **kw)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 4 * CHUNK - 1, 4 * CHUNK, 4 * CHUNK + 1, 9 * CHUNK + 7])
@pytest.mark.parametrize("len_as", ["int", "tensor"])
def test_decode_lengths_around_chunks_and_parts(n, len_as, gen, seed):
    """Lengths around 32-key chunks, which are also where the split adds parts, split by the length (an
    int) or by the capacity (a tensor: the row takes the parts its length has chunks for), with NaN spare
    capacity."""
    B, Hkv, G, D = 2, 2, 2, 64
    capacity = n + int(torch.randint(1, 40, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, capacity)
    kv_len = n if len_as == "int" else torch.full((B,), n)
    check(run_decode(q, k, v, kv_len), ref_attention(q, k, v, [n] * B)[:, :, 0], F32,
          f"n={n} capacity={capacity} seed={seed}")


@pytest.mark.parametrize("parts", [3, 7, 40])
def test_decode_splits(parts, gen, seed):
    """Parts with a chunk more than others, a ragged last chunk, and more parts than a simdgroup's lanes in
    the reduce (40 asked, as many as there are whole chunks given, 33 to 39); the largest scores in the last
    whole chunk, which the last part takes."""
    B, Hkv, G, D = 1, 1, 3, 64
    n = int(torch.randint(33 * CHUNK + 1, 40 * CHUNK, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 3, q_scale=2.0)
    last = n // CHUNK * CHUNK
    k[:, :, last - CHUNK:last] *= 30  # scores far above the rest: a max that misses them overflows exp2
    check(run_decode(q, k, v, n, num_parts=parts), ref_attention(q, k, v, [n])[:, :, 0], F32,
          f"n={n} parts={parts} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_gqa_head_dims_dtypes(fn, G, D, dtype, gen, seed):
    """Every GQA ratio, head dim and dtype: a decode split over several parts, a prefill chunk on a past."""
    B, Hkv = 1, 2
    Lq = 1 if fn == "decode" else int(torch.randint(2, 40, (1,), generator=gen))
    n = Lq + int(torch.randint(4 * CHUNK, 10 * CHUNK, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 3, dtype=dtype)
    ref = ref_attention(q, k, v, [n])
    if fn == "decode":
        out, ref = run_decode(q, k, v, n), ref[:, :, 0]
    else:
        out = run(metal.prefill_attention, q, k, v, n)
    check(out, ref, dtype, f"{fn} G={G} D={D} {dtype} Lq={Lq} n={n} seed={seed}")


@pytest.mark.parametrize("G", [12, 13])
def test_decode_more_heads_than_a_threadgroup_takes(G, gen, seed):
    """GQA groups over MAX_HEADS: blocks of 6 heads, and of 7 with one padding head in the last."""
    B, Hkv, D = 1, 1, 64
    n = int(torch.randint(1, 8 * CHUNK, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 2)
    check(run_decode(q, k, v, n, num_parts=2), ref_attention(q, k, v, [n])[:, :, 0], F32, f"n={n} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [1, 5, 131, 10_000])
def test_decode_window_and_softcap(window, softcap, dtype, gen, seed):
    B, Hkv, G, D = 2, 1, 4, 64
    n = 130 + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 9, dtype=dtype, q_scale=4.0)  # scores reach the cap
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = run_decode(q, k, v, n, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [n] * B, scale=scale, window=window, softcap=softcap)[:, :, 0]
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("parts", [None, 6])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("fill", ["nan", "garbage"])
def test_decode_per_row_lengths(window, fill, parts, gen, seed):
    """Rows of different lengths in one call: the launch is sized for the capacity, and each row takes only
    the parts its own live range has chunks for (the reduce must read no others)."""
    B, Hkv, G, D = 4, 2, 3, 64
    capacity = 300
    lengths = torch.randperm(capacity, generator=gen)[:B] + 1
    lengths[0] = 1
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths.tolist(), capacity,
                          fill=float("nan") if fill == "nan" else fill)
    ref = ref_attention(q, k, v, lengths.tolist(), window=window)[:, :, 0]
    for kv_len in (lengths, lengths.to(torch.int32)):
        out = run_decode(q, k, v, kv_len, window=window, num_parts=parts)
        check(out, ref, F32, f"lengths={kv_len.tolist()} {kv_len.dtype} window={window} seed={seed}")


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("window", [None, 1, 37])
@pytest.mark.parametrize("Lq,past", [(1, 0), (2, 0), (7, 300), (31, 1), (33, 0), (70, 45)])
def test_prefill_bottom_right_causal_with_past(Lq, past, window, gen, seed):
    """Chunks that are not multiples of a tile on a past that is not one either; NaN spare capacity."""
    B, Hkv, G, D = 2, 2, 2, 64
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 11)
    out = run(metal.prefill_attention, q, k, v, n, window=window)
    check(out, ref_attention(q, k, v, [n] * B, window=window), F32, f"Lq={Lq} past={past} window={window} seed={seed}")


@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("edge", [-1, 0, 1])
def test_prefill_window_spans_around_tiles(D, edge, gen, seed):
    """Key tiles start at a block's oldest visible key: windows a tile long, one less and one more, so that
    the last tile of a block holds one key, a whole tile, or one key more than the one before."""
    B, Hkv, G = 1, 1, 1
    tile = metal.prefill_tile(D)
    Lq, window = 2 * tile + 3, tile + edge
    n = Lq + int(torch.randint(0, 60, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 3)
    check(run(metal.prefill_attention, q, k, v, n, window=window), ref_attention(q, k, v, [n], window=window), F32,
          f"D={D} n={n} window={window} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("window,softcap", [(None, 4.0), (20, 4.0), (70, None)])
def test_prefill_window_and_softcap(window, softcap, dtype, gen, seed):
    B, Hkv, G, D = 1, 2, 2, 64
    Lq = int(torch.randint(30, 90, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 120, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 5, dtype=dtype, q_scale=3.0)
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = run(metal.prefill_attention, q, k, v, n, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [n], scale=scale, window=window, softcap=softcap)
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} Lq={Lq} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_per_row_lengths(window, gen, seed):
    B, Hkv, G, D, Lq = 3, 2, 2, 64, 6
    lengths = [Lq, Lq + 150, Lq + 11]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 170, fill="garbage")
    out = run(metal.prefill_attention, q, k, v, torch.tensor(lengths), window=window)
    check(out, ref_attention(q, k, v, lengths, window=window), F32, f"lengths={lengths} window={window} seed={seed}")


def test_strided_query(gen, seed):
    """The model hands over q as a transposed view [B, L, H, D] -> [B, H, L, D]: its strides go to the kernels."""
    B, Hkv, G, D, Lq, past = 1, 2, 2, 64, 20, 30
    n = Lq + past
    _, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n)
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).transpose(1, 2)
    check(run(metal.prefill_attention, q, k, v, n), ref_attention(q, k, v, [n]), F32, f"seed={seed}")
    check(run_decode(q[:, :, -1:], k, v, n), ref_attention(q[:, :, -1:], k, v, [n])[:, :, 0], F32, f"seed={seed}")


@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_views_one_element_into_their_buffers(fn, gen, seed):
    """q, K and V bind at their storage offsets (here one float16 in), as torch.mps binds tensors."""
    B, Hkv, G, D, Lq, n = 1, 2, 2, 64, 5, 150
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n, dtype=F16)
    bufs = [torch.empty(t.numel() + 1, dtype=F16) for t in (q, k, v)]
    qv, kv, vv = (b[1:].view(t.shape).copy_(t) for b, t in zip(bufs, (q, k, v), strict=True))
    ref = ref_attention(q, k, v, [n])
    if fn == "decode":
        check(run_decode(qv[:, :, -1:], kv, vv, n), ref[:, :, -1], F16, f"seed={seed}")
    else:
        check(run(metal.prefill_attention, qv, kv, vv, n), ref, F16, f"seed={seed}")


# ---------------------------------------------------------------- dispatch, fallback, the model


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("FACHAT_METAL_EMULATE", "1")


@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_dispatch_runs_the_metal_kernels_on_cpu_tensors(fn, emulated, monkeypatch, gen, seed):
    """fachat.decode_attention / prefill_attention(backend="metal") with FACHAT_METAL_EMULATE=1: the path a
    Mac takes, less the Metal driver."""
    calls = []
    kernel = getattr(metal, f"_{fn}")
    monkeypatch.setattr(metal, f"_{fn}", lambda *a: calls.append(1) or kernel(*a))
    B, Hkv, G, D, Lq = 2, 2, 2, 64, 1 if fn == "decode" else 9
    lengths = [Lq + 3, Lq + 200]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 210)
    if fn == "decode":
        out = fachat.decode_attention(q[:, :, 0], k, v, torch.tensor(lengths), window=50, backend="metal")
        ref = ref_attention(q, k, v, lengths, window=50)[:, :, 0]
    else:
        out = fachat.prefill_attention(q, k, v, torch.tensor(lengths), window=50, backend="metal")
        ref = ref_attention(q, k, v, lengths, window=50)
    assert calls, "the metal backend's kernels did not run"
    check(out, ref, F32, f"{fn} seed={seed}")


@pytest.mark.parametrize("failure", ["compile", "wrong"])
@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_a_broken_kernel_falls_back_with_one_warning(fn, failure, monkeypatch, caplog, gen, seed):
    """A kernel that does not compile or disagrees with the reference on its first call: one warning, the
    reference's numbers for that key from then on, and out= still filled."""
    monkeypatch.setattr(metal, "broken", {})
    monkeypatch.setattr(metal, "_verdicts", {})
    if failure == "compile":
        def library(*args, **kw):
            raise SyntaxError("program_source:1:1: error: unknown type name")
        monkeypatch.setattr(metal, "library", library)
    else:
        monkeypatch.setattr(metal, f"_{fn}", lambda q, *rest: torch.zeros_like(q))
    B, Hkv, G, D, n = 1, 2, 2, 64, 50
    Lq = 1 if fn == "decode" else 7
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 1)
    ref = ref_attention(q, k, v, [n])
    with caplog.at_level(logging.WARNING, logger=metal.__name__):
        for _ in range(3):
            out = run_decode(q, k, v, n) if fn == "decode" else run(metal.prefill_attention, q, k, v, n)
            check(out, ref[:, :, 0] if fn == "decode" else ref, F32, f"{fn} {failure} seed={seed}")
    assert len(caplog.records) == 1 and "falls back to the reference" in caplog.text
    assert list(metal.broken) == [(fn, "cpu", D, F32, G if fn == "decode" else 0)]
    metal.broken.clear()  # expected here; the autouse fixture checks the others


@pytest.mark.parametrize("variant,n_prompt", [("llama", 3), ("mistral-window", 9)])
def test_model_on_the_metal_backend_matches_transformers(variant, n_prompt, emulated, tmp_path, monkeypatch, gen,
                                                        seed):
    """A tiny model (head_dim 64, GQA 2) with attention forced to the emulated Metal kernels, prefilled with
    n_prompt tokens, then decoding token by token, against transformers' float32 logits; and its greedy
    tokens against transformers' generate."""
    from fachat import Engine
    from fachat.engine.runner import Runner
    from fachat.kernels.dispatch import BACKEND_ENV
    from tiny import make_tiny_model

    window = dict(sliding_window=6) if variant == "mistral-window" else {}  # shorter than the sequence
    peer = make_tiny_model(tmp_path, variant, seed=seed, head_dim=64, **window)
    monkeypatch.setenv(BACKEND_ENV, "metal")
    engine = Engine.load(tmp_path, device="cpu", dtype="float32")
    assert engine.attention_backend == "metal"
    ids = torch.randint(3, engine.args.vocab_size, (n_prompt + 5,), generator=gen).tolist()
    runner = Runner(engine.model, engine.new_cache(), graphs=False)
    got = torch.cat([runner.prefill(ids[:n_prompt])[None]] + [runner.prefill([t])[None] for t in ids[n_prompt:]])
    with torch.no_grad():
        want = peer(torch.tensor([ids])).logits[0, n_prompt - 1:]
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{variant}: logits off by {err:.2e} of the largest; seed={seed}"
    tokens = engine.generate(ids[:n_prompt], max_new_tokens=5, temperature=0).tokens
    with torch.no_grad():
        expected = peer.generate(torch.tensor([ids[:n_prompt]]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert tokens == expected[0, n_prompt:].tolist()[:len(tokens)], f"{variant}: seed={seed}"

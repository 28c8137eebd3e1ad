"""What only the Metal backend has (kernels/metal/*.metal): its decode's 32-key chunks and part counts, GQA
groups over a threadgroup's heads, its prefill's tiles, dispatch through FACHAT_METAL_EMULATE, the fallback
to the reference with one warning, and a model on it end to end. The attention contract that every backend
keeps runs for metal in test_attention_backends.py, through the same Backend and fixture.

The kernels run on the CPU by fachat.kernels.metal.emulate: the .metal sources built by a C++ compiler with
the threads of a threadgroup as fibers, so that barriers and simd-group collectives synchronize. Every call
writes into an output poisoned with NaN and reads its decode partials from a NaN-poisoned workspace, and no
kernel may fall back to the reference (metal_backend). The harness is slow next to native code: shapes are
small, lengths only as long as a case needs. Real Metal runs in tests/test_mps.py (`pytest -m mps` on a Mac).
"""
from __future__ import annotations

import logging

import pytest
import torch

import fachat
from fachat.kernels.metal import attention as metal
from test_attention_backends import load_metal, metal_backend  # noqa: F401 (a fixture)
from test_kernels import check, make_inputs, ref_attention

METAL = load_metal()  # or a skip of this module that says why

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CHUNK = metal.CHUNK  # keys a decode simdgroup scores at once

pytestmark = pytest.mark.usefixtures("metal_backend")  # decode partials poisoned with NaN, no fallback


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
    check(METAL.decode(q[:, :, 0], k, v, kv_len), ref_attention(q, k, v, [n] * B)[:, :, 0], F32,
          f"n={n} capacity={capacity} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("parts", [3, 7, 40])
def test_decode_splits(parts, D, dtype, gen, seed):
    """Parts with a chunk more than others, a ragged last chunk, and more parts than a simdgroup's lanes in
    the reduce (40 asked, as many as there are whole chunks given, 33 to 39), at every head dim and dtype;
    the largest scores in the last whole chunk, which the last part takes."""
    B, Hkv, G = 1, 1, 3
    n = int(torch.randint(33 * CHUNK + 1, 40 * CHUNK, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 3, dtype=dtype, q_scale=2.0)
    last = n // CHUNK * CHUNK
    k[:, :, last - CHUNK:last] *= 30  # scores far above the rest: a max that misses them overflows exp2
    check(METAL.decode(q[:, :, 0], k, v, n, parts=parts), ref_attention(q, k, v, [n])[:, :, 0], dtype,
          f"n={n} parts={parts} D={D} {dtype} seed={seed}")


@pytest.mark.parametrize("G", [12, 13])
def test_decode_more_heads_than_a_threadgroup_takes(G, gen, seed):
    """GQA groups over MAX_HEADS: blocks of 6 heads, and of 7 with one padding head in the last."""
    B, Hkv, D = 1, 1, 64
    n = int(torch.randint(1, 8 * CHUNK, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 2)
    check(METAL.decode(q[:, :, 0], k, v, n, parts=2), ref_attention(q, k, v, [n])[:, :, 0], F32, f"n={n} seed={seed}")


# ---------------------------------------------------------------- prefill


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
    check(METAL.prefill(q, k, v, n, window=window), ref_attention(q, k, v, [n], window=window), F32,
          f"D={D} n={n} window={window} seed={seed}")


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
            out = METAL.decode(q[:, :, 0], k, v, n) if fn == "decode" else METAL.prefill(q, k, v, n)
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

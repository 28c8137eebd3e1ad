"""What only the triton backend has: how its decode deals tiles to partitions and chunks of them to the
reduce, its split heuristic, its prefill's tile edges, its launch path, and (on CUDA) long contexts, large
shapes and Hopper's Gluon kernels. The attention contract that every backend keeps runs for triton in
test_attention_backends.py, through the same Backend and fixture (outputs and decode partials poisoned with NaN).

Without CUDA (CI) the kernels run in Triton's CPU interpreter at small shapes; with CUDA the same
tests run compiled on the GPU (CUDA_VISIBLE_DEVICES= runs the interpreter flavour there too), plus
a few at sizes the interpreter would take minutes over. The interpreter flavour needs a Triton whose
interpreter runs under numpy >= 2.4: 3.9 does, 3.6 does not (triton-lang/triton#9171).
"""
from __future__ import annotations

import pytest
import torch

from test_attention_backends import CUDA, DEVICE, load_triton, triton_backend  # noqa: F401 (a fixture)
from test_kernels import check, make_inputs, ref_attention

TRITON = load_triton()  # or a skip of this module that says why
from fachat.kernels.triton import decode, prefill  # imported for the interpreter by load_triton

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_gpu = pytest.mark.skipif(not CUDA, reason="large shapes: minutes in the CPU interpreter; runs on CUDA")
needs_hopper = pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability() == (9, 0)),
                                  reason="the warp-specialised Gluon kernels run on Hopper (sm_90) GPUs only")

pytestmark = pytest.mark.usefixtures("triton_backend")  # the interpreter, and decode partials poisoned with NaN
run_decode, run_prefill = TRITON.decode, TRITON.prefill


# ---------------------------------------------------------------- decode


def test_split_on_an_h100():
    """decode.split is common.partitions (tests/test_dispatch.py checks its rule) with triton's tiles and budget.
    H100 at batch 1 with 8 KV heads: a tile per partition for short contexts, then 16 partitions (128 programs)
    however long."""
    cfg = decode.config(128, BF16)
    assert [decode.split(n, 8, 128, 132, cfg) for n in (100, 1024, 2048, 4096, 16384, 128 * 1024)] == [
        1, 16, 32, 16, 16, 16]


@pytest.mark.parametrize("length", ["1", "tile-1", "tile+1", "2tile-1", "2tile", "2tile+1", "5tile+37"])
@pytest.mark.parametrize("len_as", ["int", "tensor"])
@pytest.mark.parametrize("parts", [2, 3])
def test_decode_lengths_around_tiles_and_partitions(length, len_as, parts, gen, seed):
    """Tiles dealt to 2 or 3 partitions: empty partitions, a ragged last tile, and partitions that get one
    tile more than others."""
    B, Hkv, G, D = 2, 2, 2, 64
    tile = TRITON.decode_tile(D, F32)
    n = {"1": 1, "tile-1": tile - 1, "tile+1": tile + 1, "2tile-1": 2 * tile - 1, "2tile": 2 * tile,
         "2tile+1": 2 * tile + 1, "5tile+37": 5 * tile + 37}[length]
    capacity = n + int(torch.randint(1, 40, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, capacity)  # spare capacity is NaN
    kv_len = n if len_as == "int" else torch.full((B,), n)
    out = run_decode(q[:, :, 0], k, v, kv_len, parts=parts)
    check(out, ref_attention(q, k, v, [n] * B)[:, :, 0], F32, f"n={n} parts={parts} capacity={capacity} seed={seed}")


def test_decode_reduce_over_many_chunks_of_partitions(gen, seed):
    """More partitions than the reduce takes in one chunk, the last chunk holding a single partition, and
    the largest scores in the last ones."""
    B, Hkv, G, D = 1, 1, 3, 128
    tile = TRITON.decode_tile(D, F32)
    chunk = 8192 // D  # partitions per chunk of the reduce kernel
    n = (2 * chunk + 1) * tile - int(torch.randint(0, tile, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 5, q_scale=2.0)
    k[:, :, n - 2 * tile:n] *= 3  # later maxima (in the last partitions: a tile each) force the running rescale
    out = run_decode(q[:, :, 0], k, v, n, parts=2 * chunk + 1)
    check(out, ref_attention(q, k, v, [n])[:, :, 0], F32, f"n={n} chunk={chunk} seed={seed}")


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_decode_default_split(n, gen, seed):
    """num_partitions left to the heuristic (one partition in the interpreter, many on a GPU)."""
    B, Hkv, G, D = 1, 2, 4, 128
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 1, dtype=BF16)
    check(run_decode(q[:, :, 0], k, v, n), ref_attention(q, k, v, [n])[:, :, 0], BF16, f"n={n} seed={seed}")


@needs_gpu
@pytest.mark.parametrize("n,window", [(1, None), (63, None), (64, None), (65, None), (129, 64), (4097, 63),
                                      (4096, 65), (20_011, 4000), (70_001, None)])
def test_decode_default_split_tile_edges(n, window, gen, seed):
    """The GPU's own split (a tile a partition for short spans, one program a multiprocessor for long ones)
    at lengths and windows that end on, or one past, a tile."""
    B, Hkv, G, D = 1, 8, 4, 128
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 8, dtype=BF16)
    out = run_decode(q[:, :, 0], k, v, n, window=window)
    check(out, ref_attention(q, k, v, [n] * B, window=window)[:, :, 0], BF16, f"n={n} window={window} seed={seed}")


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("window", [None, 4000])
def test_decode_long_context(dtype, window, gen, seed):
    B, Hkv, G, D = 2, 8, 4, 128
    n = int(torch.randint(20_000, 40_000, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 100, dtype=dtype)
    out = run_decode(q[:, :, 0], k, v, torch.tensor([n, n - 777]), window=window)
    ref = ref_attention(q, k, v, [n, n - 777], window=window)[:, :, 0]
    check(out, ref, dtype, f"n={n} {dtype} window={window} seed={seed}")


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("edge", [-2, -1, 0, 1])
@pytest.mark.parametrize("blocks", [1, 2])
def test_prefill_causal_diagonal_on_tile_edges(edge, blocks, gen, seed):
    """A query block's first position lands on each side of a key-tile edge: the split between tiles that
    every query sees whole (no mask) and the masked diagonal must not be off by one."""
    B, Hkv, G, D = 1, 2, 2, 64
    cfg = prefill.config(D, F32)
    past = 2 * cfg.block_n + edge
    Lq = 3 if blocks == 1 else cfg.block_m + 5
    n = past + Lq
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 3)
    check(run_prefill(q, k, v, n), ref_attention(q, k, v, [n]), F32, f"past={past} Lq={Lq} seed={seed}")


@pytest.mark.parametrize("edge", [-1, 0, 1])
def test_prefill_window_edge_on_tile_edges(edge, gen, seed):
    """The oldest key the last query block may see lands on each side of a key-tile edge."""
    B, Hkv, G, D = 1, 2, 2, 64
    cfg = prefill.config(D, F32)
    Lq = cfg.block_m + 5
    n = Lq + 200 + int(torch.randint(0, 50, (1,), generator=gen))
    pos_max = n - 1
    window = (pos_max - edge) % cfg.block_n + cfg.block_n  # pos_max - window = edge (mod block_n)
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 3)
    check(run_prefill(q, k, v, n, window=window), ref_attention(q, k, v, [n], window=window), F32,
          f"n={n} window={window} seed={seed}")


def test_repeated_decode_calls(gen, seed):
    """Calls after the first of a layout skip Triton's argument binding on a GPU (decode.Launcher): each
    of several calls on fresh inputs must still be right."""
    B, Hkv, G, D, n = 2, 2, 4, 128, 700
    for i in range(3):
        q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 8, dtype=BF16)
        out = run_decode(q[:, :, 0], k, v, n - i, parts=5)
        check(out, ref_attention(q, k, v, [n - i] * B)[:, :, 0], BF16, f"call {i} seed={seed}")
    if CUDA:
        assert decode._launch_partition.kernels and decode._launch_reduce.kernels, "the direct launch was never used"


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("window", [None, 300])
def test_prefill_chunk_onto_long_past(dtype, window, gen, seed):
    """A 512-token chunk after thousands of cached positions, as the engine's chunked prefill runs it."""
    B, Hkv, G, D, Lq = 1, 2, 4, 128, 512
    n = Lq + int(torch.randint(2000, 5000, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 64, dtype=dtype)
    out = run_prefill(q, k, v, n, window=window)
    check(out, ref_attention(q, k, v, [n], window=window), dtype, f"n={n} {dtype} window={window} seed={seed}")


@needs_gpu
@pytest.mark.parametrize("dtype,window", [(F16, None), (BF16, None), (BF16, 500)])
def test_prefill_two_programs_per_sm(dtype, window, gen, seed):
    """Query blocks enough for two programs on every multiprocessor: the configuration that caps registers
    (and spills a few) is the one chosen, and it is right."""
    B, Hkv, G, D = 1, 8, 4, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_m = prefill.config(D, dtype).block_m
    Lq = -(-2 * sms // (Hkv * G)) * block_m - int(torch.randint(0, block_m // 2, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 300, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 40, dtype=dtype)
    cfg = prefill.config_for(q.shape, dtype, torch.device(DEVICE))
    assert cfg == prefill.config(D, dtype, two_per_sm=True) and cfg.max_registers, cfg
    out = run_prefill(q, k, v, n, window=window, cfg=cfg)  # cfg: this kernel even where the Gluon one would run
    check(out, ref_attention(q, k, v, [n], window=window), dtype, f"Lq={Lq} n={n} window={window} seed={seed}")


@pytest.fixture
def hopper_calls(monkeypatch):
    """The keyword arguments of each call prefill.prefill_attention hands to the Gluon kernel (prefill_hopper)."""
    from fachat.kernels.triton import prefill_hopper

    calls, launch = [], prefill_hopper.prefill_attention
    monkeypatch.setattr(prefill_hopper, "prefill_attention", lambda *a, **kw: calls.append(kw) or launch(*a, **kw))
    return calls


@needs_hopper
@pytest.mark.parametrize("window", [None, 37, 300])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_hopper_prefill(dtype, D, G, window, gen, seed, hopper_calls):
    """The Gluon kernel on the 16-bit calls with one kv_len that it takes: random lengths across its 128-row
    query blocks and 128-key tiles, K/V past kv_len NaN (TMA must load zeros there), out NaN before."""
    B, Hkv = 2, 2
    Lq = int(torch.randint(1, 400, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 700, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 40, dtype=dtype)
    out = run_prefill(q, k, v, n, window=window)
    assert len(hopper_calls) == 1, "the call did not go to the Gluon kernel"
    check(out, ref_attention(q, k, v, [n] * B, window=window), dtype, f"Lq={Lq} n={n} seed={seed}")


@needs_hopper
@pytest.mark.parametrize("Lq,past", [(1, 0), (1, 128), (127, 1), (128, 0), (129, 127), (256, 128), (300, 0)])
def test_hopper_prefill_tile_edges(Lq, past, gen, seed, hopper_calls):
    """Query blocks and key tiles (128 each) that end on, or one past, the causal diagonal and kv_len."""
    B, Hkv, G, D = 1, 2, 4, 128
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 8, dtype=BF16)
    out = run_prefill(q, k, v, n)
    assert len(hopper_calls) == 1
    check(out, ref_attention(q, k, v, [n]), BF16, f"Lq={Lq} past={past} seed={seed}")


@needs_hopper
@pytest.mark.parametrize("case", ["softcap", "per-row lengths", "float32", "head_dim 256"])
def test_hopper_prefill_leaves_the_rest_to_triton(case, gen, seed, hopper_calls):
    """What the Gluon kernel does not take runs the Triton kernel, and is right."""
    B, Hkv, G, D, Lq, dtype = 2, 2, 2, 128, 70, BF16
    lengths, kw = [Lq + 100] * B, {}
    if case == "softcap":
        kw["softcap"] = 5.0
    elif case == "per-row lengths":
        lengths = [Lq + 100, Lq + 7]
    elif case == "float32":
        dtype = F32
    else:
        D = 256
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 120, dtype=dtype)
    kv_len = torch.tensor(lengths) if case == "per-row lengths" else lengths[0]
    out = run_prefill(q, k, v, kv_len, **kw)
    assert not hopper_calls, case
    check(out, ref_attention(q, k, v, lengths, **kw), dtype, f"{case} seed={seed}")

"""The triton backend's decode and prefill kernels against the float64 attention of test_kernels.

Without CUDA (CI) the kernels run in Triton's CPU interpreter at small shapes; with CUDA the same
tests run compiled on the GPU (CUDA_VISIBLE_DEVICES= runs the interpreter flavour there too), plus
a few at sizes the interpreter would take minutes over. Every call writes into an output poisoned
with NaN, and the decode partials come from a NaN-poisoned workspace, so an element a kernel
fails to write shows up as NaN. The interpreter flavour needs a Triton whose interpreter runs under
numpy >= 2.4: 3.9 does, 3.6 does not (triton-lang/triton#9171).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import record_calls
from test_kernels import check, make_inputs, ref_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Without a GPU the kernels go to Triton's interpreter, which triton (and its triton.language helpers)
# choose when they are imported and decorated: TRITON_INTERPRET is set for this import, and again
# while this module's tests run (interpreter_env), so that other modules never see it.
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
WORKSPACE = decode.workspace  # the real one: poisoned_workspace replaces it for each test

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_gpu = pytest.mark.skipif(not CUDA, reason="large shapes: minutes in the CPU interpreter; runs on CUDA")
needs_hopper = pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability() == (9, 0)),
                                  reason="the warp-specialised Gluon kernels run on Hopper (sm_90) GPUs only")


@pytest.fixture(autouse=True, scope="module")
def interpreter_env():
    """The interpreter reads TRITON_INTERPRET again when it runs (triton imports helpers lazily)."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch):
    """Decode partials start as NaN: a partition the kernel fails to write poisons the reduce."""
    def nan_workspace(rows, num_parts, head_dim, device, target):
        return torch.full((rows * num_parts * (head_dim + 2),), float("nan"), device=device)

    monkeypatch.setattr(decode, "workspace", nan_workspace)


def run(attention, q, k, v, kv_len, **kw):
    """attention (the backend's decode or prefill) on DEVICE into a NaN-poisoned output, returned on the CPU."""
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    if isinstance(kv_len, torch.Tensor):
        kv_len = kv_len.to(DEVICE)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    assert attention(q, k, v, kv_len, out=out, **kw) is out
    return out.cpu()


def run_decode(q, k, v, kv_len, **kw):
    return run(decode.decode_attention, q, k, v, kv_len, **kw)


def run_prefill(q, k, v, kv_len, **kw):
    return run(prefill.prefill_attention, q, k, v, kv_len, **kw)


def block_n(D, dtype):
    return decode.config(D, dtype).block_n


# ---------------------------------------------------------------- decode


def test_split_fills_the_gpu_and_covers_the_span(gen, seed):
    cfg = decode.config(128, BF16)
    for _ in range(300):
        span = int(torch.randint(1, 200_000, (1,), generator=gen))
        rows = int(torch.randint(1, 64, (1,), generator=gen))
        sms = int(torch.randint(1, 200, (1,), generator=gen))
        size, n = decode.split(span, rows, sms, cfg)
        target = cfg.programs_per_sm * sms  # programs
        msg = f"span={span} rows={rows} sms={sms} -> size={size} n={n}; seed={seed}"
        assert size % cfg.block_n == 0 and (n - 1) * size < span <= n * size, msg  # no empty partition
        assert n == 1 or (size >= cfg.min_partition and n <= -(-target // rows)), msg
        # Close to the target where the span allows partitions of the minimum size.
        enough = min(-(-target // rows), span // cfg.min_partition)
        if span >= 8 * enough * cfg.block_n:
            assert n >= 0.85 * enough, msg
    # H100 at batch 1 with 8 KV heads: one partition for a short context, the GPU full for a long one.
    assert decode.split(100, 8, 132, cfg)[1] == 1
    assert decode.split(128 * 1024, 8, 132, cfg)[1] * 8 >= 0.9 * cfg.programs_per_sm * 132


@pytest.mark.parametrize("length", ["1", "tile-1", "tile+1", "part-1", "part", "part+1", "2part+37"])
@pytest.mark.parametrize("len_as", ["int", "tensor"])
def test_decode_lengths_around_tiles_and_partitions(length, len_as, gen, seed):
    B, Hkv, G, D = 2, 2, 2, 64
    tile = block_n(D, F32)
    part = 2 * tile
    n = {"1": 1, "tile-1": tile - 1, "tile+1": tile + 1, "part-1": part - 1, "part": part, "part+1": part + 1,
         "2part+37": 2 * part + 37}[length]
    capacity = n + int(torch.randint(1, 40, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, capacity)  # spare capacity is NaN
    kv_len = n if len_as == "int" else torch.full((B,), n)
    out = run_decode(q[:, :, 0], k, v, kv_len, partition_size=part)
    check(out, ref_attention(q, k, v, [n] * B)[:, :, 0], F32, f"n={n} capacity={capacity} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_decode_gqa_head_dims_dtypes(G, D, dtype, gen, seed):
    B, Hkv = 1, 2
    tile = block_n(D, dtype)
    n = int(torch.randint(1, 4 * tile, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 3, dtype=dtype)
    out = run_decode(q[:, :, 0], k, v, n, partition_size=tile)  # up to four partitions and the reduce
    check(out, ref_attention(q, k, v, [n])[:, :, 0], dtype, f"G={G} D={D} {dtype} n={n} seed={seed}")


def test_decode_reduce_over_many_chunks_of_partitions(gen, seed):
    """More partitions than the reduce takes in one chunk, the last chunk holding a single partition, and
    the largest scores in the last ones."""
    B, Hkv, G, D = 1, 1, 3, 128
    tile = block_n(D, F32)
    chunk = 8192 // D  # partitions per chunk of the reduce kernel
    n = (2 * chunk + 1) * tile - int(torch.randint(0, tile, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 5, q_scale=2.0)
    k[:, :, n - 2 * tile:n] *= 3  # later maxima force the running rescale
    out = run_decode(q[:, :, 0], k, v, n, partition_size=tile)
    check(out, ref_attention(q, k, v, [n])[:, :, 0], F32, f"n={n} chunk={chunk} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [1, 5, 131, 10_000])
def test_decode_window_and_softcap(window, softcap, dtype, gen, seed):
    B, Hkv, G, D = 2, 1, 4, 64
    n = 130 + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 9, dtype=dtype, q_scale=4.0)  # scores reach the cap
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = run_decode(q[:, :, 0], k, v, n, scale=scale, window=window, softcap=softcap, partition_size=64)
    ref = ref_attention(q, k, v, [n] * B, scale=scale, window=window, softcap=softcap)[:, :, 0]
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("fill", ["nan", "garbage"])
def test_decode_per_row_lengths(window, fill, gen, seed):
    """Rows of different lengths in one call: partitions past a short row's end are empty."""
    B, Hkv, G, D = 4, 2, 3, 64
    capacity = 300
    lengths = torch.randperm(capacity, generator=gen)[:B] + 1
    lengths[0] = 1
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths.tolist(), capacity,
                          fill=float("nan") if fill == "nan" else fill)
    ref = ref_attention(q, k, v, lengths.tolist(), window=window)[:, :, 0]
    for kv_len in (lengths, lengths.to(torch.int32)):
        out = run_decode(q[:, :, 0], k, v, kv_len, window=window, partition_size=64)
        check(out, ref, F32, f"lengths={kv_len.tolist()} {kv_len.dtype} window={window} seed={seed}")


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_decode_default_split(n, gen, seed):
    """partition_size left to the heuristic (one partition in the interpreter, many on a GPU)."""
    B, Hkv, G, D = 1, 2, 4, 128
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 1, dtype=BF16)
    check(run_decode(q[:, :, 0], k, v, n), ref_attention(q, k, v, [n])[:, :, 0], BF16, f"n={n} seed={seed}")


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


@pytest.mark.parametrize("window", [None, 1, 37])
@pytest.mark.parametrize("Lq,past", [(2, 0), (7, 300), (63, 1), (65, 0), (130, 77)])
def test_prefill_bottom_right_causal_with_past(Lq, past, window, gen, seed):
    B, Hkv, G, D = 2, 2, 2, 64
    n = Lq + past
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n] * B, n + 11)  # NaN spare capacity
    out = run_prefill(q, k, v, n, window=window)
    check(out, ref_attention(q, k, v, [n] * B, window=window), F32, f"Lq={Lq} past={past} window={window} seed={seed}")


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


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_prefill_gqa_head_dims_dtypes(G, D, dtype, gen, seed):
    B, Hkv = 1, 1
    Lq = int(torch.randint(2, 80, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 150, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 2, dtype=dtype)
    check(run_prefill(q, k, v, n), ref_attention(q, k, v, [n]), dtype, f"G={G} D={D} {dtype} Lq={Lq} n={n} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("window,softcap", [(None, 4.0), (20, 4.0), (70, None)])
def test_prefill_window_and_softcap(window, softcap, dtype, gen, seed):
    B, Hkv, G, D = 1, 2, 2, 64
    Lq = int(torch.randint(30, 140, (1,), generator=gen))
    n = Lq + int(torch.randint(0, 200, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n + 5, dtype=dtype, q_scale=3.0)
    scale = float(torch.empty(1).uniform_(0.05, 0.3, generator=gen))
    out = run_prefill(q, k, v, n, scale=scale, window=window, softcap=softcap)
    ref = ref_attention(q, k, v, [n], scale=scale, window=window, softcap=softcap)
    check(out, ref, dtype, f"window={window} softcap={softcap} {dtype} Lq={Lq} n={n} scale={scale} seed={seed}")


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_per_row_lengths(window, gen, seed):
    B, Hkv, G, D, Lq = 3, 2, 2, 64, 6
    lengths = [Lq, Lq + 150, Lq + 11]
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, lengths, Lq + 170, fill="garbage")
    out = run_prefill(q, k, v, torch.tensor(lengths), window=window)
    check(out, ref_attention(q, k, v, lengths, window=window), F32, f"lengths={lengths} window={window} seed={seed}")


def test_prefill_strided_query(gen, seed):
    """The model hands over q as a transposed view [B, L, H, D] -> [B, H, L, D]; no copy is needed."""
    B, Hkv, G, D, Lq, past = 1, 2, 2, 64, 20, 30
    n = Lq + past
    _, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n)
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).transpose(1, 2)
    check(run_prefill(q, k, v, n), ref_attention(q, k, v, [n]), F32, f"seed={seed}")
    check(run_decode(q[:, :, -1], k, v, n), ref_attention(q[:, :, -1:], k, v, [n])[:, :, 0], F32, f"seed={seed}")


@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_unaligned_views(fn, gen, seed):
    """q, K and V one element into their buffers (not 16-byte aligned): Triton's own launch path."""
    B, Hkv, G, D, Lq = 1, 2, 2, 64, 5
    n = 150
    q, k, v = make_inputs(gen, B, Hkv, G, Lq, D, [n], n, dtype=F16)
    bufs = [torch.empty(t.numel() + 1, dtype=F16) for t in (q, k, v)]
    qv, kv, vv = (b[1:].view(t.shape).copy_(t) for b, t in zip(bufs, (q, k, v), strict=True))
    if fn == "decode":
        out = run_decode(qv[:, :, -1], kv, vv, n, partition_size=64)
        ref = ref_attention(q[:, :, -1:], k, v, [n])[:, :, 0]
    else:
        out, ref = run_prefill(qv, kv, vv, n), ref_attention(q, k, v, [n])
    check(out, ref, F16, f"{fn} seed={seed}")


def test_repeated_decode_calls(gen, seed):
    """Calls after the first of a layout skip Triton's argument binding on a GPU (decode.Launcher): each
    of several calls on fresh inputs must still be right."""
    B, Hkv, G, D, n = 2, 2, 4, 128, 700
    for i in range(3):
        q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 8, dtype=BF16)
        out = run_decode(q[:, :, 0], k, v, n - i, partition_size=128)
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
    """The calls prefill.prefill_attention hands to the Gluon kernel (prefill_hopper)."""
    return record_calls(monkeypatch, "prefill_hopper", "prefill_attention")


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


# ---------------------------------------------------------------- decode on Hopper (Gluon)


@pytest.fixture
def hopper_decode_calls(monkeypatch):
    """The calls decode.decode_attention hands to the persistent Gluon kernel (decode_hopper)."""
    return record_calls(monkeypatch, "decode_hopper", "decode_attention")


@pytest.fixture
def any_length(monkeypatch):
    """decode_hopper takes short contexts too (it normally leaves them to decode.py's kernel)."""
    from fachat.kernels.triton import decode_hopper
    monkeypatch.setattr(decode_hopper, "MIN_TILES_PER_SM", 0)


@needs_hopper
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_hopper_decode(dtype, D, G, window, gen, seed, hopper_decode_calls, any_length):
    """The persistent kernel on the calls it takes: random lengths, K/V past kv_len NaN (TMA must load
    zeros), out and workspace NaN before."""
    B, Hkv = 2, 2
    n = int(torch.randint(1, 6000, (1,), generator=gen))
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 40, dtype=dtype)
    out = run_decode(q[:, :, 0], k, v, n, window=window)
    assert len(hopper_decode_calls) == 1, "the call did not go to the Gluon kernel"
    check(out, ref_attention(q, k, v, [n] * B, window=window)[:, :, 0], dtype, f"n={n} seed={seed}")


@needs_hopper
@pytest.mark.parametrize("n,window", [(1, None), (63, None), (64, None), (65, None), (129, 64), (4097, 63),
                                      (4096, 65), (20_011, 4000)])
def test_hopper_decode_tile_edges(n, window, gen, seed, hopper_decode_calls, any_length):
    """Lengths and windows that end on, or one past, a 64-key tile; 32 KV groups, so static shares span
    groups and many programs share each group's pool."""
    B, Hkv, G, D = 4, 8, 4, 128
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n] * B, n + 8, dtype=BF16)
    out = run_decode(q[:, :, 0], k, v, n, window=window)
    assert len(hopper_decode_calls) == 1
    check(out, ref_attention(q, k, v, [n] * B, window=window)[:, :, 0], BF16, f"n={n} window={window} seed={seed}")


@needs_hopper
def test_hopper_decode_takes_long_contexts_on_its_own(gen, seed, hopper_decode_calls):
    """At the default threshold: a long context goes to the Gluon kernel, a short one does not; both right."""
    B, Hkv, G, D = 1, 8, 2, 128
    for n, gluon in ((70_001, True), (2_000, False)):
        q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], n + 64, dtype=BF16)
        before = len(hopper_decode_calls)
        out = run_decode(q[:, :, 0], k, v, n)
        assert (len(hopper_decode_calls) > before) == gluon, n
        check(out, ref_attention(q, k, v, [n])[:, :, 0], BF16, f"n={n} seed={seed}")


@needs_hopper
@pytest.mark.parametrize("case", ["softcap", "per-row lengths", "float32", "head_dim 256"])
def test_hopper_decode_leaves_the_rest_to_triton(case, gen, seed, hopper_decode_calls, any_length):
    """What the Gluon kernel does not take runs decode.py's kernel, and is right."""
    B, Hkv, G, D, n, dtype = 2, 2, 4, 128, 3000, BF16
    lengths, kw = [n] * B, {}
    if case == "softcap":
        kw["softcap"] = 5.0
    elif case == "per-row lengths":
        lengths = [n, n - 777]
    elif case == "float32":
        dtype = F32
    else:
        D = 256
    q, k, v = make_inputs(gen, B, Hkv, G, 1, D, lengths, n + 20, dtype=dtype)
    kv_len = torch.tensor(lengths) if case == "per-row lengths" else n
    out = run_decode(q[:, :, 0], k, v, kv_len, **kw)
    assert not hopper_decode_calls, case
    check(out, ref_attention(q, k, v, lengths, **kw)[:, :, 0], dtype, f"{case} seed={seed}")


@needs_hopper
def test_hopper_decode_reused_workspace_and_graph_replays(gen, seed, hopper_decode_calls, any_length, monkeypatch):
    """The real workspace, reused call after call, and a CUDA graph of calls replayed on new inputs: the
    first two captured calls take their counters from a pool with room for two, the third zeroes its own
    in the graph. Every answer agrees with float64, and the eager calls' shared counters and the pool are
    back to 0 after each call and each replay."""
    from fachat.kernels.triton import decode_hopper

    B, Hkv, G, D = 1, 8, 4, 128
    pool = torch.zeros(2 * (B * Hkv + 1), dtype=torch.int32, device=DEVICE)  # a call takes groups + 1

    def counters_zero():
        torch.cuda.synchronize()
        return all(not c.any() for c in [*decode_hopper._counters.values(), pool])

    monkeypatch.setattr(decode, "workspace", WORKSPACE)

    def inputs():
        n = int(torch.randint(3000, 9000, (1,), generator=gen))
        q, k, v = make_inputs(gen, B, Hkv, G, 1, D, [n], 9000, dtype=BF16)
        return q[:, :, 0].to(DEVICE), k.to(DEVICE), v.to(DEVICE), n, ref_attention(q, k, v, [n])[:, :, 0]

    for _ in range(5):
        q, k, v, n, want = inputs()
        check(decode.decode_attention(q, k, v, n).cpu(), want, BF16, f"eager n={n} seed={seed}")
        assert counters_zero()
    assert q.device in decode_hopper._capture_pools, "eager calls set no counters aside for captured ones"
    monkeypatch.setitem(decode_hopper._capture_pools, q.device, [pool, 0])
    n = int(torch.randint(3000, 9000, (1,), generator=gen))
    q, k, v = (t.to(DEVICE) for t in make_inputs(gen, B, Hkv, G, 1, D, [n], n, dtype=BF16))
    q = q[:, :, 0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode.decode_attention(q, k, v, n)  # compiled outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [decode.decode_attention(q, k, v, n) for _ in range(3)]
    assert decode_hopper._capture_pools[q.device][1] == pool.numel(), "captured calls did not take the pool"
    for _ in range(3):  # new inputs in the captured buffers
        q2, k2, v2 = make_inputs(gen, B, Hkv, G, 1, D, [n], n, dtype=BF16)
        q.copy_(q2[:, :, 0])
        k.copy_(k2)
        v.copy_(v2)
        graph.replay()
        want = ref_attention(q2, k2, v2, [n])[:, :, 0]
        for i, out in enumerate(outs):
            check(out.cpu(), want, BF16, f"graph call {i} n={n} seed={seed}")
        assert counters_zero()
    assert len(hopper_decode_calls) == 9  # 5 eager, 1 before the capture, 3 captured

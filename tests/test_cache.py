"""InPlaceKVCache: exactness against the concat baseline, growth policy, views, truncation, sizes."""
from __future__ import annotations

import math

import pytest
import torch

import fachat
from fachat.engine.runner import Runner
from fachat.cache.kv_cache import ConcatKVCache, InPlaceKVCache
from fachat.errors import ContextLengthError

from conftest import failing_call


def cache_for(engine, **kw):
    a = engine.args
    return InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=engine.dtype,
                          device=engine.device, **kw)


def run(engine, cache, ids, all_logits=False):
    """The model over ids after the cache's length, through a runner (which keeps the cache's books)."""
    return Runner(engine.model, cache, graphs=False).prefill(ids.flatten().tolist(), all_logits=all_logits)


def random_ids(gen, n, vocab):
    return torch.randint(3, vocab, (1, n), generator=gen)


@pytest.mark.parametrize("capacity", [1, 5])
def test_growing_cache_matches_preset_bit_exact(llama_engine, capacity, gen, seed):
    """Prefill + greedy decode through a cache that starts at `capacity` and grows, and through one preset to
    the whole length: logits equal bit for bit at every step (growth moves the live K/V exactly)."""
    eng = llama_engine
    grow, preset = cache_for(eng, capacity=capacity), cache_for(eng, capacity=64)
    ids = random_ids(gen, 11, eng.args.vocab_size)
    lg, lp = run(eng, grow, ids), run(eng, preset, ids)
    assert torch.equal(lg, lp), f"prefill logits differ; seed={seed}"
    for step in range(20):
        tok = lg.argmax(-1, keepdim=True)
        lg, lp = run(eng, grow, tok), run(eng, preset, tok)
        assert torch.equal(lg, lp), f"decode step {step}: max diff {(lg - lp).abs().max():.3g}; seed={seed}"
    # a second prefill chunk after decoding, too
    more = random_ids(gen, 6, eng.args.vocab_size)
    lg, lp = run(eng, grow, more, all_logits=True), run(eng, preset, more, all_logits=True)
    assert torch.equal(lg, lp), f"second chunk logits differ; seed={seed}"
    assert grow.length == preset.length == 11 + 20 + 6
    assert grow.growths > 0 and preset.growths == 0


@pytest.mark.parametrize("T", [1, 2, 3, 17, 64, 65])
def test_growths_logarithmic_through_model(llama_engine, T, gen, seed):
    a = llama_engine.args
    cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=llama_engine.dtype,
                           capacity=1)
    for tok in random_ids(gen, T, a.vocab_size)[0]:
        run(llama_engine, cache, tok.view(1, 1))
    assert cache.length == T
    assert cache.growths == math.ceil(math.log2(T)), f"T={T} growths={cache.growths}"
    assert cache.capacity == 2 ** math.ceil(math.log2(T))


def test_growths_logarithmic_long(gen, seed):
    T = int(torch.randint(300, 1100, (1,), generator=gen))
    cache = InPlaceKVCache(2, 2, 8, dtype=torch.float32, capacity=1)
    for pos in range(T):
        cache.reserve(pos + 1)
        for layer in range(2):
            cache.write(layer, pos, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        cache.advance(1)
    assert cache.growths == math.ceil(math.log2(T)), f"T={T} seed={seed}"


def test_preset_capacity_never_grows(tiny_llama, gen, seed):
    eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32", max_seq_len=40)
    cache = eng.new_cache()
    assert cache.capacity == 40 and cache.max_seq_len == 40
    ptr = cache.k[0].data_ptr()
    run(eng, cache, random_ids(gen, 13, eng.args.vocab_size))
    for tok in random_ids(gen, 27, eng.args.vocab_size)[0]:
        run(eng, cache, tok.view(1, 1))
    assert cache.length == 40 and cache.growths == 0 and cache.k[0].data_ptr() == ptr
    with pytest.raises(ContextLengthError):
        run(eng, cache, torch.tensor([[5]]))
    # Without max_seq_len the engine's cache starts small and grows
    grow = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32").new_cache()
    assert grow.max_seq_len == eng.args.max_position_embeddings and grow.capacity < grow.max_seq_len


def test_capacity_clamped_to_max_seq_len():
    cache = InPlaceKVCache(1, 1, 4, dtype=torch.float32, capacity=3, max_seq_len=10)
    cache.reserve(4)
    assert cache.capacity == 6 and cache.growths == 1
    cache.reserve(7)  # doubling would give 12 > 10: clamped
    assert cache.capacity == 10 and cache.growths == 2
    cache.reserve(10)
    assert cache.growths == 2
    with pytest.raises(ContextLengthError):
        cache.reserve(11)
    with pytest.raises(ValueError):
        InPlaceKVCache(1, 1, 4, dtype=torch.float32, capacity=11, max_seq_len=10)
    with pytest.raises(ValueError):
        InPlaceKVCache(1, 1, 4, dtype=torch.float32, capacity=0)


def fill(cache, n, gen, layers, shape):
    """Writes n random positions at the cursor on every layer; returns what was written per layer."""
    B, H, D = shape
    start = cache.length
    cache.reserve(start + n)
    written = []
    for layer in range(layers):
        k, v = torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, n, D, generator=gen)
        cache.write(layer, start, k, v)
        written.append((k, v))
    cache.advance(n)
    return written


def test_views_share_storage_and_are_capacity_strided(gen, seed):
    L, B, H, D = 3, 2, 2, 8
    cache = InPlaceKVCache(L, H, D, dtype=torch.float32, batch_size=B, capacity=16)
    written = fill(cache, 5, gen, L, (B, H, D))
    for layer in range(L):
        kv, vv = cache.views(layer)
        assert kv.shape == vv.shape == (B, H, 5, D)
        assert kv.data_ptr() == cache.k[layer].data_ptr() and vv.data_ptr() == cache.v[layer].data_ptr()
        assert kv.stride() == (H * 16 * D, 16 * D, D, 1) == vv.stride()
        assert torch.equal(kv, written[layer][0]) and torch.equal(vv, written[layer][1])
    # writes through the cache are visible in earlier views; writes to a view reach the buffer
    kv, vv = cache.views(1)
    new_k, new_v = torch.randn(B, H, 2, D, generator=gen), torch.randn(B, H, 2, D, generator=gen)
    cache.write(1, 1, new_k, new_v)
    assert torch.equal(kv[:, :, 1:3], new_k) and torch.equal(vv[:, :, 1:3], new_v)
    kv[0, 1, 4, 3] = 1234.5
    assert cache.k[1][0, 1, 4, 3].item() == 1234.5


def test_growth_preserves_live_prefix(gen, seed):
    L, B, H, D = 2, 1, 3, 4
    cache = InPlaceKVCache(L, H, D, dtype=torch.bfloat16, batch_size=B, capacity=2)
    fill(cache, 2, gen, L, (B, H, D))
    before = [tuple(t.clone() for t in cache.views(layer)) for layer in range(L)]
    fill(cache, 7, gen, L, (B, H, D))  # 2 -> 16 in one reserve
    assert cache.capacity == 16 and cache.growths == 1
    for layer in range(L):
        k, v = cache.views(layer)
        assert k.dtype == torch.bfloat16
        assert torch.equal(k[:, :, :2], before[layer][0]) and torch.equal(v[:, :, :2], before[layer][1])


def test_truncate_rolls_back_and_overwrites(gen, seed):
    L, B, H, D = 2, 1, 2, 4
    cache = InPlaceKVCache(L, H, D, dtype=torch.float32, capacity=4)
    first = fill(cache, 10, gen, L, (B, H, D))
    cap = cache.capacity
    cache.truncate(6)
    assert cache.length == 6 and cache.capacity == cap
    assert cache.views(0)[0].shape[2] == 6
    second = fill(cache, 3, gen, L, (B, H, D))
    for layer in range(L):
        k, v = cache.views(layer)
        assert k.shape[2] == 9
        assert torch.equal(k[:, :, :6], first[layer][0][:, :, :6])
        assert torch.equal(k[:, :, 6:], second[layer][0]) and torch.equal(v[:, :, 6:], second[layer][1])
    cache.truncate(9)  # no-op
    cache.truncate(0)
    assert cache.length == 0 and cache.live_nbytes == 0
    for bad in (-1, 1):
        with pytest.raises(ValueError):
            cache.truncate(bad)


def test_reserve_beyond_max_seq_len():
    cache = InPlaceKVCache(1, 1, 4, dtype=torch.float32, max_seq_len=8)
    assert cache.capacity == 8  # default capacity is capped by max_seq_len
    with pytest.raises(ContextLengthError):
        cache.reserve(9)
    concat = ConcatKVCache(1, 1, 4, dtype=torch.float32, max_seq_len=8)
    with pytest.raises(ContextLengthError):
        concat.reserve(9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sizes_arithmetic(dtype, gen, seed):
    L = int(torch.randint(1, 5, (1,), generator=gen))
    B, H, D = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen)), 8
    cap = int(torch.randint(4, 40, (1,), generator=gen))
    cache = InPlaceKVCache(L, H, D, dtype=dtype, batch_size=B, capacity=cap)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert cache.capacity == cap
    assert cache.nbytes == 2 * L * B * H * cap * D * elem
    assert cache.live_nbytes == 0
    n = int(torch.randint(1, cap + 1, (1,), generator=gen))
    cache.reserve(n)
    for layer in range(L):
        cache.write(layer, 0, torch.zeros(B, H, n, D, dtype=dtype), torch.zeros(B, H, n, D, dtype=dtype))
    cache.advance(n)
    assert cache.live_nbytes == 2 * L * B * H * n * D * elem, f"L={L} B={B} H={H} cap={cap} n={n}"
    cache.reserve(cap + 1)
    assert cache.capacity == 2 * cap and cache.nbytes == 2 * L * B * H * 2 * cap * D * elem
    assert cache.live_nbytes == 2 * L * B * H * n * D * elem
    assert InPlaceKVCache(L, H, D, dtype=dtype).capacity == 256  # the documented default


def test_truncate_and_rerun_gives_identical_logits(llama_engine, gen, seed):
    eng = llama_engine
    a = eng.args
    cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=eng.dtype, capacity=2)
    prompt = random_ids(gen, 9, a.vocab_size)
    run(eng, cache, prompt)
    steps = random_ids(gen, 12, a.vocab_size)[0]
    first = [run(eng, cache, t.view(1, 1)) for t in steps]
    # roll back past the whole decode, then into the middle of it, and run the same tokens again
    cache.truncate(9)
    again = [run(eng, cache, t.view(1, 1)) for t in steps]
    for i, (x, y) in enumerate(zip(first, again)):
        assert torch.equal(x, y), f"step {i} differs after truncate; seed={seed}"
    cache.truncate(9 + 5)
    # Different tokens after the rollback, then compare with a fresh cache that never saw the old ones
    other = random_ids(gen, 4, a.vocab_size)[0]
    after = [run(eng, cache, t.view(1, 1)) for t in other]
    fresh_cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=eng.dtype, capacity=2)
    run(eng, fresh_cache, prompt)
    for t in steps[:5]:
        run(eng, fresh_cache, t.view(1, 1))
    fresh = [run(eng, fresh_cache, t.view(1, 1)) for t in other]
    for i, (x, y) in enumerate(zip(after, fresh)):
        assert torch.equal(x, y), f"step {i} after truncate differs from a fresh cache; seed={seed}"
    # and the logits really depend on the cache contents (the comparison above is not vacuous)
    assert not torch.equal(after[0], run(eng, cache_for(eng), other[0].view(1, 1)))


def test_state_views_extend_and_set_state(gen, seed):
    """state: zero-copy views of the live region; extend appends copies at the cursor; set_state replaces
    the contents, copying only the given positions and growing the buffers when they do not fit."""
    L, B, H, D = 3, 1, 2, 4
    cache = InPlaceKVCache(L, H, D, dtype=torch.float32, capacity=4)
    written = fill(cache, 6, gen, L, (B, H, D))
    keys, values = cache.state
    assert len(keys) == len(values) == L
    for layer in range(L):
        assert keys[layer].data_ptr() == cache.k[layer].data_ptr() and keys[layer].shape == (B, H, 6, D)
        assert torch.equal(keys[layer], written[layer][0]) and torch.equal(values[layer], written[layer][1])
    n = int(torch.randint(1, 12, (1,), generator=gen))
    more_k = [torch.randn(B, H, n, D, generator=gen) for _ in range(L)]
    more_v = [torch.randn(B, H, n, D, generator=gen) for _ in range(L)]
    cache.extend(more_k, more_v)
    assert cache.length == 6 + n and cache.capacity >= 6 + n
    for layer in range(L):
        k, v = cache.views(layer)
        assert torch.equal(k[:, :, 6:], more_k[layer]) and torch.equal(v[:, :, :6], written[layer][1])
        more_k[layer].fill_(0)  # copied in, not aliased
        assert not torch.equal(k[:, :, 6:], more_k[layer])
    other = InPlaceKVCache(L, H, D, dtype=torch.float32, capacity=2)
    other.set_state(*cache.state)
    assert other.length == cache.length and other.growths == 1 and other.capacity >= cache.length
    for x, y in zip(other.state[0] + other.state[1], cache.state[0] + cache.state[1]):
        assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    big = InPlaceKVCache(L, H, D, dtype=torch.float32, capacity=64)
    fill(big, 40, gen, L, (B, H, D))
    big.set_state(*cache.state)  # shrinks the live region; the capacity stays
    assert big.length == cache.length and big.capacity == 64
    assert torch.equal(big.state[1][2], cache.state[1][2])


@pytest.mark.parametrize("bad", ["layers", "heads", "dtype", "lengths", "dims"])
def test_extend_rejects_mismatched_kv(bad, gen):
    L, B, H, D, n = 2, 1, 2, 4, 3
    cache = InPlaceKVCache(L, H, D, dtype=torch.float32)
    k = [torch.randn(B, H, n, D, generator=gen) for _ in range(L)]
    v = [t.clone() for t in k]
    if bad == "layers":
        k = k[:1]
    elif bad == "heads":
        k[1] = torch.randn(B, H + 1, n, D)
    elif bad == "dtype":
        v[0] = v[0].half()
    elif bad == "lengths":
        v[1] = torch.randn(B, H, n + 1, D)
    else:
        k[0] = k[0][0]
    fill(cache, 2, gen, L, (B, H, D))
    for call in (cache.extend, cache.set_state):
        with pytest.raises(ValueError, match="layers|K/V"):
            call(k, v)
        assert cache.length == 2  # nothing changed


def test_buffers_grown_in_inference_mode_take_writes_outside_it(llama_engine, gen, seed):
    """The forward runs in inference mode and grows the cache there: its buffers must still take the in-place
    writes of undo and unfreeze, outside that mode. So must those of a cache made or grown in it."""
    eng, a = llama_engine, llama_engine.args
    cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=eng.dtype, capacity=2)
    run(eng, cache, random_ids(gen, 5, a.vocab_size))
    with torch.inference_mode():
        made = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=eng.dtype, capacity=2)
        made.reserve(3)
    assert (cache.growths, made.growths) == (1, 1)
    assert not any(t.is_inference() for t in cache.k + cache.v + made.k + made.v)
    keys, values = ([t.clone() for t in ts] for ts in cache.state)
    cache.truncate(2)
    cache.extend([k[:, :, 2:] for k in keys], [v[:, :, 2:] for v in values])
    made.set_state(keys, values)
    for c in (cache, made):
        assert all(torch.equal(x, y) for x, y in zip(c.state[0] + c.state[1], keys + values))


@pytest.mark.parametrize("call", ["extend", "set_state", "set_state from a position"])
def test_failed_growth_changes_nothing_and_an_interrupted_copy_keeps_the_prefix(call, gen, seed, monkeypatch):
    """extend and set_state check and grow before they change anything: an allocation that fails after any number
    of buffers leaves the cache as it was. A KeyboardInterrupt in the copy leaves the positions before the ones
    being replaced."""
    L, B, H, D = 3, 1, 2, 4
    cache = InPlaceKVCache(L, H, D, dtype=torch.float32, capacity=8)
    old = fill(cache, 6, gen, L, (B, H, D))
    start = {"extend": 6, "set_state": 0}.get(call, int(torch.randint(1, 6, (1,), generator=gen)))
    n = int(torch.randint(9 - start, 30, (1,), generator=gen))  # past the capacity: it grows
    keys = [torch.randn(B, H, n, D, generator=gen) for _ in range(L)]
    values = [torch.randn(B, H, n, D, generator=gen) for _ in range(L)]

    def run():
        if call == "extend":
            cache.extend(keys, values)
        else:
            cache.set_state(keys, values, **({"start": start} if start else {}))

    buffers = cache.k + cache.v
    for fail_after in range(2 * L):
        with failing_call(monkeypatch, InPlaceKVCache, "_regrow", fail_after + 1, MemoryError("injected")), \
                pytest.raises(MemoryError):
            run()
        label = f"{call} failing after {fail_after} buffers; seed={seed}"
        assert (cache.length, cache.capacity, cache.growths) == (6, 8, 0), label
        assert all(x is y for x, y in zip(cache.k + cache.v, buffers)), label
        assert all(torch.equal(cache.views(i)[0], k) and torch.equal(cache.views(i)[1], v)
                   for i, (k, v) in enumerate(old)), label
    at = int(torch.randint(1, L + 1, (1,), generator=gen))
    with failing_call(monkeypatch, InPlaceKVCache, "write", at, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        run()
    assert cache.length == start and cache.growths == 1, f"{call} interrupted at layer {at - 1}; seed={seed}"
    run()
    assert cache.length == start + n
    for i, (k, v) in enumerate(old):
        assert torch.equal(cache.views(i)[0], torch.cat([k[:, :, :start], keys[i]], dim=2))
        assert torch.equal(cache.views(i)[1], torch.cat([v[:, :, :start], values[i]], dim=2))


def test_a_cache_larger_than_memory_is_a_clean_error_that_changes_nothing():
    """A preset capacity, or a growth, past what memory holds raises CacheMemoryError naming the positions."""
    with pytest.raises(fachat.CacheMemoryError, match=f"{2**40} positions"):
        InPlaceKVCache(1, 1, 64, dtype=torch.float32, capacity=2**40)
    cache = InPlaceKVCache(1, 1, 64, dtype=torch.float32, capacity=4)
    kv = [torch.randn(1, 1, 3, 64)]
    cache.extend(kv, kv)
    with pytest.raises(fachat.CacheMemoryError, match="max_seq_len"):
        cache.reserve(2**40)
    assert (cache.length, cache.capacity, cache.growths) == (3, 4, 0)
    assert torch.equal(cache.views(0)[0], kv[0])

"""The runner on the CPU: positions kept on the device against the cache's books, and tokens read one step
behind the device (as on CUDA) (the device sampler's distributions are in test_engine):
stops found a step late, Ctrl-C between steps, the RNG and the cache left as an unpipelined run leaves them."""
from __future__ import annotations

import os

import pytest
import torch

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.engine import runner as runner_module
from fachat.engine.generate import generate_step
from fachat.engine.runner import Runner
from fachat.engine.sampling import SamplingParams

from test_engine import greedy_reference
from test_session import assert_cache_holds, randint, words


def test_positions_follow_the_cache_through_growth_truncation_and_state(tiny_llama, llama_engine, gen, seed):
    """The device positions equal the cache's length after every operation, and decoding from there gives
    transformers' greedy tokens: after a prefill, steps that grow the cache twice, a truncation into the
    middle, and set_state."""
    _, peer = tiny_llama
    eng = llama_engine
    a = eng.args
    runner = Runner(eng.model, InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim,
                                              dtype=eng.dtype, capacity=4))
    context = torch.randint(3, eng.args.vocab_size, (randint(gen, 3, 9),), generator=gen).tolist()

    def decode(n: int) -> list[int]:
        runner.begin(SamplingParams(temperature=0), context)
        steps = generate_step(runner)
        got = [next(steps) for _ in range(n)]
        steps.close()
        return got

    def check(label):
        assert runner.positions.tolist() == [runner.length], f"{label}; seed={seed}"

    runner.prefill(context)
    check("prefill")
    n = randint(gen, 12, 30)  # past capacity 4, 8 and 16
    got = decode(n)
    label = f"{len(context)}-token prompt, {n} steps; seed={seed}"
    assert got == greedy_reference(peer, context, n), label
    assert runner.length == len(context) + n - 1 and runner.cache.growths >= 2, label
    check("after decoding")
    context += got
    cut = randint(gen, 1, runner.length - 1)
    runner.truncate(cut)
    check("truncate")
    runner.prefill(context[cut:cut + 1])  # refeed one token and decode from the cut
    context = context[:cut + 1]
    got = decode(5)
    assert got == greedy_reference(peer, context, 5), f"after truncate({cut}); {label}"
    keys, values = ([t.clone() for t in ts] for ts in runner.state)
    runner.set_state([k[:, :, :cut] for k in keys], [v[:, :, :cut] for v in values])
    check("set_state")
    runner.prefill(context[cut:cut + 1])
    assert decode(5) == got, f"after set_state; {label}"


# ---------------------------------------------------------------- one step behind


@pytest.fixture
def pipelined(monkeypatch):
    """Runners made from here on read tokens one step behind the device, as on CUDA."""
    monkeypatch.setitem(runner_module.LOOKAHEAD, "cpu", 1)


def chat_turns(engine, turns, **params):
    session = engine.session(system="Be brief.", **params)
    out = []
    for text in turns:
        g = session.chat(text)
        out.append((g.text, g.tokens, g.finish_reason))
    return session, out


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_stops_found_a_step_late_leave_what_an_unpipelined_run_leaves(llama_engine, mode, monkeypatch, gen, seed):
    """Eos and stop strings end answers, found one step after the device ran past them: the answers, the
    cache (exactly at the answer's end) and the RNG (so later turns) equal an unpipelined run's."""
    eng = llama_engine
    params = dict(max_new_tokens=randint(gen, 6, 20))
    if mode == "sampled":
        params |= dict(temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=seed)
    else:
        params |= dict(temperature=0)
    turns = [words(gen) for _ in range(3)]
    eng.tokenizer.eos_token_ids = []
    _, free = chat_turns(eng, turns, **params)
    # an eos that the first answer produces, and a stop string from the middle of the second answer
    first, second = free[0][1], free[1][0]
    eng.tokenizer.eos_token_ids = [first[randint(gen, 0, len(first) - 1)]]
    if len(second) >= 4:
        i = randint(gen, 1, len(second) - 3)
        params["stop"] = [second[i:i + 2]]
    results = []
    for lookahead in (0, 1):
        monkeypatch.setitem(runner_module.LOOKAHEAD, "cpu", lookahead)
        session, out = chat_turns(eng, turns, **params)
        results.append((session, out))
    (plain, plain_out), (piped, piped_out) = results
    label = f"{mode}, eos {eng.tokenizer.eos_token_ids}, stop {params.get('stop')}; seed={seed}"
    assert piped.runner.lookahead == 1 and plain.runner.lookahead == 0
    assert piped_out == plain_out, label
    assert any(reason == "stop" for _, _, reason in piped_out), f"no answer stopped early: {label}"
    assert piped.tokens == plain.tokens and piped.cache.length == plain.cache.length == len(plain.tokens) - 1, label
    for x, y in zip(piped.cache.state[0] + piped.cache.state[1], plain.cache.state[0] + plain.cache.state[1]):
        assert torch.equal(x, y), label
    if mode == "sampled":  # greedy sessions are seeded with fresh entropy, and never draw
        assert torch.equal(piped.runner.generator.get_state(), plain.runner.generator.get_state()), label
    assert_cache_holds(eng, piped, label)


def test_ctrl_c_between_steps_leaves_the_cache_consistent(eng, pipelined, gen, seed):
    """A KeyboardInterrupt in the loop over a pipelined stream, after a random number of pieces: the cache
    holds exactly the tokens but the last, the steps queued past them are taken back, and the next answer
    is the one an uninterrupted session gives after the same context."""
    # 64 tokens for at most 4 pieces: tokens that decode to no text (special ones) yield no piece
    params = dict(max_new_tokens=64, temperature=0.9, repetition_penalty=1.1, seed=seed)
    session = eng.session(**params)
    session.chat(words(gen))
    stream = session.stream_chat(words(gen))
    stop = randint(gen, 1, 4)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(stream):
            if i + 1 == stop:
                raise KeyboardInterrupt
    stream.close()
    label = f"interrupted after {stop} pieces; seed={seed}"
    assert session.cache.length == len(session.tokens) - 1, label
    assert_cache_holds(eng, session, label)
    twin = eng.session(**params)
    twin.unfreeze(session.freeze())
    text = words(gen)
    assert session.chat(text).tokens == twin.chat(text).tokens, label


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(runner_module._malloc_trim() is None or not os.path.exists("/proc/self/statm"),
                    reason="needs glibc's malloc_trim and /proc (Linux); elsewhere release_free_memory does nothing")
def test_release_free_memory_returns_the_heap_a_load_or_prefill_freed():
    # Blocks below glibc's mmap threshold come from the heap; with one kept at the end, free() alone returns
    # none of the 48 MB below it to the OS.
    blocks = [torch.ones(16 * 1024) for _ in range(768)]  # 64 KB each, touched
    kept = blocks[-1]
    del blocks
    before = _rss_bytes()
    runner_module.release_free_memory()
    assert before - _rss_bytes() > 32 * 2**20
    assert float(kept.sum()) == kept.numel()

"""Sessions on the tiny llama: chat turns that prefill only what is new, templates that are not
append-only, KeyboardInterrupt anywhere (the cache stays exact), undo / reset / system, freeze / fork,
and exact continuation after an interruption at a random step, against uninterrupted runs and Engine.generate;
every operation again once the cache has grown, and failures inside undo / unfreeze that change nothing."""
from __future__ import annotations

import bisect
import json
import shutil

import pytest
import torch

import fachat
from fachat.cache.kv_cache import InPlaceKVCache
from fachat.engine.runner import Runner
from fachat.engine import cpu_step
from fachat.engine.sampling import Sampler
from fachat.models.tokenizer import Tokenizer

from conftest import failing_call

WORDS = ["the", "quick", "fox", "jumps", "over", "lazy", "dog", "count:", "one", "two", "three", "Héllo", "wörld",
         "return", "{'a':", "[1, 2]", "日本語", "🙂", "model", "small"]
# greedy and sampled decoding, the latter with a repetition penalty too
MODES = {"greedy": dict(temperature=0),
         "sampled": dict(temperature=1.0, top_k=40, top_p=0.95),
         "penalty": dict(temperature=0.8, min_p=0.05, repetition_penalty=1.4)}


@pytest.fixture(autouse=True, scope="module")
def eager_decode():
    """This module's tests watch each forward through module hooks (Logits, InterruptAt), which the CPU decode step
    in TorchScript bypasses as CUDA graphs do: they decode eagerly (tests/test_cpu_step.py runs sessions on the step)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_step.STEP_ENV, "0")
        yield


def words(gen, n=6) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=gen).tolist())


def randint(gen, low, high) -> int:
    """Uniform in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def random_prompt(eng, gen) -> list[int]:
    """bos, then 4 to 40 random tokens."""
    return [1] + torch.randint(3, eng.args.vocab_size, (randint(gen, 4, 40),), generator=gen).tolist()


class Logits:
    """Records the logits of every completed model forward (the rows that tokens are sampled from)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __enter__(self):
        self.handle = self.model.register_forward_hook(lambda m, args, out: self.rows.append(out[0].clone()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class InterruptAt:
    """Raises KeyboardInterrupt from inside model forward number `call` (1-based), in `module`'s forward
    hook: a decoder layer's fires before the cache advances, the model's own (the logits made) after, ahead of
    other hooks there (the logits are lost: Logits never sees them)."""

    def __init__(self, model, module, call: int):
        self.model, self.module, self.call, self.calls, self.fired = model, module, call, 0, False

    def __enter__(self):
        def count(m, args):
            self.calls += 1

        def interrupt(m, args, out):
            if self.calls == self.call and not self.fired:
                self.fired = True
                raise KeyboardInterrupt

        self.handles = [self.model.register_forward_pre_hook(count), self.module.register_forward_hook(interrupt, prepend=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def interrupt_site(eng, gen):
    """A random place in the forward: after some decoder layer (K/V written, not committed) or at its end
    (the cache has advanced, the logits are lost)."""
    layers = list(eng.model.model.layers)
    sites = layers + [eng.model]
    return sites[randint(gen, 0, len(sites) - 1)]


def assert_exact(rows, ref_rows, label):
    assert len(rows) == len(ref_rows), f"{label}: {len(rows)} forwards vs {len(ref_rows)}"
    for i, (x, y) in enumerate(zip(rows, ref_rows)):
        assert torch.equal(x, y), f"{label}: logits of step {i} differ by {(x - y).abs().max():.3g}"


def assert_cache_holds(eng, session, label=""):
    """The invariant: at most one token is not cached, and the cached K/V are those of tokens[:length]
    (against a fresh prefill of them: another chunking, so equal to rounding only)."""
    cache, tokens = session.cache, session.tokens
    assert len(tokens) - cache.length in (0, 1), f"{label}: {len(tokens)} tokens, {cache.length} cached"
    if cache.length == 0:
        return
    fresh = eng.new_cache()
    Runner(eng.model, fresh).prefill(tokens[:cache.length])
    for layer in range(len(fresh.k)):
        for x, y in zip(cache.views(layer), fresh.views(layer)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"{label}: layer {layer}: {m}")


def assert_matches_fresh(eng, context: list[int], answer: list[int], rows: list[torch.Tensor], greedy: bool, label=""):
    """An answer's logits against a fresh engine's teacher-forced logits over the same tokens; greedy
    tokens are the argmax of their own logits."""
    assert len(rows) == len(answer), label
    ref = eng.score(context + answer)[len(context) - 1: len(context) - 1 + len(answer)]
    torch.testing.assert_close(torch.stack(rows), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{label}: {m}")
    if greedy:
        assert answer == [int(r.argmax()) for r in rows], label


def render(eng, messages) -> list[int]:
    return eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ---------------------------------------------------------------- chat turns


@pytest.mark.parametrize("mode", list(MODES))
def test_first_turn_is_engine_generate_and_later_turns_prefill_only_what_is_new(eng, mode, gen, seed):
    n = 10
    system, turns = words(gen, 3), [words(gen) for _ in range(3)]
    session = eng.session(system=system, max_new_tokens=n, seed=seed, **MODES[mode])
    messages = [{"role": "system", "content": system}]
    fed = []
    hook = eng.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    try:
        for i, text in enumerate(turns):
            before, cached_before = session.tokens, session.cache.length
            messages.append({"role": "user", "content": text})
            ids = render(eng, messages)
            fed.clear()
            with Logits(eng.model) as rec:
                g = session.chat(text)
            fed_now = list(fed)
            if i == 0:  # the very path of Engine.generate: same tokens, same text
                ref = eng.generate(messages, max_new_tokens=n, seed=seed, **MODES[mode])
                assert (g.tokens, g.text) == (ref.tokens, ref.text), f"mode={mode}; seed={seed}"
            # only the tokens after the first difference from the cached context are prefilled
            keep = next((j for j, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
            start = min(keep, cached_before, len(ids) - 1)
            assert fed_now == [len(ids) - start] + [1] * (n - 1), f"turn {i}: fed {fed_now}; seed={seed}"
            assert g.stats.cached_tokens == start and g.stats.prompt_tokens == len(ids)
            if i > 0:  # the last turn's prompt is not prefilled again, bar its final "\n", which re-tokenizes
                # together with the answer's first characters when the answer starts with whitespace
                assert start >= len(render(eng, messages[:-2])) - 1, "the last turn's prompt was prefilled again"
            assert session.tokens == ids + g.tokens
            assert_matches_fresh(eng, ids, g.tokens, rec.rows, mode == "greedy", f"turn {i}; seed={seed}")
            messages.append({"role": "assistant", "content": g.text})
            assert session.messages == messages and session.last_generation is g
    finally:
        hook.remove()
    assert_cache_holds(eng, session)


def test_template_that_is_not_append_only(eng, gen, seed):
    """A template whose first line counts the messages: every turn differs from the cached context right
    there, so the cache is cut near the start and all after it is prefilled again, correctly."""
    t = eng.tokenizer
    counted = t.chat_template.replace("{{ bos_token }}", "{{ bos_token }}[{{ messages|length }} messages]\n", 1)
    assert counted != t.chat_template
    eng.tokenizer = Tokenizer(t.backend, special_tokens=t.special_tokens, chat_template=counted)
    eng.tokenizer.eos_token_ids = []
    session = eng.session(max_new_tokens=6, temperature=0)
    messages = []
    for i in range(3):
        messages.append({"role": "user", "content": words(gen)})
        ids = render(eng, messages)
        before = session.tokens
        with Logits(eng.model) as rec:
            g = session.chat(messages[-1]["content"])
        assert session.tokens == ids + g.tokens
        if i:
            assert g.stats.cached_tokens < len(before) and g.stats.cached_tokens == next(
                j for j, (a, b) in enumerate(zip(before, ids)) if a != b)
        assert_matches_fresh(eng, ids, g.tokens, rec.rows, True, f"turn {i}; seed={seed}")
        messages.append({"role": "assistant", "content": g.text})
    assert_cache_holds(eng, session)
    session.undo()  # the last turn overwrote almost the whole cache; undo writes it back
    assert session.messages == messages[:-2] and session.tokens == before
    assert_cache_holds(eng, session)


def test_answer_ended_by_eos_keeps_the_eos_in_the_context(eng, gen, seed):
    text = words(gen)
    free = eng.session(max_new_tokens=16, temperature=0).chat(text).tokens
    k = next((i for i in range(2, 16) if free[i] not in free[:i]), None)
    assert k is not None, f"greedy output repeats itself from the start: {free}; seed={seed}"
    eng.tokenizer.eos_token_ids = [free[k]]
    session = eng.session(max_new_tokens=16, temperature=0)
    g = session.chat(text)
    ids = render(eng, session.messages[:-1])
    assert g.finish_reason == "stop" and g.tokens == free[:k]
    assert session.tokens == ids + free[:k + 1] and session.cache.length == len(ids) + k  # eos: not fed yet
    assert_cache_holds(eng, session)


def test_system_prompt_change_cuts_the_cache_at_the_first_difference(eng, gen, seed):
    session = eng.session(system="Be brief.", max_new_tokens=5, temperature=0)
    session.chat(words(gen))
    session.system = "Answer in French, at length."
    text = words(gen)
    ids = render(eng, session.messages + [{"role": "user", "content": text}])
    assert ids[:5] == session.tokens[:5] and ids != session.tokens[:len(ids)]
    with Logits(eng.model) as rec:
        g = session.chat(text)
    assert 0 < g.stats.cached_tokens < 10  # bos and the system header survive; the rest is new
    assert session.messages[0] == {"role": "system", "content": "Answer in French, at length."}
    assert_matches_fresh(eng, ids, g.tokens, rec.rows, True, f"seed={seed}")
    session.system = None
    assert session.messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="system"):
        session.system = 5


def test_defaults_and_overrides(eng, gen, seed):
    session = eng.session(max_new_tokens=4, temperature=1.5, seed=seed, stop=["\u2603"])
    assert session.params == fachat.SamplingParams(max_new_tokens=4, temperature=1.5, seed=seed, stop=("\u2603",))
    assert len(session.chat(words(gen)).tokens) == 4
    g = session.chat(words(gen), max_new_tokens=7, temperature=0)
    assert len(g.tokens) == 7 and session.params.temperature == 1.5  # overrides are for that call only
    # a seed given to one call reseeds the session's RNG: two sessions agree from there on
    a, b = eng.session(max_new_tokens=6, temperature=2.0, seed=1), eng.session(max_new_tokens=6, temperature=2.0)
    text = words(gen)
    assert a.chat(text, seed=seed).tokens == b.chat(text, seed=seed).tokens
    assert a.chat(text).tokens == b.chat(text).tokens
    with pytest.raises(TypeError, match="temp"):
        session.chat("x", temp=1)
    with pytest.raises(ValueError, match="top_p"):
        session.chat("x", top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        eng.session(temperature=-1)
    with pytest.raises(ValueError, match="message"):
        session.chat(["not", "a", "str"])


def test_configure_changes_the_defaults_and_a_seed_reseeds_once(eng, gen, seed, tmp_path):
    """configure(...) then plain calls answer as calls given the same overrides do, the seed reseeding only
    the first; the settings stay for later calls and in the checkpoint; a bad setting changes nothing."""
    first, text, later = words(gen), words(gen), words(gen)
    settings = dict(max_new_tokens=5, temperature=1.3, top_k=30)
    a, b = eng.session(max_new_tokens=3, temperature=0), eng.session(max_new_tokens=3, temperature=0)
    a.chat(first)
    b.chat(first)
    a.configure(**settings, seed=seed)
    assert a.chat(text).tokens == b.chat(text, **settings, seed=seed).tokens, f"seed={seed}"
    assert a.chat(later).tokens == b.chat(later, **settings).tokens, f"seed={seed}"
    assert a.params == fachat.SamplingParams(**settings, seed=seed)
    a.save(tmp_path / "a.safetensors")
    assert eng.load_session(tmp_path / "a.safetensors").params == a.params
    with pytest.raises(ValueError, match="top_p"):
        a.configure(top_p=0)
    assert a.params == fachat.SamplingParams(**settings, seed=seed)


def test_context_full_raises_and_changes_nothing(tiny_llama, gen, seed):
    eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32", max_seq_len=64)
    eng.tokenizer.eos_token_ids = []
    session = eng.session(max_new_tokens=100, temperature=0)
    g = session.chat(words(gen))
    assert g.finish_reason == "length" and len(session.tokens) == 64  # prompt + answer fill the context
    before, cached = session.tokens, session.cache.length
    with pytest.raises(fachat.ContextLengthError, match="max_seq_len"):
        session.chat(words(gen))
    with pytest.raises(fachat.ContextLengthError):
        session.generate()
    assert session.tokens == before and session.cache.length == cached and len(session.messages) == 2
    session.undo()
    assert session.tokens == [] and session.messages == []


# ---------------------------------------------------------------- streams that end early


def test_closed_stream_keeps_the_partial_answer_and_an_unstarted_one_changes_nothing(eng, gen, seed):
    n = 40
    session = eng.session(max_new_tokens=n, temperature=1.0, seed=seed)
    session.chat(words(gen))
    tokens, messages = session.tokens, session.messages
    unstarted = session.stream_chat(words(gen))
    session.append([5, 6, 7])  # ends the unstarted stream: it never ran
    assert session.tokens == tokens + [5, 6, 7] and session.messages == messages
    with pytest.raises(StopIteration):
        next(unstarted)
    text = words(gen)
    stream = session.stream_chat(text)
    piece = next(stream)  # random weights emit much invalid UTF-8, held back: a piece may take some tokens
    stream.close()
    g = stream.generation
    assert g.finish_reason == "interrupted" and g.text.startswith(piece) and 0 < len(g.tokens) < n, f"seed={seed}"
    assert session.messages[-2:] == [{"role": "user", "content": text}, {"role": "assistant", "content": g.text}]
    assert session.tokens[-len(g.tokens):] == g.tokens
    assert_cache_holds(eng, session)
    # a stream left open (a KeyboardInterrupt in the loop over it) is ended by the next call
    stream = session.stream_chat(words(gen))
    next(stream)
    n = len(session.messages)
    session.freeze()
    assert len(session.messages) == n + 2 and stream.generation.finish_reason == "interrupted"


@pytest.mark.parametrize("where,phase", [("layer", "prefill"), ("layer", "decode"), ("logits", "prefill"),
                                         ("logits", "decode"), ("consumer", "decode")])
def test_keyboard_interrupt_anywhere_keeps_the_session_consistent(eng, where, phase, gen, seed):
    """Ctrl-C inside a random forward of an answer (prefill included), or in the loop over the stream:
    at most one token is uncached, the cache is exact, the partial answer joins the conversation, the
    tokens so far are the uninterrupted run's, and the next chat matches a fresh engine."""
    n = 12
    session = eng.session(system=words(gen, 2), max_new_tokens=n, temperature=0)
    session.chat(words(gen))
    unbroken = session.fork()
    text = words(gen)
    pieces = len(list(unbroken.stream_chat(text)))
    full = unbroken.last_generation.tokens
    # model forward number `call` of the answer (1 is the prefill), or the stream's piece number `call`
    if where == "consumer":
        call = randint(gen, 1, max(pieces - 1, 1))
    else:
        call = 1 if phase == "prefill" else randint(gen, 2, n)
    stream = session.stream_chat(text)
    if where == "consumer":
        with pytest.raises(KeyboardInterrupt):
            for i, _ in enumerate(stream):
                if i + 1 == call:
                    raise KeyboardInterrupt
        stream.close()  # what a CLI does after catching it
    else:
        site = eng.model.model.layers[randint(gen, 0, 1)] if where == "layer" else eng.model
        with InterruptAt(eng.model, site, call) as interrupt, pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
        assert interrupt.fired
    label = f"{where} at forward {call}; seed={seed}"
    assert_cache_holds(eng, session, label)
    g = stream.generation
    assert g.finish_reason == "interrupted" and len(g.tokens) <= n, label
    assert session.messages[-1] == {"role": "assistant", "content": g.text}, label
    assert g.tokens == full[:len(g.tokens)], label
    answer = session.tokens[len(session.tokens) - len(g.tokens):] if g.tokens else []
    assert answer == g.tokens, label
    # the conversation goes on, and matches a fresh engine on the same tokens
    text = words(gen)
    ids = render(eng, session.messages + [{"role": "user", "content": text}])
    with Logits(eng.model) as rec:
        g = session.chat(text)
    assert session.tokens == ids + g.tokens
    assert_matches_fresh(eng, ids, g.tokens, rec.rows, True, label)
    assert_cache_holds(eng, session, label)


# ---------------------------------------------------------------- exact continuation


@pytest.mark.parametrize("how", ["freeze", "interrupt"])
@pytest.mark.parametrize("mode", list(MODES))
def test_raw_generation_interrupted_at_a_random_step_continues_exactly(eng, mode, how, gen, seed):
    """Stop after a random number of tokens, by freeze -> unfreeze into another session, or by a
    KeyboardInterrupt inside a random forward; continue: tokens and every logit equal the unbroken run's."""
    n, prompt = 24, random_prompt(eng, gen)
    whole = eng.session(max_new_tokens=n, seed=seed, **MODES[mode])
    whole.append(prompt)
    with Logits(eng.model) as ref:
        whole.generate()
    k = randint(gen, 0, n - 1)
    part = eng.session(max_new_tokens=n, seed=seed, **MODES[mode])
    part.append(prompt)
    with Logits(eng.model) as before:
        if how == "freeze":
            if k:
                part.generate(max_new_tokens=k)
            snapshot = part.freeze()
            part.generate(max_new_tokens=3)  # moves on; the snapshot is unaffected
            other = eng.session(max_new_tokens=1, temperature=0.3)  # unfreeze restores settings and RNG too
            other.unfreeze(snapshot)
            del before.rows[k:]
        else:
            with InterruptAt(eng.model, interrupt_site(eng, gen), k + 1), pytest.raises(KeyboardInterrupt):
                part.generate()
            other = part
    label = f"mode={mode} {how} after {k} tokens; seed={seed}"
    assert_cache_holds(eng, other, label)
    assert other.params == whole.params and len(other.tokens) - len(prompt) == k, label
    with Logits(eng.model) as after:
        other.generate(max_new_tokens=n - k)
    assert other.tokens == whole.tokens, label
    assert_exact(before.rows + after.rows, ref.rows, label)


@pytest.mark.parametrize("mode", list(MODES))
def test_two_halves_equal_one_go(eng, mode, gen, seed):
    """A chat answer cut at a random length, then continued with generate: Engine.generate's tokens and
    logits, bit for bit."""
    n = 20
    messages = [{"role": "user", "content": words(gen)}]
    with Logits(eng.model) as ref:
        one = eng.generate(messages, max_new_tokens=n, seed=seed, **MODES[mode])
    k = randint(gen, 1, n - 1)
    session = eng.session(max_new_tokens=n, seed=seed, **MODES[mode])
    with Logits(eng.model) as rec:
        first = session.chat(messages[0]["content"], max_new_tokens=k)
        second = session.generate(max_new_tokens=n - k)
    assert first.tokens + second.tokens == one.tokens, f"mode={mode} k={k}; seed={seed}"
    assert_exact(rec.rows, ref.rows, f"mode={mode} k={k}; seed={seed}")
    # only the pending token was fed
    assert second.stats.prompt_tokens - 1 == second.stats.cached_tokens == first.stats.prompt_tokens + k - 1


def test_chat_frozen_between_turns_continues_exactly(eng, gen, seed):
    turns = [words(gen) for _ in range(4)]
    params = dict(max_new_tokens=8, seed=seed, **MODES["penalty"])
    whole = eng.session(system=words(gen, 3), **params)
    with Logits(eng.model) as ref:
        for t in turns:
            whole.chat(t)
    j = randint(gen, 0, len(turns) - 1)
    part = eng.session(system=whole.system, **params)
    with Logits(eng.model) as rec:
        for t in turns[:j]:
            part.chat(t)
        snapshot = part.freeze()
        part.chat("something else")
        part.unfreeze(snapshot)
        del rec.rows[-8:]
        for t in turns[j:]:
            part.chat(t)
    assert part.tokens == whole.tokens and part.messages == whole.messages, f"j={j}; seed={seed}"
    assert_exact(rec.rows, ref.rows, f"j={j}; seed={seed}")


def test_repetition_penalty_counts_the_whole_context(eng, gen, seed, monkeypatch):
    """At every draw the penalised tokens are exactly the context's (prompt, earlier turns, the answer so
    far), also in a call that continues a previous one and after unfreeze into another session."""
    checks, current = [], []
    real = Sampler.__call__

    def checking_call(self, logits):
        checks.append(set(self.seen[0].nonzero().flatten().tolist()) == set(current[-1].tokens))
        return real(self, logits)

    monkeypatch.setattr(Sampler, "__call__", checking_call)
    session = eng.session(max_new_tokens=5, temperature=0.7, repetition_penalty=1.3, seed=seed)
    current.append(session)
    session.chat(words(gen))
    session.chat(words(gen))
    session.append(random_prompt(eng, gen)[1:])
    session.generate()
    session.generate(max_new_tokens=2)
    other = eng.session()
    other.unfreeze(session.freeze())
    current.append(other)
    other.generate()
    assert len(checks) == 5 + 5 + 5 + 2 + 5 and all(checks), f"{checks}; seed={seed}"


# ---------------------------------------------------------------- undo, reset


def test_undo_puts_back_exactly_the_state_before_the_turn(eng, gen, seed):
    session = eng.session(system=words(gen, 2), max_new_tokens=7, temperature=1.0, seed=seed)
    session.chat(words(gen))
    before = session.freeze()
    session.chat(words(gen))
    session.chat(words(gen))
    session.undo()
    session.undo()
    assert session.tokens == list(before.tokens) and session.messages[1:] == [
        {"role": r, "content": c} for r, c in before.conversation]
    assert session.cache.length == before.keys[0].shape[2]
    for k, v, k0, v0 in zip(*session.cache.state, before.keys, before.values):
        assert torch.equal(k, k0) and torch.equal(v, v0)  # written back, not recomputed
    # and an undone-then-repeated turn is the turn an unbroken session would have had
    text = words(gen)
    twin = eng.session()
    twin.unfreeze(before)
    assert session.chat(text, seed=seed).tokens == twin.chat(text, seed=seed).tokens
    assert session.tokens == twin.tokens
    session.undo()
    session.undo()
    assert session.messages == [{"role": "system", "content": session.system}] and session.tokens == []
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()


def test_undo_after_an_interrupted_turn(eng, gen, seed):
    session = eng.session(max_new_tokens=10, temperature=0)
    session.chat(words(gen))
    before = session.tokens
    with InterruptAt(eng.model, interrupt_site(eng, gen), randint(gen, 1, 10)), pytest.raises(KeyboardInterrupt):
        session.chat(words(gen))
    session.undo()
    assert session.tokens == before and len(session.messages) == 2
    assert_cache_holds(eng, session)


def test_reset_keeps_the_system_prompt_and_answers_as_a_new_session(eng, gen, seed):
    system = words(gen, 8)
    session = eng.session(system=system, max_new_tokens=6, temperature=1.0, seed=seed)
    session.chat(words(gen))
    session.chat(words(gen))
    session.reset()
    assert session.messages == [{"role": "system", "content": system}]
    prefix = eng.tokenizer.apply_chat_template(session.messages, add_generation_prompt=False)
    assert session.tokens == prefix and session.cache.length == len(prefix)  # the system prompt's K/V stay
    assert_cache_holds(eng, session)
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    # reseeded: it answers as a new session does (the same draws; logits equal to rounding)
    text = words(gen)
    fresh = eng.session(system=system, max_new_tokens=6, temperature=1.0, seed=seed)
    with Logits(eng.model) as rec:
        g = session.chat(text)
    assert g.tokens == fresh.chat(text).tokens and g.stats.cached_tokens == len(prefix), f"seed={seed}"
    assert_matches_fresh(eng, render(eng, session.messages[:-1]), g.tokens, rec.rows, False, f"seed={seed}")
    empty = eng.session()
    empty.reset()  # nothing to clear
    assert empty.tokens == [] and empty.messages == []


# ---------------------------------------------------------------- append / generate


def test_append_and_generate(eng, gen, seed):
    session = eng.session(max_new_tokens=5, temperature=0)
    with pytest.raises(ValueError, match="empty"):
        session.generate()
    session.append("the quick fox")
    assert session.tokens == eng.encode_prompt("the quick fox")  # bos at the start, as generate adds it
    assert session.cache.length == len(session.tokens) - 1  # the last token waits for generate
    session.append(" jumps")
    assert session.tokens[-len(eng.tokenizer.encode(" jumps")):] == eng.tokenizer.encode(" jumps")
    ids = random_prompt(eng, gen)[1:]
    session.append(torch.tensor(ids))
    g = session.generate()
    assert session.tokens[-5 - len(ids):] == ids + g.tokens and session.messages == []
    assert_cache_holds(eng, session)
    for bad, match in (([], "empty"), ("", "empty"), ([eng.args.vocab_size], "token ids"), (5, "append"),
                       ([1.5], "token ids")):
        with pytest.raises(ValueError, match=match):
            session.append(bad)
    with pytest.raises(fachat.ContextLengthError):
        session.append([5] * eng.max_seq_len)
    assert_cache_holds(eng, session)


# ---------------------------------------------------------------- freeze, fork


def test_fork_is_independent_and_never_aliases(eng, gen, seed):
    session = eng.session(system=words(gen, 2), max_new_tokens=6, temperature=1.0, seed=seed)
    session.chat(words(gen))
    child = session.fork()
    assert child.tokens == session.tokens and child.messages == session.messages
    parent_ptrs = {t.untyped_storage().data_ptr() for t in session.cache.k + session.cache.v}
    assert not parent_ptrs & {t.untyped_storage().data_ptr() for t in child.cache.k + child.cache.v}
    text = words(gen)
    with Logits(eng.model) as a:
        ga = session.chat(text)
    frozen = session.freeze()
    with Logits(eng.model) as b:
        gb = child.chat(text)  # same state, same RNG: the same answer, bit for bit
    assert ga.tokens == gb.tokens
    assert_exact(b.rows, a.rows, f"seed={seed}")
    child.chat(words(gen))
    child.cache.k[0].fill_(7.0)  # scribble over the child's buffers
    child.cache.v[-1].fill_(-7.0)
    assert session.tokens == list(frozen.tokens)
    for k, v, k0, v0 in zip(*session.cache.state, frozen.keys, frozen.values):
        assert torch.equal(k, k0) and torch.equal(v, v0), "the fork's writes reached the parent"
    assert_cache_holds(eng, session)


def test_snapshot_and_fork_cost_the_context_not_the_capacity(tiny_llama, gen, seed, monkeypatch):
    prompt = [1] + torch.randint(3, 300, (randint(gen, 20, 60),), generator=gen).tolist()
    held, copied = [], []
    real_write = InPlaceKVCache.write

    def counting_write(self, layer, start, k, v):
        copied[-1] += k.nbytes + v.nbytes
        return real_write(self, layer, start, k, v)

    monkeypatch.setattr(InPlaceKVCache, "write", counting_write)
    for max_seq_len in (128, 512):
        eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32", max_seq_len=max_seq_len)
        session = eng.session(max_new_tokens=4, temperature=0)
        copied.append(0)
        session.append(prompt)
        session.generate()
        live = session.cache.live_nbytes
        assert session.cache.capacity == max_seq_len and live < session.cache.nbytes
        snapshot = session.freeze()
        assert snapshot.nbytes == live
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in snapshot.keys + snapshot.values)
        copied[-1] = 0
        session.fork()
        assert copied[-1] == live, f"fork copied {copied[-1]} bytes for {live} live; seed={seed}"
        copied[-1] = 0
        session.unfreeze(snapshot)
        assert copied[-1] == live
        held.append(snapshot.nbytes)
    assert held[0] == held[1]


def test_unfreeze_rejects_foreign_snapshots(eng, tiny_llama):
    other = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    snapshot = other.session().freeze()
    with pytest.raises(ValueError, match="another engine"):
        eng.session().unfreeze(snapshot)
    with pytest.raises(ValueError, match="Snapshot"):
        eng.session().unfreeze({"tokens": []})


# ---------------------------------------------------------------- after the cache grows
# Without max_seq_len the cache starts at 256 positions and doubles, inside the model's forward, when full.
# Every operation must work on grown buffers: before growth, and after one and two doublings.


@pytest.fixture(scope="module")
def long_dir(tiny_llama, tmp_path_factory):
    """The tiny llama with max_position_embeddings 2048 (same weights): room for two doublings, 256 -> 1024."""
    path = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(tiny_llama[0], path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def long_eng(long_dir):
    """A fresh engine of it, loaded without max_seq_len (its cache grows) and without eos."""
    eng = fachat.Engine.load(long_dir, device="cpu", dtype="float32")
    eng.tokenizer.eos_token_ids = []
    return eng


def long_message(session, gen, target) -> str:
    """Random words, the fewest that make the prompt of a chat turn with them at least `target` tokens."""
    pool = words(gen, target).split(" ")  # every word is at least one token: these suffice

    def prompt(k):
        return len(render(session.engine, session.messages + [{"role": "user", "content": " ".join(pool[:k])}]))

    return " ".join(pool[:bisect.bisect_left(range(len(pool) + 1), target, key=prompt)])


def replay(session, turns) -> list[list[torch.Tensor]]:
    """Chats the turns, (message, answer length) each; returns each turn's logits rows."""
    rows = []
    for text, n in turns:
        with Logits(session.engine.model) as rec:
            session.chat(text, max_new_tokens=n)
        rows.append(rec.rows)
    return rows


def chat_growing(session, gen):
    """Four chat turns, long messages and short answers, whose contexts end below 256 positions, past 256, past 512,
    and a little later: the cache's growths are checked to be 0, 1, 2, 2. Returns the turns (message, answer length)
    for other sessions to replay, the snapshots frozen before each, and each one's logits rows."""
    turns, before, rows = [], [], []
    for target, growths in ((randint(gen, 100, 200), 0), (randint(gen, 270, 450), 1), (randint(gen, 530, 700), 2),
                            (None, 2)):
        text = words(gen) if target is None else long_message(session, gen, target)
        turns.append((text, randint(gen, 5, 15)))
        before.append(session.freeze())
        rows += replay(session, turns[-1:])
        assert session.cache.growths == growths, f"{len(session.tokens)} tokens, {session.cache.capacity} positions"
    assert session.cache.capacity == 1024
    return turns, before, rows


def assert_state(session, snapshot, label="", rng=False):
    """The session holds exactly the frozen state: tokens, messages, undo history and the K/V bit for bit; with
    rng, the sampling arguments and the RNG state too (undo does not rewind them)."""
    now = session.freeze()
    assert now.tokens == snapshot.tokens and now.conversation == snapshot.conversation, label
    assert now.system == snapshot.system and session.cache.length == snapshot.keys[0].shape[2], label
    assert [(t.messages, t.start, t.tokens, t.kv) for t in now.turns] == [
        (t.messages, t.start, t.tokens, t.kv) for t in snapshot.turns], label
    assert all(torch.equal(x, y) for x, y in zip(now.keys + now.values, snapshot.keys + snapshot.values)), label
    if rng:
        assert now.params == snapshot.params and torch.equal(now.rng_state, snapshot.rng_state), label


def test_undo_after_the_cache_grew_writes_back_every_turn(long_eng, gen, seed):
    eng = long_eng
    session = eng.session(system=words(gen, 3), seed=seed, **MODES["sampled"])
    turns, before, _ = chat_growing(session, gen)
    snapshot = session.freeze()
    state = session.cache.k + session.cache.v + [t for turn in snapshot.turns for t in turn.keys + turn.values]
    assert not any(t.is_inference() for t in state + list(snapshot.keys + snapshot.values)), "grown in inference mode"
    for k in reversed(range(4)):  # turns ended 2 doublings in, then 1, then none
        session.undo()
        assert_state(session, before[k], f"undo of turn {k}; seed={seed}")
    assert session.tokens == [] and session.cache.capacity == 1024
    # asked again (new draws: undo does not rewind the RNG), past 512 into the grown buffers: as a fresh engine computes
    for k, (text, n) in enumerate(turns):
        ids = render(eng, session.messages + [{"role": "user", "content": text}])
        again = session.freeze()
        with Logits(eng.model) as rec:
            g = session.chat(text, max_new_tokens=n)
        assert_matches_fresh(eng, ids, g.tokens, rec.rows, False, f"turn {k} again; seed={seed}")
    session.undo()
    assert_state(session, again, f"seed={seed}")
    assert_cache_holds(eng, session, f"seed={seed}")


def test_unfreeze_after_the_cache_grew_continues_exactly(long_eng, gen, seed):
    """Unfrozen at the start of each turn (empty, then 0, 1 and 2 doublings in), into the grown session itself and
    into a fresh one, whose cache grows in unfreeze: the state exactly, then the uninterrupted run's tokens and
    logits, bit for bit."""
    eng = long_eng
    params = dict(system=words(gen, 3), seed=seed, **MODES["penalty"])
    whole = eng.session(**params)
    turns, before, rows = chat_growing(whole, gen)
    final = whole.freeze()
    for k in range(4):
        small = eng.session(max_new_tokens=2, temperature=0)
        small.chat(words(gen))
        for name, session in (("grown", whole), ("small", small)):
            label = f"{name} session, from turn {k}; seed={seed}"
            session.unfreeze(before[k])
            assert_state(session, before[k], label, rng=True)
            if name == "small":
                assert session.cache.growths == (k >= 2), label  # past 256 positions: it grew in unfreeze
            assert_exact(sum(replay(session, turns[k:]), []), sum(rows[k:], []), label)
            assert_state(session, final, label, rng=True)
            session.undo()  # in the buffers grown by unfreeze or by the turns
            assert_state(session, before[3], label)


def test_fork_after_the_cache_grew_is_exact_and_independent(long_eng, gen, seed):
    """Forked at the start of each turn: the child answers as the parent does, bit for bit, in buffers of its own
    that grow as it goes; its undo and its writes never touch the parent."""
    eng = long_eng
    params = dict(system=words(gen, 3), seed=seed, **MODES["sampled"])
    turns, before, rows = chat_growing(eng.session(**params), gen)
    parent = eng.session(**params)
    for k, turn in enumerate(turns):
        label = f"forked at turn {k}; seed={seed}"
        child = parent.fork()
        assert_state(child, before[k], label, rng=True)
        assert_exact(replay(child, [turn])[0], rows[k], label)
        assert_exact(replay(parent, [turn])[0], rows[k], label)
        after = parent.freeze()
        assert_state(child, after, label, rng=True)
        child.undo()
        assert_state(child, before[k], label)
        child.cache.k[0].fill_(7.0)
        child.cache.v[-1].fill_(-7.0)
        assert_state(parent, after, label, rng=True)


def test_reset_after_the_cache_grew_then_undo(long_eng, gen, seed):
    """Reset before growth, after one doubling and after two: the system prompt's K/V stay, the session answers as a
    new one does, and undo takes that answer back."""
    eng = long_eng
    system = words(gen, 8)
    params = dict(system=system, seed=seed, **MODES["sampled"])
    turns, _, _ = chat_growing(eng.session(**params), gen)
    prefix = eng.tokenizer.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    for k, growths in enumerate((0, 1, 2)):
        label = f"reset after turn {k}; seed={seed}"
        session = eng.session(**params)
        replay(session, turns[:k + 1])
        assert session.cache.growths == growths, label
        session.reset()
        assert session.tokens == prefix and session.cache.length == len(prefix), label
        cleared = session.freeze()
        text = words(gen)
        with Logits(eng.model) as rec:
            g = session.chat(text, max_new_tokens=10)
        assert g.tokens == eng.session(**params).chat(text, max_new_tokens=10).tokens, label
        assert_matches_fresh(eng, render(eng, session.messages[:-1]), g.tokens, rec.rows, False, label)
        session.undo()
        assert_state(session, cleared, label)
        assert_cache_holds(eng, session, label)


def test_save_and_load_after_the_cache_grew(long_eng, gen, seed, tmp_path):
    """Saved at the start of each turn (empty, then 0, 1 and 2 doublings in) and once all have grown: the loaded
    session is the saved state, answers as it did, bit for bit, and undoes every turn, its cache growing as it goes."""
    eng = long_eng
    params = dict(system=words(gen, 3), seed=seed, **MODES["penalty"])
    session = eng.session(**params)
    turns, before, rows = chat_growing(session, gen)
    replaying = eng.session(**params)
    for k, turn in enumerate(turns):
        label = f"saved at turn {k}; seed={seed}"
        replaying.save(tmp_path / f"{k}.safetensors")
        replay(replaying, [turn])
        loaded = eng.load_session(tmp_path / f"{k}.safetensors")
        assert_state(loaded, before[k], label, rng=True)
        assert_exact(replay(loaded, [turn])[0], rows[k], label)
        assert_state(loaded, replaying.freeze(), label, rng=True)
        loaded.undo()
        assert_state(loaded, before[k], label)
    session.save(tmp_path / "grown.safetensors")
    loaded = eng.load_session(tmp_path / "grown.safetensors")
    assert_state(loaded, session.freeze(), f"seed={seed}", rng=True)
    for k in reversed(range(4)):
        for s in (session, loaded):
            s.undo()
            assert_state(s, before[k], f"undo of turn {k}; seed={seed}")


@pytest.mark.parametrize("op", ["undo", "unfreeze"])
def test_a_failed_undo_or_unfreeze_changes_nothing(long_eng, op, gen, seed, monkeypatch):
    """The cache must grow inside undo (in a fork whose cache fits a short context, undoing a turn that cut a long
    one) or unfreeze (of a long context into a short session). When an allocation of that growth fails, after a
    random number of buffers, the session is exactly as it was; a KeyboardInterrupt while the K/V are copied leaves it
    consistent; the call made again gives the state it should."""
    eng = long_eng
    layers = eng.args.num_hidden_layers
    session = eng.session(system=words(gen, 200), seed=seed, **MODES["sampled"])
    session.chat(words(gen), max_new_tokens=5)  # past 256 positions, most of them the system prompt
    if op == "undo":
        session.system = words(gen, 3)  # the next turn cuts the cache near its start, to a short context
        session.chat(words(gen), max_new_tokens=5)
        target = session.fork()
        session.undo()
        expected, call = session.freeze(), target.undo
    else:
        target = eng.session(seed=seed)
        target.chat(words(gen), max_new_tokens=5)
        expected = session.freeze()

        def call():
            target.unfreeze(expected)
    before, cache = target.freeze(), target.cache
    grown = (cache.capacity, cache.growths)
    assert cache.capacity < len(expected.tokens), "the call would not grow the cache"
    fail_after = randint(gen, 0, 2 * layers - 1)
    error = (MemoryError, torch.OutOfMemoryError)[randint(gen, 0, 1)]
    label = f"{op}: {error.__name__} after {fail_after} buffers; seed={seed}"
    with failing_call(monkeypatch, InPlaceKVCache, "_regrow", fail_after + 1, error("injected")), \
            pytest.raises(error, match="injected"):
        call()
    assert_state(target, before, label, rng=True)
    assert (cache.capacity, cache.growths) == grown, label
    at = randint(gen, 1, layers)
    with failing_call(monkeypatch, InPlaceKVCache, "write", at, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        call()
    label = f"{op}: interrupted at layer {at - 1}; seed={seed}"
    assert len(target.tokens) <= len(before.tokens), label
    assert_cache_holds(eng, target, label)
    call()
    assert_state(target, expected, label, rng=True)
    assert_cache_holds(eng, target, label)

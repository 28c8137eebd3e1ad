"""Engine API on a tiny model: generate / stream / score, eos and stop strings, seeds, prompt forms,
the sampler's filters against a float64 reference, and incremental detokenizing."""
from __future__ import annotations

import math

import pytest
import torch

import fachat
from fachat.engine.sampling import Sampler, SamplingParams
from fachat.models.tokenizer import Tokenizer

from conftest import derive_seed

CPU = torch.device("cpu")


def random_ids(gen, n, vocab):
    return [1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist()


def backend_tokenizer(path):
    from tokenizers import Tokenizer as Backend

    return Backend.from_file(str(path / "tokenizer.json"))


def greedy_reference(peer, prompt, n):
    """Greedy continuation by the transformers peer, one full forward per token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(peer(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------- generate / stream / score


def test_generate_result_fields(llama_engine, tiny_llama, gen, seed):
    path, peer = tiny_llama
    eng = llama_engine
    eng.tokenizer.eos_token_ids = []
    prompt = random_ids(gen, 9, eng.args.vocab_size)
    g = eng.generate(prompt, max_new_tokens=12, temperature=0)
    assert isinstance(g, fachat.Generation) and isinstance(g.stats, fachat.GenerationStats)
    assert g.tokens == greedy_reference(peer, prompt, 12), f"seed={seed}"  # new tokens only, no prompt
    assert g.finish_reason == "length"
    assert g.text == backend_tokenizer(path).decode(g.tokens)
    assert (g.stats.prompt_tokens, g.stats.new_tokens) == (9, 12)
    assert g.stats.time_to_first_token > 0 and g.stats.prefill_tokens_per_s > 0 and g.stats.decode_tokens_per_s > 0


def test_eos_stops_before_the_eos_token(llama_engine, gen, seed):
    eng = llama_engine
    eng.tokenizer.eos_token_ids = []
    prompt = random_ids(gen, 7, eng.args.vocab_size)
    free = eng.generate(prompt, max_new_tokens=32, temperature=0).tokens
    k = next((i for i in range(3, 32) if free[i] not in free[:i]), None)
    assert k is not None, f"greedy output repeats itself from the start: {free}; seed={seed}"
    eng.tokenizer.eos_token_ids = [free[k]]
    g = eng.generate(prompt, max_new_tokens=32, temperature=0)
    assert g.tokens == free[:k] and free[k] not in g.tokens, f"k={k}; seed={seed}"
    assert g.finish_reason == "stop" and g.stats.new_tokens == k
    assert g.text == eng.tokenizer.decode(free[:k])
    # eos as the very first token: empty result
    eng.tokenizer.eos_token_ids = [free[0], 12345]
    g = eng.generate(prompt, max_new_tokens=32, temperature=0)
    assert (g.tokens, g.text, g.finish_reason) == ([], "", "stop")
    # the model's own eos ids come from config/generation_config
    assert fachat.Engine.load(eng.source, device="cpu").tokenizer.eos_token_ids == [2]


def test_stream_matches_generate(llama_engine, gen, seed):
    eng = llama_engine
    eng.tokenizer.eos_token_ids = []
    prompt = random_ids(gen, 5, eng.args.vocab_size)
    stream = eng.stream(prompt, max_new_tokens=24, temperature=1.0, seed=seed)
    assert stream.generation.finish_reason is None
    pieces = list(stream)
    g = eng.generate(prompt, max_new_tokens=24, temperature=1.0, seed=seed)
    assert "".join(pieces) == g.text == stream.generation.text, f"seed={seed}"
    assert all(pieces), "empty piece yielded"
    assert stream.generation.tokens == g.tokens and len(g.tokens) == 24
    assert stream.generation.finish_reason == "length" and stream.generation.stats.new_tokens == 24


def test_seeds(llama_engine, gen, seed):
    eng = llama_engine
    eng.tokenizer.eos_token_ids = []
    prompt = random_ids(gen, 5, eng.args.vocab_size)
    s = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    state = torch.get_rng_state()
    a = eng.generate(prompt, max_new_tokens=32, temperature=2.0, seed=s).tokens
    b = eng.generate(prompt, max_new_tokens=32, temperature=2.0, seed=s).tokens
    c = eng.generate(prompt, max_new_tokens=32, temperature=2.0, seed=s + 1).tokens
    assert torch.equal(torch.get_rng_state(), state), "generate with a seed changed the global RNG"
    assert a == b, f"same seed {s}, different tokens"
    assert a != c, f"seeds {s} and {s + 1} gave the same 32 tokens"
    # no seed: fresh entropy each call, and the global RNG still untouched
    d = eng.generate(prompt, max_new_tokens=32, temperature=2.0).tokens
    e = eng.generate(prompt, max_new_tokens=32, temperature=2.0).tokens
    assert torch.equal(torch.get_rng_state(), state), "generate without a seed changed the global RNG"
    assert d != e, "two unseeded generations gave the same 32 tokens"
    # ... and does not depend on the global RNG either
    torch.manual_seed(seed)
    f = eng.generate(prompt, max_new_tokens=32, temperature=2.0).tokens
    torch.manual_seed(seed)
    assert eng.generate(prompt, max_new_tokens=32, temperature=2.0).tokens != f


def _stop_candidates(text, length):
    """Start offsets of substrings of text free of U+FFFD (random weights emit many invalid bytes)."""
    return [i for i in range(3, len(text) - length) if "\ufffd" not in text[i:i + length]]


def _greedy_with_stops(eng, gen, lengths, n=40):
    """A random prompt, its greedy text and tokens, and one random stop string per length taken from
    that text. Prompts are redrawn until every length has a candidate."""
    eng.tokenizer.eos_token_ids = []
    for _ in range(50):
        prompt = random_ids(gen, 6, eng.args.vocab_size)
        g = eng.generate(prompt, max_new_tokens=n, temperature=0)
        starts = [_stop_candidates(g.text, k) for k in lengths]
        if all(starts):
            picks = [c[int(torch.randint(0, len(c), (1,), generator=gen))] for c in starts]
            stops = [g.text[i:i + k] for i, k in zip(picks, lengths)]
            return prompt, g.text, g.tokens, stops
    raise AssertionError("50 greedy continuations without a usable stop string")


@pytest.mark.parametrize("stop_len", [1, 3, 6])
def test_stop_string(llama_engine, gen, seed, stop_len):
    eng = llama_engine
    prompt, full, full_tokens, (stop,) = _greedy_with_stops(eng, gen, [stop_len])
    expected = full[:full.find(stop)]
    stream = eng.stream(prompt, max_new_tokens=40, temperature=0, stop=stop)
    pieces = list(stream)
    g = stream.generation
    assert g.finish_reason == "stop", f"stop={stop!r}; seed={seed}"
    assert g.text == expected, f"stop={stop!r}; seed={seed}"
    assert "".join(pieces) == expected, f"streamed text leaks the stop string {stop!r}: {pieces}; seed={seed}"
    # tokens are the greedy ones up to and including the first token whose text completes the stop string
    first = next(n for n in range(1, len(full_tokens) + 1) if stop in eng.tokenizer.decode(full_tokens[:n]))
    assert g.tokens == full_tokens[:first], f"stop={stop!r}; seed={seed}"
    assert eng.generate(prompt, max_new_tokens=40, temperature=0, stop=[stop]).text == expected


def test_several_stop_strings_earliest_wins(llama_engine, gen, seed):
    """Two stop strings, one completed well before the other starts: the text is cut at the first."""
    eng = llama_engine
    for _ in range(50):
        prompt, full, _, (a, b) = _greedy_with_stops(eng, gen, [2, 4])
        if full.find(a) + len(a) <= full.find(b) or full.find(b) + len(b) <= full.find(a):
            break
    else:
        raise AssertionError(f"no non-overlapping stop strings found; seed={seed}")
    cut = min(full.find(a), full.find(b))
    g = eng.generate(prompt, max_new_tokens=40, temperature=0, stop=[b, a])
    assert g.text == full[:cut] and g.finish_reason == "stop", f"stops={[a, b]!r}; seed={seed}"


def test_held_back_stop_prefix_is_released(llama_engine, gen, seed):
    """Text that starts a stop string but never completes it is held back, then emitted in full."""
    eng = llama_engine
    prompt, full, _, (start,) = _greedy_with_stops(eng, gen, [3])
    stop = start + "\u2603\u2603\u2603"  # never generated by this tiny model
    assert stop not in full
    stream = eng.stream(prompt, max_new_tokens=40, temperature=0, stop=[stop, "\u2604"])
    pieces = list(stream)
    assert "".join(pieces) == full == stream.generation.text, f"stop={stop!r}; seed={seed}"
    assert stream.generation.finish_reason == "length"


def test_prompt_forms(llama_engine, tiny_llama, gen, seed):
    from transformers import AutoTokenizer

    path, _ = tiny_llama
    eng = llama_engine
    eng.tokenizer.eos_token_ids = []
    backend = backend_tokenizer(path)
    words = ["the", "quick", "fox", "日本語", "🙂", "return", "{'a':", "Héllo", "\t", "  ", "count:", "42"]
    picks = torch.randint(0, len(words), (12,), generator=gen).tolist()
    text = " ".join(words[i] for i in picks)
    # str: raw text, bos added by the tokenizer's post-processor
    ids = eng.encode_prompt(text)
    assert ids == backend.encode(text).ids and ids[0] == 1
    assert ids[1:] == backend.encode(text, add_special_tokens=False).ids
    # chat messages: the template, as transformers renders and tokenizes it
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text},
                {"role": "assistant", "content": text[::-1]}, {"role": "user", "content": "again"}]
    hf = AutoTokenizer.from_pretrained(str(path))
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if not isinstance(expected, list) else expected)
    chat_ids = eng.encode_prompt(messages)
    assert chat_ids == expected, f"text={text!r}"
    assert chat_ids.count(1) == 1  # one bos, from the template
    # token ids: used as given (list, tuple or tensor)
    raw = random_ids(gen, 8, eng.args.vocab_size)
    assert eng.encode_prompt(raw) == raw == eng.encode_prompt(tuple(raw)) == eng.encode_prompt(torch.tensor(raw))
    # each form generates what its ids generate
    for prompt, prompt_ids in ((text, ids), (messages, chat_ids), (tuple(raw), raw)):
        assert eng.generate(prompt, max_new_tokens=6, temperature=0).tokens == \
            eng.generate(prompt_ids, max_new_tokens=6, temperature=0).tokens


def test_score_shape_and_dtype(tiny_llama, gen, seed):
    for dtype in ("float32", "bfloat16"):
        eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype=dtype)
        ids = random_ids(gen, 13, eng.args.vocab_size)
        s = eng.score(ids)
        assert s.dtype == torch.float32 and s.shape == (13, eng.args.vocab_size)
        assert torch.isfinite(s).all()
        # the last row is what generation samples from: greedy's first token
        eng.tokenizer.eos_token_ids = []
        assert eng.generate(ids, max_new_tokens=1, temperature=0).tokens == [int(s[-1].argmax())]


# ---------------------------------------------------------------- sampler against a float64 reference


def ref_filtered_logits(logits, temperature, top_k, top_p, min_p):
    """HF-style warpers in float64: temperature, then top-k, top-p, min-p; removed tokens get -inf."""
    x = logits.double() / temperature
    V = x.shape[0]
    if 0 < top_k < V:
        kth = torch.sort(x, descending=True).values[top_k - 1]
        x = torch.where(x < kth, -math.inf, x)
    if top_p < 1.0:
        p = torch.softmax(x, -1)
        keep = torch.zeros(V, dtype=torch.bool)
        total = 0.0
        for idx in torch.argsort(p, descending=True).tolist():  # smallest top set with mass >= top_p
            keep[idx] = True
            total += p[idx].item()
            if total >= top_p:
                break
        x = torch.where(keep, x, -math.inf)
    if min_p > 0.0:
        p = torch.softmax(x, -1)
        x = torch.where(p < min_p * p.max(), -math.inf, x)
    return x


def ill_conditioned(logits, temperature, top_k, top_p, min_p, margin=1e-4):
    """True when a threshold falls within `margin` of a cumulative / relative probability, where
    float32 and float64 may legitimately disagree."""
    x = logits.double() / temperature
    if 0 < top_k < x.shape[0]:
        x = torch.where(x < torch.sort(x, descending=True).values[top_k - 1], -math.inf, x)
    if top_p < 1.0:
        cum = torch.sort(torch.softmax(x, -1), descending=True).values.cumsum(0)
        if (cum - top_p).abs().min() < margin:
            return True
    x = ref_filtered_logits(logits, temperature, top_k, top_p, 0.0)
    if min_p > 0.0:
        p = torch.softmax(x, -1)
        if ((p / p.max() - min_p).abs() < margin).any():
            return True
    return False


def random_params(gen):
    u = lambda lo, hi: float(torch.empty(1).uniform_(lo, hi, generator=gen))  # noqa: E731
    pick = torch.rand(3, generator=gen)
    return dict(temperature=u(0.2, 3.0),
                top_k=int(torch.randint(1, 60, (1,), generator=gen)) if pick[0] < 0.6 else 0,
                top_p=u(0.05, 0.99) if pick[1] < 0.6 else 1.0,
                min_p=u(0.01, 0.6) if pick[2] < 0.6 else 0.0)


def make_sampler(params: dict, seen: torch.Tensor, seed: int = 0) -> Sampler:
    """A one-row sampler; seen: bool [vocab], the tokens the repetition penalty applies to."""
    return Sampler(SamplingParams(**params), seen[None].clone(), torch.Generator().manual_seed(seed))


def no_tokens(vocab: int) -> torch.Tensor:
    return torch.zeros(vocab, dtype=torch.bool)


def test_sampler_probabilities_match_reference(gen, seed):
    V = 50
    checked = 0
    for trial in range(200):
        logits = torch.randn(V, generator=gen) * float(torch.empty(1).uniform_(0.5, 4, generator=gen))
        params = random_params(gen)
        if ill_conditioned(logits, **params):
            continue
        probs = make_sampler(params, no_tokens(V)).probabilities(logits.float()[None])[0]
        ref = torch.softmax(ref_filtered_logits(logits, **params), -1)
        msg = f"trial {trial} params={params}; seed={seed}"
        assert probs.shape == (V,) and probs.dtype == torch.float32
        assert torch.equal(probs > 0, ref > 0), f"kept sets differ: {msg}"
        assert torch.allclose(probs.double(), ref, atol=1e-6, rtol=1e-5), msg
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("filt", ["top_k", "top_p", "min_p"])
def test_each_filter_actually_filters(filt, gen, seed):
    logits = torch.randn(40, generator=gen) * 2
    params = {"top_k": dict(top_k=5), "top_p": dict(top_p=0.5), "min_p": dict(min_p=0.3)}[filt]
    probs = make_sampler(dict(temperature=1.0, **params), no_tokens(40)).probabilities(logits[None])[0]
    ref = torch.softmax(ref_filtered_logits(logits, 1.0, **{"top_k": 0, "top_p": 1.0, "min_p": 0.0, **params}), -1)
    assert 0 < int((probs > 0).sum()) < 40
    if filt == "top_k":
        assert int((probs > 0).sum()) == 5
    assert torch.allclose(probs.double(), ref, atol=1e-6)


def ref_penalized(logits, seen, penalty):
    """transformers' repetition penalty in float64: seen (bool [..., vocab]) logits divided by the penalty
    when positive, multiplied when negative."""
    x = logits.double()
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def test_repetition_penalty(gen, seed):
    V = 30
    penalty = float(torch.empty(1).uniform_(1.1, 2.5, generator=gen))
    seen = torch.rand(V, generator=gen) < 0.3
    sampler = make_sampler(dict(temperature=1.0, repetition_penalty=penalty), seen, seed)
    captured = []
    real = sampler.probabilities
    sampler.probabilities = lambda x: captured.append(x[0].clone()) or real(x)
    logits = torch.randn(V, generator=gen) * 3
    token = int(sampler(logits[None])[0])
    assert torch.allclose(captured[0].double(), ref_penalized(logits, seen, penalty), atol=1e-6), \
        f"penalty={penalty} seen={seen.nonzero().flatten().tolist()}; seed={seed}"
    # the sampled token counts as seen from now on
    sampler(logits[None])
    seen[token] = True
    assert torch.allclose(captured[1].double(), ref_penalized(logits, seen, penalty), atol=1e-6)


def test_repetition_penalty_changes_greedy_choice(gen, seed):
    V = 10
    logits = torch.full((1, V), -5.0)
    logits[0, 3], logits[0, 7], logits[0, 5] = 2.0, 1.7, -0.5  # 3 leads, but it was seen: 2.0 / 1.5 < 1.7
    seen = no_tokens(V)
    seen[[3, 5]] = True
    sampler = make_sampler(dict(temperature=0, repetition_penalty=1.5), seen)
    assert sampler(logits).tolist() == [7]
    assert sampler(logits).tolist() == [3]  # 7 is now seen too: 1.7 / 1.5 < 2.0 / 1.5
    assert make_sampler(dict(temperature=0), seen).__call__(logits).tolist() == [3]


def test_greedy_is_the_float64_argmax(gen, seed):
    """Greedy with a repetition penalty, 16 rows at once: the argmax of the float64 penalised logits."""
    logits = torch.randn(16, 1000, generator=gen) * 3
    seen = torch.rand(16, 1000, generator=gen) < 0.2
    got = Sampler(SamplingParams(temperature=0, repetition_penalty=1.3), seen.clone(), torch.Generator())(logits)
    assert torch.equal(got, ref_penalized(logits, seen, 1.3).argmax(-1)), f"seed={seed}"


def test_sampled_tokens_are_torch_multinomials(gen, seed):
    """The device sampler draws the tokens torch.multinomial draws from the same distributions with the same
    generator state (what the sampler did before it moved to the device), so seeded CPU runs keep their tokens."""
    logits = torch.randn(32, 500, generator=gen) * 3
    params = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01)
    sampler = Sampler(SamplingParams(**params), torch.zeros(32, 500, dtype=torch.bool), torch.Generator().manual_seed(seed))
    probs = sampler.probabilities(logits)
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    assert torch.equal(sampler(logits), want), f"seed={seed}"


SAMPLING_CASES = {"temperature": dict(temperature=0.7), "top-k": dict(temperature=1.3, top_k=7),
                  "top-p": dict(temperature=1.0, top_p=0.8), "min-p": dict(temperature=1.0, min_p=0.1),
                  "all": dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.5)}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampler_draws_the_float64_distribution(case, gen, seed):
    """20,000 draws (one call over 20,000 rows, as the device sampler runs) from random logits: no token
    outside the float64 distribution's support, and a chi-square test of the counts against it (fails at
    p < 1e-6)."""
    vocab, rows = 64, 20_000
    params = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0) | SAMPLING_CASES[case]
    filters = {k: params[k] for k in ("temperature", "top_k", "top_p", "min_p")}
    while True:
        logits = torch.randn(vocab, generator=gen) * 2.5
        seen = torch.rand(vocab, generator=gen) < 0.3
        penalised = ref_penalized(logits, seen, params["repetition_penalty"])
        want = torch.softmax(ref_filtered_logits(penalised, **filters), -1)
        # no token at a cut within float32's rounding, and a chi-square with df >= 2
        if not ill_conditioned(penalised, **filters, margin=1e-3) and (want * rows >= 5).sum() >= 3:
            break
    sampler = Sampler(SamplingParams(**params), seen.expand(rows, -1).clone(), torch.Generator().manual_seed(seed))
    draws = sampler(logits.expand(rows, -1).clone())
    counts = torch.bincount(draws, minlength=vocab).double()
    outside = counts[want == 0].sum()
    assert outside == 0, f"{case}: {int(outside)} draws outside the support; seed={seed}"
    expected = want * rows
    # Cells: each token expected 5 times or more (the chi-square approximation needs that), and the rest
    # pooled; a pool expected fewer than 5 times joins the first cell.
    big = expected >= 5
    obs = torch.cat([counts[big], (rows - counts[big].sum()).view(1)])
    exp = torch.cat([expected[big], (rows - expected[big].sum()).view(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[0] += rows - obs.sum()
        exp[0] += rows - exp.sum()
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))
    assert p_value > 1e-6, f"{case}: chi2 {chi2:.1f} on {df} df, p = {p_value:.2e}; seed={seed}"
    assert sampler.seen[torch.arange(rows), draws].all(), "the drawn tokens are not marked as seen"


# ---------------------------------------------------------------- incremental detokenizer


def run_detok(tok, ids):
    d = tok.detokenizer()
    pieces = [d.add(t) for t in ids]
    pieces.append(d.flush())
    return pieces


def check_detok(tok, ids, label, exact_on_invalid=True):
    pieces = run_detok(tok, ids)
    full = tok.decode(ids)
    # tokenizers' ByteFallback decodes a run of <0xNN> tokens that is not valid UTF-8 as one U+FFFD per
    # byte, valid ASCII bytes in the run included, so no incremental decoder can match it there.
    if exact_on_invalid or "\ufffd" not in full:
        assert "".join(pieces) == full, f"{label}: {pieces!r} vs {full!r}"
    if "\ufffd" not in full:
        bad = [p for p in pieces if "\ufffd" in p]
        assert not bad, f"{label}: emitted a replacement character {bad!r} although the full text has none"


def random_text(gen, n):
    """Random text mixing ASCII, accented Latin, CJK, emoji and other 4-byte characters."""
    ranges = [(0x20, 0x7E), (0xC0, 0x17F), (0x4E00, 0x4FFF), (0x3040, 0x30FF), (0x1F600, 0x1F64F), (0x1D100, 0x1D1FF)]
    out = []
    for _ in range(n):
        lo, hi = ranges[int(torch.randint(0, len(ranges), (1,), generator=gen))]
        out.append(chr(int(torch.randint(lo, hi + 1, (1,), generator=gen))))
    return "".join(out)


def detok_cases(tok, vocab, gen, seed, name, exact_on_invalid=True):
    for trial in range(30):  # random token sequences, specials included
        ids = torch.randint(0, vocab, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist()
        check_detok(tok, ids, f"{name} random ids {ids}; seed={seed}", exact_on_invalid)
    split_chars = 0
    for trial in range(30):  # valid text whose multi-byte characters are often split over byte tokens
        text = random_text(gen, int(torch.randint(1, 30, (1,), generator=gen)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        pieces = run_detok(tok, ids)
        assert "".join(pieces) == text, f"{name}: {text!r} -> {pieces!r}; seed={seed}"
        assert not any("\ufffd" in p for p in pieces), f"{name}: half character emitted: {pieces!r}; seed={seed}"
        split_chars += pieces[:-1].count("")  # a token that completed no character
    assert split_chars > 0, "no multi-byte character was split across tokens; the test exercised nothing"


def test_incremental_detokenizer_tiny(llama_engine, gen, seed):
    tok = llama_engine.tokenizer
    detok_cases(tok, tok.vocab_size, gen, seed, "tiny")
    # emoji / CJK outside the training corpus encode as single bytes; never emitted half
    text = "𝄞🚀中文字符"
    ids = tok.encode(text)
    assert len(ids) > len(text)
    pieces = run_detok(tok, ids)
    assert "".join(pieces) == text and all(p == "" or "\ufffd" not in p for p in pieces)
    # a stream cut in the middle of a character flushes a replacement character, as decode does
    check_detok(tok, ids[:-1], "truncated")


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf_path):
    from fachat.models.gguf import read_gguf

    return Tokenizer.from_gguf(read_gguf(smollm2_gguf_path), eos_token_ids=[2])


def test_incremental_detokenizer_smollm2_gguf(gguf_tokenizer, gen, seed):
    detok_cases(gguf_tokenizer, gguf_tokenizer.vocab_size, gen, seed, "smollm2")


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A Llama-2 style tokenizer (▁ space prefix, <0xNN> byte fallback) rebuilt from a tiny GGUF."""
    import numpy as np

    import gguf_util as util
    from fachat.models.gguf import read_gguf

    rng = np.random.default_rng(derive_seed("sentencepiece tokenizer"))
    tokens, scores, types = util.train_sentencepiece_bpe(200)
    cfg = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
               vocab_size=len(tokens))
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    util.write_tiny_gguf(path, arch="llama", cfg=cfg, weights=util.random_weights(cfg, rng, bias=False, tied=True),
                         types={}, rng=rng, tokenizer=dict(model="llama", tokens=tokens, scores=scores, types=types,
                                                           bos_id=1, eos_id=2, unk_id=0))
    return Tokenizer.from_gguf(read_gguf(path), eos_token_ids=[2])


def test_incremental_detokenizer_sentencepiece_space_prefix_and_byte_fallback(sentencepiece_tokenizer, gen, seed):
    tok = sentencepiece_tokenizer
    detok_cases(tok, tok.vocab_size, gen, seed, "sentencepiece", exact_on_invalid=False)
    # words after the first come as '▁'-prefixed tokens, which decode with their space only mid-text
    text = "the quick brown fox 🙂 jumps"
    ids = tok.encode(text)
    assert any(tok.backend.id_to_token(i).startswith("\u2581") for i in ids[1:])
    assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids), "🙂 must take the byte fallback"
    pieces = run_detok(tok, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces), f"{pieces!r}; seed={seed}"

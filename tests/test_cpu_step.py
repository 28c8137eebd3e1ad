"""The CPU decode step in TorchScript (engine/cpu_step.py), which runs where the native op does not (this module turns
the native op off; tests/test_cpu_kernels.py tests it, and both against transformers): the eager model's logits bit
for bit, across cache growth, and the eager model wherever the step does not apply."""
from __future__ import annotations

import pytest
import torch

from fachat import Engine
from fachat.engine import cpu_step
from fachat.engine.runner import Runner
from fachat.kernels import cpu as native

# Tiny variants: GQA, MQA with tied embeddings, head_dim != hidden / heads, q/k/v biases (qwen2)
VARIANTS = ["llama", "llama-tied-mqa", "llama-head-dim", "qwen2"]


@pytest.fixture(autouse=True)
def torchscript(monkeypatch):
    monkeypatch.setenv(native.KERNELS_ENV, "0")


def decode_both(engine: Engine, prompt: list[int], tokens: list[int]):
    """Prefills `prompt` into two caches, then feeds `tokens` one at a time through engine.cpu_step into one and the
    eager model into the other. Returns each step's pair of logits [1, vocab] (the step's, the eager model's) and
    the two caches."""
    model = engine.model
    caches = engine.new_cache(), engine.new_cache()
    for cache in caches:
        Runner(model, cache).prefill(prompt)
    steps = []
    for token in tokens:
        logits = []
        for forward, cache in zip((engine.cpu_step, model), caches):
            cache.reserve(cache.length + 1)
            rope = model.rope_table(cache.capacity, cache.k[0].dtype)
            with torch.inference_mode():
                logits.append(forward(torch.tensor([[token]]), torch.tensor([cache.length]), cache.k, cache.v, rope))
            cache.advance(1)
        steps.append(logits)
    return steps, caches


@pytest.mark.parametrize("quantize", [None, "int4", "int8"])
@pytest.mark.parametrize("variant,dtype", [(v, "float32") for v in VARIANTS] + [("qwen2", "bfloat16"),
                                                                              ("llama", "float16")])
def test_scripted_step_is_the_eager_model_bit_for_bit(tiny_models, variant, dtype, quantize, gen):
    engine = Engine.load(tiny_models(variant)[0], device="cpu", dtype=dtype, quantize=quantize)
    assert engine.cpu_step.runs == "TorchScript", engine.cpu_step_reason
    vocab = engine.args.vocab_size
    # past the cache's first capacity (256): the step runs on the grown buffers too
    prompt = torch.randint(0, vocab, (int(torch.randint(230, 250, (1,), generator=gen)),), generator=gen).tolist()
    tokens = torch.randint(0, vocab, (40,), generator=gen).tolist()
    steps, caches = decode_both(engine, prompt, tokens)
    for scripted, eager in steps:
        assert scripted.dtype == torch.float32 and scripted.shape == (1, vocab)
        assert torch.equal(scripted, eager)
    assert len(steps) == len(tokens)
    for a, b in zip(*(c.state for c in caches)):  # K/V written identically, at the same positions
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sampled_answers_and_caches_match_the_eager_runner(tiny_models, gen, monkeypatch):
    """Through Engine.generate, sampled (seeded) across cache growth: the scripted and eager engines agree."""
    path = tiny_models("llama")[0]
    scripted = Engine.load(path, device="cpu", dtype="float32", quantize="int4")
    monkeypatch.setenv(cpu_step.STEP_ENV, "0")
    eager = Engine.load(path, device="cpu", dtype="float32", quantize="int4")
    assert (eager.cpu_step, eager.cpu_step_reason) == (None, f"{cpu_step.STEP_ENV}=0")
    assert scripted.runner.decode_forward is scripted.cpu_step and eager.runner.decode_forward is eager.model
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    prompt = torch.randint(0, scripted.args.vocab_size, (20,), generator=gen).tolist()
    answers = []
    for engine in (scripted, eager):
        engine.tokenizer.eos_token_ids = []
        answers.append(engine.generate(prompt, max_new_tokens=300, temperature=0.9, top_k=50, seed=seed).tokens)
    assert answers[0] == answers[1] and len(answers[0]) == 300
    assert scripted.runner.cache.capacity > 256  # it grew while decoding
    for a, b in zip(scripted.runner.state, eager.runner.state):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_where_the_step_does_not_apply_the_model_runs_eagerly(tiny_models, monkeypatch):
    windowed = Engine.load(tiny_models("mistral-window")[0], device="cpu", dtype="float32")
    assert (windowed.cpu_step, windowed.cpu_step_reason) == (None, "sliding-window layers")
    assert windowed.runner.decode_forward is windowed.model
    monkeypatch.setenv(cpu_step.STEP_ENV, "2")
    with pytest.raises(ValueError, match=f"{cpu_step.STEP_ENV} must be 0 or 1"):
        Engine.load(tiny_models("llama")[0], device="cpu", dtype="float32")


def test_a_torch_that_cannot_script_the_step_decodes_eagerly(tiny_models, monkeypatch, gen):
    def refuse(fn):
        raise RuntimeError("TorchScript is gone")

    path = tiny_models("llama")[0]
    expected = Engine.load(path, device="cpu", dtype="float32")
    cpu_step._scripted.cache_clear()
    monkeypatch.setattr(torch.jit, "script", refuse)
    try:
        engine = Engine.load(path, device="cpu", dtype="float32")
    finally:
        cpu_step._scripted.cache_clear()  # the next test compiles again
    assert engine.cpu_step is None
    assert engine.cpu_step_reason == "TorchScript cannot compile the step: RuntimeError: TorchScript is gone"
    prompt = torch.randint(0, engine.args.vocab_size, (10,), generator=gen).tolist()
    for e in (engine, expected):
        e.tokenizer.eos_token_ids = []
    assert engine.generate(prompt, max_new_tokens=20, temperature=0).tokens == \
        expected.generate(prompt, max_new_tokens=20, temperature=0).tokens


def test_a_runner_of_several_rows_runs_the_model(tiny_models):
    engine = Engine.load(tiny_models("llama")[0], device="cpu", dtype="float32")
    from fachat.cache.kv_cache import InPlaceKVCache

    a = engine.args
    cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=torch.float32, batch_size=2)
    assert Runner(engine.model, cache, cpu_step=engine.cpu_step).decode_forward is engine.model
    assert Runner(engine.model, engine.new_cache(), cpu_step=engine.cpu_step).decode_forward is engine.cpu_step

"""The native CPU decode step (kernels/cpu: torch.ops.fachat_cpu.decode_step, engine/cpu_step.py picks it): the eager
model's logits and K/V to float32 rounding where projections are float, within bfloat16 rounding where quantized
ones round their inputs and outputs to it; transformers' logits as the independent peer; the build, its cache and
its failures; and sessions on either compiled step (native, TorchScript) interrupted and resumed exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_cpu_step import VARIANTS, decode_both

from fachat import Engine
from fachat.engine import cpu_step
from fachat.kernels import cpu as native
from fachat.kernels.common import cache_dir


@pytest.fixture(scope="module")
def native_op():
    why = native.load()  # builds it once per machine (cached), like the first fa-chat run
    if why is not None:
        pytest.skip(f"the native CPU kernels are unavailable here: {why}")


def _scale(x: torch.Tensor) -> float:
    return float(x.abs().max())


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """torch's intra-op threads (the tests' default is 1): the native step's attention shares its tasks among them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_step_is_the_eager_model_to_float32_rounding(native_op, tiny_models, variant, threads, gen):
    """Float projections: the two compute the same float32 math in other orders (sums, exp), so only rounding
    parts them. The keys run past the cache's first capacity (256) and past attention's first chunk (128 keys),
    and from one task a KV head into tasks shared among threads (from 8192 / (head_dim x query heads a KV head)
    keys on, 256 for the tiny llama); the K/V written into the caches are compared too."""
    engine = Engine.load(tiny_models(variant)[0], device="cpu", dtype="float32")
    assert engine.cpu_step.runs == "native", engine.cpu_step_reason
    vocab = engine.args.vocab_size
    prompt = torch.randint(0, vocab, (int(torch.randint(230, 250, (1,), generator=gen)),), generator=gen).tolist()
    steps, caches = decode_both(engine, prompt, torch.randint(0, vocab, (40,), generator=gen).tolist())
    for i, (step, eager) in enumerate(steps):
        assert step.dtype == torch.float32 and step.shape == (1, vocab)
        torch.testing.assert_close(step, eager, rtol=0, atol=1e-4 * _scale(eager), msg=lambda m: f"step {i}: {m}")
    for keys_or_values in zip(*(c.state for c in caches)):
        for x, y in zip(*keys_or_values):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4 * _scale(y))


def _use(runs: str, monkeypatch) -> None:
    """Makes the next loads' CPU step `runs` ("native" or "TorchScript"), or skips."""
    if runs == "TorchScript":
        monkeypatch.setenv(native.KERNELS_ENV, "0")  # subprocesses too
    elif (why := native.load()) is not None:
        pytest.skip(f"the native CPU kernels are unavailable here: {why}")


@pytest.mark.parametrize("runs", ["native", "TorchScript"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_steps_match_transformers(tiny_models, variant, runs, gen, monkeypatch):
    """Against an independent peer: the float32 logits of each step are transformers' of the whole sequence."""
    _use(runs, monkeypatch)
    path, peer = tiny_models(variant)
    engine = Engine.load(path, device="cpu", dtype="float32")
    assert engine.cpu_step.runs == runs, engine.cpu_step_reason
    vocab = engine.args.vocab_size
    prompt = torch.randint(0, vocab, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
    tokens = torch.randint(0, vocab, (12,), generator=gen).tolist()
    with torch.no_grad():
        expected = peer(torch.tensor([prompt + tokens])).logits[0, len(prompt):]
    for i, (step, _) in enumerate(decode_both(engine, prompt, tokens)[0]):
        torch.testing.assert_close(step[0], expected[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", ["int4", "int8"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_native_step_is_the_eager_model_to_bfloat16_rounding(native_op, tiny_models, variant, quantize, gen):
    """Quantized projections round their input and output to bfloat16: where a last-bit difference upstream flips
    one such rounding, the value moves by a bfloat16 ulp (2**-7 of it at most) and the layers after carry that on.
    Bound: two ulps of the largest logit; the greedy token is the eager model's wherever its lead is wider."""
    engine = Engine.load(tiny_models(variant)[0], device="cpu", dtype="float32", quantize=quantize)
    assert engine.cpu_step.runs == "native", engine.cpu_step_reason
    vocab = engine.args.vocab_size
    prompt = torch.randint(0, vocab, (int(torch.randint(230, 250, (1,), generator=gen)),), generator=gen).tolist()
    steps, _ = decode_both(engine, prompt, torch.randint(0, vocab, (40,), generator=gen).tolist())
    for i, (step, eager) in enumerate(steps):
        bound = 2 * 2**-7 * _scale(eager)
        torch.testing.assert_close(step, eager, rtol=0, atol=bound, msg=lambda m: f"step {i}: {m}")
        top2 = eager[0].topk(2).values
        if top2[0] - top2[1] > 2 * bound:
            assert int(step.argmax()) == int(eager.argmax()), f"step {i}"


def test_the_op_refuses_a_token_or_position_it_cannot_compute(native_op, tiny_models):
    engine = Engine.load(tiny_models("llama")[0], device="cpu", dtype="float32")
    cache = engine.new_cache()
    cache.reserve(1)
    rope = engine.model.rope_table(cache.capacity, torch.float32)
    before = [t.clone() for t in cache.k + cache.v]
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=f"token {engine.args.vocab_size} is outside the embedding"):
            engine.cpu_step(torch.tensor([[engine.args.vocab_size]]), torch.tensor([0]), cache.k, cache.v, rope)
        with pytest.raises(RuntimeError, match=f"position {cache.capacity} is outside the RoPE table"):
            engine.cpu_step(torch.tensor([[1]]), torch.tensor([cache.capacity]), cache.k, cache.v, rope)
        with pytest.raises(RuntimeError, match="caches must be float32"):
            engine.cpu_step(torch.tensor([[1]]), torch.tensor([0]), [k.double() for k in cache.k], cache.v, rope)
    assert all(torch.equal(x, y) for x, y in zip(before, cache.k + cache.v))  # nothing written


def test_native_is_used_for_float32_activations_only_and_can_be_turned_off(native_op, tiny_models, monkeypatch):
    path = tiny_models("llama")[0]
    half = Engine.load(path, device="cpu", dtype="bfloat16")
    assert half.cpu_step.runs == "TorchScript"
    assert half.cpu_step_reason == "CPU, reference attention; not native: activations in torch.bfloat16"
    monkeypatch.setenv(native.KERNELS_ENV, "0")
    off = Engine.load(path, device="cpu", dtype="float32")
    assert off.cpu_step.runs == "TorchScript"
    assert off.cpu_step_reason == f"CPU, reference attention; not native: {native.KERNELS_ENV}=0"
    monkeypatch.setenv(native.KERNELS_ENV, "1")  # required: a load that cannot have them fails, saying why
    assert Engine.load(path, device="cpu", dtype="float32").cpu_step.runs == "native"
    with pytest.raises(ValueError, match=f"{native.KERNELS_ENV}=1, but .* natively: activations in torch.bfloat16"):
        Engine.load(path, device="cpu", dtype="bfloat16")
    monkeypatch.setenv(native.KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{native.KERNELS_ENV} must be 0 or 1"):
        Engine.load(path, device="cpu", dtype="float32")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """load() as on a machine whose kernel cache (here under tmp_path) is empty. Only failing builds may run in it:
    a second library registering fachat_cpu in this process would be refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native._loaded.cache_clear()
    yield tmp_path / "cache" / "fa-chat" / "cpu-kernels"
    native._loaded.cache_clear()  # the next load() finds this process's library again


def test_without_a_compiler_the_step_runs_in_torchscript(native_op, fresh_build, tiny_models, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert native.load() == "no C++ compiler (no-such-compiler-here) on PATH"
    engine = Engine.load(tiny_models("llama")[0], device="cpu", dtype="float32")
    assert engine.cpu_step.runs == "TorchScript"
    assert engine.cpu_step_reason.endswith("not native: no C++ compiler (no-such-compiler-here) on PATH")


def test_a_failed_build_says_why_and_leaves_nothing_behind(native_op, fresh_build, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "decode_step.cpp"
    broken.write_text(native.SOURCE.read_text().replace("namespace {", "namespace { int broken(", 1))
    monkeypatch.setattr(native, "SOURCE", broken)
    why = native.load()
    assert why.startswith("building the native CPU kernels failed (") and "error" in why, why
    assert "building the native CPU kernels" in capsys.readouterr().err  # the user was told it would take a while
    assert list(fresh_build.iterdir()) == []  # no library, no half-written file, no build folder


def test_a_build_interrupted_by_ctrl_c_leaves_nothing_behind(native_op, fresh_build, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(native.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        native.load()
    assert list(fresh_build.iterdir()) == []


def test_an_unwritable_cache_says_why(native_op, fresh_build, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    why = native.load()
    assert why.startswith("building the native CPU kernels failed: ") and "cache" in why, why


def test_the_built_library_is_cached_and_reused(native_op, capsys):
    libraries = list(cache_dir(native.CACHE).glob("*.so"))
    assert libraries and not list(cache_dir(native.CACHE).glob(".build-*"))
    mtimes = {p: p.stat().st_mtime_ns for p in libraries}
    native._loaded.cache_clear()
    capsys.readouterr()
    assert native.load() is None
    assert "building" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in cache_dir(native.CACHE).glob("*.so")} == mtimes


CHILD = r"""
import json, sys
import torch
import fachat

torch.set_num_threads(1)  # as the parent (conftest): the same kernels, the same bits
job = json.loads(sys.argv[1])
engine = fachat.Engine.load(job["model"], device="cpu", dtype="float32", quantize=job["quantize"])
assert engine.cpu_step.runs == job["runs"], engine.cpu_step_reason
engine.tokenizer.eos_token_ids = []
session = engine.load_session(job["path"])
session.generate(max_new_tokens=job["rest"])
print(json.dumps(session.tokens))
"""


@pytest.mark.parametrize("quantize", [None, "int4"])
@pytest.mark.parametrize("runs", ["native", "TorchScript"])
def test_a_session_interrupted_in_a_step_resumes_exactly_in_a_new_process(tiny_models, runs, quantize, gen, seed,
                                                                          tmp_path, monkeypatch):
    """Ctrl-C as a compiled step returns (its K/V written, the cache not advanced), across cache growth: the session
    stays consistent, and saved and continued in a new process it gives the uninterrupted run's tokens. The
    TorchScript step's are also the eager engine's (bit for bit the same logits)."""
    from test_session import assert_cache_holds

    _use(runs, monkeypatch)
    path = tiny_models("llama")[0]
    engine = Engine.load(path, device="cpu", dtype="float32", quantize=quantize)
    assert engine.cpu_step.runs == runs, engine.cpu_step_reason
    engine.tokenizer.eos_token_ids = []
    n, params = 60, dict(temperature=0.9, top_p=0.9, seed=seed)
    prompt = torch.randint(0, engine.args.vocab_size, (int(torch.randint(200, 240, (1,), generator=gen)),),
                           generator=gen).tolist()
    whole = engine.session(max_new_tokens=n, **params)
    whole.append(prompt)
    whole.generate()
    k = int(torch.randint(1, n - 1, (1,), generator=gen))
    part = engine.session(max_new_tokens=n, **params)
    part.append(prompt)
    real, calls = cpu_step.CpuStep.__call__, []

    def interrupted(self, *args):
        out = real(self, *args)
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return out

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(cpu_step.CpuStep, "__call__", interrupted)
        part.generate()
    label = f"k={k} runs={runs} quantize={quantize} seed={seed}"
    if quantize is None:  # against a fresh prefill: float32 rounding apart (int4's bfloat16 activations: more)
        assert_cache_holds(engine, part, label)
    length = part.cache.length
    assert len(part.tokens) - length in (0, 1), label
    for layer in range(engine.args.num_hidden_layers):  # the uninterrupted run's K/V, bit for bit
        for x, y in zip(part.cache.views(layer), whole.cache.views(layer)):
            assert torch.equal(x, y[:, :, :length]), label
    done = len(part.tokens) - len(prompt)
    assert 0 < done < n and part.tokens == whole.tokens[: len(part.tokens)], label
    file = tmp_path / "session.safetensors"
    part.save(file)
    job = {"model": str(path), "quantize": quantize, "path": str(file), "rest": n - done, "runs": runs}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == whole.tokens, label

    if runs == "TorchScript":
        monkeypatch.setenv(cpu_step.STEP_ENV, "0")
        eager = Engine.load(path, device="cpu", dtype="float32", quantize=quantize)
        eager.tokenizer.eos_token_ids = []
        reference = eager.session(max_new_tokens=n, **params)
        reference.append(prompt)
        reference.generate()
        assert reference.tokens == whole.tokens, label

"""The engine on a CUDA device against transformers on the same device, and the triton attention
backend against the reference backend end to end."""
from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import derive_seed
from fachat import Engine
from fachat.engine.runner import GRAPHS_ENV, Runner
from fachat.kernels import reference
from fachat.kernels.dispatch import BACKEND_ENV
from test_models_tiny import rel_err
from test_session import Logits, assert_exact, randint, random_prompt
from tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
CHUNK = 512  # both backends' prefill chunk here: a prompt of CHUNK + n tokens takes two


@pytest.fixture(autouse=True)
def prefill_chunk(monkeypatch):
    monkeypatch.setattr(reference, "PREFILL_CHUNK", CHUNK)
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setattr(importlib.import_module("fachat.kernels.triton"), "PREFILL_CHUNK", CHUNK)


@pytest.mark.parametrize("variant", ["llama", "llama-tied-mqa", "mistral-window", "qwen2"])
def test_float32_logits_and_greedy_tokens_match(tiny_models, variant, gen, seed):
    path, peer = tiny_models(variant)
    engine = Engine.load(path, device="cuda", dtype="float32")
    ids = torch.randint(0, peer.config.vocab_size, (70,), generator=gen).tolist()
    peer = peer.to("cuda")
    with torch.no_grad():
        expected = peer(torch.tensor([ids], device="cuda")).logits[0]
    got = engine.score(ids)
    assert got.device.type == "cuda"
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"{variant}: relative error {err:.2e}; seed={seed}"
    cpu = Engine.load(path, device="cpu").generate(ids[:8], max_new_tokens=24, temperature=0)
    assert engine.generate(ids[:8], max_new_tokens=24, temperature=0).tokens == cpu.tokens, f"seed={seed}"
    peer.to("cpu")


def test_auto_dtype_is_bfloat16_and_close_to_float32(tiny_models, gen, seed):
    """bf16 logits are about as far from float32 as transformers' own bf16 run on the device is."""
    path, peer = tiny_models("llama")
    engine = Engine.load(path, device="auto", dtype="auto")
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
    ids = torch.randint(0, peer.config.vocab_size, (40,), generator=gen).tolist()
    with torch.no_grad():
        expected = peer(torch.tensor([ids])).logits[0]
        peer_bf16 = copy.deepcopy(peer).to("cuda", torch.bfloat16)
        theirs = peer_bf16(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    ours, peers = rel_err(engine.score(ids).cpu(), expected), rel_err(theirs, expected)
    assert ours < 2 * peers + 1e-2, f"bf16 relative error {ours:.2e}, transformers' bf16 {peers:.2e}; seed={seed}"


def test_seeded_sampling_is_reproducible_on_the_device(tiny_models, seed):
    engine = Engine.load(tiny_models("llama")[0], device="cuda")
    runs = [engine.generate("hello", max_new_tokens=24, temperature=1.5, top_p=0.95, seed=seed).tokens
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0, f"seed={seed}"


# ---------------------------------------------------------------- triton backend vs reference backend


@pytest.fixture(scope="module")
def head64_models(tmp_path_factory):
    """Tiny models with head_dim 64, which the triton backend covers (the shared tiny ones have 16), and
    room for a prompt longer than one prefill chunk."""
    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = tmp_path_factory.mktemp("head64") / variant
            make_tiny_model(made[variant], variant, seed=derive_seed("head64", variant), head_dim=64,
                            max_position_embeddings=2 * CHUNK)
        return made[variant]

    return get


def load_pair(path, dtype, monkeypatch):
    """The same model twice on CUDA: auto backend (triton) and the env-forced reference."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    triton = Engine.load(path, device="cuda", dtype=dtype)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    reference = Engine.load(path, device="cuda", dtype=dtype)
    monkeypatch.delenv(BACKEND_ENV)
    assert (triton.attention_backend, reference.attention_backend) == ("triton", "reference")
    return triton, reference


def step_logits(engine, ids, n_prompt):
    """Logits after a chunked prefill of ids[:n_prompt], then after each later id fed one decode step at a time."""
    runner = Runner(engine.model, engine.new_cache(), graphs=False)
    out = [runner.prefill(ids[:n_prompt])]
    for t in ids[n_prompt:]:
        out.append(runner.prefill([t]))
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["llama", "llama-tied-mqa", "mistral-window", "qwen2"])
def test_triton_backend_float32_greedy_tokens_identical(head64_models, variant, monkeypatch, gen, seed):
    pytest.importorskip("triton", reason="the triton backend needs triton")
    triton, reference = load_pair(head64_models(variant), "float32", monkeypatch)
    ids = torch.randint(3, triton.args.vocab_size, (CHUNK + 90,), generator=gen).tolist()  # two chunks
    got, expected = step_logits(triton, ids, CHUNK + 60), step_logits(reference, ids, CHUNK + 60)
    assert rel_err(got, expected) < 1e-4, f"{variant}: logits differ by {rel_err(got, expected):.2e}; seed={seed}"
    a = triton.generate(ids, max_new_tokens=40, temperature=0)
    b = reference.generate(ids, max_new_tokens=40, temperature=0)
    assert a.tokens == b.tokens, f"{variant}: seed={seed}"


@pytest.mark.parametrize("variant", ["llama", "mistral-window"])
def test_triton_backend_bfloat16_logits_close(head64_models, variant, monkeypatch, gen, seed):
    """bf16 rounding differs between the backends, so logits are compared, not tokens, with the reference
    backend's float32 logits as truth (independent of the kernels under test): the triton backend is
    about as close to them as the reference backend is (both some 3e-2 to 1.5e-1 of the largest logit
    off on these random models), and closer to the reference backend than that. Over 150 random models
    on an H100 the two ratios to the reference's error peaked at 1.30 and 0.62 with unfused layer ops; with
    the fused ones (float32 inside each kernel, so other roundings), 26 models on an H200 peaked at 1.61 and
    0.76. With decode's scores scaled by 1.05, every one of 10 models broke the second bound (1.36 to 2.74)."""
    pytest.importorskip("triton", reason="the triton backend needs triton")
    path = head64_models(variant)
    triton, reference = load_pair(path, "bfloat16", monkeypatch)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    exact = Engine.load(path, device="cuda", dtype="float32")
    monkeypatch.delenv(BACKEND_ENV)
    ids = torch.randint(3, triton.args.vocab_size, (CHUNK + 60,), generator=gen).tolist()
    n_prompt = CHUNK + 30
    want = step_logits(exact, ids, n_prompt)
    got, ref = step_logits(triton, ids, n_prompt).float(), step_logits(reference, ids, n_prompt).float()
    err_triton, err_ref, err_between = rel_err(got, want), rel_err(ref, want), rel_err(got, ref)
    msg = (f"{variant}: vs float32 triton {err_triton:.2e}, reference {err_ref:.2e}; between {err_between:.2e}; "
           f"seed={seed}")
    print(msg)
    assert err_triton < 2 * err_ref + 5e-3 and err_between < err_ref + 5e-3, msg


def test_verbose_cli_names_the_backend(head64_models):
    pytest.importorskip("triton", reason="the triton backend needs triton")
    path = head64_models("llama")
    for forced, expected in ((None, "triton"), ("reference", "reference")):
        env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
        if forced:
            env[BACKEND_ENV] = forced
        run = subprocess.run([sys.executable, "-m", "fachat.cli.main", "--device", "cuda", "--model", str(path),
                              "--prompt", "hi", "--max-tokens", "3", "--temperature", "0", "--verbose"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"attention backend: {expected}" in run.stderr, run.stderr
        graphs = "on (CUDA, triton attention)" if expected == "triton" else "off (the reference attention backend"
        assert f"CUDA graphs: {graphs}" in run.stderr, run.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_session_resumes_exactly_on_the_device(head64_models, dtype, gen, seed, tmp_path, monkeypatch):
    """Within one device and dtype (the auto backend: triton where installed): stop a sampled run after a
    random number of tokens, save, load into a new session, continue: the unbroken run's tokens and
    bit-identical logits. Eager steps, whose logits a hook can see (test_resume_in_a_new_process_with_graphs
    covers graphs)."""
    monkeypatch.setenv(GRAPHS_ENV, "0")
    engine = Engine.load(head64_models("llama"), device="cuda", dtype=dtype)
    engine.tokenizer.eos_token_ids = []  # runs of known length
    n, prompt = 32, random_prompt(engine, gen)
    params = dict(max_new_tokens=n, temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=seed)
    whole = engine.session(**params)
    whole.append(prompt)
    with Logits(engine.model) as ref:
        whole.generate()
    k = randint(gen, 1, n - 1)
    part = engine.session(**params)
    part.append(prompt)
    with Logits(engine.model) as before:
        part.generate(max_new_tokens=k)
    part.save(tmp_path / "s.safetensors")
    resumed = engine.load_session(tmp_path / "s.safetensors")
    with Logits(engine.model) as after:
        resumed.generate(max_new_tokens=n - k)
    label = f"{dtype} {engine.attention_backend}, saved after {k} tokens; seed={seed}"
    assert resumed.tokens == whole.tokens, label
    assert_exact(before.rows + after.rows, ref.rows, label)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_int4_decode_steps_match_transformers_on_the_kernels_weights(head64_models, variant, gen, seed):
    """int4 on CUDA: every token fed one step at a time, so each projection runs the triton backend's int4 kernel
    (in float32) against transformers' float32 model given the weights that kernel computes with (int4 codes,
    bfloat16 scales; the int8 table): float32 summation order apart."""
    pytest.importorskip("triton", reason="the int4 projection kernels are the triton backend's")
    from test_quant import emulate_kernels
    from transformers import AutoModelForCausalLM

    from fachat.models import quant

    path = head64_models(variant)
    engine = Engine.load(path, device="cuda", dtype="float32", quantize="int4")
    layer = engine.model.model.layers[0].mlp.down_proj
    assert engine.attention_backend == "triton" and isinstance(layer, quant.Int4Linear) and layer.portable
    peer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peer = emulate_kernels(peer, lambda w: quant.to_scheme(w, "int4"), rounding=False).cuda()
    ids = torch.randint(3, engine.args.vocab_size, (randint(gen, 8, 40),), generator=gen).tolist()
    ours = step_logits(engine, ids, 1)
    with torch.inference_mode():
        theirs = peer(torch.tensor([ids], device="cuda")).logits[0]
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-4, f"{variant}: {err:.2e} of the largest logit; seed={seed}"


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_cuda_graphs_give_the_eager_tokens(head64_models, quantize, monkeypatch, gen, seed):
    """Decode steps replayed from CUDA graphs against the same steps run eagerly, in float32 (int4: linear layers
    on torch's int4 kernel): identical greedy tokens, and identical sampled tokens for one seed, past a doubling of
    the cache (a second capture)."""
    pytest.importorskip("triton", reason="CUDA graphs run with the triton backend")
    path = head64_models("llama")
    graphs = Engine.load(path, device="cuda", dtype="float32", quantize=quantize)
    monkeypatch.setenv(GRAPHS_ENV, "0")
    eager = Engine.load(path, device="cuda", dtype="float32", quantize=quantize)
    assert (graphs.cuda_graphs, eager.cuda_graphs) == (True, False)
    for engine in (graphs, eager):
        engine.tokenizer.eos_token_ids = []  # runs of known length
    prompt = torch.randint(3, graphs.args.vocab_size, (randint(gen, 20, 200),), generator=gen).tolist()
    n = 300 - len(prompt) + randint(gen, 0, 100)  # past 256 positions: the cache doubles
    sampled = dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=seed)
    for params in (dict(temperature=0), sampled):
        a = graphs.generate(prompt, max_new_tokens=n, **params)
        b = eager.generate(prompt, max_new_tokens=n, **params)
        assert a.tokens == b.tokens, f"{params}; seed={seed}"
    assert graphs.runner.captures >= 3 and eager.runner.captures == 0


def test_resume_in_a_new_process_with_graphs(head64_models, gen, seed, tmp_path):
    """A sampled session with graphs on, stopped after k tokens and saved; a new process loads it and
    continues: the unbroken run's tokens."""
    pytest.importorskip("triton", reason="CUDA graphs run with the triton backend")
    path = head64_models("llama")
    engine = Engine.load(path, device="cuda", dtype="bfloat16")
    assert engine.cuda_graphs
    engine.tokenizer.eos_token_ids = []
    n, prompt = 48, random_prompt(engine, gen)
    k = randint(gen, 1, n - 1)
    params = dict(max_new_tokens=n, temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=seed)
    whole = engine.session(**params)
    whole.append(prompt)
    whole.generate()
    part = engine.session(**params)
    part.append(prompt)
    part.generate(max_new_tokens=k)
    part.save(tmp_path / "s.safetensors")
    script = (f"import json, sys\nfrom fachat import Engine\n"
              f"e = Engine.load({str(path)!r}, device='cuda', dtype='bfloat16')\ne.tokenizer.eos_token_ids = []\n"
              f"s = e.load_session(sys.argv[1])\ns.generate(max_new_tokens={n - k})\nprint(json.dumps(s.tokens))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.safetensors")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == whole.tokens, f"saved after {k}; seed={seed}"


def test_triton_decode_workspace_reuse_stays_right(gen, seed):
    """Triton decode keeps one partials buffer per thread and (device, stream). Calls that grow it, a
    second thread and a second stream running alongside the default stream, and a CUDA graph captured
    before the buffer grew (replayed after) must all agree with float64."""
    decode = pytest.importorskip("fachat.kernels.triton.decode", reason="the triton backend needs triton")
    from fachat.kernels import reference

    def case(parts):  # a partition per 64 keys gives `parts` partitions: inputs, and the float64 answer
        n = 64 * parts - randint(gen, 0, 63)
        q = torch.randn(1, 8, 128, generator=gen).to("cuda", torch.bfloat16)
        k, v = (torch.randn(1, 2, n + 7, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
        return (q, k, v, n), reference.decode_attention(q.double(), k.double(), v.double(), n)

    def run(q, k, v, n):
        return decode.decode_attention(q, k, v, n, num_partitions=-(-n // 64))

    def check(out, want, label):
        err = rel_err(out.double(), want)
        assert err < 2e-2, f"{label}: relative error {err:.2e}; seed={seed}"

    graph_args, _ = case(4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        run(*graph_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = run(*graph_args)

    for parts in (2, 8, 33, 64):  # the default stream's buffer grows past the graph's
        args, want = case(parts)
        check(run(*args), want, f"{parts} partitions")
    assert decode._workspaces.buffers, "the eager calls did not keep a buffer"

    jobs = {name: [case(randint(gen, 2, 40)) for _ in range(12)] for name in ("main", "thread", "stream")}
    outs = {name: [] for name in jobs}

    def work(name, stream):
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream())
            outs[name] += [run(*args) for args, _ in jobs[name]]

    thread = threading.Thread(target=work, args=("thread", torch.cuda.default_stream()))
    thread.start()
    work("stream", torch.cuda.Stream())
    work("main", torch.cuda.default_stream())
    thread.join()
    torch.cuda.synchronize()
    for name, cases in jobs.items():
        for i, ((_, want), out) in enumerate(zip(cases, outs[name])):
            check(out, want, f"{name} call {i}")

    q, k, v, n = graph_args
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen).to(t))
    graph.replay()
    torch.cuda.synchronize()
    check(graph_out, reference.decode_attention(q.double(), k.double(), v.double(), n), "graph replay")

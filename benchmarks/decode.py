"""End-to-end greedy decode: fa-chat against transformers and a gpt-fast-style peer, same weights, one process.

    python benchmarks/decode.py        # on the GPU: SmolLM2-135M and Llama-3.2-1B shapes, bf16, every engine
    python benchmarks/decode.py --models llama-1b --peers fa-chat,gpt-fast --out /tmp/llama.json
    TQDM_DISABLE=1 python benchmarks/decode.py --quick --device cpu --dtype float32 --out /tmp/d.json --png /tmp/d.png

The weights are RANDOM, in the real configs (the GPU machine has no internet): each model is built with
transformers, saved by save_pretrained (bf16 safetensors) into a temp folder with a small BPE tokenizer
(tests/tiny.py), and loaded from there by Engine.load. Prompts are random token ids. Linear weights have std
1/sqrt(fan_in) and the (tied) embedding 0.02, so that greedy decoding does not merely echo its input as it
does under transformers' default init. No eos id is set, so every engine makes exactly the tokens asked for.
--quick: 2-layer scaled-down configs and few tokens, a smoke run.

Engines (--peers), each in try/except so that one failing keeps the others' figures:
  fa-chat            Engine.generate(ids, temperature=0)
  fa-chat-nographs   a second engine loaded with FACHAT_CUDA_GRAPHS=0
  fa-chat-int4       an engine loaded with quantize="int4" (linear layers as groupwise int4, bf16 activations);
                     its roofline counts its own weight bytes
  hf-eager           transformers generate, DynamicCache (min_new_tokens = max_new_tokens)
  hf-static          cache_implementation="static", which transformers 5 compiles itself (CompileConfig: mode
                     "reduce-overhead"; dynamic=False here); main case only, as each cache size recompiles
  gpt-fast           a flat Llama written below: static K/V sized to each run, fused QKV and gate/up weights,
                     tensor positions, decode step torch.compile(mode="reduce-overhead", fullgraph=True),
                     eager prefill, no host sync between tokens; it recompiles per cache size, as gpt-fast does
Compiled engines are skipped on CPU unless --quick (compiling on CPU is slow).

Cases: the main one (--prompt, --new-tokens), then each --contexts length with --context-new-tokens (a prompt
is cut where prompt + new tokens would pass max_position_embeddings). Per case every engine runs once as a
warm-up (compile, CUDA-graph capture; the main case's is reported as "warm-up s"), then --repeats rounds in
turns; medians. Figures:
- decode tok/s over the tokens after the first (fa-chat: its GenerationStats; transformers: (n-1) / (t(n) -
  t(1)), two generates, noisy for small n; gpt-fast: first token to last). TTFT: prefill + the first token.
- roofline: copy GB/s / bytes read per token (every weight once, the tied embedding once, plus the K/V at the
  run's mean context). Copy GB/s: a device-to-device copy_ of a large tensor, 2 x its bytes / time (bytes
  read AND written, the rate at which the device moves bytes; a weight read is held to it).
- per decoded token, from torch.profiler around runs of n1 and n2 new tokens, (count(n2) - count(n1)) /
  (n2 - n1): CUDA kernels (device events; memcpy/memset counted apart), their summed GPU time, and host
  launch calls (cudaLaunchKernel, cuLaunchKernel(Ex), cudaGraphLaunch). GPU idle ms/token = ms/token - GPU
  ms/token: the host's share. On CPU it counts aten ops instead.
- greedy check: how many leading tokens of each engine equal transformers eager's (bf16 may diverge).
Prints markdown tables; writes JSON (after each model, so a cut-off run keeps what it finished) and a PNG.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fachat import Engine

MODELS = {  # the published configs' shapes
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
QUICK = {  # --quick: 2 layers; GQA and head_dim 64 kept
    "smollm2": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=1, head_dim=64, vocab_size=4096),
    "llama-1b": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8192),
}
DEFAULTS = dict(new_tokens=(256, 16), prompt=(128, 16), contexts=("128,2048,8192", "32,64,128"),
                context_new_tokens=(64, 8), profile_tokens=("8,40", "4,12"))  # (full, --quick)
PEERS = ["fa-chat", "fa-chat-nographs", "fa-chat-int4", "hf-eager", "hf-static", "gpt-fast"]
COMPILED = {"hf-static", "gpt-fast"}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchCooperativeKernel")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def failed(e: Exception) -> str:
    """Called in an except block: prints the traceback's last frames, returns the error's first line."""
    traceback.print_exc(limit=-3)
    return f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def copy_gbps(device: torch.device, mib: int) -> float:
    """Bytes read + written per second of a copy_ of `mib` MiB on the device, median of 10 after 3 warm-ups."""
    src = torch.randn(mib * 2**18, device=device)
    dst, times = torch.empty_like(src), []
    for _ in range(13):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[3:]) / 1e9


def build_model(name: str, quick: bool, folder: Path, device, dtype):
    """Random weights in the named config, saved into folder (bf16 safetensors, tokenizer) for Engine.load.
    Returns the transformers model, in dtype on device, holding the same bf16-rounded values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[name] | (QUICK[name] if quick else {}), bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not model.lm_head:
                mod.weight.normal_(0, mod.in_features ** -0.5)
        model.model.embed_tokens.weight.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parent.parent / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.build_tokenizer().save(str(folder / "tokenizer.json"))  # prompts are ids; ids past its vocab decode to ""
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "unk_token": "<unk>"}))
    return model.to(dtype)


class Run:
    def __init__(self, ttft_s: float, decode_tok_s: float, tokens: list[int]):
        self.ttft_s, self.decode_tok_s, self.tokens = ttft_s, decode_tok_s, tokens


class FaChat:
    def __init__(self, folder: Path, device, dtype, max_seq_len: int, graphs: bool = True, quantize: str = "auto"):
        old = os.environ.get("FACHAT_CUDA_GRAPHS")
        if not graphs:
            os.environ["FACHAT_CUDA_GRAPHS"] = "0"  # read at Engine.load
        try:
            self.engine = Engine.load(folder, device=device, dtype=dtype, max_seq_len=max_seq_len, quantize=quantize)
            self.weight_bytes = self.engine.weight_bytes
        finally:
            if old is None:
                os.environ.pop("FACHAT_CUDA_GRAPHS", None)
            else:
                os.environ["FACHAT_CUDA_GRAPHS"] = old

    def measure(self, ids: list[int], n: int) -> Run:
        gen = self.engine.generate(ids, max_new_tokens=n, temperature=0)
        assert len(gen.tokens) == n, f"{len(gen.tokens)} tokens of {n} ({gen.finish_reason})"
        return Run(gen.stats.time_to_first_token, gen.stats.decode_tokens_per_s, gen.tokens)

    def extra(self) -> dict:
        runner = self.engine.runner
        return {"capture_seconds": round(runner.capture_seconds, 3), "captures": runner.captures,
                "cuda_graphs": self.engine.cuda_graphs_reason, "attention_backend": self.engine.attention_backend}


class HF:
    def __init__(self, model, device, static: bool):
        self.model, self.device, self.kwargs = model, device, {}  # a DynamicCache is never compiled
        if static:
            from transformers import CompileConfig

            cc = CompileConfig(dynamic=False)  # mode "reduce-overhead", fullgraph False: transformers' defaults
            cc._compile_all_devices = device.type != "cuda"  # else transformers compiles on accelerators only
            self.kwargs = {"cache_implementation": "static", "compile_config": cc}

    def generate(self, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, pad_token_id=0, **self.kwargs)
        return out[0, len(ids):].tolist()  # syncs

    def measure(self, ids: list[int], n: int) -> Run:
        # t(n) first: a static cache keeps the largest size made so far, so t(1) then runs the same shapes
        t0 = time.perf_counter()
        tokens = self.generate(ids, n)
        t1 = time.perf_counter()
        self.generate(ids, 1)
        ttft = time.perf_counter() - t1
        assert len(tokens) == n, f"{len(tokens)} tokens of {n}"
        return Run(ttft, (n - 1) / (t1 - t0 - ttft) if n > 1 else float("nan"), tokens)


def rms_norm(x, weight, eps: float):  # as transformers' LlamaRMSNorm
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):  # transformers' rotate_half convention
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class FastLayer(torch.nn.Module):
    def __init__(self, sd: dict, p: str):
        super().__init__()
        a, m = p + "self_attn.", p + "mlp."
        qkv = [sd[a + x + "_proj.weight"] for x in "qkv"]
        for name, w in (("wqkv", torch.cat(qkv)),
                        ("wo", sd[a + "o_proj.weight"]), ("w2", sd[m + "down_proj.weight"]),
                        ("w13", torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])),
                        ("attn_norm", sd[p + "input_layernorm.weight"]),
                        ("ffn_norm", sd[p + "post_attention_layernorm.weight"])):
            self.register_buffer(name, w)


class FastLlama(torch.nn.Module):
    """gpt-fast's shape: K/V buffers [layers, 1, kv_heads, S, head_dim] written at tensor positions, decode
    attending over all S slots under a mask."""

    def __init__(self, hf_model, max_pos: int):
        super().__init__()
        c, sd = hf_model.config, hf_model.state_dict()
        self.eps, self.nq, self.nkv = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.layers = torch.nn.ModuleList(FastLayer(sd, f"model.layers.{i}.") for i in range(c.num_hidden_layers))
        self.register_buffer("embed", sd["model.embed_tokens.weight"])
        self.register_buffer("lm_head", sd.get("lm_head.weight", self.embed))
        self.register_buffer("norm", sd["model.norm.weight"])
        rot = hf_model.model.rotary_emb  # its inv_freq holds the llama3 scaling
        freqs = torch.outer(torch.arange(max_pos, device=self.embed.device, dtype=torch.float32), rot.inv_freq.float())
        emb = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos", (emb.cos() * rot.attention_scaling).to(self.embed.dtype))
        self.register_buffer("sin", (emb.sin() * rot.attention_scaling).to(self.embed.dtype))
        self.caches: dict[int, tuple] = {}  # one per size, kept: stable addresses for the recorded CUDA graphs

    def setup_cache(self, size: int) -> None:
        if size not in self.caches:
            shape = (len(self.layers), 1, self.nkv, size, self.hd)
            self.caches[size] = tuple(torch.zeros(shape, dtype=self.embed.dtype, device=self.embed.device)
                                      for _ in "kv")
        self.register_buffer("k_cache", self.caches[size][0])
        self.register_buffer("v_cache", self.caches[size][1])

    def forward(self, ids, pos, prefill: bool = False):
        T = ids.shape[1]
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = torch.arange(self.k_cache.shape[3], device=ids.device)[None, :] <= pos[:, None]
        sizes = [self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd]
        for i, layer in enumerate(self.layers):
            q, k, v = F.linear(rms_norm(x, layer.attn_norm, self.eps), layer.wqkv).split(sizes, -1)
            q = rotate(q.view(1, T, self.nq, self.hd).transpose(1, 2), cos, sin)
            k = rotate(k.view(1, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
            v = v.view(1, T, self.nkv, self.hd).transpose(1, 2)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[:, :, pos] = k
            vc[:, :, pos] = v
            if prefill:  # a fresh cache: the prompt's own K/V, causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + F.linear(y.transpose(1, 2).reshape(1, T, -1), layer.wo)
            gate, up = F.linear(rms_norm(x, layer.ffn_norm, self.eps), layer.w13).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, layer.w2)
        return F.linear(rms_norm(x[:, -1], self.norm, self.eps), self.lm_head)


def decode_one(model, tok, pos):
    return model(tok, pos).argmax(-1, keepdim=True)


class GptFast:
    def __init__(self, hf_model, device, max_pos: int):
        self.model, self.device = FastLlama(hf_model, max_pos), device
        self.step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True, dynamic=False)
        if hasattr(torch._dynamo.config, "recompile_limit"):  # one compile per cache size
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @torch.no_grad()
    def measure(self, ids: list[int], n: int) -> Run:
        self.model.setup_cache(len(ids) + n)  # as gpt-fast: prompt + new tokens
        t0 = time.perf_counter()
        x = torch.tensor([ids], device=self.device)
        tok = self.model(x, torch.arange(len(ids), device=self.device), prefill=True).argmax(-1, keepdim=True)
        out, pos = [tok], torch.tensor([len(ids)], device=self.device)
        sync(self.device)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            torch.compiler.cudagraph_mark_step_begin()
            tok = self.step(self.model, tok, pos).clone()  # the graph's output is overwritten by its next replay
            out.append(tok)
            pos += 1
        tokens = torch.cat(out).flatten().tolist()  # syncs
        return Run(t1 - t0, (n - 1) / (time.perf_counter() - t1) if n > 1 else float("nan"), tokens)


def profile_counts(peer, ids: list[int], n: int, device) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        peer.measure(ids, n)
        sync(device)
    c = dict(kernels=0, memcpy_memset=0, gpu_us=0.0, launches=0, graph_launches=0, aten_ops=0)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset")):
                c["memcpy_memset"] += 1
            else:
                c["kernels"] += 1
                c["gpu_us"] += e.time_range.elapsed_us()
        elif e.name.startswith(LAUNCHES):  # runtime and driver API calls, Ex variants included
            c["launches"] += 1
            c["graph_launches"] += "GraphLaunch" in e.name
        elif e.name.startswith("aten::"):
            c["aten_ops"] += 1
    return c


def per_token(peer, ids: list[int], n1: int, n2: int, device) -> dict:
    a, b = profile_counts(peer, ids, n1, device), profile_counts(peer, ids, n2, device)
    d = {k: (b[k] - a[k]) / (n2 - n1) for k in a}
    if device.type != "cuda":
        return {"aten_ops_per_token": d["aten_ops"], "n1": n1, "n2": n2}
    return {"kernels_per_token": d["kernels"], "memcpy_memset_per_token": d["memcpy_memset"],
            "gpu_ms_per_token": d["gpu_us"] / 1e3, "launch_calls_per_token": d["launches"],
            "graph_launches_per_token": d["graph_launches"], "n1": n1, "n2": n2}


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_model(name: str, a, device, dtype, copy_bw: float) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix=f"fachat-bench-{name}-")
    folder = Path(tmp.name)
    hf = build_model(name, a.quick, folder, device, dtype)
    cfg = hf.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight_bytes = sum(p.nbytes for p in hf.parameters())  # the tied embedding once
    kv_per_pos = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * dtype.itemsize
    cases = [("main", a.prompt, a.new_tokens)] + [  # (label, prompt tokens, new tokens)
        (str(c), min(c, cfg.max_position_embeddings - a.context_new_tokens), a.context_new_tokens) for c in a.contexts]
    max_len = max(p + n for _, p, n in cases)
    gen = torch.Generator().manual_seed(1)
    prompts = {p: torch.randint(4, cfg.vocab_size, (p,), generator=gen).tolist() for _, p, _ in cases}
    res = {"config": {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict) or k.startswith("rope")},
           "weights": "random, saved by save_pretrained (bf16 safetensors) to a temp folder, loaded by Engine.load",
           "weight_bytes": weight_bytes, "kv_bytes_per_position": kv_per_pos,
           "cases": [{"label": lb, "prompt": p, "new_tokens": n} for lb, p, n in cases], "engines": {}}
    log(f"{name}: built, {weight_bytes / 2**20:.1f} MiB of weights; cases (label, prompt, new): {cases}")
    peers, eng = {}, res["engines"]
    counters.clear()
    for k in a.peers:
        eng[k] = {"status": "ok", "cases": {}}
        if k in COMPILED and device.type == "cpu" and not a.quick:
            eng[k]["status"] = "skipped: torch.compile on CPU is slow (--quick runs it)"
            continue
        try:
            peers[k] = (FaChat(folder, device, dtype, max_len, graphs=k != "fa-chat-nographs",
                               quantize="int4" if k == "fa-chat-int4" else "auto") if k.startswith("fa-chat")
                        else HF(hf, device, static=k == "hf-static") if k.startswith("hf-")
                        else GptFast(hf, device, max_len))
        except Exception as e:  # noqa: BLE001 - one failing engine must not lose the others' figures
            eng[k]["status"] = failed(e)
            log(f"{name}: {k} {eng[k]['status']}")

    for label, p, n in cases:
        runs = {}
        for k in peers:  # warm-up: compile, graph capture
            if k == "hf-static" and label != "main":
                eng[k]["cases"][label] = {"status": "skipped: each static-cache size recompiles"}
                continue
            t0 = time.perf_counter()
            try:
                peers[k].measure(prompts[p], n)
                eng[k]["cases"][label], runs[k] = {"warmup_s": time.perf_counter() - t0}, []
            except Exception as e:  # noqa: BLE001
                eng[k]["cases"][label] = {"status": failed(e)}
                log(f"{name}: {k} at {label}: {eng[k]['cases'][label]['status']}")
        for _ in range(a.repeats):  # rounds in turns, so that drift weighs on every engine alike
            for k in list(runs):
                try:
                    runs[k].append(peers[k].measure(prompts[p], n))
                except Exception as e:  # noqa: BLE001
                    eng[k]["cases"][label]["status"] = failed(e)
                    del runs[k]
        for k, rs in runs.items():
            roof = copy_bw * 1e9 / (getattr(peers[k], "weight_bytes", weight_bytes) + kv_per_pos * (p + n / 2))
            tok_s = statistics.median(r.decode_tok_s for r in rs)
            eng[k]["cases"][label] |= {
                "prompt": p, "new_tokens": n, "decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s,
                "roofline_tok_s": roof, "roofline_frac": tok_s / roof,
                "ttft_ms": 1e3 * statistics.median(r.ttft_s for r in rs),
                "runs_decode_tok_s": [r.decode_tok_s for r in rs], "tokens": rs[0].tokens}
        log(f"{name}: {label}: " + ", ".join(f"{k} {eng[k]['cases'][label]['decode_tok_s']:.1f} (roofline "
                                             f"{eng[k]['cases'][label]['roofline_tok_s']:.0f})" for k in runs) + " tok/s")

    if device.type == "cuda":  # compiled code that ran without CUDA graphs
        res["inductor_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    ref = eng.get("hf-eager", {}).get("cases", {}).get("main", {}).get("tokens")
    for k, peer in peers.items():
        main = eng[k]["cases"].get("main", {})
        if ref is not None and "tokens" in main:
            eng[k]["agree_with_hf_eager"] = agreement(main["tokens"], ref)
        try:
            prof = eng[k]["profile"] = per_token(peer, prompts[a.prompt], *a.profile_tokens, device)
            if "gpu_ms_per_token" in prof and "ms_per_token" in main:
                prof["gpu_idle_ms_per_token"] = main["ms_per_token"] - prof["gpu_ms_per_token"]
        except Exception as e:  # noqa: BLE001
            eng[k]["profile"] = {"status": failed(e)}
        if isinstance(peer, FaChat):
            eng[k] |= peer.extra()
    log(f"{name}: profiled")
    tmp.cleanup()
    return res


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(name: str, m: dict, contexts: list[int], ttft_ctx: int) -> str:
    head = ["engine", "decode tok/s", "roofline", *[f"ms/tok @{c}" for c in contexts], f"TTFT @{ttft_ctx} ms",
            "kernels/tok", "launches/tok", "GPU ms/tok", "warm-up s", "= HF eager"]
    lines = [f"\n### {name}: {m['weight_bytes'] / 2**20:.1f} MiB of weights (random values)\n",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = [f"- {c['label']}: a {c['prompt']}-token prompt (max_position_embeddings "
             f"{m['config']['max_position_embeddings']})" for c in m["cases"][1:] if str(c["prompt"]) != c["label"]]
    for k, r in m["engines"].items():
        if r["status"] != "ok":
            lines.append(f"| {k} | {r['status']} |" + " |" * (len(head) - 2))
            continue
        cs, prof = r["cases"], r.get("profile", {})
        main, frac = cs.get("main", {}), cs.get("main", {}).get("roofline_frac")
        lines.append("| " + " | ".join([
            k, fmt(main.get("decode_tok_s"), ".1f"), "-" if frac is None else f"{100 * frac:.0f}%",
            *[fmt(cs.get(str(c), {}).get("ms_per_token"), ".2f") for c in contexts],
            fmt(cs.get(str(ttft_ctx), {}).get("ttft_ms"), ".1f"),
            fmt(prof.get("kernels_per_token", prof.get("aten_ops_per_token")), ".1f"),
            fmt(prof.get("launch_calls_per_token"), ".1f"), fmt(prof.get("gpu_ms_per_token"), ".3f"),
            fmt(main.get("warmup_s"), ".1f"),
            f"{r['agree_with_hf_eager']}/{len(main['tokens'])}" if "agree_with_hf_eager" in r else "-"]) + " |")
        if k == "fa-chat" and "agree_with_hf_eager" in r:
            notes.append(f"- greedy: fa-chat's first {r['agree_with_hf_eager']} of {len(main['tokens'])} tokens equal "
                         "transformers eager's")
        notes += [f"- {k} at {c}: {v['status']}" for c, v in cs.items() if "status" in v]
        notes += [f"- {k} profile: {prof['status']}"] if "status" in prof else []
        notes += [f"- {k}: " + ", ".join(f"{x} {r[x]}" for x in ("capture_seconds", "captures", "cuda_graphs", "attention_backend")
                                          if x in r)] if "attention_backend" in r else []
    if m.get("inductor_cudagraph_skips"):
        notes.append(f"- torch.compile skipped CUDA graphs {m['inductor_cudagraph_skips']} times (see its log)")
    return "\n".join(lines + notes)


def plot(result: dict, path: Path) -> None:
    try:
        import plots  # benchmarks/plots.py, beside this script
        fig, axes = plots.panels(len(result["models"]))
    except ImportError as e:
        print(f"no PNG: {e} (pip install matplotlib)")
        return
    s = result["settings"]
    for ax, (name, m) in zip(axes, result["models"].items()):
        for k, r in m["engines"].items():
            pts = [(c, r["cases"][str(c)]["decode_tok_s"]) for c in s["contexts"]
                   if "decode_tok_s" in r.get("cases", {}).get(str(c), {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_title(name)
        ax.set_ylabel("decode tok/s")
    plots.save(fig, axes, f"context: prompt tokens, then {s['context_new_tokens']} decoded",
               f"Greedy decode, random weights, {s['dtype']}, {result['versions']['device_name']}", path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama-1b", help=f"any of {','.join(MODELS)}")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"any of {','.join(PEERS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--new-tokens", type=int, help="main case's new tokens (256; --quick 16)")
    ap.add_argument("--prompt", type=int, help="main case's prompt tokens (128; --quick 16)")
    ap.add_argument("--contexts", help="prompt lengths of the context cases (128,2048,8192; --quick 32,64,128)")
    ap.add_argument("--context-new-tokens", type=int, help="new tokens of the context cases (64; --quick 8)")
    ap.add_argument("--profile-tokens", help="n1,n2 for the per-token profile (8,40; --quick 4,12)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="JSON (default benchmarks/results/decode_<device>.json)")
    ap.add_argument("--png", help="default: the JSON's path with .png")
    ap.add_argument("--quick", action="store_true", help="2-layer scaled-down configs, few tokens: a smoke run")
    a = ap.parse_args()
    for key, (full, quick) in DEFAULTS.items():
        setattr(a, key, getattr(a, key) or (quick if a.quick else full))
    a.contexts = [int(c) for c in str(a.contexts).split(",")]
    a.profile_tokens = [int(c) for c in str(a.profile_tokens).split(",")]
    a.peers = [k for k in a.peers.split(",") if k]
    unknown = set(a.peers) - set(PEERS) | set(a.models.split(",")) - set(MODELS)
    if unknown:
        ap.error(f"unknown model or peer: {sorted(unknown)}")
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ttft_ctx = 2048 if 2048 in a.contexts else max(a.contexts)
    out = Path(a.out or Path(__file__).parent / "results" / f"decode_{device.type}.json")

    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], check=False, capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # no git
        commit = ""
    versions = {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
                "python": sys.version.split()[0], "fa-chat commit": commit, "threads": torch.get_num_threads(),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    copy_bw = copy_gbps(device, 64 if a.quick else 1024)
    result = {"command": " ".join([sys.executable, *sys.argv]), "versions": versions, "copy_GBps": copy_bw,
              "copy_definition": "device-to-device copy_: 2 x tensor bytes / time (bytes read + written)",
              "settings": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "quick": a.quick,
                           **{k: getattr(a, k) for k in (*DEFAULTS, "repeats", "peers")}}, "models": {}}
    print(f"Greedy decode, RANDOM weights in the real configs (no internet){': scaled down (--quick)' * a.quick}; "
          f"{result['settings']['dtype']} on {versions['device_name']}; main case: prompt {a.prompt}, {a.new_tokens} "
          f"new tokens; contexts: {a.context_new_tokens} new tokens; median of {a.repeats}. Copy {copy_bw:.0f} GB/s "
          f"(read + written); roofline = that / bytes read per token."
          + ("" if device.type == "cuda" else " On CPU the kernels/tok column counts aten ops."))
    log(json.dumps(versions))
    for name in a.models.split(","):
        try:
            result["models"][name] = m = bench_model(name, a, device, dtype, copy_bw)
            print(table(name, m, a.contexts, ttft_ctx), flush=True)
        except Exception as e:  # noqa: BLE001
            result["models"][name] = {"status": failed(e), "engines": {}}
            log(f"{name}: {result['models'][name]['status']}")
        gc.collect()  # the model's engines are gone with bench_model's frame: free their memory
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".tmp").write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(out.with_suffix(".tmp"), out)
    print(f"\nwrote {out}")
    plot(result, Path(a.png) if a.png else out.with_suffix(".png"))


if __name__ == "__main__":
    main()

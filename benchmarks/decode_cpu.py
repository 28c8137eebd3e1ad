"""Decode and prefill tok/s of fa-chat against transformers' generate and llama.cpp, same GGUF and prompt, one run.

    python benchmarks/decode_cpu.py [--model PATH.gguf] [--prompt-tokens 256] [--new-tokens 128]

Engines: fa-chat as loaded by default (the file's Q4_0/Q4_1/Q4_K blocks as int4 matmuls, other quantized
matrices as int8, bfloat16 activations in them); "fa-chat dequantized" (quantize="none", every weight in
--dtype); transformers, which dequantizes the GGUF to --dtype; llama.cpp (llama-cpp-python, a benchmark-only
dependency: pip install llama-cpp-python; left out where it does not import), which runs the file's blocks.
Every engine generates exactly --new-tokens greedy tokens from the same token ids (eos is ignored: fa-chat by
clearing its eos ids, transformers by min_new_tokens, llama.cpp's generate never stops by itself). Runs
alternate between the engines, and each figure is the median of --repeats runs. Load s: the engine's load;
RSS MB: the process's resident memory after the load and a warm-up, less before the load; KV MB: what fa-chat's
KV cache held then (so "RSS - KV" is what the issue's memory target bounds: at most 1.3x the file); weights MB:
what fa-chat's weights take (Engine.weight_bytes); decode step: whether fa-chat decoded with the native op, in
TorchScript (FACHAT_CPU_KERNELS=0) or eagerly (FACHAT_CPU_STEP=0), and why. Prints a table and writes JSON and
a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fachat import Engine
from fachat.models.loaders import default_model

TEXT = ("The history of computing is a story of abstraction layered on abstraction. Early machines were wired "
        "by hand; later, stored programs let the same hardware run many tasks. Compilers translated human-readable "
        "code into machine instructions, and operating systems shared one processor among many programs. ")


def prompt_ids(engine: Engine, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += engine.tokenizer.encode(TEXT)
    return ids[:n]


def time_ours(engine: Engine, ids: list[int], new_tokens: int) -> tuple[float, float]:
    gen = engine.generate(ids, max_new_tokens=new_tokens, temperature=0)
    assert len(gen.tokens) == new_tokens, gen.finish_reason
    return gen.stats.prefill_tokens_per_s, gen.stats.decode_tokens_per_s


def time_hf(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    x = torch.tensor([ids])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - t0

    first = run(1)  # prefill + first token
    total = run(new_tokens)
    return len(ids) / first, (new_tokens - 1) / (total - first)


def time_llama_cpp(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    n = 0
    for _ in llm.generate(ids, temp=0.0, reset=True):
        n += 1
        if n == 1:
            first = time.perf_counter()
        if n == new_tokens:
            break
    return len(ids) / (first - t0), (new_tokens - 1) / (time.perf_counter() - first)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def loaded(load, warm_up):
    """(the engine, load seconds, RSS MB it added, warm-up included, and of that its KV cache's MB: fa-chat's)."""
    before = rss_mb()
    t0 = time.perf_counter()
    engine = load()
    seconds = time.perf_counter() - t0
    warm_up(engine)
    added = rss_mb() - before
    if not isinstance(engine, Engine):
        return engine, seconds, added, None
    cache = engine.runner.cache
    return engine, seconds, added, sum(t.numel() * t.element_size() for t in cache.k + cache.v) / 2**20


def plot(result: dict, path: Path) -> None:
    """Decode and prefill tok/s of each engine, as bars."""
    import plots

    fig, axes = plots.panels(2)
    names = list(result["engines"])
    for ax, key in zip(axes, ("decode_tok_s", "prefill_tok_s")):
        ax.bar(names, [result["engines"][n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_ylabel(key.replace("_tok_s", " tok/s (median)"))
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{Path(result['model']).name}, CPU, {result['threads']} threads, prompt {result['prompt_tokens']}, "
                 f"{result['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_cpu.json"))
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = Path(a.model or default_model())
    dtype = getattr(torch, a.dtype)
    engines = {}  # name -> (timing function, engine)
    loads = {}  # name -> (load s, RSS MB, KV MB or None)

    def warm_ours(e: Engine) -> None:
        e.tokenizer.eos_token_ids = []  # always generate exactly --new-tokens
        time_ours(e, prompt_ids(e, 32), 4)

    engine, *loads["fa-chat"] = loaded(lambda: Engine.load(path, device="cpu", dtype=dtype), warm_ours)
    engines["fa-chat"] = (time_ours, engine)
    dequantized, *loads["fa-chat dequantized"] = loaded(
        lambda: Engine.load(path, device="cpu", dtype=dtype, quantize="none"), warm_ours)
    engines["fa-chat dequantized"] = (time_ours, dequantized)
    ids = prompt_ids(engine, a.prompt_tokens)
    hf, *loads["transformers"] = loaded(
        lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval(),
        lambda m: time_hf(m, ids[:32], 4))
    engines["transformers"] = (time_hf, hf)
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama.cpp left out: {e}")
    else:
        llm, *loads["llama.cpp"] = loaded(
            lambda: llama_cpp.Llama(model_path=str(path), n_threads=torch.get_num_threads(),
                                    n_ctx=a.prompt_tokens + a.new_tokens + 16, verbose=False),
            lambda m: time_llama_cpp(m, ids[:32], 4))
        engines["llama.cpp"] = (time_llama_cpp, llm)

    runs = {name: [] for name in engines}
    for _ in range(a.repeats):
        for name, (timed, model) in engines.items():
            runs[name].append(timed(model, ids, a.new_tokens))

    def summary(name):
        prefill, decode = (statistics.median(r[i] for r in runs[name]) for i in (0, 1))
        model = engines[name][1]
        return {"prefill_tok_s": prefill, "decode_tok_s": decode, "load_s": loads[name][0], "rss_MB": loads[name][1],
                "kv_MB": loads[name][2],
                "weights_MB": model.weight_bytes / 2**20 if isinstance(model, Engine) else None,
                "decode_step": ((model.cpu_step.runs if model.cpu_step else "eager") + f" ({model.cpu_step_reason})"
                                if isinstance(model, Engine) else None),
                "runs": [{"prefill_tok_s": p, "decode_tok_s": d} for p, d in runs[name]]}

    result = {
        "model": str(path), "file_MB": path.stat().st_size / 2**20, "dtype": a.dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
        "repeats": a.repeats, "engines": {name: summary(name) for name in engines},
    }
    peer_name = "llama.cpp" if "llama.cpp" in engines else "transformers"
    peer = result["engines"][peer_name]
    print(f"\n{path.name} on CPU ({result['file_MB']:.0f} MB), {torch.get_num_threads()} threads, "
          f"prompt {a.prompt_tokens}, {a.new_tokens} new tokens, median of {a.repeats}; dequantized: {a.dtype}")
    print(f"{'':21}{'prefill tok/s':>15}{'decode tok/s':>14}{'load s':>8}{'RSS MB':>8}{'KV MB':>7}"
          f"{'(RSS-KV)/file':>15}{'weights MB':>12}{f'prefill / decode vs {peer_name}':>32}")
    for name, r in result["engines"].items():
        ratio = f"{r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x / {r['decode_tok_s'] / peer['decode_tok_s']:.2f}x"
        weights = "-" if r["weights_MB"] is None else f"{r['weights_MB']:.1f}"
        kv, of_file = ("-", "-") if r["kv_MB"] is None else \
            (f"{r['kv_MB']:.1f}", f"{(r['rss_MB'] - r['kv_MB']) / result['file_MB']:.2f}x")
        print(f"{name:21}{r['prefill_tok_s']:15.1f}{r['decode_tok_s']:14.1f}{r['load_s']:8.2f}{r['rss_MB']:8.0f}"
              f"{kv:>7}{of_file:>15}{weights:>12}{ratio:>32}")
    for name, r in result["engines"].items():
        if r["decode_step"]:
            print(f"{name}: decode step {r['decode_step']}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

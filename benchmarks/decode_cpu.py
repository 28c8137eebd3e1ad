"""Decode and prefill tok/s of fa-chat against transformers' generate, same model, dtype and prompt, one run.

    python benchmarks/decode_cpu.py [--model PATH.gguf] [--prompt-tokens 256] [--new-tokens 128]

Both sides generate exactly --new-tokens greedy tokens (eos is ignored: fa-chat by clearing its
eos ids, transformers by min_new_tokens). Runs alternate between the two, and each figure is the
median of --repeats runs. Prints a table and writes JSON to benchmarks/results/.
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
    engine = Engine.load(path, device="cpu", dtype=dtype)
    engine.tokenizer.eos_token_ids = []  # always generate exactly --new-tokens
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    ids = prompt_ids(engine, a.prompt_tokens)
    weight_bytes = sum(p.nbytes for p in engine.model.parameters())  # read once per decoded token

    time_ours(engine, ids[:32], 4), time_hf(hf, ids[:32], 4)  # warm-up
    ours, theirs = [], []
    for _ in range(a.repeats):
        ours.append(time_ours(engine, ids, a.new_tokens))
        theirs.append(time_hf(hf, ids, a.new_tokens))

    def summary(runs):
        prefill, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        return {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_GB_s": decode * weight_bytes / 1e9,
                "runs": [{"prefill_tok_s": p, "decode_tok_s": d} for p, d in runs]}

    result = {
        "model": str(path), "dtype": a.dtype, "device": "cpu", "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "repeats": a.repeats,
        "weight_bytes": weight_bytes, "fa_chat": summary(ours), "transformers": summary(theirs),
    }
    f, t = result["fa_chat"], result["transformers"]
    print(f"\nSmolLM2 on CPU, {a.dtype}, {torch.get_num_threads()} threads, prompt {a.prompt_tokens}, "
          f"{a.new_tokens} new tokens, median of {a.repeats}")
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}{'decode GB/s':>13}")
    for name, r in (("fa-chat", f), ("transformers", t)):
        print(f"{name:14}{r['prefill_tok_s']:15.1f}{r['decode_tok_s']:15.1f}{r['decode_GB_s']:13.2f}")
    print(f"{'ratio':14}{f['prefill_tok_s'] / t['prefill_tok_s']:14.2f}x{f['decode_tok_s'] / t['decode_tok_s']:14.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The Metal attention kernels against MPS scaled_dot_product_attention, on an Apple GPU (a Mac only: this
project's CI has none, and these numbers have not been measured by it).

    python benchmarks/kernels_mps.py [--out benchmarks/results/kernels_mps.json]

Time per call: rounds of back-to-back calls between two synchronizations, Metal and SDPA in turns, the
median over rounds; host overhead included, as the engine sees it (MPS has no graph replay).
Decode: batch 1, 32 query heads over 8 KV heads, head_dim 128, float16, T from 1k to 32k keys in a cache
of capacity T + 1024 (SDPA gets the live slice, which it copies to make contiguous); GB/s of K/V read.
Prefill: causal at L = 512, 2k and 8k, and a 512-token chunk onto 4k of cached past (SDPA with an explicit
bottom-right mask), in TFLOP/s (4 * heads * head_dim * visible query-key pairs).
Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HQ, HKV, D, DTYPE = 32, 8, 128, torch.float16
DECODE_T = [1024, 2048, 4096, 8192, 16384, 32768]
PREFILL = [("causal", 512, 0), ("causal", 2048, 0), ("causal", 8192, 0), ("chunk", 512, 4096)]


def median_ms(fns: dict, calls: int, rounds: int = 7) -> dict:
    """Median ms per call of each of fns, timed in turns."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.mps.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.mps.synchronize()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def bench_decode(metal, T: int) -> dict:
    q = torch.randn(1, HQ, D, dtype=DTYPE, device="mps")
    k, v = (torch.randn(1, HKV, T + 1024, D, dtype=DTYPE, device="mps") for _ in range(2))
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k[:, :, :T], v[:, :, :T], enable_gqa=True)[:, :, 0]
    ms = median_ms({"metal": lambda: metal.decode_attention(q, k, v, T), "sdpa": sdpa}, calls=50)
    gb = 2 * HKV * T * D * DTYPE.itemsize / 1e9
    return dict(T=T, parts=metal.split(T, HKV, q.device), metal_us=ms["metal"] * 1e3, sdpa_us=ms["sdpa"] * 1e3,
                metal_GBps=gb / ms["metal"] * 1e3, sdpa_GBps=gb / ms["sdpa"] * 1e3,
                err=rel_err(metal.decode_attention(q, k, v, T), sdpa()))


def bench_prefill(metal, kind: str, L: int, past: int) -> dict:
    n = L + past
    q = torch.randn(1, HQ, L, D, dtype=DTYPE, device="mps")
    k, v = (torch.randn(1, HKV, n, D, dtype=DTYPE, device="mps") for _ in range(2))
    mask = torch.arange(n, device="mps")[None, :] <= torch.arange(past, n, device="mps")[:, None]
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=None if past == 0 else mask,
                                                  is_causal=past == 0, enable_gqa=True)
    ms = median_ms({"metal": lambda: metal.prefill_attention(q, k, v, n), "sdpa": sdpa}, calls=5)
    flops = 4 * HQ * D * (L * past + L * (L + 1) // 2) / 1e12
    return dict(case=kind, L=L, past=past, metal_ms=ms["metal"], sdpa_ms=ms["sdpa"],
                metal_TFLOPs=flops / ms["metal"] * 1e3, sdpa_TFLOPs=flops / ms["sdpa"] * 1e3,
                err=rel_err(metal.prefill_attention(q, k, v, n), sdpa()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels_mps.json")
    args = ap.parse_args()
    if not (torch.backends.mps.is_available() and hasattr(torch.mps, "compile_shader")):
        sys.exit("benchmarks/kernels_mps.py needs an Apple GPU (MPS) and torch >= 2.7 (torch.mps.compile_shader); "
                 "there is none here.")
    from fachat.kernels.metal import attention as metal

    torch.manual_seed(0)
    result = dict(device=platform.platform(), machine=platform.machine(), torch=torch.__version__,
                  python=platform.python_version())
    result["decode"] = [bench_decode(metal, T) for T in DECODE_T]
    result["prefill"] = [bench_prefill(metal, *case) for case in PREFILL]
    if metal.broken:
        sys.exit(f"Metal kernels fell back to the reference on this Mac (the timings would be the reference's): "
                 f"{metal.broken}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['device']}, torch {result['torch']}")
    print(f"\ndecode (B=1, {HQ} q / {HKV} kv heads, D={D}, float16); µs per call")
    print("| T | parts | metal µs | SDPA µs | metal GB/s | SDPA GB/s | rel err |")
    print("| ---: " * 7 + "|")
    for r in result["decode"]:
        print(f"| {r['T'] // 1024}k | {r['parts']} | {r['metal_us']:.0f} | {r['sdpa_us']:.0f} | {r['metal_GBps']:.0f} "
              f"| {r['sdpa_GBps']:.0f} | {r['err']:.1e} |")
    print(f"\nprefill (B=1, {HQ} q / {HKV} kv heads, D={D}, float16); ms per call")
    print("| case | L | past | metal ms | SDPA ms | metal TFLOP/s | SDPA TFLOP/s | rel err |")
    print("| --- " + "| ---: " * 7 + "|")
    for r in result["prefill"]:
        print(f"| {r['case']} | {r['L']} | {r['past']} | {r['metal_ms']:.2f} | {r['sdpa_ms']:.2f} "
              f"| {r['metal_TFLOPs']:.2f} | {r['sdpa_TFLOPs']:.2f} | {r['err']:.1e} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

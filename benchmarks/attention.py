"""The triton attention kernels against torch's scaled_dot_product_attention, on one CUDA GPU.

    python benchmarks/attention.py [--out benchmarks/results/kernels_h100.json] [--sweep] [--profile] [--between]
    ncu --clock-control none --kernel-name regex:'decode|prefill|flash|fmha|sdpa' \
        --section SpeedOfLight python benchmarks/attention.py --ncu decode:16384

GPU time: a CUDA graph of many calls, each on another of several input sets (so that L2 never holds
the set a call reads), replayed and timed with events; the median over replays, per call. It leaves
out the host's launch overhead, which "eager µs" shows: wall time per call of back-to-back calls
without a graph, as an engine without graphs sees it (rounds of triton and SDPA in turns, median).
do_bench µs is triton.testing.do_bench (a 256 MB memset before each call to flush L2, events around
the call); on an H100 it reads 12-14 µs above the graph's time for either side, most of it the
write-back, during the timed call, of the L2 lines the memset leaves dirty (benchmarks/README.md).
Decode: batch 1, 32 query heads over 8 KV heads, head_dim 128, bf16, T from 1k to 128k; GB/s of K/V
read, and that as a fraction of the device-to-device copy bandwidth measured in the same run (bytes
read + written).
Prefill: causal at L = 2k, 8k, 32k, and a 512-token chunk onto 8k of cached past (SDPA with an explicit
bottom-right mask), in TFLOP/s (4 * heads * head_dim * visible query-key pairs).
--sweep times alternative block configurations of the Triton kernels (not the Gluon one); --profile prints
torch.profiler's kernel table; --between times decode against SDPA at every 2k keys up to 64k (GPU time
only); --ncu decode:T or prefill:L only runs that case (triton, then SDPA), for Nsight Compute to profile.
Prints a table; writes JSON and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fachat.kernels.triton import decode, prefill

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
DECODE_T = [1024, 2048, 4096, 8192, 16384, 32768, 49152, 65536, 131072]
BETWEEN_STEP, BETWEEN_MAX = 2048, 65536  # --between
PREFILL = [("causal", 2048, 0), ("causal", 8192, 0), ("causal", 32768, 0), ("chunk", 512, 8192)]
L2_BYTES = 50 * 2**20  # an H100's


def bench_us(fn) -> float:
    return do_bench(fn, warmup=100, rep=400, return_mode="median") * 1e3


def gpu_times(calls: dict, calls_per_graph: int = 64, replays: int = 15) -> dict:
    """GPU µs per call of each replay, for each name of `calls`, of a CUDA graph that runs that name's calls
    round robin (one per input set). The graphs replay in turns: under a long load the H100 holds its
    power cap by lowering the clock, and taking turns lets that weigh on every name alike."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for fns in calls.values():
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = {}
    for name, fns in calls.items():
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            for i in range(calls_per_graph):
                fns[i % len(fns)]()
        graphs[name].replay()
    times = {name: [] for name in calls}
    for _ in range(replays):
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    return times


def median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def gpu_us(calls: dict, calls_per_graph: int = 64, replays: int = 15) -> dict:
    """Median of gpu_times for each name."""
    return {name: median(t) for name, t in gpu_times(calls, calls_per_graph, replays).items()}


def sets_for(nbytes: int) -> int:
    """Input sets to rotate through so that none is still in L2 when its turn comes again."""
    return max(2, -(-3 * L2_BYTES // nbytes))


def eager_us(fns: dict, n: int = 1000, rounds: int = 5) -> dict:
    """Wall µs per call of n back-to-back calls, the host's launch overhead where it exceeds the GPU's
    time: the median of `rounds`, taken in turns by each of fns, so that drift on the host hits all alike."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: median(t) for name, t in times.items()}


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.nbytes / us / 1e3


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def kv_bytes(T: int) -> int:
    return 2 * HKV * T * D * DTYPE.itemsize


def decode_inputs(T: int):
    q = torch.randn(1, HQ, D, device="cuda", dtype=DTYPE)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=DTYPE)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=DTYPE)
    return q, k, v


def decode_sets(T: int) -> list:
    """Enough decode input sets of T keys to rotate through with none in L2 when its turn comes."""
    return [decode_inputs(T) for _ in range(sets_for(kv_bytes(T)))]


def prefill_inputs(L: int, past: int, d: int = D):
    n = L + past
    q = torch.randn(1, HQ, L, d, device="cuda", dtype=DTYPE)
    k = torch.randn(1, HKV, n, d, device="cuda", dtype=DTYPE)
    v = torch.randn(1, HKV, n, d, device="cuda", dtype=DTYPE)
    return q, k, v


def decode_calls(T: int) -> tuple[list, list, list]:
    """Input sets of T keys, and a call of decode.decode_attention and one of SDPA on each."""
    ins = decode_sets(T)
    ours = [lambda q=q, k=k, v=v: decode.decode_attention(q, k, v, T) for q, k, v in ins]
    sdpa = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
            for q, k, v in ins]
    return ins, ours, sdpa


def bench_decode(T: int, copy_gbps: float, sms: int) -> dict:
    ins, ours, sdpa = decode_calls(T)
    gb = kv_bytes(T) / 1e9
    row = {"T": T, "kv_MB": gb * 1e3, "sets": len(ins), "kernel": decode_kernel(T, sms),
           "err": rel_err(ours[0](), sdpa[0]()[:, :, 0])}
    row |= decode_speeds(T, gpu_us({"triton": ours, "sdpa": sdpa}), copy_gbps)
    row |= {f"{name}_do_bench_us": bench_us(fns[0]) for name, fns in (("triton", ours), ("sdpa", sdpa))}
    row |= {f"{name}_eager_us": us for name, us in eager_us({"triton": ours[0], "sdpa": sdpa[0]}).items()}
    return row


def decode_speeds(T: int, us: dict, copy_gbps: float) -> dict:
    """µs, GB/s of K/V read and that as a fraction of copy bandwidth, for each name of `us` (µs a call)."""
    speeds = {}
    for name, t in us.items():
        gbps = kv_bytes(T) / t / 1e3
        speeds |= {f"{name}_us": t, f"{name}_GBps": gbps, f"{name}_frac": gbps / copy_gbps}
    return speeds


def decode_between(copy_gbps: float, sms: int) -> list[dict]:
    """GPU µs of the decode at every BETWEEN_STEP keys up to BETWEEN_MAX, next to SDPA's: the main table's T
    are a sample, and the kernel changes at a length threshold."""
    rows = []
    for T in range(BETWEEN_STEP, BETWEEN_MAX + 1, BETWEEN_STEP):
        ins, ours, sdpa = decode_calls(T)
        us = gpu_us({"triton": ours, "sdpa": sdpa}, calls_per_graph=32, replays=9)
        rows.append({"T": T, "kernel": decode_kernel(T, sms)} | decode_speeds(T, us, copy_gbps))
        del ins, ours, sdpa
    return rows


def decode_kernel(T: int, sms: int) -> str:
    """How decode.decode_attention splits T keys, in words."""
    return f"triton, {decode.split(T, HKV, D, sms, decode.config(D, DTYPE))} partitions"


def prefill_flops(L: int, past: int) -> int:
    return 4 * HQ * D * (L * past + L * (L + 1) // 2)  # visible (query, key) pairs


def prefill_kernel(q, k, v, n: int) -> str:
    """Which kernel prefill.prefill_attention runs for these inputs, in words."""
    if prefill.gluon_kernel(q, k, v, n, None, None) is not None:
        return "gluon, warp-specialised (sm_90)"
    c = prefill.config_for(q.shape, k.dtype, q.device)
    cap = f", <= {c.max_registers} regs" if c.max_registers else ""
    return f"triton {c.block_m}x{c.block_n}, {c.num_warps} warps, {c.num_stages} stages{cap}"


def bench_prefill(kind: str, L: int, past: int) -> dict:
    n = L + past
    ins = [prefill_inputs(L, past) for _ in range(sets_for((HQ * L + 2 * HKV * n) * D * DTYPE.itemsize))]
    ours = [lambda q=q, k=k, v=v: prefill.prefill_attention(q, k, v, n) for q, k, v in ins]
    if past:  # SDPA's is_causal is top-left aligned: the chunk needs an explicit bottom-right mask
        mask = torch.arange(n, device="cuda")[None, :] <= torch.arange(past, n, device="cuda")[:, None]
        sdpa = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                for q, k, v in ins]
    else:
        sdpa = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                for q, k, v in ins]
    row = {"case": kind, "L": L, "past": past, "kernel": prefill_kernel(*ins[0], n),
           "err": rel_err(ours[0](), sdpa[0]())}
    # Turns of one pass over the input sets each (a graph of a few calls): the finer the turns, the
    # closer the clock each side runs at.
    times = gpu_times({"triton": ours, "sdpa": sdpa}, calls_per_graph=len(ours), replays=25)
    for name, t in times.items():
        row |= {f"{name}_us": median(t), f"{name}_TFLOPs": prefill_flops(L, past) / median(t) / 1e6}
    row |= {f"{name}_do_bench_us": bench_us(fns[0]) for name, fns in (("triton", ours), ("sdpa", sdpa))}
    row["ratio"] = row["triton_TFLOPs"] / row["sdpa_TFLOPs"]
    turns = sorted(s / t for t, s in zip(times["triton"], times["sdpa"], strict=True))
    row["ratio_turns"] = [turns[len(turns) // 10], turns[-1 - len(turns) // 10]]  # 10th and 90th percentiles
    return row


SWEEP_T = (1024, 16384, 32768, 131072)
# (block_n, num_warps, num_stages) compiled, each split for 1 to 4 programs per multiprocessor.
SWEEP_DECODE = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2),
                (128, 8, 3), (32, 4, 4), (32, 2, 4)]


def sweep(copy_gbps: float) -> list[dict]:
    """Alternative block configurations of the triton kernels alone (GPU µs); the defaults are marked."""
    def time_cfg(calls):
        try:
            return gpu_us({"cfg": calls}, calls_per_graph=max(len(calls), 16), replays=5)["cfg"]
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError) as e:
            return type(e).__name__

    def frac(T, us):
        if isinstance(us, str):
            return us
        return f"{us:.1f} µs ({kv_bytes(T) / us / 1e3 / copy_gbps:.0%})"

    rows = []
    base = decode.config(D, DTYPE)
    inputs = {T: decode_sets(T) for T in SWEEP_T}
    us = {T: time_cfg([lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                       for q, k, v in ins]) for T, ins in inputs.items()}
    rows.append({"kernel": "decode", "cfg": "sdpa", "default": False, "us": us})
    print("decode sdpa:", "  ".join(f"{T // 1024}k {frac(T, u)}" for T, u in us.items()), flush=True)
    for block_n, warps, stages in SWEEP_DECODE:
        for per_sm in (1, 2, 3, 4):
            cfg = decode.DecodeConfig(block_n, warps, stages, per_sm)
            us = {T: time_cfg([lambda q=q, k=k, v=v, T=T, c=cfg: decode.decode_attention(q, k, v, T, cfg=c)
                               for q, k, v in ins])
                  for T, ins in inputs.items()}
            rows.append({"kernel": "decode", "cfg": cfg.__dict__, "default": cfg == base, "us": us})
            print(f"decode {cfg}{' (default)' if cfg == base else ''}:",
                  "  ".join(f"{T // 1024}k {frac(T, u)}" for T, u in us.items()), flush=True)
    del inputs
    for d in (D, 64):  # the benchmark's head_dim, and SmolLM2's
        defaults = {prefill.config(d, DTYPE), prefill.config(d, DTYPE, two_per_sm=True)}
        inputs = {(L, past): [prefill_inputs(L, past, d)] for _, L, past in PREFILL[1:]}
        for args in [(128, 64, 8, 3), (128, 64, 8, 2, 128), (128, 64, 8, 3, 128), (128, 64, 8, 2), (128, 64, 8, 4),
                     (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]:
            cfg = prefill.PrefillConfig(*args)
            res = {}
            for (L, past), ins in inputs.items():
                us = time_cfg([lambda q=q, k=k, v=v, n=L + past, c=cfg: prefill.prefill_attention(q, k, v, n, cfg=c)
                               for q, k, v in ins])
                res[f"L={L} past={past}"] = us if isinstance(us, str) else prefill_flops(L, past) * d // D / us / 1e6
            rows.append({"kernel": f"prefill D={d}", "cfg": cfg.__dict__, "default": cfg in defaults, "TFLOPs": res})
            print(rows[-1], flush=True)
    return rows


def ncu_target(case: str) -> None:
    """decode:T (T keys) or prefill:L (causal, L tokens), triton then SDPA, a few calls each: a small
    program for Nsight Compute to profile."""
    kind, _, n = case.partition(":")
    n = int(n)
    if kind == "decode":
        ins = [decode_inputs(n) for _ in range(5)]
        for q, k, v in ins:
            decode.decode_attention(q, k, v, n)
        for q, k, v in ins:
            F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
    elif kind == "prefill":
        q, k, v = prefill_inputs(n, 0)
        for _ in range(2):
            prefill.prefill_attention(q, k, v, n)
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        raise SystemExit(f"--ncu takes decode:T or prefill:L, not {case!r}")
    torch.cuda.synchronize()


def profile() -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for T in (1024, 16384, 131072):
        ins = decode_sets(T)
        for q, k, v in ins:
            decode.decode_attention(q, k, v, T)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(40):
                q, k, v = ins[i % len(ins)]
                decode.decode_attention(q, k, v, T)
                F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
            torch.cuda.synchronize()
        print(f"decode T={T}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    for kind, L, past in PREFILL[1:]:
        n = L + past
        q, k, v = prefill_inputs(L, past)
        prefill.prefill_attention(q, k, v, n)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                prefill.prefill_attention(q, k, v, n)
                if not past:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            torch.cuda.synchronize()
        print(f"prefill {kind} L={L} past={past}\n" + prof.key_averages().table(sort_by="cuda_time_total",
                                                                             row_limit=6))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    dec = result["decode"]
    Ts = [r["T"] for r in dec]
    for name, color in (("triton", "C0"), ("sdpa", "C1")):
        a.plot(Ts, [r[f"{name}_GBps"] for r in dec], marker="o", color=color, label=name)
        between = result.get("decode_between", [])
        if between:
            a.plot([r["T"] for r in between], [r[f"{name}_GBps"] for r in between],
                   color=color, lw=0.8, alpha=0.6, label=f"{name}, every {BETWEEN_STEP} keys")
    a.axhline(result["copy_GBps"], color="gray", ls="--", label="device copy")
    a.axhline(0.85 * result["copy_GBps"], color="gray", ls=":", label="85% of copy")
    a.set_xscale("log", base=2)
    a.set_xlabel("T (keys)")
    a.set_ylabel("GB/s of K/V read")
    a.set_title(f"decode: B=1, {HQ}q/{HKV}kv heads, D={D}, bf16")
    a.legend()
    pre = result["prefill"]
    x = range(len(pre))
    b.bar([i - 0.2 for i in x], [r["triton_TFLOPs"] for r in pre], width=0.4, label="triton")
    b.bar([i + 0.2 for i in x], [r["sdpa_TFLOPs"] for r in pre], width=0.4, label="sdpa")
    b.set_xticks(list(x), [f"{r['case']} {r['L']}" + (f"+{r['past']}" if r["past"] else "") for r in pre])
    b.set_ylabel("TFLOP/s")
    b.set_title("prefill, causal (bottom-right)")
    b.legend()
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels_h100.json")
    ap.add_argument("--sweep", action="store_true", help="also time alternative block configurations")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler kernel tables")
    ap.add_argument("--between", action="store_true",
                    help=f"also time decode against SDPA at every {BETWEEN_STEP} keys up to {BETWEEN_MAX} (GPU time)")
    ap.add_argument("--ncu", metavar="CASE", help="only run decode:T or prefill:L, for Nsight Compute")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.ncu:
        ncu_target(args.ncu)
        return
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), decode_config=decode.config(D, DTYPE).__dict__,
                  prefill_config=prefill.config(D, DTYPE).__dict__,
                  prefill_config_two_per_sm=prefill.config(D, DTYPE, two_per_sm=True).__dict__)
    result["copy_GBps"] = copy_bandwidth()
    if args.sweep:
        result["sweep"] = sweep(result["copy_GBps"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result["decode"] = [bench_decode(T, result["copy_GBps"], sms) for T in DECODE_T]
    result["prefill"] = [bench_prefill(*case) for case in PREFILL]
    if args.between:
        result["decode_between"] = decode_between(result["copy_GBps"], sms)
    if args.profile:
        profile()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}; "
          f"copy bandwidth {result['copy_GBps']:.0f} GB/s (read + write)")
    print("\ndecode (B=1, 32 q / 8 kv heads, D=128, bf16); GPU µs from CUDA-graph replay over rotating inputs")
    print("| T | kernel | triton µs | SDPA µs | triton GB/s | SDPA GB/s | triton / copy | SDPA / copy "
          "| do_bench µs triton / SDPA | eager µs triton / SDPA | rel err |")
    print("| ---: | --- " + "| ---: " * 9 + "|")
    for r in result["decode"]:
        print(f"| {r['T'] // 1024}k | {r['kernel']} | {r['triton_us']:.1f} | {r['sdpa_us']:.1f} "
              f"| {r['triton_GBps']:.0f} | {r['sdpa_GBps']:.0f} | {r['triton_frac']:.0%} | {r['sdpa_frac']:.0%} "
              f"| {r['triton_do_bench_us']:.1f} / {r['sdpa_do_bench_us']:.1f} "
              f"| {r['triton_eager_us']:.1f} / {r['sdpa_eager_us']:.1f} | {r['err']:.1e} |")
    print("\nprefill (B=1, 32 q / 8 kv heads, D=128, bf16)")
    print("| case | L | past | kernel | triton µs | SDPA µs | triton TFLOP/s | SDPA TFLOP/s | ratio "
          "| ratio per turn, 10th-90th pct | do_bench µs triton / SDPA | rel err |")
    print("| --- " + "| ---: " * 2 + "| --- " + "| ---: " * 8 + "|")
    for r in result["prefill"]:
        print(f"| {r['case']} | {r['L']} | {r['past']} | {r['kernel']} | {r['triton_us']:.0f} | {r['sdpa_us']:.0f} "
              f"| {r['triton_TFLOPs']:.0f} | {r['sdpa_TFLOPs']:.0f} | {r['ratio']:.2f} "
              f"| {r['ratio_turns'][0]:.2f}-{r['ratio_turns'][1]:.2f} "
              f"| {r['triton_do_bench_us']:.0f} / {r['sdpa_do_bench_us']:.0f} | {r['err']:.1e} |")
    if args.between:
        print(f"\ndecode at every {BETWEEN_STEP} keys, GPU µs")
        print("| T | kernel | triton µs | SDPA µs | triton / SDPA | triton / copy |")
        print("| ---: | --- " + "| ---: " * 4 + "|")
        for r in result["decode_between"]:
            print(f"| {r['T']} | {r['kernel']} | {r['triton_us']:.1f} | {r['sdpa_us']:.1f} "
                  f"| {r['triton_us'] / r['sdpa_us']:.3f} | {r['triton_frac']:.0%} |")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""A decode step's projections, fused with their neighbours (one kernel each, fachat.kernels.triton.fused), against
what they replace: torch's matmul (cuBLAS) with the layer's other kernels around it. One CUDA GPU, batch 1, bf16,
the shapes of SmolLM2-135M and Llama-3.2-1B.

    python benchmarks/projections.py [--sweep] [--weights int4] [--out benchmarks/results/projections_cuda.json]

GPU µs per call from CUDA graphs of many calls, each on another of several weight sets so that L2 never holds the
set a call reads, as in a decode step, whose weights are read once (benchmarks/attention.py's gpu_us). GB/s counts
the weights read, and "of copy" relates that to the device-to-device copy bandwidth measured in the same run.
--sweep times each fused kernel over rows a program (BLOCK_R) and weights a step (sweep_blocks). --weights int4
runs the fused kernels on int4 layers (fachat.models.quant.Int4Linear, groups of 32), against the same bf16 cuBLAS
path. Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from attention import copy_bandwidth, gpu_us, sets_for
from fachat.kernels.triton import fused
from fachat.models.quant import GROUP, quant_linear, quantize_int4

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim, vocab
    "smollm2": (576, 1536, 9, 3, 64, 49152),
    "llama-1b": (2048, 8192, 32, 8, 64, 128256),
}
DTYPE = torch.bfloat16
CAPACITY = 512
metas = []  # --sweep's caches of launch arguments, alive for good


def cases(model: str, int4: bool) -> dict:
    """name -> (weights, K, sets) where sets builds one set of inputs and returns (fused call, unfused call)."""
    hidden, inter, hq, hkv, d, vocab = SHAPES[model]
    dev = "cuda"

    def rnd(*shape):
        return torch.randn(shape, device=dev, dtype=DTYPE) * shape[-1] ** -0.5

    def layer(w):  # the model's projections: nn.Linear layers, or Int4Linear
        if int4:
            return quant_linear(quantize_int4(w.float()), None, w.device)
        out = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        out.weight = torch.nn.Parameter(w, requires_grad=False)
        return out

    cos, sin = (torch.randn(CAPACITY, d, device=dev, dtype=DTYPE) for _ in range(2))
    pos = torch.tensor([[CAPACITY // 2]], device=dev)
    k, v = (torch.zeros(1, hkv, CAPACITY, d, device=dev, dtype=DTYPE) for _ in range(2))
    h, nw = rnd(1, 1, hidden), rnd(hidden)

    def qkv():
        w = rnd((hq + 2 * hkv) * d, hidden)
        lw = layer(w)
        return (lambda: fused.norm_rope_write(h, nw, 1e-5, lw, cos, sin, pos, k, v, hq, hkv),
                lambda: fused.rope_write(F.linear(fused.rms_norm(h, nw, 1e-5), w), cos, sin, pos, k, v, hq, hkv))

    def o_proj():
        w, o = rnd(hidden, hq * d), rnd(1, 1, hq * d)
        lw = layer(w)
        return lambda: fused.linear_add(o, lw, h), lambda: h + F.linear(o, w)

    def gate_up():
        w = rnd(2 * inter, hidden)
        lw = layer(w)
        return (lambda: fused.norm_silu_mul(h, nw, 1e-5, lw),
                lambda: fused.silu_mul(F.linear(fused.rms_norm(h, nw, 1e-5), w)))

    def down():
        w, x = rnd(hidden, inter), rnd(1, 1, inter)
        lw = layer(w)
        return lambda: fused.linear_add(x, lw, h), lambda: h + F.linear(x, w)

    def lm_head():
        w = rnd(vocab, hidden)
        lw = layer(w)
        return lambda: fused.norm_linear(h[:, -1], nw, 1e-5, lw), lambda: F.linear(fused.rms_norm(h[:, -1], nw, 1e-5), w)

    sizes = {"qkv": (hq + 2 * hkv) * d * hidden, "o_proj": hidden * hq * d, "gate_up": 2 * inter * hidden,
             "down": hidden * inter, "lm_head": vocab * hidden}
    ks = {"qkv": hidden, "o_proj": hq * d, "gate_up": hidden, "down": inter, "lm_head": hidden}
    makers = {"qkv": qkv, "o_proj": o_proj, "gate_up": gate_up, "down": down, "lm_head": lm_head}
    return {name: (sizes[name], ks[name], makers[name]) for name in makers}


def sweep_blocks(K: int, int4: bool) -> list[tuple[int, int]]:
    """--sweep's (BLOCK_R, BLOCK_K): bf16 over rows a program and weights a step (BLOCK_R * BLOCK_K); int4 over rows
    and the step's codes a row (a lane takes a group of 32 of them: the step sets the warps, fused._warps)."""
    full = triton.next_power_of_2(K)
    if int4:
        return sorted({(r, min(k, full)) for r in (2, 4, 8, 16) for k in (1024, 2048, 4096, 8192)})
    return sorted({(r, min(max(64, tile // r), full)) for r in (2, 4, 8, 16, 32) for tile in (4096, 8192)})


def measure(model: str, sweep: bool, int4: bool, copy_gbs: float) -> list[dict]:
    rows = []
    for name, (weights, K, make) in cases(model, int4).items():
        # bytes read: int4 codes with a bf16 scale and zero a group; cuBLAS (unfused) reads bf16
        nbytes = {"fused": int(weights * (0.5 + 4 / GROUP if int4 else DTYPE.itemsize)),
                  "unfused": weights * DTYPE.itemsize}
        sets = [make() for _ in range(sets_for(nbytes["unfused"]))]
        calls = {"fused": [s[0] for s in sets], "unfused": [s[1] for s in sets]}
        per_graph = max(64, len(sets))
        if sweep:
            saved = fused.gemv_blocks, fused._linear_meta, fused._rope_linear_meta
            for block_r, block_k in sweep_blocks(K, int4):
                fused.gemv_blocks = lambda rows, K, int4, r=block_r, kk=block_k: (r, kk)
                # New caches of the launch arguments, the old ones kept: launchers key on the dicts' ids.
                metas.append((fused._linear_meta, fused._rope_linear_meta))
                fused._linear_meta = functools.cache(saved[1].__wrapped__)
                fused._rope_linear_meta = functools.cache(saved[2].__wrapped__)
                us = gpu_us({"x": [s[0] for s in sets]}, per_graph)["x"]
                rows.append(dict(model=model, op=name, impl=f"fused r{block_r} k{block_k}", us=us, int4=int4,
                                 gbs=nbytes["fused"] / us / 1e3))
            metas.append((fused._linear_meta, fused._rope_linear_meta))
            fused.gemv_blocks, fused._linear_meta, fused._rope_linear_meta = saved
        for impl, us in gpu_us(calls, per_graph).items():
            rows.append(dict(model=model, op=name, impl=impl, us=us, int4=int4 and impl == "fused",
                             gbs=nbytes[impl] / us / 1e3, of_copy=nbytes[impl] / us / 1e3 / copy_gbs,
                             mb=nbytes[impl] / 2**20))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--weights", choices=("bf16", "int4"), default="bf16", help="the fused kernels' weights")
    ap.add_argument("--out", default="benchmarks/results/projections_cuda.json")
    args = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s")
    rows = [r for m in args.models.split(",") for r in measure(m, args.sweep, args.weights == "int4", copy_gbs)]
    print(f"{'model':9} {'op':8} {'impl':18} {'MB':>7} {'µs':>8} {'GB/s':>7} {'of copy':>7}")
    for r in rows:
        of_copy = f"{r['of_copy']:.0%}" if "of_copy" in r else ""
        mb = f"{r['mb']:.1f}" if "mb" in r else ""
        print(f"{r['model']:9} {r['op']:8} {r['impl']:18} {mb:>7} {r['us']:8.2f} {r['gbs']:7.0f} {of_copy:>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                              host=platform.node(), copy_gbs=copy_gbs, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

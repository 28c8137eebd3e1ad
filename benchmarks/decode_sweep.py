"""Decode block configurations of the triton kernel at 8k-128k keys, end to end (partition kernel and
reduce), on one CUDA GPU; SDPA alongside.

    python benchmarks/decode_sweep.py

Same inputs and timing as kernels.py (batch 1, 32 query / 8 KV heads, D = 128, bf16; CUDA-graph replay
over rotating input sets). Each configuration is (block_n, num_warps, num_stages) compiled, times
programs per multiprocessor for the split. Prints one line per configuration: µs and the fraction of
the copy bandwidth.
"""
from __future__ import annotations

import torch.nn.functional as F
import triton
from kernels import copy_bandwidth, decode_inputs, gpu_us, sets_for

from fachat.kernels.triton import decode

TS = (8192, 16384, 32768, 131072)
BLOCKS = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3),
          (32, 4, 4), (32, 2, 4)]


def timed(calls) -> float:
    try:
        return gpu_us(calls, calls_per_graph=max(len(calls), 32), replays=7)
    except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
        return float("nan")


def main() -> None:
    copy = copy_bandwidth()
    print(f"copy {copy:.0f} GB/s", flush=True)
    inputs = {T: [decode_inputs(T) for _ in range(sets_for(2 * 8 * T * 128 * 2))] for T in TS}
    gb = {T: 2 * 8 * T * 128 * 2 / 1e9 for T in TS}
    sdpa = {T: timed([lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                      for q, k, v in ins]) for T, ins in inputs.items()}
    print("sdpa", {T: f"{us:.1f}" for T, us in sdpa.items()}, flush=True)
    for block_n, warps, stages in BLOCKS:
        for per_sm in (1, 2, 3, 4):
            cfg = decode.DecodeConfig(block_n, warps, stages, per_sm, block_n)
            us = {T: timed([lambda q=q, k=k, v=v, T=T, c=cfg: decode.decode_attention(q, k, v, T, cfg=c)
                            for q, k, v in ins]) for T, ins in inputs.items()}
            print(f"bn={block_n} w={warps} st={stages} pps={per_sm}: "
                  + "  ".join(f"{T // 1024}k {u:.1f} ({gb[T] / u * 1e6 / copy:.0%})" for T, u in us.items()),
                  flush=True)


if __name__ == "__main__":
    main()

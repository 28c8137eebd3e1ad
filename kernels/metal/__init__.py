"""Metal backend for Apple GPUs: flash-attn-vec decode (the live KV range split over threadgroups, then a
reduce) and flash prefill on simdgroup matrices, from the .metal sources beside this file, compiled at run
time by torch.mps.compile_shader (fachat.kernels.dispatch loads it lazily). On CPU tensors the same sources
run through fachat.kernels.metal.emulate, the test harness (FACHAT_METAL_EMULATE=1 routes the dispatch here).

The layer's other steps are the reference backend's torch ops: MPS runs them as they are.
"""
from fachat.kernels.metal.attention import decode_attention, prefill_attention
from fachat.kernels.reference import (PREFILL_CHUNK, linear_add, norm_linear, norm_rope_write, norm_silu_mul, rms_norm,
                                      rope_write, silu_mul)

__all__ = ["decode_attention", "prefill_attention", "rms_norm", "silu_mul", "rope_write", "norm_linear", "norm_silu_mul",
           "norm_rope_write", "linear_add", "PREFILL_CHUNK"]

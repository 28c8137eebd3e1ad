"""Triton backend: split-KV decode and tiled flash prefill attention, and the layer's fused RMSNorm, SiLU-mul,
RoPE with the K/V cache write, and decode's projections fused with them (fachat.kernels.dispatch loads it lazily).

INTERPRET says whether the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 when this
package was first imported (Triton decides when it decorates them).
"""
from fachat.kernels.triton.decode import INTERPRET, decode_attention
from fachat.kernels.triton.fused import (linear_add, norm_linear, norm_rope_write, norm_silu_mul, rms_norm, rope_write,
                                        silu_mul)
from fachat.kernels.triton.prefill import prefill_attention

# Prompt tokens a forward takes at once: flash prefill keeps no score matrix, so the chunk bounds the MLP's
# activations only, and fewer chunks launch fewer kernels.
PREFILL_CHUNK = 2048

__all__ = ["decode_attention", "prefill_attention", "rms_norm", "silu_mul", "rope_write", "norm_linear", "norm_silu_mul",
           "norm_rope_write", "linear_add", "INTERPRET", "PREFILL_CHUNK"]

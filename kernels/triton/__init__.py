"""Triton attention backend: split-KV decode and tiled flash prefill (fachat.kernels.dispatch loads it lazily).

INTERPRET says whether the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 when this
package was first imported (Triton decides when it decorates them).
"""
from fachat.kernels.triton.decode import INTERPRET, decode_attention
from fachat.kernels.triton.prefill import prefill_attention

__all__ = ["decode_attention", "prefill_attention", "INTERPRET"]

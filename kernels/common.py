"""What every attention backend computes the same way, whatever language its kernels are written in."""
from __future__ import annotations

import math

LOG2E = 1.4426950408889634


def score_scales(scale: float | None, softcap: float | None, head_dim: int) -> tuple[float, float]:
    """(qk_scale, softcap_log2e) for the kernels, in base 2: q.k times qk_scale is the score (with a
    softcap, tanh's argument, whose value times softcap_log2e is the score)."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if softcap is None:
        return scale * LOG2E, 0.0
    return scale / softcap, softcap * LOG2E

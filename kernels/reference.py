"""Torch reference backend: the CPU path and the oracle for the GPU kernels.

The attention functions read K/V from capacity buffers [B, Hkv, capacity, D] up to the live length and
handle GQA by grouping query heads per KV head, never by repeating K/V. rms_norm, silu_mul and rope_write
are the layer's other steps, and norm_linear, norm_silu_mul, norm_rope_write and linear_add its projections
with the steps around them, in eager torch op for op: the triton backend fuses each into one kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Prompt tokens a forward takes at once: SDPA's mask (and, without a fused kernel, its scores) grow with
# chunk x context.
PREFILL_CHUNK = 512


def key_mask(kv_len: torch.Tensor, q_len: int, total: int, window: int | None) -> torch.Tensor:
    """Bool [B, q_len, total]: may query i (the last q_len of kv_len positions) see key j?

    Bottom-right causal: query i sits at position kv_len - q_len + i and sees keys at positions
    <= its own; with a window W it sees only the last W of those.
    """
    pos = kv_len[:, None] - q_len + torch.arange(q_len, device=kv_len.device)  # [B, q_len]
    keys = torch.arange(total, device=kv_len.device)
    visible = keys[None, None, :] <= pos[:, :, None]
    if window is not None:
        visible &= keys[None, None, :] > pos[:, :, None] - window
    return visible


def _batch_one(kv_len):
    """A one-row length tensor as its int, for the unmasked path (the tensor's path reads its longest length anyway)."""
    return int(kv_len) if isinstance(kv_len, torch.Tensor) and kv_len.shape == (1,) else kv_len


def _lengths(kv_len, batch: int, device) -> torch.Tensor:
    if isinstance(kv_len, int):
        return torch.full((batch,), kv_len, dtype=torch.long, device=device)
    return kv_len.to(device=device, dtype=torch.long)


def _zero_past_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zeroes K or V past each row's length: stale NaN there survives masking (0 * NaN, NaN - inf)."""
    past = torch.arange(x.shape[2], device=x.device)[None, :] >= lengths[:, None]
    return x.masked_fill(past[:, None, :, None], 0)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return s


def decode_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None,
                     partition_size: int | None = None):
    """q [B, Hq, D] -> [B, Hq, D]: prefill_attention of one query position. With partition_size, by split-KV as
    the GPU kernels compute it: per-partition (max, sum, unnormalized out), then a reduce (the oracle of that
    split; no faster here)."""
    if partition_size is None:
        return prefill_attention(q[:, :, None], k_cache, v_cache, kv_len, scale=scale, window=window,
                                 softcap=softcap)[:, :, 0]
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    kv_len = _batch_one(kv_len)
    lengths = _lengths(kv_len, B, q.device)
    T = int(kv_len) if isinstance(kv_len, int) else int(lengths.max())
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k_cache[:, :, :T].float()
    v = v_cache[:, :, :T].float()
    qg = (q.float() * scale).view(B, Hkv, Hq // Hkv, D)  # query heads grouped by the KV head they read

    s = _scores(qg, k, 1.0, softcap)  # [B, Hkv, G, T]
    masked = window is not None or not isinstance(kv_len, int)
    if masked:
        s = s.masked_fill(~key_mask(lengths, 1, T, window)[:, None], float("-inf"))
        if not isinstance(kv_len, int):
            v = _zero_past_rows(v, lengths)

    # Full partitions are views of the live prefix; a shorter tail partition follows.
    n_full, P = T // partition_size, partition_size
    parts = []
    if n_full:
        parts.append((s[..., : n_full * P].unflatten(-1, (n_full, P)), v[:, :, : n_full * P].unflatten(2, (n_full, P))))
    if T > n_full * P:
        parts.append((s[..., n_full * P:].unsqueeze(-2), v[:, :, n_full * P:].unsqueeze(2)))
    m_parts, l_parts, o_parts = [], [], []
    for sp, vp in parts:  # sp [B, Hkv, G, n, p], vp [B, Hkv, n, p, D]
        m = sp.amax(-1)
        if masked:  # a fully masked partition has max -inf: shift by 0 so that it gives p = 0, not NaN
            p = torch.exp(sp - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[..., None])
        else:
            p = torch.exp(sp - m[..., None])
        m_parts.append(m)
        l_parts.append(p.sum(-1))
        o_parts.append(torch.matmul(p.transpose(2, 3), vp).transpose(2, 3))  # [B, Hkv, G, n, D]

    if n_full + (T > n_full * P) == 1:  # one partition: the reduce is a plain normalisation
        out = o_parts[0][..., 0, :] / l_parts[0]
    else:  # rescale each partition by exp(m_i - m) and normalise by the rescaled sums
        m_all, l_all, o_all = torch.cat(m_parts, -1), torch.cat(l_parts, -1), torch.cat(o_parts, -2)
        w = torch.exp(m_all - m_all.amax(-1, keepdim=True))
        out = (w[..., None] * o_all).sum(-2) / (w * l_all).sum(-1)[..., None]
    return out.reshape(B, Hq, D).to(q.dtype)


def prefill_attention(q, k_cache, v_cache, kv_len, *, scale=None, window=None, softcap=None):
    """q [B, Hq, Lq, D] holding the last Lq of kv_len positions -> [B, Hq, Lq, D]."""
    B, Hq, Lq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    kv_len = _batch_one(kv_len)
    T = kv_len if isinstance(kv_len, int) else int(kv_len.max())
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = k_cache[:, :, :T], v_cache[:, :, :T]
    qg = q.reshape(B, Hkv, G * Lq, D)  # [B, Hkv, (G, Lq), D]
    mask = None  # one query of each row's whole length (a decode step) sees every key
    if not isinstance(kv_len, int) or window is not None or Lq > 1:
        lengths = _lengths(kv_len, B, q.device)
        if not isinstance(kv_len, int):
            k, v = _zero_past_rows(k, lengths), _zero_past_rows(v, lengths)
        mask = key_mask(lengths, Lq, T, window)[:, None, None].expand(B, 1, G, Lq, T).reshape(B, 1, G * Lq, T)
    if softcap is None:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    else:
        s = _scores(qg.float(), k.float(), scale, softcap)
        s = s if mask is None else s.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
    return out.reshape(B, Hq, Lq, D)


def rms_norm(x, weight, eps):
    """RMSNorm of x [..., H], normalised in float32 (as the reference implementation does for half types)."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def silu_mul(gate_up):
    """[..., 2 * I] holding gate then up -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up




def rope_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int, n_kv_heads: int):
    """Rotates q and k of qkv [B, L, (n_heads + 2 * n_kv_heads) * D] (q, k, v heads in turn) by the rows
    positions [B, L] of cos, sin [P, D] (rotate_half layout), writes k and v into k_cache, v_cache
    [B, Hkv, capacity, D] at those positions and returns q [B, n_heads, L, D].

    Reads no length or position on the host, so that a CUDA graph can capture it."""
    B, L, _ = qkv.shape
    D = cos.shape[-1]
    turned = n_heads + n_kv_heads  # q and k heads, turned together
    qk = qkv[..., : turned * D].view(B, L, turned, D)
    cos, sin = cos[positions][:, :, None], sin[positions][:, :, None]  # [B, L, 1, D]
    # rotate_half(x) * sin, as x's halves swapped times sin with its first half negated: the one large copy
    swapped = qk.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
    qk = qk * cos + swapped * torch.cat((-sin[..., : D // 2], sin[..., D // 2:]), -1)
    # Advanced indices split by a slice put their broadcast shape [B, L] first: [B, L, Hkv, D] is assigned.
    rows = torch.arange(B, device=positions.device)[:, None]
    k_cache[rows, :, positions] = qk[:, :, n_heads:]
    v_cache[rows, :, positions] = qkv[..., turned * D:].view(B, L, n_kv_heads, D)
    return qk[:, :, :n_heads].transpose(1, 2)


# A layer's projections with their neighbours, as the triton backend fuses them for decode. `linear` is the
# model's layer: an nn.Linear, or a quantized one (fachat.models.quant), which the triton backend calls as is.


def norm_linear(x, norm_weight, eps, linear):
    """linear(rms_norm(x)): x [..., K] -> [..., N]."""
    return linear(rms_norm(x, norm_weight, eps))


def norm_silu_mul(x, norm_weight, eps, linear):
    """silu_mul(linear(rms_norm(x))): linear's outputs are gate then up -> [..., I]."""
    return silu_mul(norm_linear(x, norm_weight, eps, linear))


def norm_rope_write(x, norm_weight, eps, linear, cos, sin, positions, k_cache, v_cache, n_heads: int,
                    n_kv_heads: int):
    """rope_write(linear(rms_norm(x))): the q, k, v projection of x [B, L, K], k and v written to the caches;
    returns q [B, n_heads, L, D]."""
    return rope_write(norm_linear(x, norm_weight, eps, linear), cos, sin, positions, k_cache, v_cache,
                      n_heads, n_kv_heads)


def linear_add(x, linear, residual):
    """residual + linear(x): a projection added to the residual stream."""
    return residual + linear(x)

"""Torch reference attention: the CPU path and the oracle for the GPU kernels.

Both functions read K/V from capacity buffers [B, Hkv, capacity, D] up to the live length and
handle GQA by grouping query heads per KV head, never by repeating K/V.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Partitions of the KV range in the split-KV decode (NWG); mirrors what a GPU kernel launches.
DEFAULT_PARTITION = 256


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
                     partition_size: int = DEFAULT_PARTITION):
    """q [B, Hq, D] -> [B, Hq, D], by split-KV: per-partition (max, sum, unnormalized out), then a reduce."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
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
    lengths = _lengths(kv_len, B, q.device)
    T = int(kv_len) if isinstance(kv_len, int) else int(lengths.max())
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = k_cache[:, :, :T], v_cache[:, :, :T]
    if not isinstance(kv_len, int):
        k, v = _zero_past_rows(k, lengths), _zero_past_rows(v, lengths)
    qg = q.reshape(B, Hkv, G * Lq, D)  # [B, Hkv, (G, Lq), D]
    mask = key_mask(lengths, Lq, T, window)[:, None, None].expand(B, 1, G, Lq, T).reshape(B, 1, G * Lq, T)
    if softcap is None:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    else:
        s = _scores(qg.float(), k.float(), scale, softcap).masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
    return out.reshape(B, Hq, Lq, D)

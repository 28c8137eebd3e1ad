"""Llama-family decoder (Llama 2/3.x, SmolLM, TinyLlama, Mistral, Qwen2) in one flat file.

Parameter names follow Hugging Face, except that q/k/v and gate/up are fused; `packed_modules`
declares how checkpoint tensors fill the fused weights.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from fachat.models.config import ModelArgs, rope_inv_freq


class FusedLinear(nn.Linear):
    """A Linear whose output rows are the concatenation of several checkpoint projections."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes


class RMSNorm(nn.Module):
    """Holds the weight; the math is the backend's, fused into the projection that follows the norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_windows[layer]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(args.hidden_size, [q_size, kv_size, kv_size], bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=args.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, h, norm, positions, kv_len, k_cache, v_cache, rope, attn: ModuleType):
        """The residual stream h [B, L, hidden] at positions [B, L] plus attention over kv_len [B] positions of
        norm(h) (whose K/V are written there first)."""
        B, L, _ = h.shape
        q = attn.norm_rope_write(h, norm.weight, norm.eps, self.qkv_proj, *rope, positions, k_cache, v_cache,
                                 self.n_heads, self.n_kv_heads)
        if L == 1:
            o = attn.decode_attention(q[:, :, 0], k_cache, v_cache, kv_len, scale=self.scale, window=self.window)
            o = o.reshape(B, 1, -1)
        else:
            o = attn.prefill_attention(q, k_cache, v_cache, kv_len, scale=self.scale, window=self.window)
            o = o.transpose(1, 2).reshape(B, L, -1)
        return attn.linear_add(o, self.o_proj, h)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = FusedLinear(args.hidden_size, [args.intermediate_size] * 2, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, h, norm, attn: ModuleType):
        """The residual stream h plus the MLP of norm(h)."""
        x = attn.norm_silu_mul(h, norm.weight, norm.eps, self.gate_up_proj)
        return attn.linear_add(x, self.down_proj, h)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, positions, kv_len, k_cache, v_cache, rope, attn):
        h = self.self_attn(h, self.input_layernorm, positions, kv_len, k_cache, v_cache, rope, attn)
        return self.mlp(h, self.post_attention_layernorm, attn)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Given its weight, Embedding skips its random init: normal_ on the meta device, where models are built,
        # imports torch's Python decompositions (about 1 s and 145 MB resident on first use).
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (fused parameter, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)  # not in checkpoints
        self.attn: ModuleType | None = None  # attention backend, chosen after loading

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] of dtype for positions 0..length-1, indexed by position in forward."""
        pos = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # Inference mode: ~20% less time per decode step than no_grad (tiny model, CPU). The cache's buffers are
    # allocated outside it (kv_cache._buffer), so no state a session keeps is an inference tensor.
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                v_cache: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                all_logits: bool = False) -> torch.Tensor:
        """Runs input_ids [B, L] at positions[b] + 0..L-1 (positions: int64 [B], on the device), writing their
        K/V into the per-layer capacity buffers k_cache / v_cache [B, Hkv, capacity, D]. rope: rope_table's
        cos and sin. Returns float32 logits [B, L, vocab] if all_logits else [B, vocab] for the last position.
        Tensors only, and no host reads in a decode step (L = 1): it can be captured in a CUDA graph."""
        L = input_ids.shape[1]
        token_positions = positions[:, None] + torch.arange(L, device=positions.device)
        kv_len = (positions + L).to(torch.int32)  # once here, not per layer in the attention kernels
        if L > 1 and len(positions) == 1:
            kv_len = int(kv_len)  # prefill of one row: one host read per chunk, not one per layer's kernel
        h = self.model.embed_tokens(input_ids)
        for layer, k, v in zip(self.model.layers, k_cache, v_cache):
            h = layer(h, token_positions, kv_len, k, v, rope, self.attn)
        if not all_logits:
            h = h[:, -1]
        norm = self.model.norm
        return self.attn.norm_linear(h, norm.weight, norm.eps, self.lm_head).float()

"""Llama-family decoder (Llama 2/3.x, SmolLM, TinyLlama, Mistral, Qwen2) in one flat file.

Parameter names follow Hugging Face, except that q/k/v and gate/up are fused; `packed_modules`
declares how checkpoint tensors fill the fused weights.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.models.config import ModelArgs, rope_inv_freq


class FusedLinear(nn.Linear):
    """A Linear whose output rows are the concatenation of several checkpoint projections."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as the reference implementation does for half types.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_windows[layer]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(args.hidden_size, [q_size, kv_size, kv_size], bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=args.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, cache: InPlaceKVCache, start: int, attn: ModuleType):
        B, L, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_buf, v_buf = cache.write(self.layer, start, k, v)
        if L == 1:
            o = attn.decode_attention(q[:, :, 0], k_buf, v_buf, start + 1, scale=self.scale, window=self.window)
            o = o.reshape(B, 1, -1)
        else:
            o = attn.prefill_attention(q, k_buf, v_buf, start + L, scale=self.scale, window=self.window)
            o = o.transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = FusedLinear(args.hidden_size, [args.intermediate_size] * 2, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, cache, start, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
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

    def rope(self, start: int, length: int, dtype: torch.dtype):
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # Inference mode: ~20% less time per decode step than no_grad (tiny model, CPU). Growth inside it is safe:
    # the cache allocates its buffers outside it (kv_cache._buffer), so no state a session keeps is an inference tensor.
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: InPlaceKVCache, all_logits: bool = False) -> torch.Tensor:
        """Runs input_ids [B, L] after the cache's current length; returns float32 logits
        [B, L, vocab] if all_logits else [B, vocab] for the last position."""
        B, L = input_ids.shape
        start = cache.length
        cache.reserve(start + L)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(start, L, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache, start, self.attn)
        cache.advance(L)
        h = self.model.norm(h if all_logits else h[:, -1])
        return self.lm_head(h).float()

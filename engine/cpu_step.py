"""The CPU decode step, one op or one compiled function: on the CPU, what CUDA graphs are on the GPU.

A decode step is some 900 small ops, and from Python each costs more than its own work. Two forms of the model's
decode step for one row and one position, over the model's own tensors (no copies), cut that:
- native: torch.ops.fachat_cpu.decode_step (kernels/cpu), one C++ op that calls the same projection kernels and
  does the rest in its own loops. Float32 activations only. The embedded model decodes about 2x faster than
  eagerly. Its logits are the eager model's to float32 rounding where projections are float (quantized ones
  round their inputs and outputs to bfloat16, so a rounding flipped by a last-bit difference shows further on):
  tests/test_cpu_kernels.py.
- TorchScript: _step below, where the native op is unavailable (no compiler, FACHAT_CPU_KERNELS=0, other
  activation dtypes). The same ops on the same kernels as the eager model with the reference backend, so its
  logits are the eager model's bit for bit (tests/test_cpu_step.py); about 1.45x faster than eagerly.
torch.compile is no substitute: on this project's 2-core machine it compiled for minutes and then ran slower
(benchmarks/README.md).

Where neither applies, the runner runs the eager model: FACHAT_CPU_STEP=0, another device or attention backend,
sliding-window layers, a layer kind the step does not know, a runner of several rows, or a torch that cannot
script it (TorchScript is deprecated and needs the package's .py sources).
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fachat.kernels import cpu as native, reference
from fachat.kernels.common import env_flag
from fachat.models.quant import Int4Linear, Int8Embedding, Int8Linear

STEP_ENV = "FACHAT_CPU_STEP"  # "0" runs the CPU decode step eagerly
# How a projection multiplies: its tensors (a, b) are (weight, weight), (packed, scales_and_zeros) or (int8, scales).
FLOAT, INT4, INT8 = 0, 1, 2


def _linear(x: torch.Tensor, kind: int, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [1, 1, K] through a projection, as nn.Linear or quant.Int4Linear / Int8Linear compute it; a quantized
    kernel's bfloat16 output stays so where x is float32: it then only meets float32 tensors, and its exact
    conversion inside their add or multiply gives the bits the separate conversion would."""
    if kind == 0:
        return F.linear(x, a, bias)
    rows = x.reshape(-1, x.shape[-1]).to(b.dtype)  # the scales' dtype: quant.KERNEL_DTYPE
    if kind == 1:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, a, rows.shape[1] // b.shape[0], b)  # b: [K / group, N, 2]
    else:
        y = torch.ops.aten._weight_int8pack_mm(rows, a, b)
    if bias is not None or x.dtype != torch.float32:
        y = y.to(x.dtype)
    y = y.reshape(1, 1, -1)
    return y if bias is None else y + bias


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """reference.rms_norm: F.rms_norm's own ops (the same bits), without its dispatch (half of its time)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _step(token: torch.Tensor, position: torch.Tensor, embed: List[torch.Tensor], kinds: List[int],
          a: List[torch.Tensor], b: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
          norms: List[torch.Tensor], eps: float, k_cache: List[torch.Tensor], v_cache: List[torch.Tensor],
          cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int, scale: float) -> torch.Tensor:
    """LlamaForCausalLM.forward of one token [1, 1] at position [1], its K/V written into the caches: float32
    logits [1, vocab]. Projection 4i + j of layer i is qkv, o, gate_up, down, and the last is lm_head; norm 2i and
    2i + 1 are layer i's, the last the final one. embed: [weight], or Int8Embedding's [int8, scales, dtype-tensor]."""
    if len(embed) == 1:
        h = F.embedding(token, embed[0])
    else:
        h = embed[0][token] * embed[1][token, None].to(embed[2].dtype)
    D = cos.shape[-1]
    turned, group = n_heads + n_kv_heads, n_heads // n_kv_heads
    pos = int(position[0])
    cos_, sin_ = cos[pos], sin[pos]
    # rotate_half(x) * sin as x's halves swapped times sin with its first half negated (reference.rope_write)
    signed_sin = torch.cat((-sin_[: D // 2], sin_[D // 2:]), -1)
    for i in range(len(k_cache)):
        p = 4 * i
        qkv = _linear(_norm(h, norms[2 * i], eps), kinds[p], a[p], b[p], biases[p])[0, 0]
        qk = qkv[: turned * D].view(turned, D)
        qk = qk * cos_ + qk.unflatten(-1, [2, D // 2]).flip(-2).flatten(-2) * signed_sin
        k_cache[i][0, :, pos] = qk[n_heads:]
        v_cache[i][0, :, pos] = qkv[turned * D:].view(n_kv_heads, D)
        # query heads grouped by the KV head they read, over every live key (reference.prefill_attention)
        o = F.scaled_dot_product_attention(qk[:n_heads].view(1, n_kv_heads, group, D), k_cache[i][:, :, : pos + 1],
                                           v_cache[i][:, :, : pos + 1], scale=scale)
        h = h + _linear(o.reshape(1, 1, -1), kinds[p + 1], a[p + 1], b[p + 1], biases[p + 1])
        gate, up = _linear(_norm(h, norms[2 * i + 1], eps), kinds[p + 2], a[p + 2], b[p + 2], biases[p + 2]).chunk(2, -1)
        h = h + _linear(F.silu(gate.to(h.dtype)) * up, kinds[p + 3], a[p + 3], b[p + 3], biases[p + 3])
    p = 4 * len(k_cache)
    return _linear(_norm(h, norms[-1], eps), kinds[p], a[p], b[p], biases[p])[:, 0].float()


@functools.cache
def _scripted():
    """_step compiled, or the reason it cannot be (a str)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
            return torch.jit.script(_step)
    except Exception as e:  # no .py sources, a torch without TorchScript, or one that no longer takes _step
        return f"TorchScript cannot compile the step: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _unfit(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the device is {device.type}"
    if env_flag(STEP_ENV) is False:
        return f"{STEP_ENV}=0"
    return None


def compile_step(device: torch.device, dtype: torch.dtype) -> None:
    """Readies the step ahead of a load onto `device` in `dtype` where it may run: the native op (built on first
    use), or else TorchScript's compiled function, whose freed objects are then reused by the load's, not left as
    holes among them (about 2 MB resident on the embedded model)."""
    if _unfit(device) is None and (dtype != torch.float32 or native.load() is not None):
        _scripted()


def _projection(layer: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(kind, a, b, bias) of a projection module, or None where _linear does not compute its forward."""
    if type(layer).forward is nn.Linear.forward:  # nn.Linear, FusedLinear
        return FLOAT, layer.weight, layer.weight, layer.bias
    if type(layer) is Int4Linear and not layer.portable:
        return INT4, layer.packed, layer.scales_and_zeros, layer.bias
    if type(layer) is Int8Linear:
        return INT8, layer.weight_int8, layer.scales, layer.bias
    return None


class CpuStep:
    """Called as the model is in a decode step, for one row: (tokens [1, 1], positions [1], k_cache, v_cache, rope)
    -> float32 logits [1, vocab]."""

    def __init__(self, step, runs: str, tensors: tuple, heads: tuple):
        self._step, self._tensors, self._heads = step, tensors, heads
        self.runs = runs  # "native" (kernels/cpu) or "TorchScript"

    @classmethod
    def of(cls, model, device: torch.device) -> tuple["CpuStep | None", str]:
        """The step of a loaded model (its attention backend chosen) on `device`, or None; and why."""
        if (why := _unfit(device)) is not None:
            return None, why
        if model.attn is not reference:
            return None, "the attention backend is not the reference"
        if any(w is not None for w in model.args.layer_windows):
            return None, "sliding-window layers"
        layers = model.model.layers
        modules = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        projections = [_projection(m) for m in [*modules, model.lm_head]]
        if None in projections:
            return None, "a projection that is neither nn.Linear nor a CPU-packed Int4Linear or Int8Linear"
        embed = model.model.embed_tokens
        if type(embed) is Int8Embedding:
            tables = [embed.weight_int8, embed.scales, torch.empty(0, dtype=embed.dtype)]
        elif type(embed) is nn.Embedding:
            tables = [embed.weight]
        else:
            return None, "an embedding that is neither nn.Embedding nor Int8Embedding"
        norms = [n.weight for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        kinds, a, b, biases = (list(t) for t in zip(*projections))
        attention = layers[0].self_attn
        tensors = (tables, kinds, a, b, biases, [*norms, model.model.norm.weight], model.args.rms_norm_eps)
        heads = (attention.n_heads, attention.n_kv_heads, attention.scale)
        why_not_native = native.load() if norms[0].dtype == torch.float32 else f"activations in {norms[0].dtype}"
        if why_not_native is None:
            return cls(torch.ops.fachat_cpu.decode_step, "native", tensors, heads), "CPU, reference attention"
        if env_flag(native.KERNELS_ENV):
            raise ValueError(f"{native.KERNELS_ENV}=1, but the CPU decode step cannot run natively: {why_not_native}")
        step = _scripted()
        if isinstance(step, str):
            return None, step
        return cls(step, "TorchScript", tensors, heads), f"CPU, reference attention; not native: {why_not_native}"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                 v_cache: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # The optimizing executor only added 4 MB resident (profiled, specialized graphs), no speed.
        with torch.jit.optimized_execution(False):
            return self._step(tokens, positions, *self._tensors, k_cache, v_cache, *rope, *self._heads)

"""Weights that stay quantized: int4 (groups of 32 along the input) and int8 (one scale per output channel) linear
layers, and an int8 embedding whose rows are dequantized as they are looked up. On CPU they run PyTorch's own
low-bit matmuls; on CUDA int4 runs the triton backend's projection kernels in decode.

Loaders hand over codes (Int4Codes, Int8Codes): exact integer values and float32 scales, from a GGUF file's
blocks or from quantize_int4/quantize_int8 of float weights. The modules pack them for the device's kernel.
The kernels take bfloat16 activations (on CPU they are fast only with them), so a layer rounds its input to
bfloat16, its scales too, and returns its output in the input's dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int4", "int8")
GROUP = 32  # int4 weights per scale: a GGUF Q4 block
KERNEL_DTYPE = torch.bfloat16
# int8 scales are max|w| / 126.5 rather than / 127: their rounding to bfloat16 (relative error <= 2^-9) then
# never shrinks a scale below max|w| / 127, so no weight is clipped.
_INT8_DIVISOR = 126.5


@dataclass
class Int4Codes:
    """Weights [N, K] = q * scale + min, q in 0..15 (uint8 [N, K]), scale and min float32 [N, K / GROUP]."""
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], computed as GGUF's dequantizers compute Q4_0, Q4_1 and Q4_K: bit for bit theirs."""
        N, K = self.q.shape
        q = self.q.view(N, K // GROUP, GROUP).float()
        return (q * self.scale[..., None] + self.min[..., None]).reshape(N, K)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def map_rows(self, fn) -> "Int4Codes":
        return Int4Codes(fn(self.q), fn(self.scale), fn(self.min))


@dataclass
class Int8Codes:
    """Weights [N, K] = q * scale, q int8 [N, K], scale float32 [N] (one per output channel)."""
    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def map_rows(self, fn) -> "Int8Codes":
        return Int8Codes(fn(self.q), fn(self.scale))


Codes = Int4Codes | Int8Codes


def quantize_int4(w: torch.Tensor) -> Int4Codes:
    """Asymmetric int4 per GROUP weights of a row: the group's range split into 15 steps from its minimum."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = torch.where(scale[..., None] > 0, (g - lo[..., None]) / scale[..., None], 0).round().clamp(0, 15)
    return Int4Codes(q.to(torch.uint8).reshape(N, K), scale, lo)


def quantize_int8(w: torch.Tensor) -> Int8Codes:
    """Symmetric int8 per output row, its scale a bfloat16 value (as the kernel reads it)."""
    w = w.float()
    scale = (w.abs().amax(1) / _INT8_DIVISOR).to(KERNEL_DTYPE).float()
    q = torch.where(scale[:, None] > 0, w / scale[:, None], 0).round().clamp(-127, 127)
    return Int8Codes(q.to(torch.int8), scale)


def to_scheme(codes: Codes | torch.Tensor, scheme: str) -> Codes:
    """codes (or float weights) in `scheme`: kept if already so, else requantized from their values."""
    if scheme == "int4":
        return codes if isinstance(codes, Int4Codes) else quantize_int4(_values(codes))
    return codes if isinstance(codes, Int8Codes) else quantize_int8(_values(codes))


def concat(parts: list[Codes]) -> Codes:
    """The codes of the weights stacked row-wise (a fused projection); parts of different schemes are all
    requantized to int8, the finer."""
    if all(isinstance(p, Int4Codes) for p in parts):
        return Int4Codes(*(torch.cat(f) for f in zip(*((p.q, p.scale, p.min) for p in parts))))
    parts = [to_scheme(p, "int8") for p in parts]
    return Int8Codes(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def _values(w: Codes | torch.Tensor) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dequantize()


def int4_fits(out_features: int, in_features: int, device: torch.device) -> bool:
    """Whether the device's Int4Linear takes a weight of this shape (MPS: not run here, int8 there)."""
    if in_features % GROUP or device.type not in ("cpu", "cuda"):
        return False
    return device.type != "cpu" or out_features % 16 == 0  # the CPU kernel's packing


class QuantLinear(nn.Module):
    """A linear layer on quantized weights; `bias`, if any, is a float parameter added to the output."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = self._matmul(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(QuantLinear):
    """Groupwise int4, weights (q - 8) * scale + zero with scale and zero in bfloat16, in one of two layouts:
    - CPU: torch's _weight_int4pack_mm_for_cpu, its packed codes and scales_and_zeros [K / GROUP, N, 2];
    - portable (other devices; `portable`): `packed` [N, 4, K / GROUP] int32 words of 8 codes, word j of group g
      at [n, j, g] with column GROUP g + 8j + i in bits 4i to 4i + 3, and scales_and_zeros [N, K / GROUP, 2],
      which the triton backend's projection kernels read for a few rows (decode: a lane takes a group, and the
      lanes' loads of a word are contiguous); this module's own forward (prefill, the reference backend)
      dequantizes the weights to bfloat16 and multiplies with torch's matmul."""

    def __init__(self, codes: Int4Codes, bias: torch.Tensor | None, device: torch.device,
                 portable: bool | None = None):
        N, K = codes.q.shape
        super().__init__(K, N, bias, device)
        self.portable = device.type != "cpu" if portable is None else portable
        q = codes.q.to(device)
        zero = codes.min + 8 * codes.scale
        if self.portable:
            columns = q.reshape(N, K // GROUP, 4, 8).transpose(1, 2)  # [n, j, g, i]: column GROUP g + 8j + i
            packed = columns[..., 0].to(torch.int32)
            for i in range(1, 8):
                packed |= columns[..., i].to(torch.int32) << 4 * i
            scales_and_zeros = torch.stack([codes.scale, zero], -1)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            scales_and_zeros = torch.stack([codes.scale.T, zero.T], -1)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, KERNEL_DTYPE).contiguous())

    def _matmul(self, x):
        if not self.portable:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
        nibbles = self.packed.view(torch.uint8).unflatten(-1, (-1, 4))  # a word's bytes: codes 2b and 2b + 1
        codes = torch.stack([nibbles & 15, nibbles >> 4], -1).flatten(-2)  # [N, 4, K / GROUP, 8], uint8
        codes = codes.transpose(1, 2).reshape(self.out_features, -1, GROUP)
        scale, zero = self.scales_and_zeros.float().unbind(-1)
        weight = (codes.float() - 8) * scale[..., None] + zero[..., None]
        return F.linear(x, weight.view(self.out_features, self.in_features).to(KERNEL_DTYPE))


class Int8Linear(QuantLinear):
    """Per-channel int8: torch's _weight_int8pack_mm where the device has it, else a dequantizing matmul."""

    def __init__(self, codes: Int8Codes, bias: torch.Tensor | None, device: torch.device):
        N, K = codes.q.shape
        super().__init__(K, N, bias, device)
        self.register_buffer("weight_int8", codes.q.to(device))
        self.register_buffer("scales", codes.scale.to(device, KERNEL_DTYPE))

    def _matmul(self, x):
        if _has_int8pack_mm(x.device.type):
            return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scales


@functools.cache
def _has_int8pack_mm(device_type: str) -> bool:
    try:
        x = torch.zeros(1, 32, dtype=KERNEL_DTYPE, device=device_type)
        torch.ops.aten._weight_int8pack_mm(x, torch.zeros(16, 32, dtype=torch.int8, device=device_type),
                                           torch.ones(16, dtype=KERNEL_DTYPE, device=device_type))
        return True
    except (NotImplementedError, RuntimeError):
        return False


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 rows with one scale each: a lookup dequantizes the rows it reads. A tied
    lm_head shares the table (as_linear)."""

    def __init__(self, codes: Int8Codes, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.q.shape
        self.dtype = dtype
        self.register_buffer("weight_int8", codes.q.to(device))
        self.register_buffer("scales", codes.scale.to(device, KERNEL_DTYPE))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # int8 times a scale of the output dtype: the exact product rounded once (3 kernels on CUDA, not 6)
        return self.weight_int8[ids] * self.scales[ids, None].to(self.dtype)

    def as_linear(self) -> Int8Linear:
        layer = Int8Linear.__new__(Int8Linear)
        QuantLinear.__init__(layer, self.embedding_dim, self.num_embeddings, None, self.weight_int8.device)
        layer.weight_int8, layer.scales = self.weight_int8, self.scales  # shared, not copied
        return layer


def quant_linear(codes: Codes, bias: torch.Tensor | None, device: torch.device) -> QuantLinear:
    """The module for codes: Int4Linear, or Int8Linear where the int4 kernel does not take the shape (the
    codes are then requantized to int8)."""
    if isinstance(codes, Int4Codes) and int4_fits(codes.q.shape[0], codes.q.shape[1], device):
        return Int4Linear(codes, bias, device)
    return Int8Linear(to_scheme(codes, "int8"), bias, device)

"""KV caches laid out [batch, kv_heads, capacity, head_dim], read by attention as buffer + live length."""
from __future__ import annotations

import math

import torch

from fachat.errors import CacheMemoryError, ContextLengthError

DEFAULT_INITIAL_CAPACITY = 256


class InPlaceKVCache:
    """One capacity buffer per layer; new K/V are written at the cursor, capacity doubles when exceeded.

    Each head's live prefix [0, length) is contiguous and heads are capacity * head_dim apart, so
    attention kernels take the buffer and the live length and never need a concatenated copy.
    Growth copies only the live prefix, so a T-token decode copies O(T) elements in total.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", batch_size: int = 1, capacity: int | None = None,
                 max_seq_len: int | None = None):
        if capacity is None:
            capacity = DEFAULT_INITIAL_CAPACITY if max_seq_len is None else min(DEFAULT_INITIAL_CAPACITY, max_seq_len)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_seq_len is not None and capacity > max_seq_len:
            raise ValueError(f"capacity ({capacity}) exceeds max_seq_len ({max_seq_len})")
        self.max_seq_len = max_seq_len
        self.length = 0
        self.growths = 0
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = [_buffer(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_buffer(shape, dtype, device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers, spare capacity included."""
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def live_nbytes(self) -> int:
        """Bytes of K/V in the live region [0, length)."""
        return self.nbytes * self.length // self.capacity

    def reserve(self, needed: int) -> None:
        """Makes room for `needed` positions, doubling capacity as often as that takes. Every new buffer is
        allocated before any is swapped in: a failed allocation leaves the cache as it was."""
        if self.max_seq_len is not None and needed > self.max_seq_len:
            raise ContextLengthError(f"{needed} tokens do not fit in max_seq_len={self.max_seq_len}")
        if needed <= self.capacity:
            return
        new_capacity = self.capacity
        while new_capacity < needed:
            new_capacity *= 2
        if self.max_seq_len is not None:
            new_capacity = min(new_capacity, self.max_seq_len)
        k = [self._regrow(buf, new_capacity) for buf in self.k]
        v = [self._regrow(buf, new_capacity) for buf in self.v]
        self.k, self.v = k, v
        self.growths += 1

    def _regrow(self, buf: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = buf.shape
        new = _buffer((b, h, capacity, d), buf.dtype, buf.device)
        new[:, :, : self.length].copy_(buf[:, :, : self.length])
        return new

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v [B, Hkv, L, D] at positions [start, start + L); returns the capacity buffers."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end].copy_(k)
        self.v[layer][:, :, start:end].copy_(v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Commits n positions written by `write` on every layer."""
        self.length += n

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy views of the live region, [B, Hkv, length, D]."""
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def truncate(self, n: int) -> None:
        """Rolls back to the first n positions; capacity is kept."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate length must be in [0, {self.length}], got {n}")
        self.length = n

    @property
    def state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's live K and V, [B, Hkv, length, D]: zero-copy views (clone them to keep them)."""
        views = [self.views(layer) for layer in range(len(self.k))]
        return [k for k, _ in views], [v for _, v in views]

    def extend(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Appends n positions given per layer as K and V [B, Hkv, n, D], copied in (O(n)); see set_state."""
        self.set_state(keys, values, start=self.length)

    def set_state(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: int = 0) -> None:
        """Replaces the contents from position `start` on (by default all) with K and V [B, Hkv, n, D] per
        layer: copies n positions, never the spare capacity; the buffers grow (see reserve) if they must. The
        checks and the growth come first: if they fail, nothing has changed. A copy cut short
        (KeyboardInterrupt) leaves the first `start` positions."""
        n = self._check_kv(keys, values)
        if not 0 <= start <= self.length:
            raise ValueError(f"start must be in [0, {self.length}], got {start}")
        self.reserve(start + n)
        self.truncate(start)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.write(layer, start, k, v)
        self.advance(n)

    def _check_kv(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """The n of K/V that fit this cache: one tensor [B, Hkv, n, D] of its dtype per layer."""
        b, h, _, d = self.k[0].shape
        if len(keys) != len(self.k) or len(values) != len(self.v):
            raise ValueError(f"expected K and V for {len(self.k)} layers, got {len(keys)} and {len(values)}")
        n = keys[0].shape[2] if keys[0].dim() == 4 else -1
        for t in keys + values:
            if t.dim() != 4 or tuple(t.shape) != (b, h, n, d) or t.dtype != self.k[0].dtype:
                raise ValueError(f"K/V must all be {self.k[0].dtype} [{b}, {h}, n, {d}] of one n; "
                                 f"got {t.dtype} {list(t.shape)}")
        return n


@torch.inference_mode(False)
def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Never an inference tensor, even allocated inside the forward (which runs in inference mode): undo and
    unfreeze write to the buffers outside that mode, which refuses in-place writes to inference tensors."""
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # torch's out-of-memory errors (torch.OutOfMemoryError on CUDA)
        gib = math.prod(shape) * dtype.itemsize / 2**30
        raise CacheMemoryError(f"the KV cache cannot hold {shape[2]} positions: a {gib:.2f} GiB buffer does not "
                               f"fit in memory on {device} ({str(e).splitlines()[0]}); use a smaller max_seq_len "
                               "or a shorter context") from None


class ConcatKVCache(InPlaceKVCache):
    """Concat-grow baseline: every write reallocates the layer's buffer to exactly the new length.

    It costs O(T^2) copying over a T-token decode; it exists to check and measure InPlaceKVCache.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, **kwargs):
        kwargs["capacity"] = 1
        super().__init__(num_layers, num_kv_heads, head_dim, **kwargs)
        self.k = [t[:, :, :0] for t in self.k]
        self.v = [t[:, :, :0] for t in self.v]

    def reserve(self, needed: int) -> None:
        if self.max_seq_len is not None and needed > self.max_seq_len:
            raise ContextLengthError(f"{needed} tokens do not fit in max_seq_len={self.max_seq_len}")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer] = torch.cat([self.k[layer][:, :, :start], k], dim=2)
        self.v[layer] = torch.cat([self.v[layer][:, :, :start], v], dim=2)
        return self.k[layer], self.v[layer]

    @property
    def live_nbytes(self) -> int:
        return self.nbytes

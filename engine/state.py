"""A session's state as plain values: a chat turn's undo record (Turn), a whole session at one moment
(Snapshot), and what sessions use of an engine (EngineLike).

Session (fachat.engine.session) makes and restores snapshots; fachat.engine.persistence writes them to a file
and reads them back. This module imports neither of them, nor engine.py, so that the imports stand in layers:
engine -> session -> persistence -> state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from fachat.cache.kv_cache import InPlaceKVCache
    from fachat.engine.generate import Generation
    from fachat.engine.runner import Runner
    from fachat.engine.sampling import SamplingParams
    from fachat.models.config import ModelArgs
    from fachat.models.tokenizer import Tokenizer


class EngineLike(Protocol):
    """What sessions and checkpoints use of an engine; fachat.engine.engine.Engine is the one implementation.
    A protocol rather than an import of Engine: engine.py imports Session, and an import back is a circle."""
    model: torch.nn.Module
    tokenizer: Tokenizer
    args: ModelArgs
    source: str
    weights_sha256: str
    quantize: str | None
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int

    @property
    def fingerprint(self) -> dict[str, Any]: ...

    def new_cache(self) -> InPlaceKVCache: ...

    def new_runner(self) -> Runner: ...

    def check_token_ids(self, ids) -> list[int]: ...


@dataclass(frozen=True, eq=False)
class Turn:
    """What undo needs to take back one chat turn: the conversation's length before it, the position at
    which the turn cut the context, the tokens it cut off, and the K/V of those that were cached."""
    messages: int
    start: int
    tokens: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # per layer [B, Hkv, kv, D]; never written to, so snapshots share them
    values: tuple[torch.Tensor, ...]

    @property
    def kv(self) -> int:
        return self.keys[0].shape[2]


@dataclass(frozen=True, eq=False, repr=False)
class Snapshot:
    """A session's whole state at one moment (Session.freeze), to restore with Session.unfreeze as often
    as needed. It holds a copy of the live K/V only, so its size follows the context, not the capacity."""
    engine: EngineLike
    tokens: tuple[int, ...]
    system: str | None
    conversation: tuple[tuple[str, str], ...]  # (role, content), without the system message
    turns: tuple[Turn, ...]
    params: SamplingParams
    rng_state: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    last_generation: Generation | None

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V copy this snapshot holds."""
        return sum(t.nbytes for t in self.keys + self.values)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens a and b share from the start."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)

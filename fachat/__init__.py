"""fa-chat: a stateful decode engine for small Llama-style models."""
from fachat.cache import InPlaceKVCache
from fachat.engine import Engine, Generation, GenerationStats, SamplingParams, Session, Snapshot
from fachat.errors import (CheckpointError, ContextLengthError, CorruptModelError, FachatError, ModelLoadError,
                           ModelNotFoundError, UnsupportedModelError)
from fachat.kernels import decode_attention, prefill_attention

__version__ = "0.1.0"
__all__ = [
    "Engine", "Session", "Snapshot", "Generation", "GenerationStats", "SamplingParams", "InPlaceKVCache",
    "decode_attention", "prefill_attention",
    "FachatError", "ModelLoadError", "ModelNotFoundError", "UnsupportedModelError", "CorruptModelError",
    "ContextLengthError", "CheckpointError",
]

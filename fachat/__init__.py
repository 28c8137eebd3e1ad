"""fa-chat: a stateful decode engine for small Llama-style models."""
from pathlib import Path as _Path

# In a source checkout the subpackages are the top-level folders beside this one (engine/, kernels/, ...).
# They hold no __init__.py, so that none of them hides an installed package of the same name (transformers
# imports PyPI's `kernels`) from Python started in the checkout. A wheel has them inside this folder.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "engine").is_dir() and (_checkout / "setup.py").is_file():
    __path__.append(str(_checkout))

from fachat.cache.kv_cache import InPlaceKVCache  # noqa: E402
from fachat.engine.engine import Engine  # noqa: E402
from fachat.engine.generate import Generation, GenerationStats  # noqa: E402
from fachat.engine.sampling import SamplingParams  # noqa: E402
from fachat.engine.session import Session  # noqa: E402
from fachat.engine.state import Snapshot  # noqa: E402
from fachat.errors import (CacheMemoryError, CheckpointError, ContextLengthError, CorruptModelError, FachatError,  # noqa: E402
                           ModelLoadError, ModelNotFoundError, UnsupportedModelError)
from fachat.kernels.dispatch import decode_attention, prefill_attention  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Engine", "Session", "Snapshot", "Generation", "GenerationStats", "SamplingParams", "InPlaceKVCache",
    "decode_attention", "prefill_attention",
    "FachatError", "ModelLoadError", "ModelNotFoundError", "UnsupportedModelError", "CorruptModelError",
    "ContextLengthError", "CacheMemoryError", "CheckpointError",
]

"""KV caches and session checkpoint files."""
from fachat.cache.kv_cache import ConcatKVCache, InPlaceKVCache

__all__ = ["InPlaceKVCache", "ConcatKVCache"]

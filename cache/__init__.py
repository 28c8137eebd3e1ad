"""KV caches."""
from fachat.cache.kv_cache import ConcatKVCache, InPlaceKVCache

__all__ = ["InPlaceKVCache", "ConcatKVCache"]

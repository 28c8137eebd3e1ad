"""Session persistence, all in one place: the identity of the model that a session's K/V belong to, the
checkpoint file format, the checks a file passes before it is loaded, and the conversion between a session's
Snapshot and a file. Session.save and Session.load (and so Engine.load_session) call save_snapshot and
load_snapshot; `fa-chat --resume` reads a file's header with read_checkpoint_info before loading its model.

A checkpoint is one safetensors file with the live K/V of every layer and a JSON header. Layout (format
version 2):
- tensors `k.{i}`, `v.{i}` for each layer i: K/V [B, Hkv, length, D] of positions [0, length), never the
  cache's spare capacity; `undo.k.{i}`, `undo.v.{i}`: [B, Hkv, undo_length, D], the K/V that undo puts back.
- metadata key "fachat": JSON with format, version, model (architecture, source, config_sha256 of the config
  fields the math reads, weights_sha256 of every weight as stored in the model's file, quantize: how the engine
  stored them, as Engine.quantize says), dtype, layers, length,
  undo_length, tokens, messages, turns, sampling, rng and crc32 (of the rest of the header, and of the tensor
  bytes).

Saving is atomic: a temp file `.{name}.{pid}-{random}.fa-chat-tmp` in the target's folder, fsync, then
os.replace; the temp files of writers that died mid-save are removed by the next save to the same path.
Loading checks the whole file (header, tensor names and shapes, checksums, and that the header's fields
agree with each other), then that it fits the engine, before returning anything, and raises CheckpointError
naming the file and the problem. Nothing is unpickled.

This module imports neither engine.py nor session.py (they import it): the engine comes in as an EngineLike.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import zlib
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from fachat.engine.sampling import SamplingParams
from fachat.engine.state import EngineLike, Snapshot, Turn, common_prefix
from fachat.errors import CheckpointError
from fachat.models.loaders import quantize_described

FORMAT = "fa-chat session"
VERSION = 2
META_KEY = "fachat"
TMP_SUFFIX = ".fa-chat-tmp"
DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}
KINDS = {dict: "an object", str: "a str", int: "an int", list: "a list"}
REQUIRED = {"model": dict, "dtype": str, "layers": int, "length": int, "undo_length": int, "tokens": list,
            "messages": list, "turns": list, "sampling": dict, "rng": dict, "crc32": dict}
# The config fields the forward pass reads (with the rope frequencies): what the K/V and logits depend on
# besides the weights. The rest (dtype, token ids, max_position_embeddings...) changes no math.
MATH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "layer_windows", "qkv_bias", "o_bias", "mlp_bias",
               "tie_word_embeddings")


# ------------------------------------------------------------ the model's identity


def model_fingerprint(engine: EngineLike) -> dict[str, Any]:
    """What identifies the model that a session's K/V belong to: a hash of the config fields the math
    reads (MATH_FIELDS and the rope frequencies in use) and the hash of every weight value, taken as the
    weights file was read (the same whatever dtype the engine runs). The architecture and source are
    there to name the model in messages. Engine.fingerprint holds it, computed once per engine."""
    config = {k: getattr(engine.args, k) for k in MATH_FIELDS} | {"rope_inv_freq": engine.model.inv_freq.tolist()}
    source = os.path.abspath(engine.source) if os.path.exists(engine.source) else engine.source
    return {"architecture": engine.args.architecture,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": engine.weights_sha256, "quantize": engine.quantize, "source": source}


# ------------------------------------------------------------ sessions


def save_snapshot(snapshot: Snapshot, path: str | os.PathLike) -> None:
    """Writes a session's state (Session.save passes its own, uncopied) to path with save_checkpoint: the
    live K/V, the undo history's K/V one turn after another, the tokens, messages, turns, sampling arguments
    and RNG state, and the engine's fingerprint."""
    keys, values, turns = snapshot.keys, snapshot.values, snapshot.turns
    layers = range(len(keys))  # the turns' K/V tails, one after another (none: zero positions)
    undo_keys = [torch.cat([keys[i][:, :, :0], *(t.keys[i] for t in turns)], dim=2) for i in layers]
    undo_values = [torch.cat([values[i][:, :, :0], *(t.values[i] for t in turns)], dim=2) for i in layers]
    system = [] if snapshot.system is None else [("system", snapshot.system)]
    save_checkpoint(path, list(keys), list(values), undo_keys, undo_values, {
        "model": snapshot.engine.fingerprint,
        "tokens": list(snapshot.tokens),
        "messages": [{"role": r, "content": c} for r, c in system + list(snapshot.conversation)],
        "turns": [{"messages": t.messages, "start": t.start, "tokens": list(t.tokens), "kv": t.kv} for t in turns],
        "sampling": dataclasses.asdict(snapshot.params),
        # The session's generator is always made on the engine's device.
        "rng": {"device": snapshot.engine.device.type,
                "state": base64.b64encode(snapshot.rng_state.numpy().tobytes()).decode()},
    })


def load_snapshot(engine: EngineLike, path: str | os.PathLike, convert_dtype: bool = False) -> Snapshot:
    """The state of a session saved with save_snapshot, for Session to restore. Raises CheckpointError, naming
    the file and the problem, if it is unreadable, corrupt, inconsistent, of another model, or of another dtype
    (unless convert_dtype: the K/V are converted)."""
    ckpt = load_checkpoint(path, check=lambda info: _check_compatible(engine, info, convert_dtype))
    meta = ckpt.info.meta
    system, conversation = _split_system(meta["messages"])

    def to_engine(ts):
        return tuple(t.to(engine.device, engine.dtype) for t in ts)

    turns, offset = [], 0
    for t in meta["turns"]:
        part = [tuple(u.narrow(2, offset, t["kv"]) for u in undo) for undo in (ckpt.undo_keys, ckpt.undo_values)]
        turns.append(Turn(t["messages"], t["start"], tuple(t["tokens"]), to_engine(part[0]), to_engine(part[1])))
        offset += t["kv"]
    # The live K/V only pass through: the cache copies them onto its device, so they get the dtype alone.
    return Snapshot(engine, tuple(meta["tokens"]), system,
                    tuple((m["role"], m["content"]) for m in conversation), tuple(turns),
                    SamplingParams(**meta["sampling"]), _decode_rng(meta["rng"]),
                    tuple(t.to(dtype=engine.dtype) for t in ckpt.keys),
                    tuple(t.to(dtype=engine.dtype) for t in ckpt.values), None)


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(the system prompt or None, the conversation after it)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    return system, messages[1:] if system is not None else messages


def _decode_rng(rng: dict) -> torch.Tensor | None:
    try:
        raw = base64.b64decode(rng.get("state"), validate=True)
    except (TypeError, ValueError):
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _check_compatible(engine: EngineLike, info: CheckpointInfo, convert_dtype: bool) -> None:
    """Raises CheckpointError unless the checkpoint fits this engine: model, dtype, shapes, vocabulary,
    context length, sampling arguments, RNG, and tokens that hold what the chat template makes of the messages."""
    def bad(problem: str):
        raise CheckpointError(f"{info.path}: {problem}")

    meta, ours, a = info.meta, engine.fingerprint, engine.args
    saved = meta["model"]
    if any(saved.get(k) != ours[k] for k in ("config_sha256", "weights_sha256")):
        bad(f"it was saved with another model ({saved.get('architecture')} from {saved.get('source')}); "
            f"this engine runs {ours['architecture']} from {ours['source']}")
    if saved.get("quantize") != ours["quantize"]:  # other weight values: its K/V are not this engine's
        bad(f"it was saved with the model's weights {quantize_described(saved.get('quantize'))}, but this engine "
            f"runs them {quantize_described(ours['quantize'])}; load the model with quantize={info.model_quantize!r} "
            "(fa-chat: --quantize) to resume it")
    if meta["dtype"] != dtype_name(engine.dtype) and not convert_dtype:
        bad(f"its K/V are {meta['dtype']} but the engine runs {dtype_name(engine.dtype)}; "
            "load it with convert_dtype=True (fa-chat: --convert-dtype) to convert them")
    if meta["layers"] != a.num_hidden_layers or info.kv_shape != (1, a.num_key_value_heads, a.head_dim):
        bad(f"its K/V are {meta['layers']} layers of [B, Hkv, D] = {list(info.kv_shape)}; the model has "
            f"{a.num_hidden_layers} layers of [1, {a.num_key_value_heads}, {a.head_dim}]")
    tokens = meta["tokens"] + [x for t in meta["turns"] for x in t["tokens"]]
    if any(t >= a.vocab_size for t in tokens):
        bad(f"token id {max(tokens)} is out of range for the vocabulary of {a.vocab_size}")
    longest = max([len(meta["tokens"])] + [t["start"] + len(t["tokens"]) for t in meta["turns"]])
    if longest > engine.max_seq_len:
        bad(f"it holds a context of {longest} tokens but the engine's max_seq_len is {engine.max_seq_len}")
    try:
        SamplingParams(**meta["sampling"])
    except (TypeError, ValueError) as e:
        bad(f"its sampling arguments are invalid: {e}")
    rng = meta["rng"]
    if rng.get("device") != engine.device.type:
        bad(f"its sampler RNG state is for a {rng.get('device')!r} generator; this engine runs on "
            f"{engine.device.type}, whose generator cannot take it")
    try:  # on a scratch generator: setting a state is the one full check of it
        torch.Generator(engine.device).set_state(_decode_rng(rng))
    except (TypeError, ValueError, RuntimeError) as e:
        bad(f"its sampler RNG state is malformed: {e}")
    _check_rendering(engine, meta, bad)


def _check_rendering(engine: EngineLike, meta: dict, bad) -> None:
    """The tokens begin with the chat template's rendering of the messages before the last answer, as the
    last chat turn made them: all of it once the answer began, else up to the turn's first uncached token at
    least (a prefill cut short, raw text appended after it). Only the system prompt may differ: a new one takes
    effect at the next chat turn, so the tokens may hold an older one, or none."""
    system, conversation = _split_system(meta["messages"])
    if not conversation or not engine.tokenizer.chat_template:
        return  # no chat turn (raw text, or reset): nothing rendered to compare with

    def render(system: str | None) -> list[int]:
        head = [] if system is None else [{"role": "system", "content": system}]
        return engine.tokenizer.apply_chat_template(head + conversation[:-1], add_generation_prompt=True)

    try:
        prompt = render(system)
        kept = len(prompt) if conversation[-1]["content"] else meta["turns"][-1]["start"] + 1
        tokens = meta["tokens"][:kept]
        differ = common_prefix(tokens, prompt)
        if differ == min(len(tokens), len(prompt)):
            return
        other = render((system or "") + ".")
    except ValueError:
        return  # a template that rejects these messages: the session could not chat on either, nothing to check
    # The system prompt's part of the rendering: what another system prompt changes, seen from either end.
    if differ > max(common_prefix(prompt, other), len(prompt) - common_prefix(prompt[::-1], other[::-1])):
        bad(f"its tokens differ from the chat template's rendering of its messages at token {differ}, "
            "after the system prompt: the messages or the tokens were edited")


# ------------------------------------------------------------ the file format


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
    def model_quantize(self) -> str:
        """Engine.load's quantize argument that loads the model's weights as they were when the session was saved."""
        quantize = self.meta["model"].get("quantize")
        return "none" if quantize is None else quantize.replace("gguf", "auto")

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
    turns, sampling, rng) to path, atomically. A new file gets the mode the umask leaves; a file saved over
    keeps its mode. Every failure raises an OSError (FileNotFoundError, PermissionError, IsADirectoryError...)
    that names path."""
    path = Path(path)
    tensors = {}
    for i, (k, v, uk, uv) in enumerate(zip(keys, values, undo_keys, undo_values)):
        tensors.update({f"k.{i}": k, f"v.{i}": v, f"undo.k.{i}": uk, f"undo.v.{i}": uv})
    # One copy each into fresh CPU memory: views of the live region are not contiguous.
    tensors = {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in tensors.items()}
    meta = dict(meta, format=FORMAT, version=VERSION, dtype=dtype_name(keys[0].dtype), layers=len(keys),
                length=keys[0].shape[2], undo_length=undo_keys[0].shape[2])
    meta["crc32"] = {"header": _header_crc(meta), "data": _data_crc(tensors)}
    try:
        _write_atomically(path, tensors, {META_KEY: json.dumps(meta, ensure_ascii=False)})
    except OSError as e:  # it would name the temp file, which the user never asked for
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if path.is_dir():  # refused now rather than by os.replace, after writing it all
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    _remove_dead_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with open(fd, "wb") as f:
            with suppress(FileNotFoundError):
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # saving over a file keeps its mode
            _write_safetensors(f, tensors, metadata)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout: the header's size (8 bytes, little-endian), the JSON header padded with spaces
    to 8 bytes, then the tensors' bytes. Written here: safetensors' save_file writes a temp file of its own
    (mode 0600, named in its errors) and renames it over the target."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": DTYPES[dtype_name(t.dtype)][1], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little") + text)
    for t in tensors.values():
        f.write(_bytes(t))


def _remove_dead_temps(path: Path) -> None:
    """Removes the temp files that writers killed mid-save left beside path; those of live writers stay."""
    temp = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+{re.escape(TMP_SUFFIX)}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return  # the save itself will say what is wrong with the folder
    for name in names:
        match = temp.fullmatch(name)
        if match and not _alive(int(match[1])):
            with suppress(OSError):  # another user's, in a sticky folder: not ours to remove
                os.unlink(path.parent / name)


def _alive(pid: int) -> bool:
    """Whether process pid exists (a reused pid keeps a dead writer's temp file: that errs on the safe side).
    Where that cannot be asked safely (os.kill(pid, 0) is no probe on Windows), every writer counts as alive."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's process
        pass
    return True


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
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
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
    first = 1 if messages and messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        role = ("user", "assistant")[(i - first) % 2]
        if messages[i]["role"] != role:
            bad(f"messages[{i}] is {messages[i]['role']!r} where {role!r} belongs: after an optional system "
                "message, user and assistant messages alternate")


def _check_turns(meta, bad) -> None:
    """turns: the undo history, oldest first: {messages, start, tokens, kv}, where kv counts the K/V positions
    (from undo.k/undo.v, in turn order) that undo writes back at start. Each chat turn adds a user message and
    its answer. The undos are played back, newest first, on the token count and cache length as Session.undo
    does them: each must find the tokens it starts at."""
    turns = meta["turns"]
    for i, t in enumerate(turns):
        ok = (isinstance(t, dict) and set(t) == {"messages", "start", "tokens", "kv"}
              and all(_is_token(t[k]) for k in ("messages", "start", "kv")) and isinstance(t["tokens"], list)
              and all(_is_token(x) for x in t["tokens"]))
        if not ok:
            bad(f"turns[{i}] must be {{'messages', 'start', 'kv': int >= 0, 'tokens': [int]}}, got {t!r}")
        if t["messages"] != 2 * i:
            bad(f"turns[{i}] begins at message {t['messages']}, but {i} turns before it make {2 * i} messages")
    conversation = sum(m["role"] != "system" for m in meta["messages"])
    if conversation != 2 * len(turns):
        bad(f"{conversation} messages (system aside) do not make {len(turns)} turns of a user message and an answer")
    if sum(t["kv"] for t in turns) != meta["undo_length"]:
        bad(f"the turns hold {sum(t['kv'] for t in turns)} undo positions but undo_length is {meta['undo_length']}")
    n, length = len(meta["tokens"]), meta["length"]
    for i in reversed(range(len(turns))):
        start, kv, cut = turns[i]["start"], turns[i]["kv"], len(turns[i]["tokens"])
        if kv > cut:
            bad(f"turns[{i}] has undo K/V for {kv} positions but only {cut} tokens")
        if start > n:
            bad(f"turns[{i}] starts at token {start}, past the {n} tokens that undoing it would find")
        if length >= start:
            length = start + kv
        n = min(start + cut, length + 1)


def _header_crc(meta: dict) -> int:
    """Of the header without its checksums, in a canonical form: it survives a JSON round trip unchanged."""
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())


def _data_crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(_bytes(tensors[name]), crc)
    return crc


def _bytes(t: torch.Tensor):
    """A contiguous CPU tensor's bytes, as a numpy view (numpy has no bfloat16)."""
    return t.reshape(-1).view(torch.uint8).numpy()


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

"""Sessions: a context whose K/V stay in the cache between calls, with chat turns, undo, freeze / fork,
and checkpoints that resume exactly.

The invariant every operation keeps, even when a KeyboardInterrupt cuts a forward short: the cache holds
the K/V of tokens[:cache.length], and at most one token after that (the last one generated or appended)
is not in it yet. The next call feeds that token first, exactly as an uninterrupted run would have.
"""
from __future__ import annotations

import base64
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.cache.checkpoint import CheckpointInfo, dtype_name, load_checkpoint, save_checkpoint
from fachat.engine.generate import Generation, TextStream, generate_step, prefill
from fachat.engine.sampling import Sampler, SamplingParams, new_generator
from fachat.errors import CheckpointError, ContextLengthError

if TYPE_CHECKING:
    from fachat.engine.engine import Engine


@dataclass(frozen=True, eq=False)
class _Turn:
    """What undo needs to take back one chat turn: the conversation's length before it, the position at
    which the turn cut the context, the tokens it cut off, and the K/V of those that were cached."""
    messages: int
    start: int
    tokens: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # per layer [B, Hkv, kv, D]; never written to, so snapshots share them
    values: tuple[torch.Tensor, ...]

    @property
    def kv(self) -> int:
        return self.keys[0].shape[2]


@dataclass(frozen=True, eq=False, repr=False)
class Snapshot:
    """A session's whole state at one moment (Session.freeze), to restore with Session.unfreeze as often
    as needed. It holds a copy of the live K/V only, so its size follows the context, not the capacity."""
    engine: Engine
    tokens: tuple[int, ...]
    system: str | None
    conversation: tuple[tuple[str, str], ...]  # (role, content), without the system message
    turns: tuple[_Turn, ...]
    params: SamplingParams
    rng_state: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    last_generation: Generation | None

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V copy this snapshot holds."""
        return sum(t.nbytes for t in self.keys + self.values)


class Session:
    """A conversation (or a raw token context) with one model, whose K/V stay cached between calls.

    sampling: Engine.generate's arguments (max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, stop), the defaults of every call; each call may override them. The sampler's
    RNG lives as long as the session, so a seeded session repeats its whole conversation; a `seed` given
    to one call reseeds it from there on.
    """

    def __init__(self, engine: Engine, system: str | None = None, **sampling):
        self.engine = engine
        self._params = SamplingParams(**sampling)
        self._generator = new_generator(engine.device, self._params.seed)
        self._cache = engine.new_cache()
        self._tokens: list[int] = []
        self._system = _check_system(system)
        self._conversation: list[dict[str, str]] = []  # without the system message
        self._turns: list[_Turn] = []  # undo history, oldest first
        self._active: TextStream | None = None
        self.last_generation: Generation | None = None

    # ------------------------------------------------------------ state

    @property
    def tokens(self) -> list[int]:
        """The context: every token the next answer follows."""
        return list(self._tokens)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The system message, if any, then the conversation."""
        return [dict(m) for m in self._with_system(self._conversation)]

    @property
    def cache(self) -> InPlaceKVCache:
        return self._cache

    @property
    def params(self) -> SamplingParams:
        """The session's default sampling arguments."""
        return self._params

    @property
    def system(self) -> str | None:
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        """A new system message (None: none). The next chat renders with it, and the cache is cut where
        the rendering first differs."""
        self._finish_active()
        self._system = _check_system(text)

    def configure(self, **sampling) -> None:
        """Changes the session's default sampling arguments (saved with it); a `seed` reseeds the RNG now."""
        self._finish_active()
        self._params = dataclasses.replace(self._params, **sampling)
        if sampling.get("seed") is not None:
            self._generator.manual_seed(sampling["seed"])

    # ------------------------------------------------------------ chat

    def chat(self, message: str, **overrides) -> Generation:
        return _drain(self.stream_chat(message, **overrides))

    def stream_chat(self, message: str, **overrides) -> TextStream:
        """Answers message after the conversation so far. The whole conversation is rendered with the chat
        template and compared with the context: the cache is cut at the first difference and only the rest
        is prefilled. The answer joins `messages` when the stream ends, however it ends (cut short by
        close() or a KeyboardInterrupt: the partial text)."""
        if not isinstance(message, str):
            raise ValueError(f"message must be a str, got {type(message).__name__}")
        self._finish_active()
        conversation = self._conversation + [{"role": "user", "content": message}]
        ids = self.engine.tokenizer.apply_chat_template(self._with_system(conversation), add_generation_prompt=True)
        return self._stream(ids, overrides, conversation)

    def undo(self) -> None:
        """Takes back the last chat turn, the user's message and the answer. The cache is cut back to where
        the turn began and the K/V that the turn overwrote are written back: nothing is recomputed. The
        sampler's RNG is not rewound, so asking again draws a new answer. If it fails (out of memory), nothing
        has changed; a KeyboardInterrupt in the copy leaves the cache cut back and the turn to undo again."""
        self._finish_active()
        if not self._turns:
            raise ValueError("nothing to undo: no chat turn since the session began or was reset")
        turn = self._turns[-1]
        old = self._tokens[:turn.start] + list(turn.tokens)
        if self._cache.length >= turn.start:
            try:
                self._cache.set_state(list(turn.keys), list(turn.values), start=turn.start)
            finally:
                self._trim()  # after a copy cut short, the cache holds turn.start positions
        self._tokens = old[:self._cache.length + 1]
        self._conversation = self._conversation[:turn.messages]
        self._turns.pop()

    def reset(self) -> None:
        """Clears the conversation and the undo history, keeping the system message (and the K/V of the
        tokens that render it, where the template renders it first). A seeded session is reseeded, so it
        answers as a new one would."""
        self._finish_active()
        keep = 0
        if self._system is not None and self.engine.tokenizer.chat_template:
            try:
                prefix = self.engine.tokenizer.apply_chat_template(self._with_system([]), add_generation_prompt=False)
                keep = min(_common_prefix(self._tokens, prefix), self._cache.length)
            except ValueError:
                pass  # a template that will not render a system message alone: keep nothing
        self._cache.truncate(keep)
        del self._tokens[keep:]
        self._conversation, self._turns = [], []
        if self._params.seed is not None:
            self._generator.manual_seed(self._params.seed)

    # ------------------------------------------------------------ raw context

    def append(self, text_or_ids: str | Sequence[int] | torch.Tensor) -> None:
        """Adds text or token ids to the context and prefills them, all but the last token, which the next
        generate feeds. Text is encoded without special tokens, except at the very start of a session
        (where the tokenizer adds a bos, as Engine.generate does). Chat messages are not touched."""
        self._finish_active()
        if isinstance(text_or_ids, str):
            new = self.engine.tokenizer.encode(text_or_ids, add_special_tokens=not self._tokens)
        elif isinstance(text_or_ids, (list, tuple, torch.Tensor)):
            new = self.engine.check_token_ids(text_or_ids)
        else:
            raise ValueError(f"append takes a str or a list of token ids, got {type(text_or_ids).__name__}")
        if not new:
            raise ValueError("nothing to append: the text or token list is empty")
        ids = self._tokens + new
        if len(ids) > self.engine.max_seq_len:
            raise ContextLengthError(f"the context would be {len(ids)} tokens but max_seq_len is "
                                     f"{self.engine.max_seq_len}")
        try:
            self._tokens = ids
            if self._cache.length < len(ids) - 1:
                prefill(self.engine.model, self._cache, ids[self._cache.length:-1])
        finally:
            self._trim()

    def generate(self, **overrides) -> Generation:
        return _drain(self.stream(**overrides))

    def stream(self, **overrides) -> TextStream:
        """Continues the context with new tokens (after append, or after an answer); messages are not touched."""
        self._finish_active()
        if not self._tokens:
            raise ValueError("the session is empty: append a prompt or chat first")
        return self._stream(list(self._tokens), overrides)

    # ------------------------------------------------------------ freeze / fork

    def freeze(self) -> Snapshot:
        """The session's state, to restore with unfreeze: costs one copy of the live K/V, O(context)."""
        self._finish_active()
        return self._snapshot(copy=True)

    def unfreeze(self, snapshot: Snapshot) -> None:
        """Puts back a frozen state (copying its K/V in, O(context)); the snapshot stays usable."""
        self._finish_active()
        if not isinstance(snapshot, Snapshot):
            raise ValueError(f"unfreeze takes a Snapshot from Session.freeze, got {type(snapshot).__name__}")
        if snapshot.engine is not self.engine:
            raise ValueError("the snapshot was frozen from a session of another engine")
        self._restore(snapshot)

    def fork(self) -> Session:
        """An independent copy with its own cache (the live K/V copied once) and the same RNG state: the
        two never share a buffer, so a write to one never shows in the other."""
        self._finish_active()
        child = Session(self.engine)
        child._restore(self._snapshot(copy=False))
        return child

    # ------------------------------------------------------------ checkpoints

    def save(self, path: str | os.PathLike) -> None:
        """Writes the session to one safetensors file, atomically: the live K/V, the tokens, messages, undo
        history, sampling arguments and RNG state (see fachat.cache.checkpoint). A new file's mode follows the
        umask; a file saved over keeps its mode. Raises OSError (FileNotFoundError, PermissionError,
        IsADirectoryError...) naming path if the file cannot be written; an older file there stays whole."""
        self._finish_active()
        keys, values = self._cache.state
        layers = range(len(keys))  # the turns' K/V tails, one after another (none: zero positions)
        undo_keys = [torch.cat([keys[i][:, :, :0], *(t.keys[i] for t in self._turns)], dim=2) for i in layers]
        undo_values = [torch.cat([values[i][:, :, :0], *(t.values[i] for t in self._turns)], dim=2) for i in layers]
        save_checkpoint(path, keys, values, undo_keys, undo_values, {
            "model": self.engine.fingerprint,
            "tokens": self._tokens,
            "messages": self.messages,
            "turns": [{"messages": t.messages, "start": t.start, "tokens": list(t.tokens), "kv": t.kv}
                      for t in self._turns],
            "sampling": dataclasses.asdict(self._params),
            "rng": {"device": self._generator.device.type,
                    "state": base64.b64encode(self._generator.get_state().numpy().tobytes()).decode()},
        })

    @classmethod
    def load(cls, engine: Engine, path: str | os.PathLike, convert_dtype: bool = False) -> Session:
        """A session saved with save; see Engine.load_session."""
        ckpt = load_checkpoint(path, check=lambda info: _check_compatible(engine, info, convert_dtype))
        meta = ckpt.info.meta
        messages = meta["messages"]
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        conversation = messages[1:] if system is not None else messages

        def to_engine(ts):
            return tuple(t.to(engine.device, engine.dtype) for t in ts)

        turns, offset = [], 0
        for t in meta["turns"]:
            part = [tuple(u.narrow(2, offset, t["kv"]) for u in undo) for undo in (ckpt.undo_keys, ckpt.undo_values)]
            turns.append(_Turn(t["messages"], t["start"], tuple(t["tokens"]), to_engine(part[0]), to_engine(part[1])))
            offset += t["kv"]
        # The live K/V only pass through: the cache copies them onto its device, so they get the dtype alone.
        snapshot = Snapshot(engine, tuple(meta["tokens"]), system,
                            tuple((m["role"], m["content"]) for m in conversation), tuple(turns),
                            SamplingParams(**meta["sampling"]), _decode_rng(meta["rng"]),
                            tuple(t.to(dtype=engine.dtype) for t in ckpt.keys),
                            tuple(t.to(dtype=engine.dtype) for t in ckpt.values), None)
        session = cls(engine)
        session._restore(snapshot)
        return session

    # ------------------------------------------------------------ internals

    def _stream(self, ids: list[int], overrides: dict, conversation: list[dict] | None = None) -> TextStream:
        """The one generation path (Engine.stream's too): makes ids the context, keeping the cached K/V up
        to the first difference, and streams an answer. conversation: a chat turn's messages, which the
        answer joins when the stream ends."""
        params = dataclasses.replace(self._params, **overrides) if overrides else self._params
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(f"the context is {len(ids)} tokens but max_seq_len is {limit}; "
                                     "shorten it or load with a larger max_seq_len")
        # Feed at least the last token: its logits are where the answer starts.
        start = min(_common_prefix(self._tokens, ids), self._cache.length, len(ids) - 1)
        turn = None
        if conversation is not None:
            keys, values = self._cache.state
            turn = _Turn(len(self._conversation), start, tuple(self._tokens[start:]),
                         tuple(k[:, :, start:].clone(memory_format=torch.contiguous_format) for k in keys),
                         tuple(v[:, :, start:].clone(memory_format=torch.contiguous_format) for v in values))

        def on_end(generation: Generation) -> None:
            self.last_generation = generation
            if conversation is not None:
                self._conversation = conversation + [{"role": "assistant", "content": generation.text}]
                self._turns.append(turn)

        sampler = Sampler(params, self.engine.args.vocab_size, self.engine.device, generator=self._generator)
        steps = self._steps(ids, start, sampler, overrides.get("seed"))
        self._active = TextStream(steps, self.engine.tokenizer, len(ids), min(params.max_new_tokens, limit - len(ids)),
                                  params.stop, cached_tokens=start, on_end=on_end)
        return self._active

    def _steps(self, ids: list[int], start: int, sampler: Sampler, seed: int | None):
        """Runs when the stream starts: a stream closed before it starts has changed nothing."""
        try:
            self._cache.truncate(start)
            self._tokens = list(ids)
            if seed is not None:
                self._generator.manual_seed(seed)
            for token in generate_step(self.engine.model, self._cache, ids, sampler):
                self._tokens.append(token)
                yield token
        finally:
            self._trim()

    def _trim(self) -> None:
        """Restores the invariant after a prefill that was cut short: uncached tokens but one are dropped."""
        del self._tokens[self._cache.length + 1:]

    def _finish_active(self) -> None:
        """Ends an answer still streaming (its partial text joins the conversation) before anything changes."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _with_system(self, conversation: list[dict]) -> list[dict]:
        system = [] if self._system is None else [{"role": "system", "content": self._system}]
        return system + conversation

    def _snapshot(self, copy: bool) -> Snapshot:
        keys, values = self._cache.state
        if copy:
            keys = [k.clone(memory_format=torch.contiguous_format) for k in keys]
            values = [v.clone(memory_format=torch.contiguous_format) for v in values]
        return Snapshot(self.engine, tuple(self._tokens), self._system,
                        tuple((m["role"], m["content"]) for m in self._conversation), tuple(self._turns),
                        self._params, self._generator.get_state(), tuple(keys), tuple(values), self.last_generation)

    def _restore(self, snapshot: Snapshot) -> None:
        """Puts the snapshot's state in place. What can fail (the RNG state, the cache's checks and growth) runs
        before anything changes; a KeyboardInterrupt in the copy leaves the cache empty and the rest as it was."""
        generator = torch.Generator(self.engine.device)
        generator.set_state(snapshot.rng_state)
        try:
            self._cache.set_state(list(snapshot.keys), list(snapshot.values))
        finally:
            self._trim()  # after a copy cut short, the cache is empty
        self._tokens = list(snapshot.tokens)
        self._system = snapshot.system
        self._conversation = [{"role": r, "content": c} for r, c in snapshot.conversation]
        self._turns = list(snapshot.turns)
        self._params = snapshot.params
        self._generator = generator
        self.last_generation = snapshot.last_generation


def _drain(stream: TextStream) -> Generation:
    try:
        for _ in stream:
            pass
    finally:
        stream.close()  # also when a KeyboardInterrupt lands between two pieces: the answer is recorded now
    return stream.generation


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _check_system(text) -> str | None:
    if text is not None and not isinstance(text, str):
        raise ValueError(f"system must be a str or None, got {type(text).__name__}")
    return text


def _decode_rng(rng: dict) -> torch.Tensor | None:
    try:
        raw = base64.b64decode(rng.get("state"), validate=True)
    except (TypeError, ValueError):
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _check_compatible(engine: Engine, info: CheckpointInfo, convert_dtype: bool) -> None:
    """Raises CheckpointError unless the checkpoint fits this engine: model, dtype, shapes, vocabulary,
    context length, sampling arguments, RNG, and tokens that hold what the chat template makes of the messages."""
    def bad(problem: str):
        raise CheckpointError(f"{info.path}: {problem}")

    meta, ours, a = info.meta, engine.fingerprint, engine.args
    saved = meta["model"]
    if any(saved.get(k) != ours[k] for k in ("config_sha256", "weights_sha256")):
        bad(f"it was saved with another model ({saved.get('architecture')} from {saved.get('source')}); "
            f"this engine runs {ours['architecture']} from {ours['source']}")
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


def _check_rendering(engine: Engine, meta: dict, bad) -> None:
    """The tokens begin with the chat template's rendering of the messages before the last answer, as the
    last chat turn made them: all of it once the answer began, else up to the turn's first uncached token at
    least (a prefill cut short, raw text appended after it). Only the system prompt may differ: a new one takes
    effect at the next chat turn, so the tokens may hold an older one, or none."""
    messages = meta["messages"]
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    conversation = messages[1:] if system is not None else messages
    if not conversation or not engine.tokenizer.chat_template:
        return  # no chat turn (raw text, or reset): nothing rendered to compare with

    def render(system: str | None) -> list[int]:
        head = [] if system is None else [{"role": "system", "content": system}]
        return engine.tokenizer.apply_chat_template(head + conversation[:-1], add_generation_prompt=True)

    try:
        prompt = render(system)
        kept = len(prompt) if conversation[-1]["content"] else meta["turns"][-1]["start"] + 1
        tokens = meta["tokens"][:kept]
        differ = _common_prefix(tokens, prompt)
        if differ == min(len(tokens), len(prompt)):
            return
        other = render((system or "") + ".")
    except ValueError:
        return  # a template that rejects these messages: the session could not chat on either, nothing to check
    # The system prompt's part of the rendering: what another system prompt changes, seen from either end.
    if differ > max(_common_prefix(prompt, other), len(prompt) - _common_prefix(prompt[::-1], other[::-1])):
        bad(f"its tokens differ from the chat template's rendering of its messages at token {differ}, "
            "after the system prompt: the messages or the tokens were edited")

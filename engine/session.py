"""Sessions: a context whose K/V stay in the cache between calls, with chat turns, undo, freeze / fork,
and checkpoints that resume exactly.

The invariant every operation keeps, even when a KeyboardInterrupt cuts a forward short: the cache holds
the K/V of tokens[:cache.length], and at most one token after that (the last one generated or appended)
is not in it yet. The next call feeds that token first, exactly as an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.engine.generate import Generation, TextStream, generate_step
from fachat.engine.persistence import load_snapshot, save_snapshot
from fachat.engine.runner import Runner
from fachat.engine.sampling import SamplingParams, seed_generator
from fachat.engine.state import EngineLike, Snapshot, Turn, common_prefix
from fachat.errors import ContextLengthError

CONTEXT_FULL = ("stop", "shift")


class Session:
    """A conversation (or a raw token context) with one model, whose K/V stay cached between calls.

    sampling: Engine.generate's arguments (max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, stop), the defaults of every call; each call may override them. The sampler's
    RNG lives as long as the session, so a seeded session repeats its whole conversation; a `seed` given
    to one call reseeds it from there on.
    """

    def __init__(self, engine: EngineLike, system: str | None = None, *, runner: Runner | None = None,
                 context_full: str = "stop", **sampling):
        """runner: the one to decode with (Engine.generate lends its own, whose graphs are already captured);
        by default a new one, with a new cache. context_full: see the property."""
        self.engine = engine
        self.context_full = context_full
        self.dropped_turns = 0  # the oldest chat turns that the last stream_chat dropped to fit the context
        self._params = SamplingParams(**sampling)
        self._runner = runner if runner is not None else engine.new_runner()
        self._runner.truncate(0)
        seed_generator(self._runner.generator, self._params.seed)
        self._tokens: list[int] = []
        self._system = _check_system(system)
        self._conversation: list[dict[str, str]] = []  # without the system message
        self._turns: list[Turn] = []  # undo history, oldest first
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
        return self._runner.cache

    @property
    def runner(self) -> Runner:
        """What decodes for this session: the cache, the device-side sampler state and RNG, the CUDA graphs."""
        return self._runner

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

    @property
    def context_full(self) -> str:
        """What a chat turn does when the conversation, the new message and room for its answer
        (max_new_tokens, at most half of max_seq_len) do not fit in max_seq_len. "stop" (the default): the
        answer stops at the limit, and a message that does not fit at all raises ContextLengthError. "shift":
        the oldest whole turns are dropped (never the system message) until it fits, and what remains is
        prefilled again; undo then takes back the kept turns, cut back to their rendering, never the dropped
        ones. Not saved with the session."""
        return self._context_full

    @context_full.setter
    def context_full(self, mode: str) -> None:
        if mode not in CONTEXT_FULL:
            raise ValueError(f"context_full must be one of {', '.join(CONTEXT_FULL)}, got {mode!r}")
        self._context_full = mode

    def configure(self, **sampling) -> None:
        """Changes the session's default sampling arguments (saved with it); a `seed` reseeds the RNG now."""
        self._finish_active()
        self._params = dataclasses.replace(self._params, **sampling)
        if sampling.get("seed") is not None:
            self._runner.generator.manual_seed(sampling["seed"])

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
        ids = self._render(conversation, answer=True)
        self.dropped_turns, history = 0, None
        if self._context_full == "shift":
            limit = self.engine.max_seq_len
            room = min(self._params_with(overrides).max_new_tokens, limit // 2)
            while len(ids) + room > limit and len(conversation) > 1:
                conversation = conversation[2:]  # a user message and its answer
                ids = self._render(conversation, answer=True)
                self.dropped_turns += 1
            if self.dropped_turns:
                # The kept turns are prefilled again: undo cuts back to where each began in the new rendering.
                history = [(m, common_prefix(self._render(conversation[:m]), ids))
                           for m in range(0, len(conversation), 2)]
        return self._stream(ids, overrides, conversation, history)

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
        if self._runner.length >= turn.start:
            try:
                self._runner.set_state(list(turn.keys), list(turn.values), start=turn.start)
            finally:
                self._trim()  # after a copy cut short, the cache holds turn.start positions
        self._tokens = old[:self._runner.length + 1]
        self._conversation = self._conversation[:turn.messages]
        self._turns.pop()

    def reset(self) -> None:
        """Clears the conversation and the undo history, keeping the system message (and the K/V of the
        tokens that render it, where the template renders it first). A seeded session is reseeded, so it
        answers as a new one would."""
        self._finish_active()
        keep = 0
        if self.engine.tokenizer.chat_template:
            keep = min(common_prefix(self._tokens, self._render([])), self._runner.length)
        self._runner.truncate(keep)
        del self._tokens[keep:]
        self._conversation, self._turns = [], []
        if self._params.seed is not None:
            self._runner.generator.manual_seed(self._params.seed)

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
            if self._runner.length < len(ids) - 1:
                self._runner.prefill(ids[self._runner.length:-1])
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

    def stream_from(self, ids: list[int], **overrides) -> TextStream:
        """Makes the token ids the context, keeping the cached K/V of what it shares with the current one, and
        streams their continuation (Engine.stream's path); messages are not touched."""
        self._finish_active()
        return self._stream(self.engine.check_token_ids(ids), overrides)

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
        child = Session(self.engine, context_full=self._context_full)
        child._restore(self._snapshot(copy=False))
        return child

    # ------------------------------------------------------------ checkpoints

    def save(self, path: str | os.PathLike) -> None:
        """Writes the session to one safetensors file, atomically: the live K/V, the tokens, messages, undo
        history, sampling arguments and RNG state (see fachat.engine.persistence). A new file's mode follows the
        umask; a file saved over keeps its mode. Raises OSError (FileNotFoundError, PermissionError,
        IsADirectoryError...) naming path if the file cannot be written; an older file there stays whole."""
        self._finish_active()
        save_snapshot(self._snapshot(copy=False), path)

    @classmethod
    def load(cls, engine: EngineLike, path: str | os.PathLike, convert_dtype: bool = False) -> Session:
        """A session saved with save; see Engine.load_session."""
        snapshot = load_snapshot(engine, path, convert_dtype)
        session = cls(engine)
        session._restore(snapshot)
        return session

    # ------------------------------------------------------------ internals

    def _stream(self, ids: list[int], overrides: dict, conversation: list[dict] | None = None,
                history: list[tuple[int, int]] | None = None) -> TextStream:
        """The one generation path (Engine.stream's too): makes ids the context, keeping the cached K/V up
        to the first difference, and streams an answer. conversation: a chat turn's messages, which the
        answer joins when the stream ends. history: after a context shift, the undo history that replaces
        the old one, as (messages, start) of each turn, this one included; what undo writes back is empty."""
        params = self._params_with(overrides)
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(f"the context is {len(ids)} tokens but max_seq_len is {limit}; "
                                     "shorten it or load with a larger max_seq_len")
        # Feed at least the last token: its logits are where the answer starts.
        start = min(common_prefix(self._tokens, ids), self._runner.length, len(ids) - 1)
        turn = None
        if conversation is not None and history is None:
            keys, values = self._runner.state
            turn = Turn(len(self._conversation), start, tuple(self._tokens[start:]),
                        tuple(k[:, :, start:].clone(memory_format=torch.contiguous_format) for k in keys),
                        tuple(v[:, :, start:].clone(memory_format=torch.contiguous_format) for v in values))

        def on_end(generation: Generation) -> None:
            self.last_generation = generation
            if conversation is not None:
                self._conversation = conversation + [{"role": "assistant", "content": generation.text}]
                if history is None:
                    self._turns.append(turn)
                else:
                    keys, values = (tuple(t[:, :, :0].clone() for t in ts) for ts in self._runner.state)
                    self._turns = [Turn(m, start, (), keys, values) for m, start in history]

        max_new_tokens = min(params.max_new_tokens, limit - len(ids))
        steps = self._steps(ids, start, params, overrides.get("seed"), max_new_tokens)
        self._active = TextStream(steps, self.engine.tokenizer, len(ids), max_new_tokens, params.stop,
                                  cached_tokens=start, on_end=on_end)
        return self._active

    def _steps(self, ids: list[int], start: int, params: SamplingParams, seed: int | None, max_new_tokens: int):
        """Runs when the stream starts: a stream closed before it starts has changed nothing."""
        runner = self._runner
        try:
            runner.truncate(start)
            self._tokens = list(ids)
            if seed is not None:
                runner.generator.manual_seed(seed)
            runner.prefill(ids[start:])
            runner.begin(params, ids)
            for token in generate_step(runner, max_new_tokens):
                self._tokens.append(token)
                yield token
        finally:
            self._trim()

    def _trim(self) -> None:
        """Restores the invariant after a prefill that was cut short: uncached tokens but one are dropped."""
        del self._tokens[self._runner.length + 1:]

    def _finish_active(self) -> None:
        """Ends an answer still streaming (its partial text joins the conversation) before anything changes."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _params_with(self, overrides: dict) -> SamplingParams:
        return dataclasses.replace(self._params, **overrides) if overrides else self._params

    def _render(self, conversation: list[dict], answer: bool = False) -> list[int]:
        """The chat template's tokens for the system message and conversation; answer: with the prompt of
        an answer after them. Nothing at all renders as no tokens, as does a system message alone that the
        template will not render (then reset keeps nothing, and undo after a context shift cuts back to 0)."""
        messages = self._with_system(conversation)
        if not messages:
            return []
        try:
            return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=answer)
        except ValueError:
            if conversation:
                raise
            return []

    def _with_system(self, conversation: list[dict]) -> list[dict]:
        system = [] if self._system is None else [{"role": "system", "content": self._system}]
        return system + conversation

    def _snapshot(self, copy: bool) -> Snapshot:
        keys, values = self._runner.state
        if copy:
            keys = [k.clone(memory_format=torch.contiguous_format) for k in keys]
            values = [v.clone(memory_format=torch.contiguous_format) for v in values]
        return Snapshot(self.engine, tuple(self._tokens), self._system,
                        tuple((m["role"], m["content"]) for m in self._conversation), tuple(self._turns),
                        self._params, self._runner.generator.get_state(), tuple(keys), tuple(values),
                        self.last_generation)

    def _restore(self, snapshot: Snapshot) -> None:
        """Puts the snapshot's state in place. What can fail (the RNG state, the cache's checks and growth) runs
        before anything changes; a KeyboardInterrupt in the copy leaves the cache empty and the rest as it was."""
        torch.Generator(self.engine.device).set_state(snapshot.rng_state)  # checks it, on a scratch generator
        try:
            self._runner.set_state(list(snapshot.keys), list(snapshot.values))
        finally:
            self._trim()  # after a copy cut short, the cache is empty
        self._tokens = list(snapshot.tokens)
        self._system = snapshot.system
        self._conversation = [{"role": r, "content": c} for r, c in snapshot.conversation]
        self._turns = list(snapshot.turns)
        self._params = snapshot.params
        self._runner.set_rng_state(snapshot.rng_state)
        self.last_generation = snapshot.last_generation


def _drain(stream: TextStream) -> Generation:
    try:
        for _ in stream:
            pass
    finally:
        stream.close()  # also when a KeyboardInterrupt lands between two pieces: the answer is recorded now
    return stream.generation


def _check_system(text) -> str | None:
    if text is not None and not isinstance(text, str):
        raise ValueError(f"system must be a str or None, got {type(text).__name__}")
    return text

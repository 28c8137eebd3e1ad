"""Generation in layers: token steps, then a text stream with stop strings, then a finished Generation."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from fachat.engine.runner import Runner
from fachat.models.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # the context the answer follows
    new_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those whose K/V a session already held (not prefilled)
    time_to_first_token: float = 0.0  # seconds, prefill included
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # new tokens only; an ending eos is left out
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", or "interrupted" (closed early)
    stats: GenerationStats = field(default_factory=GenerationStats)


def generate_step(runner: Runner, max_tokens: int | None = None) -> Iterator[int]:
    """Yields the tokens sampled after the runner's last prefill, one at a time (row 0): max_tokens of them,
    or forever.

    The device runs runner.lookahead steps ahead: token t is read while the step that feeds it is already
    queued (never a step past max_tokens). When the iteration ends early (a stop found in token t, close(),
    KeyboardInterrupt), the steps queued past it are taken back: the cache ends after the token before the
    last one yielded (which is never fed, as in an unpipelined run), and the RNG is put back to where the
    first unread draw began."""
    base, read, issued = runner.length, 0, 1
    rng, pending = deque(), deque()
    try:
        rng.append(runner.rng_state())
        pending.append(runner.sample())
        while True:
            while len(pending) <= runner.lookahead and (max_tokens is None or issued < max_tokens):
                rng.append(runner.rng_state())
                pending.append(runner.step())
                issued += 1
            if not pending:
                return
            token = runner.read(pending.popleft())[0]
            rng.popleft()
            read += 1
            yield token
    finally:
        runner.truncate(min(runner.length, base + max(read - 1, 0)))
        if rng and rng[0] is not None:
            runner.set_rng_state(rng[0])


class TextStream:
    """Iterates over text pieces as they decode; `generation` holds the result once iteration ends.

    Text that could be the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, steps: Iterator[int], tokenizer: Tokenizer, prompt_tokens: int, max_new_tokens: int,
                 stop: Sequence[str], *, cached_tokens: int = 0, on_end: Callable[[Generation], None] | None = None):
        """on_end is called with the finished Generation once the stream ends, however it ends: done,
        closed, or an exception (KeyboardInterrupt) raised inside it."""
        self._steps = steps
        self._tokenizer = tokenizer
        self._max_new_tokens = max_new_tokens
        self._stop = list(stop)
        self._on_end = on_end
        self.generation = Generation(stats=GenerationStats(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens))
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Ends the stream early (e.g. after a KeyboardInterrupt in the loop over it); a stream that never
        started ends without having run."""
        self._pieces.close()

    def _run(self) -> Iterator[str]:
        gen, stats = self.generation, self.generation.stats
        detok = self._tokenizer.detokenizer()
        eos = set(self._tokenizer.eos_token_ids)
        text, emitted = "", 0
        start = time.perf_counter()
        first = last = start
        step, cut = 0, None
        try:
            for step, token in enumerate(self._steps):
                last = time.perf_counter()
                if step == 0:
                    first = last
                if token in eos:
                    gen.finish_reason = "stop"
                    break
                gen.tokens.append(token)
                piece = detok.add(token)
                text += piece
                if self._stop:
                    # A stop string can end inside text held back for an incomplete character.
                    visible = text if piece else text + detok.pending()
                    cut = self._stop_index(visible, emitted)
                    if cut is not None:
                        text, gen.finish_reason = visible[:cut], "stop"
                        break
                end = len(text) - self._held_back(text)
                if end > emitted:
                    yield text[emitted:end]
                    emitted = end
                if len(gen.tokens) >= self._max_new_tokens:
                    gen.finish_reason = "length"
                    break
            if cut is None:
                text += detok.flush()  # a trailing partial character, if any
            if len(text) > emitted:
                yield text[emitted:]
        finally:
            self._steps.close()
            gen.text = text
            if gen.finish_reason is None:
                gen.finish_reason = "interrupted"
            stats.new_tokens = len(gen.tokens)
            stats.time_to_first_token = first - start
            if first > start:
                stats.prefill_tokens_per_s = (stats.prompt_tokens - stats.cached_tokens) / (first - start)
            if last > first:
                stats.decode_tokens_per_s = step / (last - first)
            if self._on_end is not None:
                self._on_end(gen)

    def _stop_index(self, text: str, emitted: int) -> int | None:
        hits = [i for s in self._stop if (i := text.find(s, emitted)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        return max((k for s in self._stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)

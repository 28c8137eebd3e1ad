"""Sampling parameters, their validation, and a seeded sampler that never touches the global RNG."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def _number(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        lo = "(" if low_open else "["
        hi = "]" if high != math.inf else ")"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Engine.generate's arguments, in transformers' names; temperature 0 means greedy. `stop` is kept
    as a tuple of strings; a str is one stop string."""
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: str | Sequence[str] | None = ()

    def __post_init__(self):
        _number("temperature", self.temperature, low=0.0)
        _number("top_k", self.top_k, low=0, integer=True)
        _number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.seed is not None:
            _number("seed", self.seed, low=0, high=2**63 - 1, integer=True)
        _number("max_new_tokens", self.max_new_tokens, low=1, integer=True)
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty str or a list of non-empty str, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stops))  # frozen: normalised once, here


class Sampler:
    """Turns last-position logits [B, vocab] into tokens [B] on their device, with no host read: repetition
    penalty, then temperature, top-k, top-p, min-p. Its state (the tokens seen, for the penalty, and the RNG)
    lives on the device too, so a CUDA graph can capture a call."""

    def __init__(self, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator):
        """seen: bool [B, vocab], the tokens each row has seen, updated in place; generator: the one to draw from."""
        self.params = params
        self.seen = seen
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits[:, : self.seen.shape[-1]].float()
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            # Exponential race, as torch.multinomial draws one sample (same tokens for the same generator state),
            # minus its host-side checks of the distribution: they would read the device.
            probs = self.probabilities(logits)
            race = torch.empty_like(probs).exponential_(1, generator=self.generator)
            tokens = (probs / race).argmax(-1)
        self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distributions [B, vocab] sampled from, after temperature and the top-k / top-p / min-p filters."""
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= p.top_p  # mass before this token already covers top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
        if p.min_p > 0.0:
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), -math.inf)
        return torch.softmax(logits, -1)


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    return seed_generator(torch.Generator(device=device), seed)


def seed_generator(generator: torch.Generator, seed: int | None) -> torch.Generator:
    """Seeds generator with seed, or with fresh entropy for None (the default seed would be a constant)."""
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator

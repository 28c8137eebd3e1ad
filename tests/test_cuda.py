"""The engine on a CUDA device (reference attention backend), against transformers on the same device."""
from __future__ import annotations

import pytest
import torch

from fachat import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.mark.parametrize("variant", ["llama", "llama-tied-mqa", "mistral-window", "qwen2"])
def test_float32_logits_and_greedy_tokens_match(tiny_models, variant, gen, seed):
    path, peer = tiny_models(variant)
    engine = Engine.load(path, device="cuda", dtype="float32")
    ids = torch.randint(0, peer.config.vocab_size, (70,), generator=gen).tolist()
    peer = peer.to("cuda")
    with torch.no_grad():
        expected = peer(torch.tensor([ids], device="cuda")).logits[0]
    got = engine.score(ids)
    assert got.device.type == "cuda"
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"{variant}: relative error {err:.2e}; seed={seed}"
    cpu = Engine.load(path, device="cpu").generate(ids[:8], max_new_tokens=24, temperature=0)
    assert engine.generate(ids[:8], max_new_tokens=24, temperature=0).tokens == cpu.tokens, f"seed={seed}"
    peer.to("cpu")


def test_auto_dtype_is_bfloat16_and_close_to_float32(tiny_models, gen, seed):
    path, peer = tiny_models("llama")
    engine = Engine.load(path, device="auto", dtype="auto")
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
    ids = torch.randint(0, peer.config.vocab_size, (40,), generator=gen).tolist()
    with torch.no_grad():
        expected = peer(torch.tensor([ids])).logits[0]
    err = ((engine.score(ids).cpu() - expected).abs().max() / expected.abs().max()).item()
    assert err < 5e-2, f"bf16 relative error {err:.2e}; seed={seed}"


def test_seeded_sampling_is_reproducible_on_the_device(tiny_models, seed):
    engine = Engine.load(tiny_models("llama")[0], device="cuda")
    runs = [engine.generate("hello", max_new_tokens=24, temperature=1.5, top_p=0.95, seed=seed).tokens
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0, f"seed={seed}"

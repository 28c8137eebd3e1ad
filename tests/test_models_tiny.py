"""Every tiny Llama-family variant against its transformers peer: logits, greedy decode, chunked prefill,
half-precision loads, config parsing (rope scaling included) and sharded checkpoints."""
from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest
import torch

import fachat
from tiny import VARIANTS
from fachat.errors import UnsupportedModelError
from fachat.models.config import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, ModelArgs, rope_inv_freq

reference_module = importlib.import_module("fachat.kernels.reference")


def random_ids(gen, n, vocab):
    return [1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist()


def peer_logits(peer, ids):
    with torch.no_grad():
        return peer(torch.tensor([ids])).logits[0].float()


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def load(path, **kw):
    return fachat.Engine.load(path, device="cpu", **{"dtype": "float32", **kw})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_score_matches_transformers(variant, tiny_models, gen, seed):
    path, peer = tiny_models(variant)
    eng = load(path)
    ids = random_ids(gen, 48, eng.args.vocab_size)  # longer than mistral-window's window of 16
    ours, ref = eng.score(ids), peer_logits(peer, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (48, eng.args.vocab_size)
    assert rel_err(ours, ref) < 1e-4, f"{variant}: rel err {rel_err(ours, ref):.3g}; seed={seed}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_generate(variant, tiny_models, gen, seed):
    path, peer = tiny_models(variant)
    eng = load(path)
    eng.tokenizer.eos_token_ids = []  # never stop early: compare all 32 tokens
    prompt = random_ids(gen, 10, eng.args.vocab_size)
    ours = eng.generate(prompt, max_new_tokens=32, temperature=0).tokens
    with torch.no_grad():
        out = peer.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, len(prompt):].tolist()
    assert len(ours) == 32
    n = len(theirs)  # transformers may still stop at its configured eos; compare what it produced
    assert n == 32 or theirs[-1] in (peer.generation_config.eos_token_id, 2), theirs
    for i in range(n):
        if ours[i] != theirs[i]:
            # Only an (effectively) tied argmax may differ between two correct float32 implementations.
            top2 = out.scores[i][0].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < 1e-4 * top2[0].abs().item(), \
                f"{variant}: token {i} differs ({ours[i]} vs {theirs[i]}), top-2 gap {gap:.3g}; seed={seed}"
            break


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_prefill_matches_one_chunk(variant, tiny_models, gen, seed, monkeypatch):
    path, peer = tiny_models(variant)
    eng = load(path)
    eng.tokenizer.eos_token_ids = []
    ids = random_ids(gen, 45, eng.args.vocab_size)
    whole = eng.score(ids)
    greedy = eng.generate(ids, max_new_tokens=8, temperature=0).tokens
    monkeypatch.setattr(reference_module, "PREFILL_CHUNK", 7)
    chunked = eng.score(ids)
    # float32 rounding differs with the chunking: bound it against the logits' scale, not elementwise (a logit
    # near 0 has no relative error to speak of)
    assert rel_err(chunked, whole) < 1e-5, f"{variant}: relative error {rel_err(chunked, whole):.3g}; seed={seed}"
    assert rel_err(chunked, peer_logits(peer, ids)) < 1e-4, f"{variant} chunked vs transformers; seed={seed}"
    assert eng.generate(ids, max_new_tokens=8, temperature=0).tokens == greedy


def test_mistral_window_long_prompt_in_chunks(tiny_models, gen, seed, monkeypatch):
    """Prompt 5x the window, window 2x the chunk: chunks must see the window reaching into earlier chunks."""
    path, peer = tiny_models("mistral-window")
    eng = load(path)
    assert eng.args.layer_windows == [16] * eng.args.num_hidden_layers
    ids = random_ids(gen, 80, eng.args.vocab_size)
    ref = peer_logits(peer, ids)
    monkeypatch.setattr(reference_module, "PREFILL_CHUNK", 7)
    assert rel_err(eng.score(ids), ref) < 1e-4, f"seed={seed}"
    # and the window matters here: the same weights without a window give other logits
    no_window = load(path)
    no_window.model.model.layers[0].self_attn.window = None
    no_window.model.model.layers[1].self_attn.window = None
    assert rel_err(no_window.score(ids), ref) > 1e-3


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral-window"])
@pytest.mark.parametrize("dtype,torch_dtype,tol", [("bfloat16", torch.bfloat16, 0.08),
                                                   ("float16", torch.float16, 0.01)])
def test_half_precision_load(variant, dtype, torch_dtype, tol, tiny_models, gen, seed):
    path, peer = tiny_models(variant)
    eng = load(path, dtype=dtype)
    assert eng.dtype == torch_dtype
    assert all(p.dtype == torch_dtype for p in eng.model.parameters())
    ids = random_ids(gen, 40, eng.args.vocab_size)
    ours, ref = eng.score(ids), peer_logits(peer, ids)
    assert ours.dtype == torch.float32
    err = (ours - ref).norm() / ref.norm()
    assert err < tol, f"{variant} {dtype}: relative L2 error {err:.3g}; seed={seed}"
    # greedy tokens agree with fp32 on most positions (only near-ties may flip)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.7, f"{variant} {dtype}: argmax agreement {agree:.2f}; seed={seed}"


def test_tied_embeddings_share_storage(tiny_models):
    for variant in ("llama-tied-mqa", "qwen2"):
        eng = load(tiny_models(variant)[0])
        assert eng.model.lm_head.weight.data_ptr() == eng.model.model.embed_tokens.weight.data_ptr()
    eng = load(tiny_models("llama")[0])
    assert eng.model.lm_head.weight.data_ptr() != eng.model.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------- ModelArgs.from_dict and rope


def base_config(**extra):
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.update(extra)
    return cfg


def test_from_dict_drops_unknown_keys():
    args = ModelArgs.from_dict(base_config(some_future_key={"x": 1}, pretraining_tp=1, use_cache=True))
    assert not hasattr(args, "some_future_key")
    assert (args.vocab_size, args.hidden_size, args.num_key_value_heads, args.head_dim) == (100, 64, 2, 16)
    assert args.rope_scaling is None and args.rope_theta == 10000.0


def test_from_dict_defaults_and_model_type():
    cfg = base_config(num_key_value_heads=None, model_type="mistral", sliding_window=32)
    del cfg["architectures"]
    args = ModelArgs.from_dict(cfg)
    assert args.architecture == "MistralForCausalLM"
    assert args.num_key_value_heads == 4  # missing -> num_attention_heads
    assert args.layer_windows == [32, 32]


# rope_inv_freq rounds float64 math to float32 once: half an ulp, plus slack for pow's last bit in float64
F32_ROUNDING = 2.0 ** -24 * 1.01


def expected_default(theta, dim):
    return [theta ** (-(2 * i) / dim) for i in range(dim // 2)]


@pytest.mark.parametrize("where", ["rope_scaling-type", "rope_scaling-rope_type", "rope_parameters"])
def test_rope_linear_read_from_any_key(where, gen, seed):
    factor = float(torch.empty(1).uniform_(1.5, 16, generator=gen))
    theta = float(torch.empty(1).uniform_(1e3, 1e6, generator=gen))
    if where == "rope_scaling-type":
        cfg = base_config(rope_theta=theta, rope_scaling={"type": "linear", "factor": factor})
    elif where == "rope_scaling-rope_type":
        cfg = base_config(rope_theta=theta, rope_scaling={"rope_type": "linear", "factor": factor})
    else:
        cfg = base_config(rope_parameters={"rope_type": "linear", "factor": factor, "rope_theta": theta})
    args = ModelArgs.from_dict(cfg)
    assert args.rope_theta == pytest.approx(theta)
    assert args.rope_scaling["rope_type"] == "linear" and args.rope_scaling["factor"] == factor
    expected = torch.tensor([f / factor for f in expected_default(theta, args.head_dim)], dtype=torch.float64)
    got = rope_inv_freq(args).double()
    assert torch.allclose(got, expected, rtol=F32_ROUNDING, atol=0), f"theta={theta} factor={factor} seed={seed}"


def test_rope_default_from_rope_parameters():
    args = ModelArgs.from_dict(base_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert args.rope_scaling is None and args.rope_theta == 500000.0
    expected = torch.tensor(expected_default(500000.0, 16), dtype=torch.float64)
    assert torch.allclose(rope_inv_freq(args).double(), expected, rtol=F32_ROUNDING, atol=0)


def llama3_inv_freq_f64(theta, dim, factor, low, high, old_len):
    """Llama 3.1's frequency-dependent rope scaling, written out per frequency in float64."""
    out = []
    for f in expected_default(theta, dim):
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:  # high frequency: unchanged
            out.append(f)
        elif wavelen > old_len / low:  # low frequency: divided by factor
            out.append(f / factor)
        else:  # in between: interpolate
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_rope_llama3_matches_formula(where, gen, seed):
    # Llama 3.1's own values, then random ones
    cases = [(500000.0, 8.0, 1.0, 4.0, 8192)]
    for _ in range(5):
        cases.append((float(torch.empty(1).uniform_(1e4, 1e6, generator=gen)),
                      float(torch.empty(1).uniform_(2, 32, generator=gen)),
                      float(torch.empty(1).uniform_(0.5, 2, generator=gen)),
                      float(torch.empty(1).uniform_(3, 8, generator=gen)),
                      int(torch.randint(64, 16384, (1,), generator=gen))))
    for theta, factor, low, high, old_len in cases:
        rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": old_len}
        cfg = base_config(hidden_size=512, num_attention_heads=4, num_key_value_heads=4)  # head_dim 128
        if where == "rope_scaling":
            cfg.update(rope_theta=theta, rope_scaling=rope)
        else:
            cfg.update(rope_parameters={**rope, "rope_theta": theta})
        args = ModelArgs.from_dict(cfg)
        got = rope_inv_freq(args).double()
        ref = llama3_inv_freq_f64(theta, 128, factor, low, high, old_len)
        assert torch.allclose(got, ref, rtol=F32_ROUNDING, atol=0), \
            f"theta={theta} factor={factor} low={low} high={high} old={old_len}: " \
            f"max rel {((got - ref).abs() / ref).max():.3g}; seed={seed}"
    # Llama 3.1's values exercise all three regions (unchanged, interpolated, divided)
    ref = llama3_inv_freq_f64(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    base = torch.tensor(expected_default(500000.0, 128), dtype=torch.float64)
    ratio = base / ref
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_unsupported_rope_type_names_supported():
    for cfg in (base_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                base_config(rope_scaling={"type": "dynamic", "factor": 2.0}),
                base_config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})):
        with pytest.raises(UnsupportedModelError) as info:
            ModelArgs.from_dict(cfg)
        msg = str(info.value)
        bad = (cfg.get("rope_scaling") or cfg.get("rope_parameters")).get("rope_type") or cfg["rope_scaling"]["type"]
        assert bad in msg and all(t in msg for t in SUPPORTED_ROPE_TYPES), msg


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GemmaForCausalLM", "Phi3ForCausalLM"])
def test_unsupported_architecture_names_supported(arch):
    with pytest.raises(UnsupportedModelError) as info:
        ModelArgs.from_dict(base_config(architectures=[arch]))
    msg = str(info.value)
    assert arch in msg and all(a in msg for a in SUPPORTED_ARCHITECTURES), msg
    assert isinstance(info.value, ValueError)


def test_unsupported_activation_and_bad_heads():
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelArgs.from_dict(base_config(hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads"):
        ModelArgs.from_dict(base_config(num_key_value_heads=3))
    cfg = base_config()
    del cfg["hidden_size"]
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        ModelArgs.from_dict(cfg)


# ---------------------------------------------------------------- sharded safetensors


def test_sharded_safetensors(tiny_models, tmp_path, gen, seed):
    src, peer = tiny_models("qwen2")
    out = tmp_path / "sharded"
    peer.save_pretrained(out, max_shard_size="20KB", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    eng = load(out)
    ids = random_ids(gen, 20, eng.args.vocab_size)
    assert rel_err(eng.score(ids), peer_logits(peer, ids)) < 1e-4, f"seed={seed}"

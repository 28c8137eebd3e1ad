"""Issue 19: a hostile config.json, or a GGUF whose metadata says the same, gets a ModelLoadError naming the file
and the field; nothing loads and no other exception escapes. Weights holding NaN or inf are refused as they are
read, naming the weight; config values that pass those checks but make NaN or inf, by Engine.load's checks of the
rotary frequencies and of a one-token forward pass."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fachat
from fachat.errors import CorruptModelError, ModelLoadError
from fachat.models.config import ModelArgs

import gguf_util

DELETE = object()  # as an override: take the field out of config.json

# name -> (the field the error must name, overrides of the tiny llama's config.json)
HOSTILE_CONFIGS = {
    "negative hidden_size": ("hidden_size", {"hidden_size": -64}),
    "zero hidden_size": ("hidden_size", {"hidden_size": 0}),
    "bool hidden_size": ("hidden_size", {"hidden_size": True}),
    "float hidden_size": ("hidden_size", {"hidden_size": 64.0}),
    "string hidden_size": ("hidden_size", {"hidden_size": "64"}),
    "null hidden_size": ("hidden_size", {"hidden_size": None}),
    "list hidden_size": ("hidden_size", {"hidden_size": [64]}),
    "nested hidden_size": ("hidden_size", {"hidden_size": {"value": [64, {"x": None}]}}),
    "absurd hidden_size": ("hidden_size", {"hidden_size": 10**30}),
    "missing hidden_size": ("hidden_size", {"hidden_size": DELETE}),
    "absurd vocab_size": ("vocab_size", {"vocab_size": 2**40}),
    "negative intermediate_size": ("intermediate_size", {"intermediate_size": -1}),
    "zero layers": ("num_hidden_layers", {"num_hidden_layers": 0}),
    "fractional layers": ("num_hidden_layers", {"num_hidden_layers": 2.5}),
    "absurd layer count": ("num_hidden_layers", {"num_hidden_layers": 10**9}),
    "zero heads": ("num_attention_heads", {"num_attention_heads": 0}),
    "heads not dividing hidden_size": ("num_attention_heads", {"head_dim": None, "num_attention_heads": 6}),
    "zero kv heads": ("num_key_value_heads", {"num_key_value_heads": 0}),
    "kv heads not dividing heads": ("num_key_value_heads", {"num_key_value_heads": 3}),
    "string kv heads": ("num_key_value_heads", {"num_key_value_heads": "2"}),
    "odd head_dim": ("head_dim", {"head_dim": 15}),
    "negative head_dim": ("head_dim", {"head_dim": -16}),
    "float head_dim": ("head_dim", {"head_dim": 16.0}),
    "negative rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": -1}),
    "zero rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": 0}),
    "NaN rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": float("nan")}),  # json.dumps writes NaN, loads reads it
    "infinite rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": float("inf")}),
    "string rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": "1e-5"}),
    "bool rms_norm_eps": ("rms_norm_eps", {"rms_norm_eps": True}),
    "zero rope_theta": ("rope_theta", {"rope_parameters": DELETE, "rope_theta": 0}),
    "string rope_theta": ("rope_theta", {"rope_parameters": DELETE, "rope_theta": "10000"}),
    "negative rope_theta in rope_parameters": ("rope_parameters.rope_theta",
                                               {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}),
    "zero max_position_embeddings": ("max_position_embeddings", {"max_position_embeddings": 0}),
    "one max_position_embeddings": ("max_position_embeddings", {"max_position_embeddings": 1}),
    "float max_position_embeddings": ("max_position_embeddings", {"max_position_embeddings": 512.0}),
    "null max_position_embeddings": ("max_position_embeddings", {"max_position_embeddings": None}),
    "string tie_word_embeddings": ("tie_word_embeddings", {"tie_word_embeddings": "yes"}),
    "int attention_bias": ("attention_bias", {"attention_bias": 1}),
    "bos outside the vocabulary": ("bos_token_id", {"bos_token_id": 10**6}),
    "negative bos": ("bos_token_id", {"bos_token_id": -1}),
    "junk in eos list": ("eos_token_id", {"eos_token_id": [2, "x"]}),
    "object eos": ("eos_token_id", {"eos_token_id": {"id": 2}}),
    "architectures a string": ("architectures", {"architectures": "LlamaForCausalLM"}),
    "architectures of numbers": ("architectures", {"architectures": [5]}),
    "null hidden_act": ("hidden_act", {"hidden_act": None}),
    "negative sliding_window": ("sliding_window", {"sliding_window": -1, "architectures": ["MistralForCausalLM"]}),
    "layer_types too short": ("layer_types", {"layer_types": ["full_attention"], "architectures": ["Qwen2ForCausalLM"]}),
    "rope_parameters a list": ("rope_parameters", {"rope_parameters": [1, 2]}),
    "unknown rope_scaling.rope_type": ("rope_scaling.rope_type",
                                       {"rope_parameters": DELETE, "rope_scaling": {"rope_type": "su", "factor": 2}}),
    "unknown rope_scaling.type": ("rope_scaling.type",
                                  {"rope_parameters": DELETE, "rope_scaling": {"type": "dynamic", "factor": 2}}),
    "unknown rope_parameters.rope_type": ("rope_parameters.rope_type",
                                          {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}),
    "number as rope type": ("rope_parameters.rope_type", {"rope_parameters": {"rope_type": 7}}),
    "linear rope without factor": ("rope_parameters.factor", {"rope_parameters": {"rope_type": "linear"}}),
    "negative linear factor": ("rope_parameters.factor", {"rope_parameters": {"rope_type": "linear", "factor": -2}}),
    "string linear factor": ("rope_scaling.factor",
                             {"rope_parameters": DELETE, "rope_scaling": {"type": "linear", "factor": "2"}}),
    "llama3 high below low": ("rope_parameters.high_freq_factor", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}}),
}


@pytest.fixture
def model_folder(tiny_llama, tmp_path):
    """A private copy of the tiny llama's folder, for a test to damage."""
    return shutil.copytree(tiny_llama[0], tmp_path / "model")


def write_config(folder, config) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def refused(source, error=ModelLoadError, file=None):
    """The ModelLoadError (of type error) that loading source raises, checked to name the file (source by
    default); any other exception, or a load, fails the test."""
    with pytest.raises(error) as info:
        fachat.Engine.load(source, device="cpu", dtype="float32")
    file = file or source
    assert str(file) in str(info.value), f"the message does not name {file}: {info.value}"
    return info.value


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_hostile_config_json(model_folder, case):
    field, overrides = HOSTILE_CONFIGS[case]
    config = json.loads((model_folder / "config.json").read_text())
    config |= overrides
    write_config(model_folder, {k: v for k, v in config.items() if v is not DELETE})
    error = refused(model_folder, file=model_folder / "config.json")
    assert field in str(error), f"{case}: the message does not name {field}: {error}"


@pytest.mark.parametrize("top", [[1, 2], "LlamaForCausalLM", 42, None, True])
def test_config_top_level_not_an_object(model_folder, top):
    write_config(model_folder, top)
    assert "expected an object" in str(refused(model_folder, CorruptModelError, model_folder / "config.json"))


@pytest.mark.parametrize("content, named", [("[2]", "JSON object"), ('{"eos_token_id": "2"}', "eos_token_id"),
                                            ('{"eos_token_id": [2, 400]}', "eos_token_id")])
def test_hostile_generation_config(model_folder, content, named):
    """Its eos ids join config.json's; the tiny llama's vocabulary has 400 tokens."""
    (model_folder / "generation_config.json").write_text(content)
    error = refused(model_folder, CorruptModelError, model_folder / "generation_config.json")
    assert named in str(error), str(error)


def test_type_decisions_follow_transformers(tiny_llama):
    """Where transformers 5 refuses a type, so do we: "64", 64.0 and true are not ints. Where it accepts
    one, so do we, and we also accept an integer where a float belongs (it refuses rms_norm_eps: 1)."""
    transformers = pytest.importorskip("transformers")
    config = json.loads((tiny_llama[0] / "config.json").read_text())
    for value in ("64", 64.0, True):
        with pytest.raises(Exception, match="hidden_size"):
            transformers.LlamaConfig.from_dict(config | {"hidden_size": value})
        with pytest.raises(CorruptModelError, match="hidden_size"):
            ModelArgs.from_dict(config | {"hidden_size": value})
    accepted = config | {"rms_norm_eps": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 500000},
                         "num_key_value_heads": None, "head_dim": None, "eos_token_id": [2, 3]}
    args = ModelArgs.from_dict(accepted)
    assert (args.rms_norm_eps, args.rope_theta) == (1.0, 500000.0)
    assert isinstance(args.rms_norm_eps, float) and isinstance(args.rope_theta, float)
    assert (args.num_key_value_heads, args.head_dim, args.eos_token_ids) == (4, 16, [2, 3])


# ---------------------------------------------------------------- GGUF metadata


@pytest.fixture(scope="module")
def gguf_tokenizer():
    tokens, merges, types = gguf_util.train_byte_level_bpe(300, ["<|endoftext|>", "<s>"])
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges, "types": types, "bos_id": 1,
            "eos_id": 0}


def write_gguf(path, tokenizer, seed, extra=None, weights_change=None):
    """A one-layer tiny llama GGUF (float32 weights drawn from seed); extra(writer) may overwrite metadata,
    weights_change(weights) may alter the weights."""
    rng = np.random.default_rng(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
               vocab_size=len(tokenizer["tokens"]))
    weights = gguf_util.random_weights(cfg, rng, bias=False, tied=True)
    if weights_change:
        weights_change(weights)
    gguf_util.write_tiny_gguf(path, arch="llama", cfg=cfg, weights=weights, types={}, tokenizer=tokenizer, rng=rng,
                              extra=extra)


# name -> (metadata key, value, GGUF value type name); each overwrites one key of a valid file
HOSTILE_METADATA = {
    "negative embedding_length": ("llama.embedding_length", -64, "INT32"),
    "string embedding_length": ("llama.embedding_length", "64", "STRING"),
    "float embedding_length": ("llama.embedding_length", 64.0, "FLOAT32"),
    "bool embedding_length": ("llama.embedding_length", True, "BOOL"),
    "absurd embedding_length": ("llama.embedding_length", 2**63, "UINT64"),
    "zero head_count": ("llama.attention.head_count", 0, "UINT32"),
    "head_count_kv not dividing": ("llama.attention.head_count_kv", 3, "UINT32"),
    "odd key_length": ("llama.attention.key_length", 15, "UINT32"),
    "negative feed_forward_length": ("llama.feed_forward_length", -1, "INT32"),
    "negative rms epsilon": ("llama.attention.layer_norm_rms_epsilon", -1.0, "FLOAT32"),
    "NaN rms epsilon": ("llama.attention.layer_norm_rms_epsilon", float("nan"), "FLOAT32"),
    "zero freq_base": ("llama.rope.freq_base", 0.0, "FLOAT32"),
    "string freq_base": ("llama.rope.freq_base", "abc", "STRING"),
    "zero context_length": ("llama.context_length", 0, "UINT32"),
    "bool block_count": ("llama.block_count", True, "BOOL"),
    "absurd block_count": ("llama.block_count", 4_000_000_000, "UINT32"),
    "bos outside the vocabulary": ("tokenizer.ggml.bos_token_id", 10**6, "UINT32"),
    "unknown rope scaling type": ("llama.rope.scaling.type", "ntk", "STRING"),
}


@pytest.mark.parametrize("case", HOSTILE_METADATA)
def test_hostile_gguf_metadata(tmp_path, gguf_tokenizer, seed, case):
    import gguf

    key, value, vtype = HOSTILE_METADATA[case]
    path = tmp_path / "hostile.gguf"
    write_gguf(path, gguf_tokenizer, seed, lambda w: w.add_key_value(key, value, gguf.GGUFValueType[vtype]))
    error = refused(path)
    assert key in str(error), f"{case}: the message does not name {key}: {error}; seed={seed}"


def test_hostile_gguf_rope_factor(tmp_path, gguf_tokenizer, seed):
    import gguf

    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(-2.0)

    path = tmp_path / "factor.gguf"
    write_gguf(path, gguf_tokenizer, seed, extra)
    assert "llama.rope.scaling.factor" in str(refused(path, CorruptModelError)), f"seed={seed}"


# ---------------------------------------------------------------- NaN or inf weights, and values that make them


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_safetensors_weight_not_finite(model_folder, gen, seed, bad):
    """One element of one weight, drawn at random."""
    file = model_folder / "model.safetensors"
    tensors = load_file(str(file))
    names = sorted(tensors)
    name = names[int(torch.randint(len(names), (1,), generator=gen))]
    flat = tensors[name].view(-1)
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = bad
    save_file(tensors, str(file), metadata={"format": "pt"})
    error = refused(model_folder, CorruptModelError)
    assert f"weight {name} holds NaN or inf values" in str(error), f"{bad} in {name} gave: {error}; seed={seed}"


def test_gguf_weight_not_finite(tmp_path, gguf_tokenizer, gen, seed):
    def poison(weights):
        w = weights["model.layers.0.mlp.down_proj.weight"].reshape(-1)
        w[int(torch.randint(w.size, (1,), generator=gen))] = np.nan

    path = tmp_path / "nan.gguf"
    write_gguf(path, gguf_tokenizer, seed, weights_change=poison)
    message = str(refused(path, CorruptModelError))
    assert "weight model.layers.0.mlp.down_proj.weight holds NaN or inf values" in message, f"{message}; seed={seed}"


def test_finite_weights_that_overflow_are_refused_by_the_forward_pass(model_folder):
    """Every weight finite, but the final norm's so large that the logits overflow float32."""
    file = model_folder / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.norm.weight"].fill_(3e38)
    save_file(tensors, str(file), metadata={"format": "pt"})
    assert "NaN or inf logits" in str(refused(model_folder, CorruptModelError))


def test_values_that_pass_checks_but_give_nan(model_folder):
    """rope_theta=1e-300 is a positive finite number, but its inverse frequencies overflow float32 to inf, and
    position 0 times inf is NaN."""
    config = json.loads((model_folder / "config.json").read_text())
    write_config(model_folder, config | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e-300}})
    assert "the rotary embedding's frequencies are NaN or inf" in str(refused(model_folder, CorruptModelError))

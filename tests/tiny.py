"""Tiny random Llama-family models saved by transformers, with a byte-level BPE tokenizer, for tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "def main():\n    return {'a': [1, 2, 3]}\n\n",
    "Héllo wörld, ça va? 日本語のテキスト — emoji 🙂 and tabs\tand  spaces.",
    "Once upon a time there was a small model that liked to count: one, two, three.",
]

# Small enough for fast tests, with GQA (4 query heads over 2 KV heads).
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class name, overrides)
VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-head-dim": ("LlamaConfig", dict(head_dim=32)),
    "llama-rope-linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3-rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
}


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def make_tiny_model(path: Path, variant: str = "llama", seed: int | None = None, **overrides):
    """Saves a random model of the variant (config.json, model.safetensors, tokenizer files) into path.
    Returns the transformers model in float32, as the peer to compare against."""
    import transformers

    cls_name, extra = VARIANTS[variant]
    tok = build_tokenizer()
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides, "vocab_size": tok.get_vocab_size()})
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(cfg).float().eval()
    with torch.no_grad():  # random init is near zero; spread weights so that logits are not flat
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
    }))
    return model

"""Chat templates and special tokens, against transformers' tokenizer on the same files."""
from __future__ import annotations

import pytest
import torch

from fachat import Engine

transformers = pytest.importorskip("transformers", reason="transformers is the peer for chat templates")

STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def conversation(gen_words):
    return [{"role": "system", "content": f"be {gen_words[0]}"}, {"role": "user", "content": gen_words[1]},
            {"role": "assistant", "content": f"{gen_words[2]} {gen_words[3]}"},
            {"role": "user", "content": f"  {gen_words[4]}?  "}]


@pytest.fixture
def words(gen):
    pool = ["alpha", "héllo", "日本", "42", "tabs\tand  spaces", "🙂", "code()", "x\ny"]
    return [pool[int(i)] for i in torch.randint(0, len(pool), (5,), generator=gen)]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_match_transformers(tiny_llama, words, add_generation_prompt):
    path, _ = tiny_llama
    ours = Engine.load(path, device="cpu").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    messages = conversation(words)
    assert ours.render_chat(messages, add_generation_prompt) == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt) == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)


def test_chat_template_jinja_file_and_raise_exception(untemplated_dir, words):
    path = untemplated_dir
    (path / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    engine = Engine.load(path, device="cpu")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    good = conversation(words)[1:]
    assert engine.tokenizer.render_chat(good) == theirs.apply_chat_template(good, add_generation_prompt=True,
                                                                             tokenize=False)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        engine.generate(bad, max_new_tokens=2)


def test_model_without_chat_template_refuses_messages_but_takes_text(untemplated_dir):
    engine = Engine.load(untemplated_dir, device="cpu")
    with pytest.raises(ValueError, match="no chat template"):
        engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert engine.generate("hi", max_new_tokens=2, temperature=0).finish_reason in ("length", "stop")

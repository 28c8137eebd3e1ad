"""Tokenizer: `tokenizers` for ids, a sandboxed jinja2 chat template, eos ids, incremental detokenizing."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fachat.errors import CorruptModelError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend, *, chat_template: str | None = None, special_tokens: dict[str, str | None] | None = None,
                 eos_token_ids: list[int] | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        eos = list(eos_token_ids or [])
        eos_text = self.special_tokens.get("eos_token")
        if not eos and eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos = [backend.token_to_id(eos_text)]
        self.eos_token_ids = eos
        self._template = None

    @classmethod
    def from_dir(cls, path: Path, eos_token_ids: list[int]) -> "Tokenizer":
        """Loads tokenizer.json, tokenizer_config.json and chat_template.jinja from a model folder."""
        from tokenizers import Tokenizer as Backend

        file = path / "tokenizer.json"
        if not file.is_file():
            raise CorruptModelError(f"{path} has no tokenizer.json (slow sentencepiece/tiktoken tokenizers are not supported)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:
            raise CorruptModelError(f"cannot read {file}: {e}") from None
        config = read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # a list of named templates; take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        return cls(backend, chat_template=template, special_tokens=special, eos_token_ids=eos_token_ids)

    @classmethod
    def from_gguf(cls, contents, eos_token_ids: list[int]) -> "Tokenizer":
        """From a read GGUF file (fachat.models.gguf.GGUFFile), whose metadata rebuilt the tokenizer."""
        config = contents.tokenizer_config
        return cls(contents.tokenizer, chat_template=config.get("chat_template"),
                   special_tokens={k: config.get(k) for k in SPECIAL_TOKEN_KEYS}, eos_token_ids=eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass the prompt as a str or a list of token ids")
        _check_messages(messages)
        from jinja2 import TemplateError

        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in self.special_tokens.items() if v is not None})
        except TemplateError as e:  # raise_exception(...) in the template: the messages are not acceptable
            raise ValueError(f"the chat template rejected the messages: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The rendered text already holds its special tokens (bos included), as in transformers.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not valid JSON: {e}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")


def _compile_template(source: str):
    """Compiles a chat template in jinja2's sandbox, with the helpers transformers provides."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise CorruptModelError(f"the chat template does not compile: {e}") from None


class IncrementalDetokenizer:
    """Turns a token stream into text pieces, never emitting half a UTF-8 character.

    Decodes a short window of recent tokens twice, with and without the newest ones, and emits the
    difference; the window keeps space-prefix tokens (sentencepiece's leading-space strip) and
    byte-fallback sequences correct.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this have been emitted

    def _unreleased(self) -> str:
        """Text of the tokens after read_offset, decoded in the window that starts at prefix_offset."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        return full[len(prefix):]

    def add(self, token: int) -> str:
        self.tokens.append(token)
        new = self._unreleased()
        if not new or new.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new

    def pending(self) -> str:
        """Text decoded but held back by `add`, without a trailing incomplete character."""
        return self._unreleased().rstrip("\ufffd")

    def flush(self) -> str:
        """Whatever is still held back (a trailing partial character decodes as U+FFFD)."""
        new = self._unreleased()
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new

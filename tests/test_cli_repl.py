"""The fa-chat REPL driven through a pseudo-terminal, as a person at a keyboard would."""
from __future__ import annotations

import os
import re
import signal
import sys

import pytest
import torch

from fachat import Engine
from fachat.engine.runner import Runner

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the REPL through a pseudo-terminal")

PROMPT = ">>> "
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Repl:
    """One fa-chat process on a pseudo-terminal; `say` returns what the REPL printed in answer."""

    def __init__(self, tmp_path, *args, timeout=120, quiet=True, **env):
        """quiet: no stats line, whose timings differ between runs; env: more environment variables."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path / "state"), **env}
        # SIGINT back to its default, so that Python turns Ctrl-C into KeyboardInterrupt even where the test
        # run inherited it ignored (a shell's background job does).
        self.child = pexpect.spawn(sys.executable, ["-m", "fachat.cli.main", "--device", "cpu",
                                                    *(["--quiet"] if quiet else []), *args],
                                   env=env, timeout=timeout, cwd=str(tmp_path), dimensions=(24, 1000),
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.child.expect_exact(PROMPT)

    def say(self, line: str) -> bytes:
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        out = ANSI.sub(b"", self.child.before)
        echo, _, reply = out.partition(b"\r\n")  # the terminal echoes the typed line first
        assert echo.endswith(line.encode()), (echo, line)
        return reply

    def quit(self, how: str = "/quit") -> int:
        if how == "ctrl-d":
            self.child.sendeof()
        else:
            self.child.sendline(how)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def test_save_quit_resume_continues_exactly_like_an_unbroken_run(tmp_path, tiny_dir, llama_engine, seed):
    """Sampled chat, /save, quit, `fa-chat --resume` (model taken from the file), continue: the answers,
    the conversation and the final KV cache equal those of one uninterrupted run with the same seed."""
    flags = ["--max-tokens", "10", "--temperature", "1.0", "--seed", str(seed)]
    turns = ["Tell me about the fox", "and the dog?", "thanks"]

    whole = Repl(tmp_path, "--model", str(tiny_dir), *flags)
    unbroken = [whole.say(t) for t in turns]
    whole.say("/save whole.safetensors")
    assert whole.quit() == 0

    first = Repl(tmp_path, "--model", str(tiny_dir), *flags)
    resumed = [first.say(turns[0])]
    saved = first.say("/save half.safetensors")
    assert b"saved" in saved
    assert first.quit("ctrl-d") == 0

    second = Repl(tmp_path, "--resume", "half.safetensors", "--max-tokens", "10")
    resumed += [second.say(t) for t in turns[1:]]
    second.say("/save resumed.safetensors")
    assert second.quit() == 0

    assert resumed == unbroken
    engine = llama_engine
    a, b = engine.load_session(tmp_path / "whole.safetensors"), engine.load_session(tmp_path / "resumed.safetensors")
    assert a.tokens == b.tokens and a.messages == b.messages
    assert [m["content"] for m in a.messages if m["role"] == "user"] == turns
    assert a.cache.length == b.cache.length
    for layer in range(len(a.cache.k)):
        for x, y in zip(a.cache.views(layer), b.cache.views(layer)):
            assert torch.equal(x, y)

    # The library, same seed: the same conversation.
    ref = engine.session(max_new_tokens=10, temperature=1.0, seed=seed)
    for t in turns:
        ref.chat(t)
    assert ref.tokens == a.tokens and ref.messages == a.messages


def test_commands_undo_system_reset_stats_and_errors(tmp_path, tiny_dir, llama_engine):
    repl = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "6", "--temperature", "0")
    repl.say("hello there")
    stats = repl.say("/stats").decode()
    tokens = int(re.search(r"context: (\d+) tokens", stats)[1])
    cached = int(re.search(r"KV cache: (\d+) positions cached", stats)[1])
    assert tokens - cached in (0, 1) and tokens > 0, stats
    assert re.search(r"decode [\d.]+ tok/s", stats) and "MiB" in stats

    repl.say("second turn")
    assert b"took back the last turn" in repl.say("/undo")
    after_undo = int(re.search(rb"context: (\d+) tokens", repl.say("/stats"))[1])
    assert after_undo == tokens
    repl.say("/undo")
    assert b"error:" in repl.say("/undo")  # nothing left to take back; the REPL goes on

    assert b"system prompt set" in repl.say("/system You are a pirate.")
    repl.say("ahoy")
    engine = llama_engine
    ref = engine.session(system="You are a pirate.", max_new_tokens=6, temperature=0)
    ref.chat("ahoy")
    repl.say("/save sys.safetensors")
    assert engine.load_session(tmp_path / "sys.safetensors").tokens == ref.tokens

    assert b"new conversation" in repl.say("/reset")
    assert int(re.search(rb"context: (\d+) tokens", repl.say("/stats"))[1]) < len(ref.tokens)

    for bad, message in [("/load missing.safetensors", b"missing.safetensors"), ("/save", b"needs a file path"),
                         ("/frobnicate", b"unknown command /frobnicate")]:
        out = repl.say(bad)
        assert message in out and b"Traceback" not in out
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(500))
    out = repl.say("/load junk.safetensors")
    assert b"junk.safetensors" in out and b"Traceback" not in out
    assert b"/undo" in repl.say("/help")
    assert repl.quit() == 0
    history = (tmp_path / "state" / "fa-chat" / "history").read_text()
    assert "hello there" in history and "/system You are a pirate." in history


def test_ctrl_c_stops_the_answer_and_the_session_stays_consistent(tmp_path, smollm2_gguf_path):
    """Ctrl-C mid-answer on the real model, twice: the REPL survives, the cache holds exactly the tokens
    of the context (checked against a fresh prefill of them), and the conversation goes on."""
    # Greedy answers to these run to the 1500-token limit (about 50 s on a 2-core machine), so the
    # interrupt lands mid-answer however slowly the test process gets to send it. Dequantized weights: the
    # float32 path gives the same K/V decoded step by step as prefilled at once, to 1e-4 (the int4 kernel's
    # bfloat16 roundings would blur a misplaced position less clearly).
    repl = Repl(tmp_path, "--model", str(smollm2_gguf_path), "--quantize", "none", "--max-tokens", "1500",
                "--temperature", "0", timeout=300)

    def interrupt(message):
        repl.child.sendline(message)
        repl.child.expect(rb"\r\n\S+ \S+")  # the echo, then the answer has begun
        repl.child.sendintr()
        repl.child.expect_exact("[interrupted]")
        repl.child.expect_exact(PROMPT)

    interrupt("Write a long story about a lighthouse keeper.")
    stats = repl.say("/stats").decode()
    tokens = int(re.search(r"context: (\d+) tokens", stats)[1])
    cached = int(re.search(r"KV cache: (\d+) positions cached", stats)[1])
    assert tokens - cached in (0, 1), stats
    interrupt("Go on, and tell me about the storm.")
    repl.say("/save after.safetensors")
    assert repl.quit() == 0

    engine = Engine.load(smollm2_gguf_path, device="cpu", quantize="none")
    session = engine.load_session(tmp_path / "after.safetensors")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert all(m["content"] for m in session.messages)
    assert len(session.tokens) < tokens + 1000, "the second answer was not cut short"
    fresh = engine.new_cache()
    Runner(engine.model, fresh).prefill(session.tokens[: session.cache.length])
    for layer in range(len(fresh.k)):
        for x, y in zip(session.cache.views(layer), fresh.views(layer)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)

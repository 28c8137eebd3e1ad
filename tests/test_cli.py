"""The fa-chat command, run as a real process."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from fachat import Engine
from fachat.engine.runner import Runner


def fa_chat(*args, stdin: str = "", timeout: float = 120, **run):
    """fa-chat in a new process, both streams captured; run: more subprocess.run arguments (cwd, or where
    a stream goes instead)."""
    # History under a folder that cannot be made: the REPL keeps none, and the user's stays untouched.
    env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_STATE_HOME=os.devnull)
    # The CPU, like the engines these runs are compared with: sampled streams differ between devices.
    result = subprocess.run([sys.executable, "-m", "fachat.cli.main", "--device", "cpu", *args],
                            input=stdin.encode(), timeout=timeout, env=env,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **run})
    # Decoded by hand: text mode would turn a generated "\r" into "\n".
    result.stdout, result.stderr = (None if s is None else s.decode() for s in (result.stdout, result.stderr))
    return result


def test_one_shot_prompt_streams_the_engine_answer(tiny_dir, seed):
    args = ["--model", str(tiny_dir), "--max-tokens", "12", "--temperature", "1.0", "--seed", str(seed)]
    result = fa_chat(*args, "--prompt", "Tell me a story")
    assert result.returncode == 0, result.stderr
    expected = Engine.load(tiny_dir, device="cpu").generate(
        [{"role": "user", "content": "Tell me a story"}], max_new_tokens=12, temperature=1.0, seed=seed)
    assert result.stdout == expected.text + "\n"


def test_prompt_dash_reads_stdin_and_verbose_prints_stats(tiny_dir):
    result = fa_chat("--model", str(tiny_dir), "--prompt", "-", "--max-tokens", "5", "--temperature", "0",
                     "--verbose", stdin="from standard input")
    assert result.returncode == 0, result.stderr
    expected = Engine.load(tiny_dir, device="cpu").generate(
        [{"role": "user", "content": "from standard input"}], max_new_tokens=5, temperature=0)
    assert result.stdout == expected.text + "\n"
    assert "attention backend: reference (the default on cpu)" in result.stderr
    assert "CUDA graphs: off (the device is cpu)" in result.stderr
    assert "decode" in result.stderr and "tok/s" in result.stderr


def test_repl_turns_help_and_quit(tiny_dir):
    result = fa_chat("--model", str(tiny_dir), "--max-tokens", "4", "--temperature", "0",
                     stdin="hello\n/help\n/nonsense\n/reset\nagain\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 6  # five inputs, then /quit; "never read" is not
    assert "/reset" in result.stdout and "unknown command /nonsense" in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_longer_than_max_seq_len_is_a_clean_error(tiny_dir):
    result = fa_chat("--model", str(tiny_dir), "--prompt", "word " * 200, "--max-seq-len", "16")
    assert result.returncode == 2
    assert "max_seq_len" in result.stderr and "Traceback" not in result.stderr


def test_repl_survives_a_user_error(tiny_dir):
    result = fa_chat("--model", str(tiny_dir), "--max-seq-len", "16", "--max-tokens", "2",
                     stdin="word " * 50 + "\nhi\n")
    assert result.returncode == 0
    assert "error:" in result.stderr and "max_seq_len" in result.stderr
    assert "Traceback" not in result.stderr


def resumed_answer(engine, tmp_path, seed):
    """A session of one turn saved to tmp_path/s.safetensors, `fa-chat --resume` of it answering a second
    question, and the library's answer to that question."""
    session = engine.session(max_new_tokens=8, temperature=1.0, seed=seed)
    session.chat("first question")
    session.save(tmp_path / "s.safetensors")
    expected = session.chat("second question")
    return fa_chat("--resume", str(tmp_path / "s.safetensors"), "--prompt", "second question"), expected


def test_resume_with_prompt_continues_the_saved_conversation(tmp_path, tiny_dir, seed):
    """One-shot --prompt on top of --resume answers as the library's resumed session does."""
    result, expected = resumed_answer(Engine.load(tiny_dir, device="cpu"), tmp_path, seed)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"


def test_full_context_ends_the_answer_with_a_pointer_to_reset(smollm2_gguf_path):
    """--context-full stop: a story asked for in a 64-token context stops at the limit, says so, and the
    REPL still takes commands."""
    result = fa_chat("--model", str(smollm2_gguf_path), "--max-seq-len", "64", "--max-tokens", "500",
                     "--temperature", "0", "--context-full", "stop", stdin="Write a long story about a dragon.\n/stats\n")
    assert result.returncode == 0, result.stderr
    assert "context full: 64 tokens" in result.stderr and "/reset" in result.stderr
    assert "context: 64 tokens of 64" in result.stdout


def test_ctrl_c_during_the_prefill_of_raw_text_returns_to_the_prompt(untemplated_dir, monkeypatch, capsys, seed):
    """A model without a chat template prefills the typed text before its answer streams. Ctrl-C there
    (raised here partway through the prefill) prints [interrupted] and returns, as it does mid-answer: the
    REPL goes on, a one-shot run exits 130 with no traceback, and the context keeps the prefilled part,
    with the K/V of a fresh prefill of it."""
    from fachat.cli import main as cli

    path = untemplated_dir
    engine = Engine.load(path, device="cpu", dtype="float32")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "it", "rains"]
    rng = random.Random(seed)
    text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 40)))
    real_prefill = Runner.prefill

    def cut_short(runner, ids, all_logits=False):
        if len(ids) < 2:  # not the text's: Engine.load's own one-token check of the weights
            return real_prefill(runner, ids, all_logits)
        real_prefill(runner, ids[: len(ids) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "prefill", cut_short)
    session = engine.session(max_new_tokens=4, temperature=0)
    try:
        answer = cli.stream_answer(session, text, cli.Console())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the prefill escaped stream_answer: the REPL would exit")
    assert answer is None
    assert "[interrupted]" in capsys.readouterr().err
    ids = engine.tokenizer.encode(text, add_special_tokens=True)
    assert 0 < session.cache.length < len(ids) - 1
    assert session.tokens == ids[: session.cache.length + 1]
    fresh = engine.new_cache()
    real_prefill(Runner(engine.model, fresh), session.tokens[: session.cache.length])
    for layer in range(len(fresh.k)):
        for x, y in zip(session.cache.views(layer), fresh.views(layer)):
            torch.testing.assert_close(x, y)

    monkeypatch.setattr(Runner, "prefill", real_prefill)
    gen = cli.stream_answer(session, " and then", cli.Console())
    assert gen.finish_reason in ("length", "stop") and gen.stats.new_tokens > 0

    monkeypatch.setattr(Runner, "prefill", cut_short)
    assert cli.main(["--model", str(path), "--device", "cpu", "--prompt", text]) == 130
    err = capsys.readouterr().err
    assert "[interrupted]" in err and "Traceback" not in err


def test_quantize_flag_shows_the_resident_weights_and_resume_keeps_the_saved_quantization(tmp_path, tiny_dir, seed):
    engine = Engine.load(tiny_dir, device="cpu", quantize="int8")
    result = fa_chat("--model", str(tiny_dir), "--quantize", "int8", "--prompt", "hello", "--max-tokens", "4",
                     "--temperature", "0", "--verbose", stdin="")
    assert result.returncode == 0, result.stderr
    expected = engine.generate([{"role": "user", "content": "hello"}], max_new_tokens=4, temperature=0)
    assert result.stdout == expected.text + "\n"
    assert f"weights: {engine.weight_bytes / 2**20:.1f} MiB resident, quantized to int8" in result.stderr
    stats = fa_chat("--model", str(tiny_dir), "--quantize", "int4", stdin="/stats\n")
    assert stats.returncode == 0 and "MiB resident, quantized to int4" in stats.stdout, stats.stderr

    resumed, expected = resumed_answer(engine, tmp_path, seed)  # without --quantize: the saved int8
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == expected.text + "\n"
    refused = fa_chat("--resume", str(tmp_path / "s.safetensors"), "--quantize", "none", "--prompt", "x")
    assert refused.returncode == 2 and "quantize='int8'" in refused.stderr and "Traceback" not in refused.stderr

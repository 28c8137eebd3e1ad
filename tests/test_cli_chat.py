"""The fa-chat REPL as people expect a chat to behave (issue 18): pasted and fenced multi-line messages,
/set and /show, the stats line, colour, and a chat that goes on past its context by dropping old turns."""
from __future__ import annotations

import random
import re

import pytest
import torch

from fachat import Engine
from fachat.engine.runner import Runner
from fachat.errors import ContextLengthError
from test_cli import fa_chat
from test_cli_repl import PROMPT, Repl

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "it", "rains"]
STATS = rb"\[\d+ tokens?, [\d.]+ tok/s, first token \d+ ms\]"
DIM, RED = b"\x1b[2m", b"\x1b[31m"


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def user_messages(engine, path) -> list[str]:
    return [m["content"] for m in engine.load_session(path).messages if m["role"] == "user"]


def test_a_pasted_block_and_a_fenced_block_are_one_message_each(tmp_path, tiny_dir, llama_engine, seed):
    """On a terminal the REPL turns bracketed paste on; a pasted block of lines is one message, as are the
    lines typed between two \"\"\" lines; Ctrl-C inside a fenced block, or in a line, drops it."""
    rng = random.Random(seed)
    pasted = [words(rng, 1, 6) for _ in range(rng.randint(2, 5))]
    fenced = [words(rng, 1, 6) for _ in range(rng.randint(2, 5))]
    repl = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "3", "--temperature", "0", TERM="xterm")
    child = repl.child
    assert b"\x1b[?2004h" in child.before, f"bracketed paste is not turned on (seed {seed})"

    # A terminal sends a paste's line breaks as carriage returns, between the marks; Enter then sends it.
    child.send("\x1b[200~" + "\r".join(pasted) + "\x1b[201~\r")
    child.expect_exact(PROMPT)
    child.sendline('"""')
    for line in fenced:
        child.expect_exact("... ")
        child.sendline(line)
    child.sendline('"""')
    child.expect_exact(PROMPT)
    child.sendline('"""' + "never sent")
    child.expect_exact("... ")
    child.sendintr()
    child.expect_exact(PROMPT)
    child.send("half typed, never sent")
    # Ctrl-C once the line shows, as a person presses it: one that comes while readline is still taking the
    # keys in reaches Python only at the next key (CPython's readline loop checks signals when select() is
    # interrupted), and the terminal's flush on Ctrl-C drops the echo.
    child.expect_exact("never sent")
    child.sendintr()
    child.expect_exact(PROMPT)
    repl.say("/save chat.safetensors")
    assert repl.quit() == 0
    assert user_messages(llama_engine, tmp_path / "chat.safetensors") == ["\n".join(pasted), "\n".join(fenced)], \
        f"seed {seed}"


def test_piped_input_joins_a_marked_paste_and_shows_no_stats_or_colour(tiny_dir, seed):
    """Without a terminal (no readline), the paste marks still make one message of the lines between them;
    the answer on stdout carries no stats line and, with --color auto, nothing is coloured."""
    rng = random.Random(seed)
    pasted = [words(rng, 1, 6) for _ in range(rng.randint(2, 5))]
    result = fa_chat("--model", str(tiny_dir), "--max-tokens", "3", "--temperature", "0",
                     stdin="\x1b[200~" + "\n".join(pasted) + "\x1b[201~\n/stats\n")
    assert result.returncode == 0, result.stderr
    assert "2 messages" in result.stdout, f"the paste was not one message (seed {seed}): {result.stdout!r}"
    assert "tok/s" not in result.stdout.split("context:")[0] and "\x1b[" not in result.stdout + result.stderr


# /set input -> what its error line says; each leaves the settings as they were.
BAD_SET = {
    "/set": "/set takes system or one of max-tokens, temperature",
    "/set warmth 3": "got warmth",
    "/set temperature": "/set temperature needs a value",
    "/set temperature hot": "temperature: invalid float value: 'hot'",
    "/set temperature -1": "temperature must be in [0.0, inf), got -1.0",
    "/set top-p 2": "top_p must be in (0.0, 1.0], got 2.0",
    "/set top-k 2.5": "top-k: invalid int value: '2.5'",
    "/set max-tokens 0": "max-tokens: must be >= 1, got 0",
    "/set seed -3": "seed must be in [0,",
    "/set repetition-penalty nan": "repetition_penalty must be a number, got nan",
}


def test_bad_set_commands_get_one_error_line_and_change_nothing(tiny_dir):
    result = fa_chat("--model", str(tiny_dir), "--temperature", "0.5", "--color", "always",
                     stdin="\n".join(BAD_SET) + "\n/show\n")
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == len(BAD_SET) and "Traceback" not in result.stderr, result.stderr
    for line, (typed, says) in zip(errors, BAD_SET.items()):
        assert says in line and line.startswith("\x1b[31m"), (typed, line)  # --color always: red
    assert re.search(r"temperature +0\.5\n", result.stdout) and re.search(r"top-p +1\.0\n", result.stdout)


def test_set_temperature_0_answers_greedily_and_survives_save_and_resume(tmp_path, tiny_dir, llama_engine, seed):
    """A sampled chat switched to greedy by /set answers as a greedy session of the library does, and
    `--resume` of its save goes on greedy, with /set system as the system prompt."""
    rng = random.Random(seed)
    first, second = words(rng, 3, 8), words(rng, 3, 8)
    repl = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "8", "--temperature", "1.5", "--seed", str(seed))
    assert b"temperature set" in repl.say("/set temperature 0")
    assert b"system prompt set" in repl.say("/set system You are a pirate.")
    assert re.search(rb"temperature +0\.0\r\n", repl.say("/show"))
    repl.say(first)
    repl.say("/save half.safetensors")
    assert repl.quit() == 0

    resumed = Repl(tmp_path, "--resume", "half.safetensors")
    assert re.search(rb"system +You are a pirate\.\r\n", resumed.say("/show"))
    resumed.say(second)
    resumed.say("/save whole.safetensors")
    assert resumed.quit() == 0

    ref = llama_engine.session(system="You are a pirate.", max_new_tokens=8, temperature=0)
    ref.chat(first)
    ref.chat(second)
    chat = llama_engine.load_session(tmp_path / "whole.safetensors")
    assert chat.params.temperature == 0
    assert chat.messages == ref.messages and chat.tokens == ref.tokens, f"not greedy (seed {seed})"


def test_stats_line_and_colour_on_a_terminal_and_no_color(tmp_path, tiny_dir, seed):
    """On a terminal each answer ends with a dim stats line and errors are red; NO_COLOR keeps the stats
    line and drops the colour; --quiet drops the line."""
    rng = random.Random(seed)
    coloured = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "4", quiet=False, TERM="xterm")
    coloured.say(words(rng, 2, 6))
    assert re.search(re.escape(DIM) + STATS, coloured.child.before), coloured.child.before
    coloured.say("/set temperature hot")
    assert RED + b"error: temperature" in coloured.child.before
    assert coloured.quit() == 0

    plain = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "4", quiet=False, TERM="xterm", NO_COLOR="1")
    plain.say(words(rng, 2, 6))
    assert re.search(STATS, plain.child.before) and DIM not in plain.child.before, plain.child.before
    plain.say("/set temperature hot")
    assert b"error: temperature" in plain.child.before and RED not in plain.child.before
    assert plain.quit() == 0

    quiet = Repl(tmp_path, "--model", str(tiny_dir), "--max-tokens", "4")
    assert not re.search(STATS, quiet.say(words(rng, 2, 6)))
    assert quiet.quit() == 0


def test_a_chat_past_its_context_drops_the_oldest_turns_and_keeps_the_system_prompt(tmp_path, tiny_dir, seed):
    """A 256-token chat given more than that: the oldest turns go, the system prompt stays first in the
    context, and the chat, an undo across the shift and the chat after it equal a library session's with
    context_full="shift"."""
    rng = random.Random(seed)
    messages = [words(rng, 12, 24) for _ in range(8)]
    system = "You are a pirate."
    repl = Repl(tmp_path, "--model", str(tiny_dir), "--max-seq-len", "256", "--max-tokens", "12",
                "--temperature", "0", "--system", system)
    replies = [repl.say(m) for m in messages[:-1]]
    assert any(b"[context full: dropped the " in r for r in replies), f"no shift (seed {seed})"
    assert b"took back" in repl.say("/undo")
    repl.say(messages[-1])
    repl.say("/save chat.safetensors")
    assert repl.quit() == 0

    engine = Engine.load(tiny_dir, device="cpu", dtype="float32", max_seq_len=256)
    chat = engine.load_session(tmp_path / "chat.safetensors")
    prefix = engine.tokenizer.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    assert chat.tokens[:len(prefix)] == prefix and chat.messages[0] == {"role": "system", "content": system}
    assert len(chat.messages) < 2 * len(messages), f"nothing was dropped (seed {seed})"
    ref = engine.session(system=system, max_new_tokens=12, temperature=0, context_full="shift")
    for m in messages[:-1]:
        ref.chat(m)
    ref.undo()
    ref.chat(messages[-1])
    assert chat.tokens == ref.tokens and chat.messages == ref.messages, f"seed {seed}"


@pytest.mark.parametrize("mode", ["stop", "shift"])
def test_session_context_full(tmp_path, tiny_dir, seed, mode):
    """The library's choice: "stop" (the default) refuses a message past the context; "shift" drops the
    oldest turns, keeps the system prompt, and undoes the kept turns back to contexts whose cache equals a
    fresh prefill of them, through a save and load too."""
    rng = random.Random(seed)
    engine = Engine.load(tiny_dir, device="cpu", dtype="float32", max_seq_len=128)
    session = engine.session(system="Be brief.", max_new_tokens=8, temperature=0,
                             **({} if mode == "stop" else {"context_full": mode}))
    assert session.context_full == mode
    with pytest.raises(ValueError, match="context_full must be one of stop, shift"):
        session.context_full = "wrap"
    try:
        for _ in range(10):
            session.chat(words(rng, 10, 20))
    except ContextLengthError:
        assert mode == "stop"
        return
    assert mode == "shift", f"the context never filled (seed {seed})"
    assert session.messages[0]["role"] == "system" and len(session.tokens) <= 128
    session.save(tmp_path / "shifted.safetensors")
    loaded = engine.load_session(tmp_path / "shifted.safetensors")
    for s in (session, loaded):
        while True:
            try:
                s.undo()
            except ValueError:
                break
            fresh = engine.new_cache()
            Runner(engine.model, fresh).prefill(s.tokens[: s.cache.length])
            for layer in range(len(fresh.k)):
                for x, y in zip(s.cache.views(layer), fresh.views(layer)):
                    torch.testing.assert_close(x, y, msg=f"seed {seed}")
        assert s.messages == [{"role": "system", "content": "Be brief."}]

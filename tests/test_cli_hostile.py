"""fa-chat over tables of bad input and hostile files, each run as a real process: every one is refused
with one error line that names the problem and the right exit status, never with a traceback."""
from __future__ import annotations

import base64
import os
import random
import subprocess

import pytest
import torch

from fachat import Engine
from conftest import derive_seed
from test_checkpoint import edited
from test_cli import fa_chat

# name: (arguments, what the error says); each exits 2 with a "fa-chat: error:" line. {tmp}: the test's folder.
ARGS = {
    "empty-prompt": (["--prompt", ""], "the prompt is empty"),
    "blank-prompt": (["--prompt", " \n\t "], "the prompt is empty"),
    "empty-stdin": (["--prompt", "-"], "the prompt is empty"),
    "missing-model": (["--model", "{tmp}/no-such-model"], "{tmp}/no-such-model: no such file or directory"),
    "folder-without-config": (["--model", "{tmp}"], "no config.json"),
    "not-a-model": (["--model", "{tmp}/notes.txt"], "expected a model folder"),
    "device": (["--device", "tpu"], "device must be"),
    "dtype": (["--dtype", "int8"], "dtype must be"),
    "max-seq-len-0": (["--max-seq-len", "0"], "--max-seq-len: must be >= 2, got 0"),
    "max-seq-len-1": (["--max-seq-len", "1"], "--max-seq-len: must be >= 2, got 1"),
    "max-seq-len-negative": (["--max-seq-len=-5"], "--max-seq-len: must be >= 2, got -5"),
    "max-seq-len-not-a-number": (["--max-seq-len", "abc"], "--max-seq-len: invalid int value: 'abc'"),
    "max-seq-len-past-memory": (["--max-seq-len", "1000000000000"], "1000000000000"),
    "temperature": (["--temperature", "-1"], "temperature must be"),
    "top-p-0": (["--top-p", "0"], "top_p must be"),
    "top-p-2": (["--top-p", "2"], "top_p must be"),
    "top-k": (["--top-k", "-1"], "top_k must be"),
    "seed": (["--seed=-1"], "seed must be"),
}

# name: what the error says about the file, for --resume and /load (the error names the file too).
FILES = {
    "missing": "no such file",
    "directory": "directory",
    "empty": "not a valid safetensors",
    "random-bytes": "not a valid safetensors",
    "truncated": "not a valid safetensors",
    "model-weights": "not a fa-chat session",
    "other-model": "another model",
    "invalid-rng": "RNG state",
    "other-dtype": "--convert-dtype",
}

# name: (lines typed into the REPL, what the reply to the last says); the replies before it are no errors.
REPL = {
    "save-into-missing-folder": (["/save no-such-folder/chat.safetensors"],
                                 ["error: ", "no-such-folder/chat.safetensors"]),
    "save-onto-directory": (["/save folder"], ["error: ", "folder", "directory"]),
    "undo-with-nothing-to-undo": (["/undo"], ["error: nothing to undo"]),
    # A message of some 320 tokens: the cache grows past its first 256 positions, and undo writes back into it.
    "undo-after-growth": (["hi", "word " * 80, "/undo"], ["took back the last turn"]),
    "unknown-command": (["/frobnicate"], ["error: unknown command /frobnicate"]),
}


def chatted_and_saved(model, path, **load):
    session = Engine.load(model, device="cpu", **load).session(max_new_tokens=3, temperature=0)
    session.chat("hello")
    session.save(path)


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> dict[str, str]:
    """name -> path of each of FILES."""
    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(derive_seed("hostile files"))
    tiny, _ = tiny_models("llama")
    good = root / "good.safetensors"
    chatted_and_saved(tiny, good, dtype="float32")
    paths = {name: root / f"{name}.safetensors" for name in FILES}
    paths["directory"].mkdir()
    paths["empty"].write_bytes(b"")
    paths["random-bytes"].write_bytes(rng.randbytes(4096))
    raw = good.read_bytes()
    paths["truncated"].write_bytes(raw[:rng.randint(1, len(raw) - 1)])
    paths["model-weights"].write_bytes((tiny / "model.safetensors").read_bytes())
    chatted_and_saved(tiny_models("qwen2")[0], paths["other-model"])
    # The right size, but no state a generator takes (checksum recomputed: the check behind it is reached).
    invalid = base64.b64encode(bytes(torch.Generator().get_state().numel())).decode()
    edited(lambda meta, eng: meta["rng"].update(state=invalid))(good, paths["invalid-rng"], None, root, None)
    chatted_and_saved(tiny, paths["other-dtype"], dtype="bfloat16")  # the CLI's engine runs float32 on the CPU
    return {name: str(path) for name, path in paths.items()}


def assert_refused(result, *says):
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("fa-chat: error: ") and all(s in error for s in says), (error, says)


def repl(tiny_dir, tmp_path, lines, *args):
    """Types lines into the REPL, run in tmp_path; returns the process and the reply to each line, stdout
    and stderr together."""
    result = fa_chat("--model", str(tiny_dir), "--max-tokens", "4", "--temperature", "0", *args,
                     stdin="".join(line + "\n" for line in lines), cwd=tmp_path, stderr=subprocess.STDOUT)
    return result, result.stdout.split(">>> ")[1:len(lines) + 1]


def assert_replies(result, replies, lines, says):
    assert "Traceback" not in result.stdout, result.stdout
    assert result.returncode == 0 and len(replies) == len(lines), result.stdout
    *before, last = replies
    assert not any("error:" in reply for reply in before), before
    assert all(s in last for s in says), (last, says)
    assert ".tmp" not in last, f"names an internal temp file: {last}"


@pytest.mark.parametrize("case", list(ARGS))
def test_bad_arguments_are_refused(tiny_dir, tmp_path, case):
    args, message = ARGS[case]
    (tmp_path / "notes.txt").write_text("not a model")
    result = fa_chat("--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2",
                     *(a.format(tmp=tmp_path) for a in args))
    assert_refused(result, message.format(tmp=tmp_path))


@pytest.mark.parametrize("case", list(FILES))
def test_resume_of_a_hostile_file_is_refused(tiny_dir, files, case):
    result = fa_chat("--model", str(tiny_dir), "--resume", files[case], "--prompt", "hi")
    assert_refused(result, files[case], FILES[case])


@pytest.mark.parametrize("case", list(FILES))
def test_load_of_a_hostile_file_is_refused_and_the_chat_goes_on(tiny_dir, files, tmp_path, case):
    lines = [f"/load {files[case]}"]
    result, replies = repl(tiny_dir, tmp_path, lines)
    assert_replies(result, replies, lines, ["error: ", files[case], FILES[case]])


@pytest.mark.parametrize("case", list(REPL))
def test_bad_commands_are_refused_and_the_chat_goes_on(tiny_dir, tmp_path, case):
    lines, says = REPL[case]
    (tmp_path / "folder").mkdir()
    result, replies = repl(tiny_dir, tmp_path, lines)
    assert_replies(result, replies, lines, says)


def test_convert_dtype_lets_resume_and_load_take_another_dtype(tiny_dir, files, tmp_path):
    path = files["other-dtype"]
    lines = [f"/load {path}"]
    result, replies = repl(tiny_dir, tmp_path, lines, "--resume", path, "--convert-dtype")
    assert_replies(result, replies, lines, [f"[loaded {path}: "])
    assert f"[resumed {path}: " in result.stdout


@pytest.mark.parametrize("args, stdin", [(["--prompt", "hi"], ""), ([], "hi\n")], ids=["prompt", "repl"])
def test_a_closed_pipe_ends_quietly(tiny_dir, args, stdin):
    """`fa-chat --prompt hi | head -c 1`: writing the answer fails, and fa-chat exits as a Unix tool that
    SIGPIPE killed does, with status 128 + 13 and nothing said."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: that write fails, whatever the timing
    try:
        result = fa_chat("--model", str(tiny_dir), "--max-tokens", "8", *args, stdin=stdin, stdout=write)
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 141, result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith(("Loading ", "Loaded on ", "Type a"))]
    assert said == [], result.stderr

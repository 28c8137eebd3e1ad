"""Session checkpoints: what the file holds, exact resume in a new process, atomic saves (temp files, modes,
errors), and a clean CheckpointError for every corrupt, truncated, foreign or hand-edited file."""
from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fachat
from fachat.engine import persistence
from fachat.errors import CheckpointError
from conftest import derive_seed
from test_session import (MODES, InterruptAt, Logits, assert_cache_holds, assert_exact, randint, random_prompt,
                          words)
from test_session import eager_decode  # noqa: F401 (an autouse fixture: this module's tests hook forwards too)
from tiny import make_tiny_model


def chatted(eng, gen, seed, turns=2, **kw):
    session = eng.session(system=words(gen, 3), max_new_tokens=6, temperature=1.0, seed=seed, **kw)
    for _ in range(turns):
        session.chat(words(gen))
    return session


def read_raw(path):
    """(header dict, data bytes) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def header_crc(meta):
    """The header checksum as the format defines it: crc32 of the canonical JSON of all but crc32."""
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())


# ---------------------------------------------------------------- contents


def test_file_holds_the_live_kv_and_a_small_header(eng, gen, seed, tmp_path):
    session = chatted(eng, gen, seed, turns=3)
    session.undo()
    session.system = "Another system prompt."  # the next turn cuts the cache near the start: undo keeps the rest
    session.chat(words(gen))
    session.append(random_prompt(eng, gen)[1:])
    session.generate(max_new_tokens=3)
    path = tmp_path / "s.safetensors"
    session.save(path)
    cache, a = session.cache, eng.args
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["fachat"])
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    L = a.num_hidden_layers
    assert names == {f"{p}.{i}" for p in ("k", "v", "undo.k", "undo.v") for i in range(L)}
    for i in range(L):
        assert shapes[f"k.{i}"] == shapes[f"v.{i}"] == [1, a.num_key_value_heads, cache.length, a.head_dim]
    undo_bytes = sum(math.prod(shape) * 4 for name, shape in shapes.items() if name.startswith("undo."))
    assert undo_bytes > 0
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert os.path.getsize(path) == 8 + header_len + cache.live_nbytes + undo_bytes, "more than the live K/V"
    assert cache.capacity > cache.length and header_len < 32 << 10
    assert (meta["format"], meta["version"], meta["length"], meta["dtype"]) == (
        "fa-chat session", persistence.VERSION, cache.length, "float32")
    assert set(meta["model"]) == {"architecture", "config_sha256", "weights_sha256", "quantize", "source"}
    assert meta["tokens"] == session.tokens and meta["messages"] == session.messages
    assert meta["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                                "seed": seed, "max_new_tokens": 6, "stop": []}
    assert meta["model"]["architecture"] == "LlamaForCausalLM" and meta["rng"]["device"] == "cpu"
    info = persistence.read_checkpoint_info(path)
    assert info.model_source == os.path.abspath(eng.source) and info.length == cache.length
    assert info.dtype == torch.float32


def test_load_restores_everything(eng, gen, seed, tmp_path):
    session = chatted(eng, gen, seed, turns=2, stop=["\u2603"], repetition_penalty=1.2)
    session.system = "Another system prompt."
    session.chat(words(gen))
    path = tmp_path / "s.safetensors"
    session.save(path)
    loaded = eng.load_session(path)
    assert (loaded.tokens, loaded.messages, loaded.system, loaded.params) == (
        session.tokens, session.messages, session.system, session.params)
    assert loaded.cache.length == session.cache.length
    for x, y in zip(loaded.cache.state[0] + loaded.cache.state[1], session.cache.state[0] + session.cache.state[1]):
        assert torch.equal(x, y)
    text = words(gen)
    with Logits(eng.model) as a:
        ga = session.chat(text)
    with Logits(eng.model) as b:
        gb = loaded.chat(text)  # same RNG state, same context: the same draws and logits
    assert ga.tokens == gb.tokens and session.tokens == loaded.tokens
    assert_exact(b.rows, a.rows, f"seed={seed}")
    for s in (session, loaded):  # the undo history came along, K/V included
        s.undo()
        s.undo()
    assert loaded.tokens == session.tokens and loaded.messages == session.messages
    assert len(loaded.tokens) > 30  # the turns before the system change: written back from the file
    for x, y in zip(loaded.cache.state[0] + loaded.cache.state[1], session.cache.state[0] + session.cache.state[1]):
        assert torch.equal(x, y)
    empty = tmp_path / "empty.safetensors"
    eng.session().save(empty)
    assert eng.load_session(empty).tokens == []


# ---------------------------------------------------------------- exact resume in a new process

CHILD = r"""
import json, sys
import torch
import fachat
from safetensors.torch import save_file

torch.set_num_threads(1)  # as the parent (conftest): the same kernels, the same bits
job = json.loads(sys.argv[1])
engine = fachat.Engine.load(job["model"], device="cpu", dtype="float32")
engine.tokenizer.eos_token_ids = []
out, meta = {}, {}
for case in job["cases"]:
    session = engine.load_session(case["path"])
    rows = []
    hook = engine.model.register_forward_hook(lambda m, args, o: rows.append(o[0].clone()))
    if case["kind"] == "raw":
        session.generate(max_new_tokens=case["rest"])
    else:
        for text in case["rest"]:
            session.chat(text)
    hook.remove()
    out[case["name"] + ".tokens"] = torch.tensor(session.tokens)
    out[case["name"] + ".logits"] = torch.stack(rows) if rows else torch.zeros(0)
    meta[case["name"]] = json.dumps(session.messages)
save_file(out, job["out"], metadata=meta)
"""


def test_resume_in_a_new_process_continues_exactly(eng, tiny_llama, gen, seed, tmp_path):
    """Each mode, raw and chat: stop at a random step, save, load in a new Python process, continue. The
    tokens, messages and every logit equal those of the uninterrupted run."""
    expected, cases = {}, []
    for mode, params in MODES.items():
        n, prompt = 16, random_prompt(eng, gen)  # raw: cut mid-answer after k tokens
        whole = eng.session(max_new_tokens=n, seed=seed, **params)
        whole.append(prompt)
        with Logits(eng.model) as ref:
            whole.generate()
        k = randint(gen, 0, n - 1)
        part = eng.session(max_new_tokens=n, seed=seed, **params)
        part.append(prompt)
        with Logits(eng.model) as before:
            if k:
                part.generate(max_new_tokens=k)
        path = tmp_path / f"raw-{mode}.safetensors"
        part.save(path)
        cases.append({"name": f"raw-{mode}", "kind": "raw", "path": str(path), "rest": n - k})
        expected[f"raw-{mode}"] = (whole.tokens, whole.messages, ref.rows, before.rows)

        turns = [words(gen) for _ in range(3)]  # chat: cut between turns
        whole = eng.session(system=words(gen, 2), max_new_tokens=6, seed=seed, **params)
        with Logits(eng.model) as ref:
            for t in turns:
                whole.chat(t)
        j = randint(gen, 0, 2)
        part = eng.session(system=whole.system, max_new_tokens=6, seed=seed, **params)
        with Logits(eng.model) as before:
            for t in turns[:j]:
                part.chat(t)
        path = tmp_path / f"chat-{mode}.safetensors"
        part.save(path)
        cases.append({"name": f"chat-{mode}", "kind": "chat", "path": str(path), "rest": turns[j:]})
        expected[f"chat-{mode}"] = (whole.tokens, whole.messages, ref.rows, before.rows)
    out = tmp_path / "child.safetensors"
    job = {"model": str(tiny_llama[0]), "cases": cases, "out": str(out)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        for name, (tokens, messages, ref_rows, before_rows) in expected.items():
            label = f"{name}; seed={seed}"
            assert f.get_tensor(f"{name}.tokens").tolist() == tokens, label
            assert json.loads(meta[name]) == messages, label
            rows = f.get_tensor(f"{name}.logits")
            assert_exact(before_rows + list(rows), ref_rows, label)


# ---------------------------------------------------------------- atomic save


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_save_that_fails_midway_leaves_the_old_file(eng, gen, seed, tmp_path, monkeypatch, failure):
    session = chatted(eng, gen, seed)
    path = tmp_path / "chat.safetensors"
    session.save(path)
    old = path.read_bytes()
    session.chat(words(gen))

    def failing_write(f, tensors, metadata):
        f.write(old[: randint(gen, 1, len(old) - 1)])  # part of a file, then the failure
        raise failure

    monkeypatch.setattr(persistence, "_write_safetensors", failing_write)
    with pytest.raises(type(failure)) as info:
        session.save(path)
    assert isinstance(failure, KeyboardInterrupt) or str(path) in str(info.value)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["chat.safetensors"], "a temp file was left behind"
    monkeypatch.undo()
    session.save(path)  # and a save that succeeds replaces it
    assert eng.load_session(path).tokens == session.tokens
    assert sorted(os.listdir(tmp_path)) == ["chat.safetensors"]


KILLED_SAVE = r"""
import os, signal, sys
import torch
from fachat.engine import persistence

os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the temp file written, before the rename
kv = [torch.ones(1, 2, 3, 4)]
persistence.save_checkpoint(sys.argv[1], kv, kv, kv, kv, {"tokens": [1, 2, 3]})
"""


def test_the_next_save_removes_the_temp_files_of_killed_writers(eng, gen, seed, tmp_path):
    session = chatted(eng, gen, seed)
    path = tmp_path / "chat.safetensors"
    session.save(path)
    old = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert path.read_bytes() == old
    left = set(os.listdir(tmp_path)) - {path.name}
    assert len(left) == 1, left
    dead = left.pop()
    assert dead.startswith(f".{path.name}.") and "fa-chat-tmp" in dead, f"whose is {dead}?"
    # a save in progress in a live process, another file's leftover and a file of the user's all stay
    live = f".{path.name}.{os.getpid()}-0123abcd.fa-chat-tmp"
    others = [live, dead.replace(path.name, "other.safetensors"), f".{path.name}.notes"]
    for name in others:
        (tmp_path / name).write_bytes(b"x")
    session.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name] + others)
    assert eng.load_session(path).tokens == session.tokens


def test_new_files_follow_the_umask_and_a_saved_over_file_keeps_its_mode(eng, gen, seed, tmp_path):
    session = chatted(eng, gen, seed, turns=1)
    old = os.umask(0o027)
    try:
        session.save(tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat_mode(tmp_path / "new.safetensors") == 0o640
    for mode in (0o644, 0o600, 0o664):
        path = tmp_path / f"{mode:o}.safetensors"
        path.write_bytes(b"an older file")
        path.chmod(mode)
        session.save(path)
        assert stat_mode(path) == mode
        assert eng.load_session(path).tokens == session.tokens


def stat_mode(path):
    return os.stat(path).st_mode & 0o7777


def test_save_errors_name_the_path_given(eng, gen, seed, tmp_path, monkeypatch):
    session = chatted(eng, gen, seed, turns=1)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    cases = [(tmp_path / "no-such-folder" / "x.safetensors", FileNotFoundError),
             (tmp_path / "a-folder", IsADirectoryError),
             (tmp_path / "a-file" / "x.safetensors", NotADirectoryError)]
    if not os.access(read_only, os.W_OK):  # root writes anywhere
        cases.append((read_only / "x.safetensors", PermissionError))
    for path, error in cases:
        with pytest.raises(error) as info:
            session.save(path)
        assert str(path) in str(info.value) and f"/.{path.name}." not in str(info.value), str(info.value)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    path = tmp_path / "full.safetensors"
    with pytest.raises(OSError, match="No space left on device") as info:
        session.save(path)
    assert str(path) in str(info.value) and f"/.{path.name}." not in str(info.value), str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["a-file", "a-folder", "read-only"]


# ---------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """A module-wide engine and a valid checkpoint of it (3 turns, the last after a system prompt change: the
    file holds the K/V that undo would write back)."""
    eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    eng.tokenizer.eos_token_ids = []
    g = torch.Generator().manual_seed(derive_seed("saved checkpoint"))
    session = eng.session(system="Be brief.", max_new_tokens=5, temperature=1.0, seed=3)
    for _ in range(2):
        session.chat(words(g))
    session.system = "Another system prompt."
    session.chat(words(g))
    path = tmp_path_factory.mktemp("ckpt") / "good.safetensors"
    session.save(path)
    return eng, path


def edited(meta_edit, fix_crc=True, text=None):
    """A damage: the good file with its header edited (and its checksum fixed, to reach later checks)."""
    def damage(good, bad, eng, tmp_path, gen):
        header, data = read_raw(good)
        meta = json.loads(header["__metadata__"]["fachat"])
        meta_edit(meta, eng)
        if fix_crc:
            meta["crc32"]["header"] = header_crc(meta)
        header["__metadata__"]["fachat"] = text if text is not None else json.dumps(meta)
        write_raw(bad, header, data)
    return damage


def set_(key, value):
    def edit(meta, eng):
        meta[key] = value(meta, eng) if callable(value) else value
    return edit


def truncated(good, bad, eng, tmp_path, gen):
    raw = good.read_bytes()
    bad.write_bytes(raw[: randint(gen, 1, len(raw) - 1)])


def flipped_data(good, bad, eng, tmp_path, gen):
    header, data = read_raw(good)
    data = bytearray(data)
    data[randint(gen, 0, len(data) - 1)] ^= 1 << randint(gen, 0, 7)
    write_raw(bad, header, bytes(data))


def other_weights(good, bad, eng, tmp_path, gen):
    """The same architecture and config, other weights: only the weights' hash tells them apart."""
    other_variant(good, bad, eng, tmp_path, gen, variant="llama")


def other_variant(good, bad, eng, tmp_path, gen, variant="llama-tied-mqa"):
    make_tiny_model(tmp_path / variant, variant, seed=randint(gen, 0, 2 ** 31))
    s = fachat.Engine.load(tmp_path / variant, device="cpu", dtype="float32").session(max_new_tokens=3)
    s.chat("hello")
    s.save(bad)


def tokens_past_vocab(meta, eng):
    meta["tokens"][len(meta["tokens"]) // 2] = eng.args.vocab_size


def one_token_changed(meta, eng):
    meta["tokens"][-1] = (meta["tokens"][-1] + 1) % eng.args.vocab_size


def prompt_token_changed(meta, eng):
    """A token of the last turn's prompt (the answer after it is 5 tokens at most)."""
    i = len(meta["tokens"]) - 8
    meta["tokens"][i] = (meta["tokens"][i] + 1) % eng.args.vocab_size


def invalid_rng_state(meta, eng):
    """The right size for a CPU generator's state, but not a state mt19937 can be in."""
    size = torch.Generator().get_state().numel()
    meta["rng"]["state"] = base64.b64encode(bytes(size)).decode()


def swap_roles(meta, eng):
    m = meta["messages"]
    m[1]["role"], m[2]["role"] = m[2]["role"], m[1]["role"]


DAMAGES = {
    "missing": (None, "no such file"),
    "empty": (lambda good, bad, *_: bad.write_bytes(b""), "not a valid safetensors"),
    "random-bytes": (lambda good, bad, eng, tmp, gen: bad.write_bytes(os.urandom(randint(gen, 1, 1 << 16))),
                     "not a valid safetensors"),
    "truncated": (truncated, "not a valid safetensors"),
    "model-weights": (lambda good, bad, eng, *_: bad.write_bytes((Path(eng.source) / "model.safetensors").read_bytes()),
                      "not a fa-chat session"),
    "other-variant": (other_variant, "another model"),
    "other-weights": (other_weights, "another model"),
    "data-bit-flip": (flipped_data, "checksum"),
    "header-edited": (edited(one_token_changed, fix_crc=False), "checksum"),
    "not-json": (edited(lambda m, e: None, text="{'tokens': [1, 2"), "not valid JSON"),
    "json-not-object": (edited(lambda m, e: None, text="[1, 2, 3]"), "not a fa-chat session"),
    "other-format": (edited(set_("format", "something else")), "not a fa-chat session"),
    "future-version": (edited(set_("version", persistence.VERSION + 1)), f"unknown format version {persistence.VERSION + 1}"),
    "missing-key": (edited(lambda m, e: m.pop("tokens")), "lacks 'tokens'"),
    "wrong-type": (edited(set_("length", "12")), "'length' must be an int"),
    "tokens-vs-length": (edited(set_("tokens", lambda m, e: m["tokens"][:-2])), "do not match the cache length"),
    "length-vs-shapes": (edited(lambda m, e: m.update(length=m["length"] + 1, tokens=m["tokens"] + [5])),
                         "expected [B, Hkv, "),
    "layer-count": (edited(set_("layers", 3)), "do not match 3 layers"),
    "negative-token": (edited(lambda m, e: m["tokens"].__setitem__(0, -4)), "tokens must be ints >= 0"),
    "token-past-vocab": (edited(tokens_past_vocab), "out of range for the vocabulary"),
    "dtype-vs-tensors": (edited(set_("dtype", "bfloat16")), "but the header says bfloat16"),
    "unknown-dtype": (edited(set_("dtype", "int8")), "unknown dtype"),
    "bad-message": (edited(lambda m, e: m["messages"][1].update(content=5)), "messages[1]"),
    "bad-sampling": (edited(lambda m, e: m["sampling"].update(temperature=-1)), "temperature"),
    "unknown-sampling": (edited(lambda m, e: m["sampling"].update(temp=1)), "sampling arguments"),
    "bad-rng": (edited(lambda m, e: m["rng"].update(state="bm90IGEgc3RhdGU=")), "RNG state is malformed"),
    "invalid-rng-state": (edited(invalid_rng_state), "RNG state is malformed"),
    "rng-other-device": (edited(lambda m, e: m["rng"].update(device="cuda")), "'cuda' generator"),
    "undo-vs-tensors": (edited(lambda m, e: m["turns"][-1].update(kv=m["turns"][-1]["kv"] + 1)), "undo"),
    "bad-turn": (edited(lambda m, e: m["turns"].append({"messages": 99, "start": 0, "tokens": [], "kv": 0})),
                 "turns[3]"),
    "directory": (lambda good, bad, *_: bad.mkdir(), "is a directory"),
    "roles-not-alternating": (edited(swap_roles), "alternate"),
    "two-system-messages": (edited(lambda m, e: m["messages"][3].update(role="system")), "alternate"),
    "messages-vs-turns": (edited(lambda m, e: m.update(messages=m["messages"][:-2])), "do not make 3 turns"),
    "turn-messages": (edited(lambda m, e: m["turns"][1].update(messages=1)), "turns[1] begins at message 1"),
    "turn-past-tokens": (edited(lambda m, e: m["turns"][0].update(start=len(m["tokens"]))), "turns[0] starts at token"),
    "edited-question": (edited(lambda m, e: m["messages"][3].update(content="Something else.")),
                        "differ from the chat template's rendering"),
    "edited-answer": (edited(lambda m, e: m["messages"][2].update(content="Something else.")),
                      "differ from the chat template's rendering"),
    "edited-prompt-token": (edited(prompt_token_changed), "differ from the chat template's rendering"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_checkpoints_raise_a_clean_error_and_change_nothing(saved, damage, gen, seed, tmp_path):
    eng, good = saved
    make, message = DAMAGES[damage]
    bad = tmp_path / f"{damage}.safetensors"
    if make is not None:
        make(good, bad, eng, tmp_path, gen)
    current = eng.session(max_new_tokens=3, temperature=0)
    current.chat("hello")
    before = current.freeze()
    with pytest.raises(CheckpointError) as info:
        eng.load_session(bad)
    text = str(info.value)
    assert str(bad) in text and message in text, f"{damage}: {text}; seed={seed}"
    assert current.tokens == list(before.tokens)
    assert current.messages == [{"role": r, "content": c} for r, c in before.conversation]
    for x, y in zip(current.cache.state[0], before.keys):
        assert torch.equal(x, y)
    assert eng.load_session(good).tokens  # the engine is as it was


def test_damages_are_not_vacuous(saved, tmp_path, gen):
    """The edit helper itself yields a loadable file when it changes nothing."""
    eng, good = saved
    same = tmp_path / "same.safetensors"
    edited(lambda m, e: None)(good, same, eng, tmp_path, gen)
    assert eng.load_session(same).tokens == eng.load_session(good).tokens


# ---------------------------------------------------------------- dtype, context length


def test_other_dtype_needs_convert_dtype(tiny_llama, gen, seed, tmp_path):
    f32 = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    bf16 = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="bfloat16")
    f32.tokenizer.eos_token_ids = bf16.tokenizer.eos_token_ids = []
    session = f32.session(max_new_tokens=5, temperature=0)
    session.chat(words(gen))
    path = tmp_path / "f32.safetensors"
    session.save(path)
    with pytest.raises(CheckpointError, match="convert_dtype"):
        bf16.load_session(path)
    loaded = bf16.load_session(path, convert_dtype=True)
    assert loaded.tokens == session.tokens and loaded.cache.k[0].dtype == torch.bfloat16
    for x, y in zip(loaded.cache.state[0], session.cache.state[0]):
        assert torch.equal(x, y.to(torch.bfloat16))
    assert len(loaded.chat(words(gen)).tokens) == 5
    back = tmp_path / "bf16.safetensors"
    loaded.save(back)
    assert f32.load_session(back, convert_dtype=True).cache.k[0].dtype == torch.float32
    with pytest.raises(CheckpointError, match="bfloat16"):
        f32.load_session(back)


# ---------------------------------------------------------------- which model


def chat_saved(engine, gen, path):
    session = engine.session(max_new_tokens=3, temperature=0)
    session.chat(words(gen))
    session.save(path)
    return session


def test_every_weight_value_identifies_the_model(tiny_llama, gen, seed, tmp_path):
    """One value changed anywhere is another model; the same file elsewhere, or run in another dtype, is not."""
    f32 = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    path = tmp_path / "s.safetensors"
    session = chat_saved(f32, gen, path)
    copy = shutil.copytree(tiny_llama[0], tmp_path / "copy")
    assert fachat.Engine.load(copy, device="cpu", dtype="float32").load_session(path).tokens == session.tokens
    bf16 = fachat.Engine.load(copy, device="cpu", dtype="bfloat16")
    assert bf16.fingerprint["weights_sha256"] == f32.fingerprint["weights_sha256"]
    assert bf16.load_session(path, convert_dtype=True).tokens == session.tokens
    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[randint(gen, 0, len(weights) - 1)]
    flat = weights[name].view(-1)
    i = randint(gen, 0, flat.numel() - 1)
    flat[i] = -flat[i] if flat[i] != 0 else 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="another model"):
        fachat.Engine.load(copy, device="cpu", dtype="float32").load_session(path)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf (gguf-py) is not installed")
def test_every_gguf_weight_identifies_the_model(gen, seed, tmp_path):
    """The same for a GGUF file, whose weights are hashed as stored (quantized blocks included)."""
    import numpy as np
    from fachat.models.gguf import _Header
    from test_gguf import write_small

    model = tmp_path / "m.gguf"
    write_small(model, np.random.default_rng(seed), types={"model.layers.0.mlp.up_proj.weight": "Q8_0"})
    path = tmp_path / "s.safetensors"
    session = fachat.Engine.load(model, device="cpu").session(max_new_tokens=3, temperature=0)
    session.append(list(range(5, 12)))
    session.generate()
    session.save(path)
    elsewhere = shutil.copy(model, tmp_path / "elsewhere.gguf")
    assert fachat.Engine.load(elsewhere, device="cpu").load_session(path).tokens == session.tokens
    tensors = _Header(model).tensors
    t = tensors[randint(gen, 0, len(tensors) - 1)]
    raw = bytearray(model.read_bytes())
    raw[t.offset + randint(gen, 0, t.nbytes - 1)] ^= 1 << randint(gen, 0, 7)
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(raw)
    with pytest.raises(CheckpointError, match="another model"):
        fachat.Engine.load(changed, device="cpu").load_session(path)


@pytest.mark.parametrize("edit,loads", [
    ({"torch_dtype": "bfloat16"}, True), ({"max_position_embeddings": 1024}, True), ({"bos_token_id": 3}, True),
    ({"use_cache": False, "some_new_field": [1, 2]}, True), ({"rms_norm_eps": 1e-6}, False),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}, False),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, False)])
def test_config_fields_that_change_no_math_keep_checkpoints_valid(tiny_llama, gen, seed, tmp_path, edit, loads):
    path = tmp_path / "s.safetensors"
    session = chat_saved(fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32"), gen, path)
    copy = shutil.copytree(tiny_llama[0], tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text()) | edit
    (copy / "config.json").write_text(json.dumps(config))
    engine = fachat.Engine.load(copy, device="cpu", dtype="float32")
    if loads:
        assert engine.load_session(path).tokens == session.tokens
    else:
        with pytest.raises(CheckpointError, match="another model"):
            engine.load_session(path)


# ---------------------------------------------------------------- valid sessions stay valid


def test_every_state_a_session_reaches_saves_and_loads(eng, gen, seed, tmp_path):
    """A random walk over what a session does (chat, interrupted or closed answers, system prompt changes,
    undo, reset, raw text): every state saves and loads as it is, so the load checks refuse no valid file."""
    session = eng.session(max_new_tokens=4, temperature=1.0, seed=seed)
    path = tmp_path / "s.safetensors"

    def interrupted_chat():
        site = eng.model.model.layers[randint(gen, 0, 1)]
        with InterruptAt(eng.model, site, randint(gen, 1, 3)), pytest.raises(KeyboardInterrupt):
            session.chat(words(gen))

    def closed_chat():
        stream = session.stream_chat(words(gen))
        next(stream, None)
        stream.close()

    def raw():
        session.append(" " + words(gen, 3))
        session.generate(max_new_tokens=randint(gen, 1, 3))

    steps = {"chat": lambda: session.chat(words(gen)), "interrupted": interrupted_chat, "closed": closed_chat,
             "system": lambda: setattr(session, "system", words(gen, 2)),
             "no system": lambda: setattr(session, "system", None),
             "undo": lambda: session.undo() if any(m["role"] == "assistant" for m in session.messages) else None,
             "reset": session.reset, "raw": raw}
    names, done = sorted(steps), []
    for _ in range(24):
        name = names[randint(gen, 0, len(names) - 1)]
        if len(session.tokens) > 400:
            name = "reset"
        steps[name]()
        done.append(name)
        session.save(path)
        loaded = eng.load_session(path)
        label = f"after {done}; seed={seed}"
        assert (loaded.tokens, loaded.messages) == (session.tokens, session.messages), label


def test_context_longer_than_the_engine_allows(tiny_llama, gen, seed, tmp_path):
    eng = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    session = eng.session(max_new_tokens=4, temperature=0)
    session.chat(words(gen, 12))
    path = tmp_path / "long.safetensors"
    session.save(path)
    short = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32", max_seq_len=16)
    with pytest.raises(CheckpointError, match="max_seq_len is 16"):
        short.load_session(path)
    assert_cache_holds(eng, eng.load_session(path))

"""Session checkpoints: what the file holds, exact resume in a new process, atomic saves, and a clean
CheckpointError for every corrupt, truncated, foreign or hand-edited file."""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fachat
from fachat.cache import checkpoint
from fachat.errors import CheckpointError
from conftest import derive_seed
from test_session import MODES, Logits, assert_cache_holds, assert_exact, randint, random_prompt, words
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
    assert (meta["format"], meta["version"], meta["length"], meta["dtype"]) == ("fa-chat session", 1, cache.length,
                                                                                 "float32")
    assert meta["tokens"] == session.tokens and meta["messages"] == session.messages
    assert meta["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                                "seed": seed, "max_new_tokens": 6, "stop": []}
    assert meta["model"]["architecture"] == "LlamaForCausalLM" and meta["rng"]["device"] == "cpu"
    info = checkpoint.read_checkpoint_info(path)
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

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(old[: randint(gen, 1, len(old) - 1)])  # part of a file, then the failure
        raise failure

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(type(failure)):
        session.save(path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["chat.safetensors"], "a temp file was left behind"
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        session.save(tmp_path / "no-such-folder" / "x.safetensors")
    session.save(path)  # and a save that succeeds replaces it
    assert eng.load_session(path).tokens == session.tokens
    assert sorted(os.listdir(tmp_path)) == ["chat.safetensors"]


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
    """The same architecture and config, other weights: only the sampled weight values tell them apart."""
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
    "future-version": (edited(set_("version", 2)), "unknown format version 2"),
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
    "rng-other-device": (edited(lambda m, e: m["rng"].update(device="cuda")), "'cuda' generator"),
    "undo-vs-tensors": (edited(lambda m, e: m["turns"][-1].update(kv=m["turns"][-1]["kv"] + 1)), "undo"),
    "bad-turn": (edited(lambda m, e: m["turns"].append({"messages": 99, "start": 0, "tokens": [], "kv": 0})),
                 "turns[3]"),
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


def scaled_sample(factor):
    """Scales the largest of the model's sampled weight values by factor."""
    def edit(meta, eng):
        x = torch.frombuffer(bytearray(base64.b64decode(meta["model"]["weights_sample"])), dtype=torch.float32)
        x[x.abs().argmax()] *= factor
        meta["model"]["weights_sample"] = base64.b64encode(x.numpy().tobytes()).decode()
    return edit


def test_weight_samples_match_exactly_in_one_dtype_and_to_rounding_across(tiny_llama, gen, seed, tmp_path):
    f32 = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="float32")
    bf16 = fachat.Engine.load(tiny_llama[0], device="cpu", dtype="bfloat16")
    session = f32.session(max_new_tokens=3, temperature=0)
    session.chat(words(gen))
    good = tmp_path / "good.safetensors"
    session.save(good)
    for factor, f32_loads, bf16_loads in ((1 + 1e-6, False, True), (1.05, False, False)):
        path = tmp_path / f"scaled-{factor}.safetensors"
        edited(scaled_sample(factor))(good, path, f32, tmp_path, gen)
        for engine, loads in ((f32, f32_loads), (bf16, bf16_loads)):
            if loads:
                assert engine.load_session(path, convert_dtype=True).tokens == session.tokens
            else:
                with pytest.raises(CheckpointError, match="another model"):
                    engine.load_session(path, convert_dtype=True)


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

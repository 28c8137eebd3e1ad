"""Loading by hub id, served from a Hugging Face cache laid out on disk (the hub itself is unreachable)."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys

import torch

from fachat.models.loaders import HUB_PATTERNS

LOAD = """
import json, sys, torch
from fachat import Engine, ModelLoadError
try:
    e = Engine.load(sys.argv[1], device="cpu")
except ModelLoadError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
else:
    ids = json.loads(sys.argv[2])
    print(json.dumps({"logits": e.score(ids).tolist()}))
"""


def run_offline(hf_home, repo_id: str, ids: list[int]) -> dict:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD, repo_id, json.dumps(ids)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def populate_cache(hf_home, repo_id: str, folder) -> None:
    """Lays out a model folder as huggingface_hub's cache stores a downloaded snapshot."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = os.urandom(20).hex()
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_cache_offline(tmp_path, tiny_llama, gen):
    folder, peer = tiny_llama
    populate_cache(tmp_path / "hf", "tiny-org/tiny-llama", folder)
    ids = torch.randint(0, peer.config.vocab_size, (24,), generator=gen).tolist()
    result = run_offline(tmp_path / "hf", "tiny-org/tiny-llama", ids)
    with torch.no_grad():
        expected = peer(torch.tensor([ids])).logits[0]
    assert torch.allclose(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-4)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path):
    result = run_offline(tmp_path / "empty-hf-home", "nobody-here/no-such-model", [1])
    assert result["error"] == "ModelNotFoundError"
    assert "nobody-here/no-such-model" in result["message"] and "offline" in result["message"]


def test_hub_patterns_take_what_a_model_needs_and_never_pickles():
    wanted = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "model.safetensors", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json"]
    unwanted = ["pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pt", "model.ckpt", "README.md"]
    assert all(any(fnmatch.fnmatch(f, p) for p in HUB_PATTERNS) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in HUB_PATTERNS)


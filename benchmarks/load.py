"""Model load time, and what hashing every weight (the checkpoints' model identity) costs within it.

    python benchmarks/load.py [--model PATH.gguf] [--repeats 5]

Engine.load hashes (sha256) every tensor of the file as stored, while it reads it. This times Engine.load
of the GGUF (float32, CPU) and, alternating with it, sha256 alone over the same bytes: every tensor's data
as the gguf package reads it. Medians of --repeats runs after one warm-up load (the file is in the page
cache). Prints both and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fachat import Engine
from fachat.models.loaders import default_model


def hash_tensors(path: str) -> tuple[float, int]:
    """Seconds to sha256 every tensor's stored bytes, and how many bytes that is."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    t0 = time.perf_counter()
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.data.reshape(-1).view("uint8"))
    return time.perf_counter() - t0, sum(t.data.nbytes for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load.json"))
    a = ap.parse_args()
    model = a.model or default_model()
    Engine.load(model, device="cpu", dtype="float32")  # warm-up: the file into the page cache
    loads, hashes = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        Engine.load(model, device="cpu", dtype="float32")
        loads.append(time.perf_counter() - t0)
        seconds, nbytes = hash_tensors(model)
        hashes.append(seconds)
    load_s, hash_s = statistics.median(loads), statistics.median(hashes)
    print(f"{Path(model).name}: Engine.load {load_s:.3f} s (median of {a.repeats}); sha256 of its "
          f"{nbytes / 2**20:.1f} MiB of tensor data {hash_s * 1e3:.1f} ms ({nbytes / 2**20 / hash_s:.0f} MiB/s), "
          f"{hash_s / load_s:.1%} of the load")
    Path(a.out).write_text(json.dumps({
        "benchmark": "load", "model": Path(model).name, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "repeats": a.repeats, "tensor_bytes": nbytes,
        "load_s": loads, "sha256_s": hashes}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

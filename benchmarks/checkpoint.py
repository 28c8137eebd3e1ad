"""Session checkpoints on the real model: save time, load time and file size next to the live K/V bytes.

    python benchmarks/checkpoint.py [--model PATH.gguf] [--tokens 256 512 ... 8192] [--repeats 3] [--dir DIR]

One session of SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU) grows by appending text to T
tokens for each T (T-1 of them cached, the last one waiting for the next call). Session.save writes it
(K/V copied off the cache, checksummed, written to a temp file, fsync, rename) and Engine.load_session
reads it back (header, model fingerprint, checksums, copy into a new cache). Each figure is the median of
--repeats runs. The file stays in the page cache, so loads measure parsing, checking and copying rather
than the disk. Prints a table, writes JSON to benchmarks/results/ and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fachat import Engine
from fachat.models.loaders import default_model

import plots  # benchmarks/plots.py, beside this script
from decode_cpu import prompt_ids

RESULTS = Path(__file__).parent / "results"

def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plot(rows: list[dict], path: Path) -> None:
    T = [r["tokens"] for r in rows]
    fig, (ax_t, ax_s) = plots.two_panels()
    ax_t.loglog(T, [r["save_s"] for r in rows], "o-", label="save (fsync included)")
    ax_t.loglog(T, [r["load_s"] for r in rows], "s-", label="load (checks included)")
    ax_t.set_ylabel("seconds (median)")
    ax_s.loglog(T, [r["file_bytes"] / 2 ** 20 for r in rows], "o-", label="file")
    ax_s.loglog(T, [r["live_kv_bytes"] / 2 ** 20 for r in rows], "x--", label="live K/V")
    ax_s.set_ylabel("MiB")
    plots.save(fig, (ax_t, ax_s), "session tokens", "Session checkpoints, SmolLM2-135M-Instruct, float32, CPU", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2 ** i for i in range(8, 14)])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "checkpoint.json"))
    a = ap.parse_args()

    engine = Engine.load(a.model or default_model(), device="cpu", dtype="float32")
    fingerprint_s = timed(lambda: engine.fingerprint)  # once per engine, on the first save or load
    ids = prompt_ids(engine, max(a.tokens))
    session = engine.session()
    folder = Path(a.dir or tempfile.mkdtemp(prefix="fachat-ckpt-"))
    path = folder / "session.safetensors"
    rows = []
    print(f"fingerprint of the model: {fingerprint_s * 1e3:.0f} ms, once per engine")
    print(f"{'tokens':>6} {'cached':>6} | {'live KV MiB':>11} {'file MiB':>9} {'header KiB':>10} | "
          f"{'save ms':>8} {'load ms':>8} | {'save MiB/s':>10} {'load MiB/s':>10}")
    for T in sorted(a.tokens):
        session.append(ids[len(session.tokens):T])
        saves = [timed(lambda: session.save(path)) for _ in range(a.repeats)]
        loaded = []
        loads = [timed(lambda: loaded.append(engine.load_session(path))) for _ in range(a.repeats)]
        assert loaded[-1].tokens == session.tokens and loaded[-1].cache.length == session.cache.length
        loaded.clear()
        live, size = session.cache.live_nbytes, os.path.getsize(path)
        row = {"tokens": len(session.tokens), "cached": session.cache.length, "live_kv_bytes": live,
               "file_bytes": size, "save_s": statistics.median(saves), "load_s": statistics.median(loads),
               "save_runs_s": saves, "load_runs_s": loads}
        rows.append(row)
        mib = 2 ** 20
        print(f"{row['tokens']:>6} {row['cached']:>6} | {live / mib:>11.1f} {size / mib:>9.1f} "
              f"{(size - live) / 1024:>10.1f} | {row['save_s'] * 1e3:>8.1f} {row['load_s'] * 1e3:>8.1f} | "
              f"{live / mib / row['save_s']:>10.0f} {live / mib / row['load_s']:>10.0f}", flush=True)
    path.unlink()
    if a.dir is None:
        folder.rmdir()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "checkpoint", "model": engine.source, "dtype": "float32", "device": "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "repeats": a.repeats, "fingerprint_s": fingerprint_s, "rows": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

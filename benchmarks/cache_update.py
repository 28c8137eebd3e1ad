"""The cost of growing a KV cache one token at a time: InPlaceKVCache against concat-grow (ConcatKVCache).

    python benchmarks/cache_update.py [--tokens 256 512 ... 8192] [--max-concat-tokens 8192]

For each T, appends T positions one at a time to a cache with SmolLM2-135M-Instruct's shapes (30 layers,
3 KV heads, head_dim 64, float32), as decoding does: reserve, write K and V on every layer, advance.
Reports the total time and the bytes copied, counted where each cache copies: in-place writes the new
position and, when it doubles, the live prefix; concat-grow rebuilds each layer's tensor every step.
Prints a table, writes JSON to benchmarks/results/ and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import torch

from fachat.cache.kv_cache import ConcatKVCache, InPlaceKVCache

import plots  # benchmarks/plots.py, beside this script

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
RESULTS = Path(__file__).parent / "results"


class CountingInPlace(InPlaceKVCache):
    copied = 0

    def write(self, layer, start, k, v):
        self.copied += k.nbytes + v.nbytes
        return super().write(layer, start, k, v)

    def _regrow(self, buf, capacity):
        self.copied += buf[:, :, : self.length].nbytes  # the live prefix moves to the new buffer
        return super()._regrow(buf, capacity)


class CountingConcat(ConcatKVCache):
    copied = 0

    def write(self, layer, start, k, v):
        k_buf, v_buf = super().write(layer, start, k, v)
        self.copied += k_buf.nbytes + v_buf.nbytes  # torch.cat copies all of the new tensors
        return k_buf, v_buf


def append_one_at_a_time(cache: InPlaceKVCache, T: int) -> float:
    k = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    v = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    t0 = time.perf_counter()
    for pos in range(T):
        cache.reserve(pos + 1)
        for layer in range(LAYERS):
            cache.write(layer, pos, k, v)
        cache.advance(1)
    return time.perf_counter() - t0


def quiet_allocator() -> bool:
    """glibc hands every block over 128 KiB back to the OS and page-faults it in anew, which makes the concat
    baseline several times slower and erratic on this VM. Keeping freed memory makes it copy-bound:
    the fairest (fastest) baseline. Returns whether mallopt took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def plot(rows: list[dict], path: Path) -> None:
    fig, (ax_t, ax_b) = plots.two_panels()
    for kind, style in (("in_place", "o-"), ("concat", "s-")):
        pts = [(r["tokens"], r[kind]) for r in rows if r[kind] is not None]
        ax_t.loglog([t for t, _ in pts], [m["seconds"] for _, m in pts], style, label=kind.replace("_", "-"))
        ax_b.loglog([t for t, _ in pts], [m["bytes_copied"] for _, m in pts], style, label=kind.replace("_", "-"))
    ax_t.set_ylabel("total time (s)")
    ax_b.set_ylabel("bytes copied")
    plots.save(fig, (ax_t, ax_b), "tokens appended one at a time (T)",
         "KV cache update, SmolLM2-135M shapes (30 layers x 3 KV heads x 64, float32)", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2 ** i for i in range(8, 14)])
    ap.add_argument("--max-concat-tokens", type=int, default=8192, help="skip concat-grow above this T (it is O(T^2))")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (copies gain nothing from more)")
    ap.add_argument("--out", default=str(RESULTS / "cache_update.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    allocator = quiet_allocator()
    per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    rows = []
    print(f"{'T':>6} | {'in-place s':>10} {'copied MiB':>11} | {'concat s':>9} {'copied GiB':>11} | "
          f"{'time x':>7} {'bytes x':>8}")
    for T in a.tokens:
        inplace = CountingInPlace(LAYERS, KV_HEADS, HEAD_DIM, dtype=torch.float32)
        row = {"tokens": T, "live_bytes": T * per_token,
               "in_place": {"seconds": append_one_at_a_time(inplace, T), "bytes_copied": inplace.copied,
                            "growths": inplace.growths, "capacity": inplace.capacity},
               "concat": None}
        line = f"{T:>6} | {row['in_place']['seconds']:>10.3f} {inplace.copied / 2 ** 20:>11.1f} | "
        if T <= a.max_concat_tokens:
            concat = CountingConcat(LAYERS, KV_HEADS, HEAD_DIM, dtype=torch.float32)
            row["concat"] = {"seconds": append_one_at_a_time(concat, T), "bytes_copied": concat.copied}
            line += (f"{row['concat']['seconds']:>9.2f} {concat.copied / 2 ** 30:>11.2f} | "
                     f"{row['concat']['seconds'] / row['in_place']['seconds']:>6.0f}x "
                     f"{concat.copied / inplace.copied:>7.0f}x")
        else:
            line += f"{'skipped':>9} {'':>11} |"
        print(line, flush=True)
        rows.append(row)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "cache_update", "shapes": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                                "dtype": "float32", "bytes_per_token": per_token},
        "torch": torch.__version__, "threads": a.threads, "machine": platform.machine(),
        "glibc_keeps_freed_memory": allocator, "rows": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

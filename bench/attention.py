"""Attention benchmark: hand-written dense vs fused with a dense mask vs the fused block path.

Patterns: the DiT sliding-block pattern (blocks of 24 frames, 2 back / 1 ahead: the receptive field of the
whole official DiT) and plain causal attention (no block path there: it is not block-sparse).
Each case runs in a fresh subprocess so its peak memory is its own: on CPU the peak resident set above the
inputs (ru_maxrss), on CUDA torch.cuda.max_memory_allocated. Times are medians of several runs.

    python bench/attention.py                      # T in 1k, 4k, 16k; a table, then one JSON line
    python bench/attention.py --T 1024 4096         # a quicker run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = {
    "sliding": ["manual", "sdpa_dense", "block"],
    "causal": ["manual", "sdpa_dense", "sdpa_causal"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(pattern: str, T: int, path: str, heads: int, dim: int, repeats: int) -> dict:
    import torch

    from nano_omni.attention import attention, block_attention, block_pattern, causal_mask

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if T > 96:  # warm up the same path on a small problem, so lazily loaded kernels do not count as memory
        run_case(pattern, 96, path, heads, dim, 1)
    q, k, v = (torch.randn(1, heads, T, dim, device=dev) for _ in range(3))
    if pattern == "sliding":
        p = block_pattern(1, T, block_size=24, back=2, ahead=1, device=dev)
        if path == "manual":
            fn = lambda: block_attention(q, k, v, p, impl="manual")
        elif path == "sdpa_dense":
            fn = lambda: block_attention(q, k, v, p, impl="sdpa")
        else:
            fn = lambda: block_attention(q, k, v, p, impl="block")
    else:
        if path == "manual":
            fn = lambda: attention(q, k, v, causal=True, impl="manual")
        elif path == "sdpa_dense":
            fn = lambda: attention(q, k, v, causal_mask(T, T, dev), impl="sdpa")
        else:
            fn = lambda: attention(q, k, v, causal=True, impl="sdpa")
    with torch.no_grad():
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes()
        fn()  # first call: peak memory (it also builds the block index tables once, as a model would per forward)
        if dev == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(repeats):
            if path == "block" and pattern == "sliding":
                p.__dict__.pop("_gather", None)  # time the index tables too: a fair, per-call cost
            t0 = time.perf_counter()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"pattern": pattern, "T": T, "path": path, "device": dev, "median_ms": 1e3 * statistics.median(times),
            "peak_mb": max(peak, 0) / 2 ** 20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", nargs=3, metavar=("PATTERN", "T", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        pattern, T, path = a.case
        reps = a.repeats if int(T) <= 4096 else max(3, a.repeats // 2)
        print(json.dumps(run_case(pattern, int(T), path, a.heads, a.dim, reps)))
        return
    rows = []
    for pattern, paths in PATHS.items():
        for T in a.T:
            for path in paths:
                cmd = [sys.executable, __file__, "--case", pattern, str(T), path, "--heads", str(a.heads),
                       "--dim", str(a.dim), "--repeats", str(a.repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"case {pattern} T={T} {path} failed:\n{out.stderr}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{pattern:8s} T={T:6d} {path:12s} {r['median_ms']:10.2f} ms {r['peak_mb']:10.1f} MB", flush=True)
    print()
    print("| pattern | T | path | median ms | peak MB | device |")
    print("|---|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['T']} | {r['path']} | {r['median_ms']:.2f} | {r['peak_mb']:.1f} | {r['device']} |")
    get = lambda pat, T, path: next(r for r in rows if r["pattern"] == pat and r["T"] == T and r["path"] == path)
    Tmax = max(a.T)
    man, dense, blk = (get("sliding", Tmax, p) for p in ("manual", "sdpa_dense", "block"))
    summary = {
        "bench": "attention", "device": blk["device"], "T": Tmax, "heads": a.heads, "head_dim": a.dim,
        "block_vs_manual_speedup": man["median_ms"] / blk["median_ms"],
        "block_vs_manual_memory_ratio": man["peak_mb"] / max(blk["peak_mb"], 1e-3),
        "block_vs_sdpa_dense_speedup": dense["median_ms"] / blk["median_ms"],
        "causal_sdpa_vs_manual_speedup": get("causal", Tmax, "manual")["median_ms"] / get("causal", Tmax, "sdpa_causal")["median_ms"],
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

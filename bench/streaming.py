"""Streaming speech benchmark: time to each first packet, real-time factor and peak memory of the whole chain
Thinker -> Talker -> streaming Token2Wav, for Euler vs RK4 sampling and the hand-written vs fused attention.

Stages, all timed from the start of the request (the prompt already tokenised):
    prefill      the Thinker's prompt pass         first_text   the first reply token leaves
    first_codec  the Talker's first code           first_mel    the DiT's first mel chunk is final
    first_pcm    the first PCM chunk leaves (the goal is measured from first_text)
    stall        playback that starts with the first PCM chunk: total time it waits for a chunk not yet out
                 (0: the stream never runs dry, however short the first packet)
RTF = wall time of the whole request / seconds of audio produced. A last case repeats the default sampler with
a first DiT chunk as long as the others (3 blocks instead of 2), to show what the short first chunk buys.
Lengths are fixed so runs compare: the Thinker writes `--text-tokens` tokens and the Talker `--codes` codes (stop
ids suppressed). Weights are random: this measures speed, not speech. Each case runs in its own process, so its
peak memory is its own (CPU: resident-set growth; CUDA: torch.cuda.max_memory_allocated).

    python bench/streaming.py                                   # tiny preset, CPU: a table, then one JSON line
    python bench/streaming.py --preset qwen2_5_omni_7b          # the 7B-shaped model, on a GPU when present
    python bench/streaming.py --preset qwen2_5_omni_7b --layers 1   # 7B widths, one layer each (a CPU can hold it)
Goal for the tiny preset on a 2-core CPU: first PCM <= 150 ms after the first text token, RTF <= 0.25.
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

from common import few_layers, no_stop_ids

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stall_seconds(chunks: list[tuple[float, int]], rate: int) -> float:
    """Playback that starts with the first chunk and plays each one as soon as it is both due and there: the total
    time it waits for a chunk that has not left yet (0: the stream never runs dry). chunks: (time left, samples)."""
    clock, stall = None, 0.0
    for t, n in chunks:
        if clock is not None and t > clock:
            stall += t - clock
        clock = t if clock is None else max(clock, t)
        clock += n / rate
    return stall


def run_case(preset: str, solver: str, backend: str, text_tokens: int, codes: int, repeats: int, threads: int,
             layers: int = 0, first_chunk_blocks: int = 2) -> dict:
    import torch

    from nano_omni.attention import use_backend
    from nano_omni.config import get_config
    from nano_omni.omni import Omni, Voice
    from nano_omni.processor import Processor
    from nano_omni.tokenizer import ByteTokenizer
    from nano_omni.token2wav import FrameNoise

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(threads)
    cfg = get_config(preset)
    if layers:
        cfg = few_layers(cfg, layers)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Omni(cfg).eval()
    if dev == "cuda":   # bf16 for Thinker and Talker, fp32 for Token2Wav, as the official model runs
        model.thinker.to(torch.bfloat16)
        model.talker.to(torch.bfloat16)
    d = cfg.dit
    model.voices = {"v": Voice(min(cfg.tokens.max_id + 1, cfg.thinker.vocab_size - 1),
                               torch.randn(1, d.enc_emb_dim, device=dev), torch.randn(1, 300, d.mel_dim, device=dev))}
    tok = ByteTokenizer(cfg.tokens, cfg.thinker.vocab_size) if preset == "tiny" else None
    if tok is not None:
        x = Processor(cfg, tok)([{"role": "user", "content": "Please describe the picture in one short sentence."}])
    else:   # a 7B-shaped model has no byte tokenizer: a random 64-token text prompt does the same work
        from nano_omni.tmrope import text_positions
        ids = torch.randint(0, 150000, (1, 64))
        mask = torch.ones_like(ids)
        pos, deltas = text_positions(mask)
        from nano_omni.processor import OmniInputs
        x = OmniInputs(ids, mask, pos, deltas)
    x = x.to(dev)
    # the Talker may neither stop nor pick an id the DiT cannot read: every request is exactly `codes` long
    no_stop = no_stop_ids(cfg)
    talker_kw = dict(max_new_tokens=codes, stop_ids=[-1], suppress_ids=no_stop)
    thinker_kw = dict(max_new_tokens=text_tokens, stop_ids=[-1])
    t2w_kw = dict(solver=solver, steps=10 if solver == "rk4" else d.ode_steps, first_chunk_blocks=first_chunk_blocks)
    sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)

    def one_request() -> dict:
        v = model.voice("v")
        marks: dict[str, float] = {}
        chunks = []                                          # (time it left, samples)
        t0 = time.perf_counter()
        t2w = model.token2wav.session(v.cond, v.ref_mel, noise=FrameNoise(0, d.mel_dim, d.block_size), **t2w_kw)
        for kind, val in model._events(x, "v", thinker_kw, talker_kw, {}, 0):
            sync()
            now = time.perf_counter() - t0
            if kind == "text":
                marks.setdefault("first_text", now)
                continue
            marks.setdefault("first_codec", now)
            out = t2w.push(val.view(1, 1))
            sync()
            for pcm in out:
                chunks.append((time.perf_counter() - t0, pcm.numel()))
        for pcm in t2w.finish():
            chunks.append((time.perf_counter() - t0, pcm.numel()))
        sync()
        marks["total"] = time.perf_counter() - t0
        marks["first_mel"] = next(t for kind, t in t2w.marks if kind == "mel") - t0
        marks["first_pcm"] = chunks[0][0]
        marks["audio_s"] = sum(n for _, n in chunks) / cfg.vocoder.sample_rate
        marks["stall"] = stall_seconds(chunks, cfg.vocoder.sample_rate)
        return marks

    with torch.inference_mode(), use_backend(backend):
        # the Thinker's prefill alone, for the table
        def prefill():
            model.thinker(x.input_ids, x.attention_mask, positions=x.positions)
            sync()
        prefill()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss()
        runs = [one_request() for _ in range(repeats)]
        peak = (torch.cuda.max_memory_allocated() - base) if dev == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        pre = []
        for _ in range(max(3, repeats)):
            t = time.perf_counter()
            prefill()
            pre.append(time.perf_counter() - t)
    runs = runs[1:] if len(runs) > 1 else runs            # the first request warms caches and lazy kernels
    med = lambda k: statistics.median(r[k] for r in runs)
    ms = lambda s: round(1e3 * s, 2)
    return {"preset": preset, "layers": layers or None, "device": dev, "threads": threads if dev == "cpu" else None, "solver": solver,
            "ode_steps": t2w_kw["steps"], "backend": backend, "first_chunk_blocks": first_chunk_blocks,
            "prefill_ms": ms(statistics.median(pre)), "first_text_ms": ms(med("first_text")),
            "first_codec_ms": ms(med("first_codec")), "first_mel_ms": ms(med("first_mel")),
            "first_pcm_ms": ms(med("first_pcm")),
            "first_pcm_after_first_text_ms": ms(statistics.median(r["first_pcm"] - r["first_text"] for r in runs)),
            "stall_ms": ms(med("stall")),
            "audio_s": round(med("audio_s"), 3), "total_s": round(med("total"), 3),
            "rtf": round(statistics.median(r["total"] / r["audio_s"] for r in runs), 4),
            "peak_mb": round(max(peak, 0) / 2 ** 20, 1), "runs": len(runs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers, real widths (0: the preset's)")
    ap.add_argument("--text-tokens", type=int, default=24)
    ap.add_argument("--codes", type=int, default=250, help="speech codes per request (50 per second)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest for the tiny model)")
    ap.add_argument("--case", nargs=3, metavar=("SOLVER", "BACKEND", "FIRST_CHUNK_BLOCKS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.preset, a.case[0], a.case[1], a.text_tokens, a.codes, a.repeats, a.threads, a.layers,
                                  int(a.case[2]))))
        return
    rows = []
    from nano_omni.config import get_config

    default_solver = get_config(a.preset).dit.ode_solver
    # every solver x attention path with the default first chunk (2 blocks), then the default solver with a first
    # chunk as long as the others (3 blocks), to show what the shorter first chunk buys
    cases = [(s, b, 2) for s in ("euler", "rk4") for b in ("fused", "manual")] + [(default_solver, "fused", 3)]
    for solver, backend, first in cases:
        cmd = [sys.executable, __file__, "--case", solver, backend, str(first), "--preset", a.preset, "--text-tokens",
               str(a.text_tokens), "--codes", str(a.codes), "--repeats", str(a.repeats), "--threads", str(a.threads),
               "--layers", str(a.layers)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"case {solver}/{backend}/{first} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{solver:5s} {backend:6s} first chunk {first} blocks: first pcm {r['first_pcm_after_first_text_ms']:8.1f} ms "
              f"after first text, stalls {r['stall_ms']:.0f} ms, RTF {r['rtf']:.3f}, peak {r['peak_mb']:.0f} MB", flush=True)
    keys = ["solver", "ode_steps", "backend", "first_chunk_blocks", "prefill_ms", "first_text_ms", "first_codec_ms",
            "first_mel_ms", "first_pcm_ms", "first_pcm_after_first_text_ms", "stall_ms", "rtf", "peak_mb"]
    print()
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    default = rows[cases.index((default_solver, "fused", 2))]
    summary = {"bench": "streaming", "preset": a.preset, "layers": a.layers or None, "device": rows[0]["device"], "threads": rows[0]["threads"],
               "default_solver": default["solver"], "first_pcm_after_first_text_ms": default["first_pcm_after_first_text_ms"],
               "rtf": default["rtf"], "goal_first_pcm_ms": 150, "goal_rtf": 0.25,
               "meets_goals": default["first_pcm_after_first_text_ms"] <= 150 and default["rtf"] <= 0.25, "rows": rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

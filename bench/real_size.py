"""Real size, end to end: transformers writes a Qwen2.5-Omni of a given preset in the official on-disk format
(config.json + sharded safetensors + index, random weights from its own init), nano_omni's `from_pretrained` loads
it, and the loaded model answers one request with streamed speech.

What it measures, each in this one run:
    save      transformers' save_pretrained: seconds, GB on disk, shard count
    load      from_pretrained: seconds; peak accelerator memory during the load against the size of the weights it
              keeps (built on the meta device and filled shard by shard, so the ratio should be about 1.0)
    request   a 64-token text prompt, greedy: prefill, first text token, first PCM chunk, real-time factor of
              `--codes` codes of speech (stop ids suppressed so every run is the same length)
Weights are random: this proves the real-size path and measures it; it says nothing about speech quality.

    python bench/real_size.py                                  # the 7B preset, on a GPU (about 45 GB of free disk)
    python bench/real_size.py --preset qwen2_5_omni_3b
    python bench/real_size.py --preset tiny                    # the same path on a CPU in seconds
    python bench/real_size.py --layers 1                       # 7B widths, one layer each: a CPU in a minute
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import few_layers, no_stop_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # reference.py: the transformers builders


def write_official(cfg, directory: Path, device: str, shard: str) -> dict:
    """transformers' Qwen2.5-Omni with the numbers of `cfg`, its own random init, saved as the Hub lays it out."""
    from reference import hf_omni_config
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    t = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        hf = Qwen2_5OmniForConditionalGeneration._from_config(hf_omni_config(cfg), dtype=dtype).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    built = time.perf_counter() - t
    t = time.perf_counter()
    hf.save_pretrained(directory, max_shard_size=shard)
    saved = time.perf_counter() - t
    del hf
    files = list(directory.glob("*.safetensors"))
    return {"transformers_params": n_params, "build_s": round(built, 1), "save_s": round(saved, 1),
            "disk_gb": round(sum(f.stat().st_size for f in files) / 1e9, 2), "shards": len(files)}


def load(directory: Path, device: str, tokens) -> tuple[object, dict]:
    from nano_omni.pretrained import from_pretrained

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    model, _ = from_pretrained(directory, device=device,
                               dtype=torch.bfloat16 if device == "cuda" else torch.float32, tokens=tokens)
    secs = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    out = {"load_s": round(secs, 1), "weights_gb": round(weights / 1e9, 2)}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        out.update(peak_gpu_gb=round(peak / 1e9, 2), peak_over_weights=round(peak / weights, 3))
    return model, out


@torch.no_grad()
def request(model, device: str, text_tokens: int, codes: int) -> dict:
    from nano_omni.omni import Voice
    from nano_omni.processor import OmniInputs
    from nano_omni.tmrope import text_positions

    cfg = model.cfg
    d = cfg.dit
    g = torch.Generator().manual_seed(0)
    model.voices = {"v": Voice(min(cfg.tokens.max_id + 1, cfg.thinker.vocab_size - 1),
                               torch.randn(1, d.enc_emb_dim, generator=g).to(device),
                               torch.randn(1, 300, d.mel_dim, generator=g).to(device))}
    ids = torch.randint(0, min(cfg.thinker.vocab_size, 150000), (1, 64), generator=g)
    mask = torch.ones_like(ids)
    pos, deltas = text_positions(mask)
    x = OmniInputs(ids, mask, pos, deltas).to(device)
    no_stop = no_stop_ids(cfg)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once() -> dict:
        marks, samples = {}, 0
        t0 = time.perf_counter()
        for kind, val in model.stream(x, "v", thinker_kw=dict(max_new_tokens=text_tokens, stop_ids=[-1]),
                                      talker_kw=dict(max_new_tokens=codes, stop_ids=[-1], suppress_ids=no_stop)):
            sync()
            marks.setdefault("first_" + kind, time.perf_counter() - t0)
            samples += val.numel() if kind == "audio" else 0
        sync()
        marks["total"] = time.perf_counter() - t0
        marks["audio_s"] = samples / cfg.vocoder.sample_rate
        return marks

    once()                                   # warm-up: lazy kernels, allocator
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    m = once()
    t = time.perf_counter()
    model.thinker(x.input_ids, x.attention_mask, positions=x.positions)
    sync()
    ms = lambda s: round(1e3 * s, 1)   # noqa: E731
    out = {"prefill_ms": ms(time.perf_counter() - t), "first_text_ms": ms(m["first_text"]),
           "first_pcm_ms": ms(m["first_audio"]), "first_pcm_after_first_text_ms": ms(m["first_audio"] - m["first_text"]),
           "audio_s": round(m["audio_s"], 2), "rtf": round(m["total"] / m["audio_s"], 3)}
    if device == "cuda":
        out["peak_gpu_gb_during_request"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2_5_omni_7b")
    ap.add_argument("--dir", default="", help="where to write the checkpoint (default: a temporary folder, removed)")
    ap.add_argument("--shard", default="5GB", help="max_shard_size for save_pretrained")
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=0, help="fewer layers, real widths (0: the preset's)")
    ap.add_argument("--codes", type=int, default=150, help="speech codes in the request (50 per second)")
    a = ap.parse_args()
    from nano_omni.config import get_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = get_config(a.preset)
    cfg = few_layers(cfg, a.layers) if a.layers else cfg
    directory = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="nano_omni_real_size_"))
    try:
        row = {"bench": "real_size", "preset": a.preset, "layers": a.layers or None, "device": device,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
        row.update(write_official(cfg, directory, device, a.shard))
        print(f"saved: {row}", flush=True)
        model, stats = load(directory, device, cfg.tokens)   # the preset's special ids (official ones for 3B/7B)
        row.update(stats)
        row["nano_omni_params"] = sum(p.numel() for p in model.parameters())
        print(f"loaded: {stats}", flush=True)
        row.update(request(model, device, a.text_tokens, a.codes))
    finally:
        if not a.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()

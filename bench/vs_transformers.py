"""nano_omni against transformers' Qwen2.5-Omni: same configuration, same weights, same machine, same run.

    1 train     Thinker training step (forward + backward, text batch): tokens per second
    2 decode    KV-cached greedy decoding of the Thinker: new tokens per second
    3 speech    time to the first audio of a spoken reply of `--reply-seconds` (10 s by default): nano_omni streams
                (first PCM chunk), transformers returns the whole utterance at once (its first audio is all of it)

Both models run in fp32 with the same random weights (moved into nano_omni through its checkpoint loader), the
same attention kernel family (PyTorch SDPA: transformers is switched to its "sdpa" attention, its fastest on a CPU;
the parity tests run it on "eager"), one process at a time. Medians of several repetitions; the table
gives the times and the ratios, the last line is JSON.

    python bench/vs_transformers.py                 # the tiny training configuration on this CPU
    python bench/vs_transformers.py --preset qwen2_5_omni_7b --layers 2    # 7B-shaped layers, on a GPU if present
    python bench/vs_transformers.py --compile       # opt-in: both Thinker decoders torch.compile'd (minutes of compiling)
Goals: training throughput >= 1.5x, decoding >= 3x, first audio >= 10x sooner on a 10-second reply.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import few_layers, no_stop_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # reference.py: the transformers builders

HF_ATTENTION = "sdpa"   # transformers' attention kernel here: PyTorch SDPA, the fastest it offers on a CPU


def _timeit(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def build(preset: str, layers: int | None, device):
    from reference import hf_omni

    from nano_omni.checkpoint import load_weights
    from nano_omni.omni import Omni, Voice

    if preset == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from train_tiny import model_config
        cfg = model_config("tiny")
    else:
        from nano_omni.config import get_config
        cfg = get_config(preset)
    if layers:
        cfg = few_layers(cfg, layers)
    with torch.device(device):
        hf = hf_omni(cfg, seed=0).to(device)
        ours = Omni(cfg).to(device).eval()
    # the parity tests run transformers on its "eager" attention; a speed comparison gives it its fastest kernel
    hf.set_attn_implementation(HF_ATTENTION)
    load_weights(ours, hf.state_dict(), source="transformers Qwen2.5-Omni")
    g = torch.Generator().manual_seed(1)
    cond, ref = torch.randn(1, cfg.dit.enc_emb_dim, generator=g), torch.randn(1, 100, cfg.dit.mel_dim, generator=g)
    spk = min(cfg.tokens.max_id + 1, cfg.thinker.vocab_size - 1)
    hf.speaker_map = {"v": {"bos_token": spk, "cond": cond.to(device), "ref_mel": ref.to(device)}}
    ours.voices = {"v": Voice(spk, cond.to(device), ref.to(device))}
    return cfg, hf, ours


def bench_train(cfg, hf, ours, device, batch: int, seq: int, repeats: int, sync) -> dict:
    ids = torch.randint(0, min(cfg.thinker.vocab_size, 250), (batch, seq), device=device)
    mask = torch.ones_like(ids)
    hf.thinker.train()
    ours.thinker.train()

    def step(model, forward):
        model.zero_grad(set_to_none=True)
        logits = forward()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()

    t_hf = _timeit(lambda: step(hf.thinker, lambda: hf.thinker(input_ids=ids, attention_mask=mask).logits), repeats, sync)
    t_ours = _timeit(lambda: step(ours.thinker, lambda: ours.thinker(ids, mask).logits), repeats, sync)
    hf.thinker.eval()
    ours.thinker.eval()
    n = batch * seq
    return {"tokens": n, "transformers_tok_s": n / t_hf, "nano_omni_tok_s": n / t_ours, "speedup": t_hf / t_ours}


@torch.no_grad()
def bench_decode(cfg, hf, ours, device, prompt: int, new: int, repeats: int, sync) -> dict:
    ids = torch.randint(0, min(cfg.thinker.vocab_size, 250), (1, prompt), device=device)
    mask = torch.ones_like(ids)
    run_hf = lambda: hf.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False, eos_token_id=None)
    run_ours = lambda: ours.thinker.generate(ids, mask, max_new_tokens=new, stop_ids=[-1])
    a, b = run_hf()[0, prompt:], run_ours().tokens[0]
    same = bool(torch.equal(a, b))
    t_hf = _timeit(run_hf, repeats, sync)
    t_ours = _timeit(run_ours, repeats, sync)
    return {"new_tokens": new, "transformers_tok_s": new / t_hf, "nano_omni_tok_s": new / t_ours,
            "speedup": t_hf / t_ours, "same_tokens": same,
            "transformers_ops_per_token": ops_per_token(lambda n: hf.thinker.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                eos_token_id=None), new),
            "nano_omni_ops_per_token": ops_per_token(lambda n: ours.thinker.generate(ids, mask, max_new_tokens=n,
                                                                                     stop_ids=[-1]), new)}


def ops_per_token(generate, new: int) -> float:
    """PyTorch operator calls per decoding step (what the dispatcher sees, views included): the calls of
    generate(new) minus those of generate(1) (the prompt's), over new - 1. A noise-free count of the work each step
    hands to PyTorch; at small widths the step's time follows it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    calls = []
    for n in (1, new):
        Count.n = 0
        with torch.no_grad(), Count():
            generate(n)
        calls.append(Count.n)
    return (calls[1] - calls[0]) / (new - 1)


@torch.no_grad()
def bench_speech(cfg, hf, ours, device, reply_s: float, repeats: int, sync) -> dict:
    """First audio of a spoken reply of reply_s seconds (50 codes per second), same work on both sides.

    Both sides: a 24-token prompt (left-padded by one), a 16-token greedy reply, a greedy Talker that runs exactly n_codes steps (the
    stop codes and the ids the DiT cannot read are suppressed, so no row stops early), repetition penalty 1.05,
    and a DiT with 10-point RK4, guidance 0.5, sway -1. transformers returns the whole waveform at once;
    nano_omni's clock stops at its first PCM chunk.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    from nano_omni.processor import OmniInputs
    from nano_omni.tmrope import text_positions

    n_codes, n_text = int(50 * reply_s), 16
    tc = cfg.talker
    ids = torch.randint(0, min(cfg.thinker.vocab_size, 250), (1, 25), device=device)
    # one left pad: transformers 5.24's generate drops an all-ones attention mask, and its Talker then skips the
    # codec pad/bos embeddings and TMRoPE of its first step (see tests/test_pretrained.py); with a pad both sides
    # take the path transformers' own Talker.forward defines
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    never = no_stop_ids(cfg)
    ode = dict(steps=10, solver="rk4", guidance=0.5, sway=-1.0)

    class Suppress(LogitsProcessor):
        # transformers' generate() already passes suppress_tokens=[codec_bos] to the Talker, so the other ids
        # are suppressed by a processor of our own (generate() refuses a second SuppressTokensLogitsProcessor)
        def __call__(self, input_ids, scores):
            scores[:, never] = float("-inf")
            return scores

    hf_codes = []

    def run_hf():
        return hf.generate(input_ids=ids, attention_mask=mask, speaker="v", thinker_max_new_tokens=n_text,
                           thinker_eos_token_id=[-1], talker_max_new_tokens=n_codes, talker_do_sample=False,
                           talker_repetition_penalty=1.05, talker_eos_token_id=[tc.codec_eos],
                           talker_logits_processor=LogitsProcessorList([Suppress()]),
                           token2wav_num_steps=ode["steps"], token2wav_guidance_scale=ode["guidance"],
                           token2wav_sway_coefficient=ode["sway"])

    pos, deltas = text_positions(mask)
    x = OmniInputs(ids, mask, pos.to(device), deltas.to(device))

    def first_pcm():
        t0 = time.perf_counter()
        for kind, _ in ours.stream(x, "v", thinker_kw=dict(max_new_tokens=n_text, stop_ids=[-1]),
                                   talker_kw=dict(do_sample=False, repetition_penalty=1.05, max_new_tokens=n_codes,
                                                  suppress_ids=never, stop_ids=[-1]), t2w_kw=ode):
            if kind == "audio":
                sync()
                return time.perf_counter() - t0
        raise RuntimeError("no audio was produced")

    # one checked run of each, outside the timings: transformers' codes are caught on their way into its
    # Token2Wav, ours as the Talker yields them (up to the first PCM chunk)
    ours_codes = []
    t2w_forward, talker_stream = hf.token2wav.forward, ours.talker.stream
    hf.token2wav.forward = lambda code, *a, **k: (hf_codes.append(code), t2w_forward(code, *a, **k))[1]
    ours.talker.stream = lambda *a, **k: (ours_codes.append(c) or c for c in talker_stream(*a, **k))
    try:
        _, wav = run_hf()
        first_pcm()
    finally:
        del hf.token2wav.forward, ours.talker.stream
    ours_seen = torch.stack(ours_codes, 1)                                           # (1, codes before first audio)
    same = bool(torch.equal(hf_codes[0][:, : ours_seen.shape[1]].cpu(), ours_seen.cpu()))
    t_hf = _timeit(run_hf, max(1, repeats // 2), sync)
    t_ours = statistics.median(first_pcm() for _ in range(repeats))
    return {"reply_seconds": reply_s, "text_tokens": n_text, "codes": n_codes,
            "transformers_codes": int(hf_codes[0].shape[1]), "transformers_audio_s": wav.shape[-1] / cfg.vocoder.sample_rate,
            "codes_before_first_audio": int(ours_seen.shape[1]), "same_codes": same, "ode": ode,
            "transformers_first_audio_s": t_hf, "nano_omni_first_audio_s": t_ours, "speedup": t_hf / t_ours}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=0, help="override the layer counts (0: the preset's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reply-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the Thinker's decoder stack on BOTH sides (nn.Module.compile, in place) before "
                         "measuring; off by default: the eager path is the one the tests check")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg, hf, ours = build(a.preset, a.layers or None, device)
    if a.compile:
        # the same switch for both: each side's Thinker decoder stack, compiled where it sits (state-dict keys
        # unchanged); compilation happens in the warm-up calls, which the timings leave out
        ours.thinker.model.compile()
        hf.thinker.model.language_model.compile()
    rows = {"train": bench_train(cfg, hf, ours, device, a.batch, a.seq, a.repeats, sync),
            "decode": bench_decode(cfg, hf, ours, device, 32, a.new_tokens, a.repeats, sync),
            "speech": bench_speech(cfg, hf, ours, device, a.reply_seconds, a.repeats, sync)}
    mode = "both Thinker decoders torch.compile'd" if a.compile else "eager"
    print(f"| measure (transformers on {HF_ATTENTION} attention, {mode}) | transformers | nano_omni | ratio |")
    print("|---|---:|---:|---:|")
    r = rows["train"]
    print(f"| Thinker training step, tokens/s | {r['transformers_tok_s']:.0f} | {r['nano_omni_tok_s']:.0f} | {r['speedup']:.2f}x |")
    r = rows["decode"]
    print(f"| KV-cached decoding, tokens/s | {r['transformers_tok_s']:.0f} | {r['nano_omni_tok_s']:.0f} | {r['speedup']:.2f}x |")
    print(f"| PyTorch operator calls per decoded token | {r['transformers_ops_per_token']:.0f} | "
          f"{r['nano_omni_ops_per_token']:.0f} | {r['transformers_ops_per_token'] / r['nano_omni_ops_per_token']:.2f}x fewer |")
    r = rows["speech"]
    print(f"| first audio of a {r['reply_seconds']:.0f}-s reply, s | {r['transformers_first_audio_s']:.2f} | "
          f"{r['nano_omni_first_audio_s']:.3f} | {r['speedup']:.1f}x sooner |")
    summary = {"bench": "vs_transformers", "preset": a.preset, "layers": a.layers or None, "device": device,
               "threads": a.threads if device == "cpu" else None,
               "transformers_attention": HF_ATTENTION, "compiled": a.compile, **rows,
               "goals": {"train": 1.5, "decode": 3.0, "first_audio": 10.0},
               "meets_goals": rows["train"]["speedup"] >= 1.5 and rows["decode"]["speedup"] >= 3.0
               and rows["speech"]["speedup"] >= 10.0}
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()

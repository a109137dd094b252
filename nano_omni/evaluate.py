"""Evaluate a trained tiny model on the held-out split of tiny_data.

    python -m nano_omni.evaluate                               # runs/tiny/checkpoint; prints a table and a JSON line
    python -m nano_omni.evaluate --checkpoint DIR --write-readme README.md
    python -m nano_omni.evaluate --checkpoint R/checkpoint --readouts   # after `train_tiny.py --out R --stage 1`
    python -m nano_omni.evaluate --checkpoint DIR --tasks asr --seeds 0,1,2   # the speech half, over three seeds
    python -m nano_omni.evaluate --checkpoint DIR --tasks asr --judge checkpoints/tiny  # heard by a fixed judge
    python -m nano_omni.evaluate --checkpoint DIR --no-speech --split train  # the training items: memorised or learnt?

1. Understanding: exact-match accuracy per task (greedy answers), with the count right of asked and Wilson's 95 %
   interval.
2. Speech: every voice speaks every held-out transcript (Thinker -> Talker -> DiT -> BigVGAN, the official sampling
   defaults with a fixed seed, or once per seed of --seeds); the trained Thinker transcribes it back (or, with
   --judge, another checkpoint's Thinker); word error rate per voice, beside that of the voice's own held-out
   recordings heard by the same ear (the floor its speech meets). Also the mel distance (DTW-aligned mean
   absolute difference of log mels) to the real recording of that text by that voice.
3. The chain, part by part: the real held-out recordings -> their mel -> BigVGAN or Griffin-Lim, and -> their codec
   codes -> DiT -> BigVGAN (the chain without the Talker) or -> the codes' centroids -> Griffin-Lim (what the codes
   alone hold) -> transcribed -> word error rate, and the mel distance to the original. Read with 2, this says
   which part loses the words.
The README's results table is written by --write-readme, between the markers it already holds. --readouts measures
only what each encoder knows alone, through stage 1's readouts (nano_omni/readout.py). --split train asks the
understanding tasks' training items instead of the held-out ones: a task answered far better there than held out
has been memorised, not learnt (video_cue_colour, whose 400 training clips are never drawn anew, can be).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .audio_io import resample
from .codec import SpeechCodec
from .data import IMAGE_PIXELS, ROOT, SYSTEM, TASKS, VIDEO_PIXELS, ThinkerData, load_examples, load_speech
from .mel import griffin_lim
from .processor import Processor
from .tokenizer import chat_template

ASR_QUESTION = "what does the voice say?"


def word_error_rate(ref: str, hyp: str) -> float:
    """Word-level edit distance / number of reference words.

    >>> word_error_rate("three seven one", "three seven"), word_error_rate("red", "red")
    (0.3333333333333333, 0.0)
    """
    r, h = ref.split(), hyp.split()
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(1, len(r))


def wilson_interval(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % confidence interval (Wilson's score interval) of an accuracy measured as `right` of `n`.

    A held-out task here has 60 questions, so one answer is 1.7 points and a measured 93.3 % is consistent with a
    true accuracy anywhere from about 84 to 97 %: read the table's gaps to the 95 % target with it. Wilson's
    interval, unlike the textbook p +- z sqrt(p (1 - p) / n), stays inside [0, 1] and is not empty at 0 or n right.

    >>> [round(x, 3) for x in wilson_interval(56, 60)]
    [0.841, 0.974]
    >>> [round(x, 3) for x in wilson_interval(60, 60)]
    [0.94, 1.0]
    """
    if not 0 <= right <= n or n <= 0:
        raise ValueError(f"wilson_interval: need 0 <= right <= n and n > 0, got right={right}, n={n}")
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def dtw_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a_i - b_j| (per mel bin) along the cheapest monotone alignment of frames a (Ta, m) and b (Tb, m)."""
    cost = torch.cdist(a.float(), b.float(), p=1).numpy() / a.shape[1]
    Ta, Tb = cost.shape
    acc = np.full((Ta + 1, Tb + 1), np.inf)
    steps = np.zeros((Ta + 1, Tb + 1))
    acc[0, 0] = 0.0
    for i in range(1, Ta + 1):
        for j in range(1, Tb + 1):
            k = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))
            pi, pj = ((i - 1, j - 1), (i - 1, j), (i, j - 1))[k]
            acc[i, j] = cost[i - 1, j - 1] + acc[pi, pj]
            steps[i, j] = steps[pi, pj] + 1
    return float(acc[Ta, Tb] / steps[Ta, Tb])


def _clean(tok, ids) -> str:
    return tok.decode(ids, skip_special=True).strip()      # pad and <|im_end|> are special tokens


@torch.no_grad()
def answers(model, data: ThinkerData, idx: list[int], max_new_tokens: int = 24, batch: int = 32,
            positions: str = "tmrope") -> list[str]:
    """Greedy answers. positions="sequential": plain 1-D ids, for a model trained that way (the TMRoPE lesson)."""
    from .tmrope import text_positions

    out = []
    for k in range(0, len(idx), batch):
        x = data.prompts(idx[k: k + batch]).to(model.device)
        if positions == "sequential":
            x.positions, x.rope_deltas = (t.to(x.input_ids.device) for t in text_positions(x.attention_mask))
        gen = model.thinker.generate_from(x, max_new_tokens=max_new_tokens)
        out += [_clean(data.tok, row) for row in gen.tokens]
    return out


@torch.no_grad()
def transcribe(model, proc: Processor, wavs_24k: list[torch.Tensor], batch: int = 16) -> list[str]:
    """The Thinker as a speech recogniser: 24-kHz waveforms -> their text."""
    texts = []
    for k in range(0, len(wavs_24k), batch):
        convs = [[{"role": "user", "content": [{"type": "audio", "audio": (resample(w.cpu(), 24000, 16000).numpy(), 16000)},
                                                ASR_QUESTION]}] for w in wavs_24k[k: k + batch]]
        x = proc(convs, system=SYSTEM).to(model.device)
        gen = model.thinker.generate_from(x, max_new_tokens=40)
        texts += [_clean(proc.tok, row) for row in gen.tokens]
    return texts


def speak(model, tok, text: str, voice: str, seed: int = 0, max_codes: int = 500) -> torch.Tensor:
    """A 24-kHz waveform of `voice` saying `text` (the tiny models' speaking prompt, as in training). At most
    `max_codes` codes (10 s): a Talker that never stops is heard babbling, not left to fill its context."""
    from .data import SYSTEM as system

    prompt = tok.encode(chat_template([{"role": "user", "content": f"say: {text}"}], system=system))
    return model.say(torch.tensor([prompt], device=model.device), tok.encode(text), voice, seed=seed,
                     talker_kw={"max_new_tokens": max_codes})[1].cpu()


@torch.no_grad()
def evaluate(model, tok, *, root=ROOT, per_task: int = 0, per_voice: int = 0, seed: int = 0, tasks=None,
             positions: str = "tmrope", with_speech: bool = True, codec=None, seeds: list[int] | None = None,
             judge: tuple | None = None, split: str = "test") -> dict:
    """Held-out accuracy per task, then (with_speech) the speech half judged by the model's own Thinker: generated
    speech per voice, and the real test recordings through each part of the chain (their mel through BigVGAN and
    Griffin-Lim; with `codec`, a SpeechCodec, their codes through the DiT and BigVGAN), so that where
    intelligibility is lost can be read off. seeds: speak every text once per sampling seed (the Talker samples,
    and one seed moves a voice's word error rate by several points); the figures are then means over the seeds,
    each seed's word error rate kept in `wer_by_seed`. Default: [seed]. judge: (model, tokenizer) whose Thinker
    transcribes the speech instead of `model`'s own: one fixed judge makes the speech figures of two models
    comparable (each model's own Thinker hears differently; README, "The shipped tiny model"). split: the
    split the understanding tasks are asked from ("test", or "train" to see what was memorised); the speech
    measurements always use the held-out recordings."""
    seeds = list(seeds) if seeds else [seed]
    model.eval()
    cfg = model.cfg
    proc = Processor(cfg, tok, image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS)
    ear, ear_proc = model, proc
    if judge is not None:
        ear = judge[0].eval()
        ear_proc = Processor(ear.cfg, judge[1], image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS)
    t0 = time.time()
    # 1. understanding
    ex = load_examples(split, root, tasks=tasks)
    by_task = defaultdict(list)
    for e in ex:
        by_task[e["task"]].append(e)
    acc, asked = {}, {}
    for task, items in sorted(by_task.items()):
        items = items[:per_task] if per_task else items
        data = ThinkerData(items, proc, tok, root)
        got = answers(model, data, list(range(len(items))), positions=positions)
        acc[task] = sum(g == e["answer"] for g, e in zip(got, items)) / len(items)
        asked[task] = len(items)
    # 2. speech, per voice; 3. vocoder vs Griffin-Lim on the real recordings
    utts = load_speech("test", root)
    speech = {}
    voc = {"bigvgan": [], "griffin_lim": []}
    if with_speech and getattr(model, "voices", None):
        mel_of = SpeechCodec(torch.zeros(1, 2 * cfg.dit.mel_dim), cfg.dit.repeats, cfg.vocoder).mel
        for v in sorted(model.voices):
            mine = [u for u in utts if u["speaker"] == v]
            mine = mine[:per_voice] if per_voice else mine
            if not mine:
                continue
            by_seed, dist, examples = {}, [], None
            for s in seeds:
                wavs = [speak(model, tok, u["transcript"], v, s) for u in mine]
                heard = transcribe(ear, ear_proc, [w if w.numel() > 2400 else torch.zeros(2400) for w in wavs])
                by_seed[s] = float(np.mean([word_error_rate(u["transcript"], h) for u, h in zip(mine, heard)]))
                dist += [dtw_distance(mel_of(w), mel_of(u["wav"])) for w, u in zip(wavs, mine) if w.numel() > 2400]
                examples = examples or [{"text": u["transcript"], "heard": h} for u, h in zip(mine[:3], heard[:3])]
            speech[v] = {"wer": float(np.mean(list(by_seed.values()))), "wer_by_seed": by_seed,
                         "mel_distance": float(np.mean(dist)) if dist else None, "n": len(mine), "examples": examples}
        real = utts[: (per_voice * 4) if per_voice else len(utts)]
        mels = [mel_of(u["wav"]) for u in real]
        runs = {"bigvgan": [model.token2wav.code2wav_bigvgan_model(m.T[None].to(model.device))[0].cpu() for m in mels],
                "griffin_lim": [griffin_lim(m.T[None], cfg.vocoder)[0] for m in mels]}
        if codec is not None:   # the recordings' own codes: the chain without the Talker, and what the codes hold
            codes = [codec.encode(u["wav"]) for u in real]
            voices = [model.voice(u["speaker"]) for u in real]
            runs["codes_dit_bigvgan"] = [model.token2wav(c.to(model.device)[None], v.cond, v.ref_mel)[0].cpu()
                                         for c, v in zip(codes, voices)]
            runs["codes_centroids_griffin_lim"] = [griffin_lim(codec.decode_mel(c).T[None], cfg.vocoder)[0]
                                                   for c in codes]
        for name, ws in runs.items():
            heard = transcribe(ear, ear_proc, ws)
            voc[name] = {"wer": float(np.mean([word_error_rate(u["transcript"], h) for u, h in zip(real, heard)])),
                         "mel_distance": float(np.mean([dtw_distance(mel_of(w), m) for w, m in zip(ws, mels)]))}
        asr_real = transcribe(ear, ear_proc, [u["wav"] for u in real])
        voc["real_recordings_wer"] = float(np.mean([word_error_rate(u["transcript"], h) for u, h in zip(real, asr_real)]))
        for v in speech:   # each voice's own recordings, by the same ear: the floor its generated speech meets
            own = [word_error_rate(u["transcript"], h) for u, h in zip(real, asr_real) if u["speaker"] == v]
            speech[v]["recordings_wer"] = float(np.mean(own)) if own else None
    return {"accuracy": acc, "asked": asked, "split": split, "speech": speech, "vocoder": voc,
            "seconds": round(time.time() - t0, 1)}


def table(res: dict) -> str:
    which = "training" if res.get("split") == "train" else "held-out"
    lines = [f"| {which} task | exact match | right / asked | 95 % interval |", "|---|---:|---:|---:|"]
    for t, a in res["accuracy"].items():
        n = res["asked"][t]
        right = round(a * n)
        lo, hi = wilson_interval(right, n)
        lines.append(f"| {t} | {100 * a:.1f} % | {right} / {n} | {100 * lo:.1f}–{100 * hi:.1f} % |")
    if res["speech"]:
        seeds = list(next(iter(res["speech"].values()))["wer_by_seed"])
        wer = "word error rate of generated speech" + (f" (mean; seeds {' / '.join(map(str, seeds))})"
                                                        if len(seeds) > 1 else "")
        lines += ["", f"| voice | {wer} | its recordings, heard | mel distance to the recording |",
                  "|---|---:|---:|---:|"]
        for v, s in res["speech"].items():
            md = "–" if s["mel_distance"] is None else f"{s['mel_distance']:.3f}"
            own = "–" if s.get("recordings_wer") is None else f"{100 * s['recordings_wer']:.1f} %"
            each = f" ({' / '.join(f'{100 * w:.1f}' for w in s['wer_by_seed'].values())})" if len(seeds) > 1 else ""
            lines.append(f"| {v} | {100 * s['wer']:.1f} %{each} | {own} | {md} |")
    if res["vocoder"].get("bigvgan"):
        lines += ["", "| the held-out recordings, through | word error rate | mel distance |", "|---|---:|---:|"]
        for name, label in (("bigvgan", "their mel -> BigVGAN"), ("griffin_lim", "their mel -> Griffin-Lim"),
                            ("codes_dit_bigvgan", "their codec codes -> DiT -> BigVGAN"),
                            ("codes_centroids_griffin_lim", "their codec codes -> centroids' mel -> Griffin-Lim")):
            if name in res["vocoder"]:
                r = res["vocoder"][name]
                lines.append(f"| {label} | {100 * r['wer']:.1f} % | {r['mel_distance']:.3f} |")
        lines.append(f"| (the recordings themselves) | {100 * res['vocoder']['real_recordings_wer']:.1f} % | 0 |")
    return "\n".join(lines)


RESULTS_MARKERS = ("<!-- results:begin -->", "<!-- results:end -->")


def has_results_markers(doc: str) -> bool:
    """Whether the text `doc` holds both markers `write_readme` writes between."""
    return all(m in doc for m in RESULTS_MARKERS)


def write_readme(path: Path, text: str) -> None:
    from .checkpoint import atomic_write_bytes

    begin, end = RESULTS_MARKERS
    doc = path.read_text()
    if not has_results_markers(doc):
        raise ValueError(f"{path} has no {begin} ... {end} markers to write the results between")
    head, rest = doc.split(begin, 1)
    atomic_write_bytes(path, (head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]).encode())


def main(argv=None):
    from .pretrained import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/tiny/checkpoint")
    ap.add_argument("--per-task", type=int, default=0, help="examples per task (0: all)")
    ap.add_argument("--per-voice", type=int, default=0, help="utterances per voice (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="comma-separated sampling seeds: every voice speaks every text once per seed, "
                                    "the table gives the mean and each seed's word error rate (default: --seed)")
    ap.add_argument("--tasks", help="comma-separated understanding tasks (default: all)")
    ap.add_argument("--positions", choices=["tmrope", "sequential"], default="tmrope",
                    help="the position ids the model was trained with")
    ap.add_argument("--no-speech", action="store_true", help="skip the speech measurements")
    ap.add_argument("--split", choices=["test", "train"], default="test",
                    help="the items the understanding tasks are asked from (train: with --no-speech, not for the README)")
    ap.add_argument("--readouts", action="store_true",
                    help="only what each encoder knows alone, read out through the LLM's output layer (stage 1's "
                         "readouts, nano_omni/readout.py; for a checkpoint right after stage 1)")
    ap.add_argument("--judge", metavar="CHECKPOINT",
                    help="transcribe the speech with this checkpoint's Thinker instead of the evaluated model's own "
                         "(one fixed judge makes two models' speech figures comparable)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the README's figures), cuda, mps or auto")
    ap.add_argument("--write-readme", metavar="README", help="write the table into this file between its markers")
    ap.add_argument("--json", metavar="PATH", help="also save the full results here")
    a = ap.parse_args(argv)
    seeds = None                     # checked before the model is loaded
    if a.seeds:
        try:
            seeds = [int(x) for x in a.seeds.split(",")]
        except ValueError:
            ap.error(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {a.seeds!r}")
    tasks = set(a.tasks.split(",")) if a.tasks else None
    if tasks and tasks - set(TASKS):
        ap.error(f"--tasks: unknown task(s) {sorted(tasks - set(TASKS))}; the tasks are {', '.join(TASKS)}")
    if a.split == "train" and (not a.no_speech or a.write_readme or a.readouts):
        ap.error("--split train asks only the understanding tasks' training items: give --no-speech, "
                 "and neither --write-readme (the README holds held-out figures) nor --readouts")
    if a.threads < 0:
        ap.error(f"--threads must be 0 (torch's default) or more, got {a.threads}")
    for flag, ck in (("--checkpoint", a.checkpoint), ("--judge", a.judge)):
        if ck is not None and not Path(ck).is_dir():
            ap.error(f"{flag} {ck}: no such model directory")
    if a.write_readme:                # the outputs are checked before the minutes of measuring, not after
        doc = Path(a.write_readme)
        if not doc.is_file() or not has_results_markers(doc.read_text()):
            ap.error(f"--write-readme {a.write_readme}: needs an existing file holding the "
                     f"{' ... '.join(RESULTS_MARKERS)} markers")
    if a.json and (Path(a.json).is_dir() or not Path(a.json).resolve().parent.is_dir()):
        ap.error(f"--json {a.json}: cannot be written (a folder, or its folder does not exist)")
    from .training import pick_device

    try:
        device = pick_device(a.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.checkpoint, dtype=torch.float32, device=device)
    if a.readouts:
        from .readout import readout_accuracy

        proc = Processor(model.cfg, tok, image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS)
        res = {k: round(100 * v, 1) for k, v in readout_accuracy(model.eval(), tok, proc).items()}
        print(f"read out through the output layer, exact match in %: {res}")
        print(json.dumps({"readouts": res}))
        return
    judge = load_model(a.judge, dtype=torch.float32, device=model.device) if a.judge else None
    codec_file = Path(a.checkpoint) / "codec.safetensors"
    codec = SpeechCodec.load(codec_file) if codec_file.is_file() else None
    res = evaluate(model, tok, per_task=a.per_task, per_voice=a.per_voice, seed=a.seed, seeds=seeds,
                   tasks=tasks, positions=a.positions,
                   with_speech=not a.no_speech, codec=codec, judge=judge, split=a.split)
    if a.judge:
        res["judge"] = a.judge
    text = table(res)
    print(text)
    print(json.dumps(res))           # printed before the files are written: a failed write loses no result
    if a.write_readme:
        cmd = (f"python -m nano_omni.evaluate --checkpoint {a.checkpoint}" + (f" --seeds {a.seeds}" if a.seeds else "")
               + (f" --judge {a.judge}" if a.judge else ""))
        write_readme(Path(a.write_readme), f"Measured by `{cmd}`:\n\n" + text)
    if a.json:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(a.json), json.dumps(res, indent=2).encode())


if __name__ == "__main__":
    main()

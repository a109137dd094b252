"""Generate tiny_data/: the toy dataset the tiny Qwen2.5-Omni learns from on a laptop CPU.

    python tiny_data/make_data.py            # rewrites tiny_data/{speech,images,video}/ and the three manifests

What it makes (details and measured sizes in tiny_data/README.md):
  speech/   FLAC, mono 16 kHz int16: four flite voices (slt, rms, awb, kal16) saying digit strings, numbers
            zero..twenty, colours, shapes, "<colour> <shape>" and short phrases.
  images/   84x84 PNG: 1-3 copies of one shape in one colour on black.
  video/    4-s clips: 8 frames at 2 fps (56x56, uint8 .npz) of a shape whose colour changes, and a FLAC track
            that is silent except for one voice saying the cue word "now".
  train.jsonl, test.jsonl: one example per line, {"id", "task", "question", "answer", media paths, metadata}.
  speech.jsonl: every utterance with speaker, transcript, path and split (for the codec / Talker / DiT / vocoder).

Only generation needs flite (`apt-get install flite`); the committed files are all a training run reads.
Everything is seeded: a rerun with the same flite, libsndfile and pillow writes byte-identical files (the .npz
files are written with a fixed zip timestamp for that reason).

Design choices that keep each task learnable by a tiny model (and honest about generalisation):
  * every number is a lower-case English word ("seven", never "7"), in questions, answers and transcripts;
  * held-out test items are new: digit strings and five "<colour> <shape>" pairs never spoken in train, fresh
    prosody (flite duration stretch and pitch) for the closed-vocabulary words, new images and clips, text
    questions never asked in train (for addition: each sum is in train under other wordings);
  * video colour changes fall on whole seconds, because the vision encoder pairs frames (temporal patch 2 at
    2 fps): one temporal token then shows one colour, and the cue's midpoint is >= 0.3 s from any change.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from nano_omni.toy import (COLOURS, CUE_WORD, DIGITS, NUMBERS, PAD_S, PICTURE_QUESTIONS, SHAPES, TEXT_QUESTIONS,
                           VIDEO_FPS, VIDEO_QUESTION, VIDEO_SECONDS, clip_scene, cue_track, draw_picture,
                           picture_answer, render_clip, window)

SR = 16000
VOICES = ("slt", "rms", "awb", "kal16")
# flite's int_f0_target_mean moves the pitch of these voices (rms ignores it; its renderings vary in tempo only).
F0_BASE = {"slt": 170.0, "awb": 131.0, "kal16": 97.0}
PHRASES = ("hello there", "good morning", "good night", "thank you", "see you later", "how are you",
           "yes please", "no thanks")
PEAK = 0.8               # every utterance is scaled to this peak so the four voices are equally loud

# Per voice: how many utterances of each kind go to each split.
N_DIGIT_STRINGS = {"train": 50, "test": 10}
N_NUMBERS_TEST, N_COLOURS_TEST, N_SHAPES_TEST, N_PAIRS_TEST, N_PHRASES_TEST = 4, 2, 2, 3, 2
N_HELD_OUT_PAIRS = 5     # "<colour> <shape>" pairs heard only in test
N_IMAGES = {"train": 400, "test": 60}
N_VIDEOS = {"train": 400, "test": 60}
N_TEXT = {"train": 400, "test": 60}

QUESTIONS = {
    "asr": "what does the voice say?",
    **PICTURE_QUESTIONS,
    "video_cue_colour": VIDEO_QUESTION,
}
ADD_TEMPLATES = ("what is {a} plus {b}?", "add {a} and {b}.", "{a} and {b} make what?")


# ----------------------------------------------------------------------------------------------------------------
# Speech with flite.
# ----------------------------------------------------------------------------------------------------------------
def check_flite() -> str:
    """flite's version line; exits with the install command if flite or one of the voices is missing."""
    if shutil.which("flite") is None:
        raise SystemExit("make_data.py needs flite to synthesise speech: apt-get install -y flite")
    listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
    missing = [v for v in VOICES if v not in listed]
    if missing:
        raise SystemExit(f"flite lacks the voices {missing} (it lists {listed[2:]}); install Debian's flite 2.2")
    lines = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout.splitlines()
    return next(line.strip() for line in lines if "version" in line)


def trim(wav: np.ndarray) -> np.ndarray:
    """Exactly PAD_S of silence before and after the speech (cut, or zero-filled where flite left less), so the
    spoken part is the middle len - 2 * PAD_S samples. A 10-ms frame is speech if its RMS is within 40 dB of the
    loudest frame, which keeps soft consonants (the "s" of six, the "f" of five)."""
    hop, pad = SR // 100, int(PAD_S * SR)
    n = len(wav) // hop
    rms = np.sqrt((wav[: n * hop].reshape(n, hop) ** 2).mean(axis=1))   # (frames,)
    active = np.nonzero(rms > rms.max() * 0.01)[0]
    lo, hi = active[0] * hop - pad, (active[-1] + 1) * hop + pad
    return window(wav, lo, hi)


def synth(text: str, voice: str, stretch: float, f0: float | None, tmp: Path) -> np.ndarray:
    """flite -> trimmed, peak-normalised int16 samples at 16 kHz."""
    out = tmp / "u.wav"
    cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}"]
    if f0 is not None:
        cmd += ["--setf", f"int_f0_target_mean={f0}"]
    subprocess.run(cmd + ["-t", text, "-o", str(out)], check=True, capture_output=True)
    wav, sr = sf.read(str(out), dtype="float32")
    if sr != SR:
        raise RuntimeError(f"flite voice {voice} wrote {sr} Hz audio, expected {SR}")
    wav = trim(wav)
    return np.round(wav * (PEAK / np.abs(wav).max()) * 32767).astype(np.int16)


def prosody(rng: np.random.Generator, voice: str) -> tuple[float, float | None]:
    """A random rendering: tempo within +-10 %, pitch within +-8 % of the voice's own (3 decimals, so reruns match)."""
    stretch = round(float(rng.uniform(0.9, 1.1)), 3)
    f0 = round(F0_BASE[voice] * float(rng.uniform(0.92, 1.08)), 1) if voice in F0_BASE else None
    return stretch, f0


def write_flac(path: Path, wav: np.ndarray) -> None:
    sf.write(str(path), wav, SR, format="FLAC", subtype="PCM_16")


def speech_plan(rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(voice, split, kind, transcript) for every utterance. Test digit strings and held-out colour-shape pairs
    never occur in train; the closed word lists occur in both splits, rendered with different prosody."""
    n_strings = {s: n * len(VOICES) for s, n in N_DIGIT_STRINGS.items()}
    seen, strings = set(), []
    while len(strings) < n_strings["train"] + n_strings["test"]:
        s = " ".join(DIGITS[i] for i in rng.integers(0, 10, size=int(rng.integers(2, 5))))
        if s not in seen:
            seen.add(s)
            strings.append(s)
    pools = {"test": strings[: n_strings["test"]], "train": strings[n_strings["test"]:]}
    pairs = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(pairs))
    held_out = [pairs[i] for i in order[:N_HELD_OUT_PAIRS]]
    train_pairs = [pairs[i] for i in sorted(order[N_HELD_OUT_PAIRS:])]

    def pick(items, k):
        return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]

    plan = []
    for v, voice in enumerate(VOICES):
        for split, n in N_DIGIT_STRINGS.items():
            plan += [(voice, split, "digits", s) for s in pools[split][v * n: (v + 1) * n]]
        plan += [(voice, "train", "number", w) for w in NUMBERS]
        plan += [(voice, "train", "colour", w) for w in COLOURS for _ in range(2)]
        plan += [(voice, "train", "shape", w) for w in SHAPES for _ in range(2)]
        # each train pair is spoken by two of the four voices, each phrase once per voice (to save bytes)
        plan += [(voice, "train", "colour_shape", p) for j, p in enumerate(train_pairs) if (j - v) % len(VOICES) < 2]
        plan += [(voice, "train", "phrase", p) for p in PHRASES]
        plan += [(voice, "test", "number", w) for w in pick(NUMBERS, N_NUMBERS_TEST)]
        plan += [(voice, "test", "colour", w) for w in pick(list(COLOURS), N_COLOURS_TEST)]
        plan += [(voice, "test", "shape", w) for w in pick(SHAPES, N_SHAPES_TEST)]
        plan += [(voice, "test", "colour_shape", p) for p in pick(held_out, N_PAIRS_TEST)]
        plan += [(voice, "test", "phrase", p) for p in pick(PHRASES, N_PHRASES_TEST)]
    return plan


def make_speech(root: Path, rng: np.random.Generator, tmp: Path) -> tuple[list[dict], dict]:
    """Synthesise every planned utterance; returns the speech.jsonl rows and the asr examples per split."""
    (root / "speech").mkdir()
    rows, asr = [], {"train": [], "test": []}
    counters = {v: 0 for v in VOICES}
    for voice, split, kind, text in speech_plan(rng):
        stretch, f0 = prosody(rng, voice)
        wav = synth(text, voice, stretch, f0, tmp)
        counters[voice] += 1
        uid = f"{voice}-{counters[voice]:04d}"
        path = f"speech/{uid}.flac"
        write_flac(root / path, wav)
        rows.append({"id": uid, "speaker": voice, "transcript": text, "audio": path, "split": split, "kind": kind,
                     "seconds": round(len(wav) / SR, 3), "stretch": stretch, "f0": f0})
        asr[split].append({"task": "asr", "question": QUESTIONS["asr"], "answer": text, "audio": path,
                           "transcript": text, "speaker": voice, "kind": kind})
    return rows, asr


# ----------------------------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------------------------
def make_images(root: Path, rng: np.random.Generator) -> dict:
    """Each picture serves three examples (shape, colour, count), all in the picture's split."""
    (root / "images").mkdir()
    out = {}
    for split, n in N_IMAGES.items():
        out[split] = {"image_shape": [], "image_colour": [], "image_count": []}
        for i in range(n):
            im, meta = draw_picture(rng)
            path = f"images/{split}-{i:04d}.png"
            im.save(root / path, optimize=True)
            meta = {"image": path, **meta}
            for task in ("image_shape", "image_colour", "image_count"):
                out[split][task].append({"task": task, "question": QUESTIONS[task], "answer": picture_answer(task, meta),
                                         **meta})
    return out


def save_npz(path: Path, **arrays) -> None:
    """np.savez_compressed with a fixed zip timestamp, so a rerun writes the same bytes (np.load reads it)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue())


def make_videos(root: Path, rng: np.random.Generator, tmp: Path) -> dict:
    """Clips for "what colour was the shape when the voice said now?" (nano_omni/toy.py draws them: training
    draws fresh ones the same way). The cue's midpoint (the middle of the spoken word, padding excluded) lies in
    second k, >= CUE_MARGIN from its ends; the answer is second k's colour."""
    (root / "video").mkdir()
    out = {}
    for split, n in N_VIDEOS.items():
        out[split] = []
        for i in range(n):
            scene = clip_scene(rng)
            voice = VOICES[rng.integers(len(VOICES))]
            stretch, f0 = prosody(rng, voice)
            track, cue = cue_track(rng, synth(CUE_WORD, voice, stretch, f0, tmp), SR, int(PAD_S * SR))
            stem = f"video/{split}-{i:04d}"
            save_npz(root / f"{stem}.npz", frames=render_clip(scene))
            write_flac(root / f"{stem}.flac", track)
            out[split].append({
                "task": "video_cue_colour", "question": QUESTIONS["video_cue_colour"],
                "answer": scene["schedule"][cue["second"]],
                "video": {"frames": f"{stem}.npz", "fps": VIDEO_FPS, "audio": f"{stem}.flac"},
                "shape": scene["shape"], "position": scene["position"], "radius": scene["radius"],
                "schedule": [{"start": float(s), "end": float(s + 1), "colour": c}
                             for s, c in enumerate(scene["schedule"])],
                "cue": {"word": CUE_WORD, "speaker": voice, "start": cue["start"], "end": cue["end"],
                        "mid": cue["mid"]}})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Text.
# ----------------------------------------------------------------------------------------------------------------
def make_text(rng: np.random.Generator) -> dict:
    """Addition, copying and counting, all with word answers. No test question appears in train."""
    out = {"train": {}, "test": {}}
    # Addition of two digits: every pair is in train under two wordings; test asks some pairs the third way.
    train, rest = [], []
    for a in range(10):
        for b in range(10):
            t = rng.permutation(len(ADD_TEMPLATES))
            q = [ADD_TEMPLATES[j].format(a=DIGITS[a], b=DIGITS[b]) for j in t]
            train += [(x, NUMBERS[a + b]) for x in q[:2]]
            rest.append((q[2], NUMBERS[a + b]))
    test = [rest[i] for i in sorted(rng.choice(len(rest), size=N_TEXT["test"], replace=False))]
    out["train"]["text_add"], out["test"]["text_add"] = train, test

    def unique(n, make, taken):
        got = []
        while len(got) < n:
            q, a = make()
            if q not in taken:
                taken.add(q)
                got.append((q, a))
        return got

    for task, make in TEXT_QUESTIONS.items():
        taken = set()
        for split in ("train", "test"):
            out[split][task] = unique(N_TEXT[split], lambda: make(rng), taken)
    return {s: {t: [{"task": t, "question": q, "answer": a} for q, a in ex] for t, ex in d.items()}
            for s, d in out.items()}


# ----------------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def summary(root: Path) -> str:
    """The tables in README.md: examples per task and split, bytes per folder, and the best accuracy a model that
    ignores the sound can reach on video_cue_colour (it can only pick the clip's most frequent colour)."""
    rows = {s: [json.loads(line) for line in open(root / f"{s}.jsonl")] for s in ("train", "test")}
    tasks = list(dict.fromkeys(r["task"] for r in rows["train"]))
    lines = ["| task | train | test |", "|---|---:|---:|"]
    lines += [f"| {t} | {sum(r['task'] == t for r in rows['train'])} | {sum(r['task'] == t for r in rows['test'])} |"
              for t in tasks]
    speech = [json.loads(line) for line in open(root / "speech.jsonl")]
    lines += ["", "| utterances | train | test | mean seconds |", "|---|---:|---:|---:|"]
    for kind in dict.fromkeys(u["kind"] for u in speech):
        us = [u for u in speech if u["kind"] == kind]
        n = {s: sum(u["split"] == s for u in us) for s in ("train", "test")}
        lines.append(f"| {kind} | {n['train']} | {n['test']} | {np.mean([u['seconds'] for u in us]):.2f} |")
    minutes = {s: sum(u["seconds"] for u in speech if u["split"] == s) / 60 for s in ("train", "test")}
    lines.append(f"| all ({len(VOICES)} voices) | {minutes['train']:.1f} min | {minutes['test']:.1f} min | |")
    sizes = {sub: sum(f.stat().st_size for f in (root / sub).rglob("*") if f.is_file())
             for sub in ("speech", "images", "video")}
    sizes["manifests"] = sum((root / f"{m}.jsonl").stat().st_size for m in ("train", "test", "speech"))
    lines += ["", "| part | MB |", "|---|---:|"]
    lines += [f"| {k} | {v / 1e6:.2f} |" for k, v in sizes.items()] + [f"| all | {sum(sizes.values()) / 1e6:.2f} |"]
    lines.append("")
    for split in ("train", "test"):
        clips = [r for r in rows[split] if r["task"] == "video_cue_colour"]
        best = np.mean([max(map([s["colour"] for s in r["schedule"]].count, COLOURS)) / VIDEO_SECONDS for r in clips])
        blind = max(Counter(r["answer"] for r in clips).values()) / len(clips)     # always the commonest colour
        lines.append(f"video_cue_colour {split}: best accuracy without the sound {best:.1%}, "
                     f"without the picture {blind:.1%}  ")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where to write (default: tiny_data/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="only print the tables of an existing dataset")
    args = p.parse_args(argv)
    root = Path(args.out)
    if args.summary:
        print(summary(root))
        return
    version = check_flite()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("speech", "images", "video"):          # stale files from an earlier run must not survive
        shutil.rmtree(root / sub, ignore_errors=True)
    # one random stream per part, so changing one part leaves the others' files as they were
    rngs = {part: np.random.default_rng([args.seed, i]) for i, part in enumerate(("speech", "image", "video", "text"))}
    with tempfile.TemporaryDirectory() as tmp:
        speech_rows, asr = make_speech(root, rngs["speech"], Path(tmp))
        videos = make_videos(root, rngs["video"], Path(tmp))
    images, text = make_images(root, rngs["image"]), make_text(rngs["text"])
    for split in ("train", "test"):
        groups = [("asr", asr[split])] + list(images[split].items()) + [("video_cue_colour", videos[split])] \
            + list(text[split].items())
        rows = [{"id": f"{task}-{split}-{i:04d}", **ex} for task, exs in groups for i, ex in enumerate(exs)]
        write_jsonl(root / f"{split}.jsonl", rows)
    write_jsonl(root / "speech.jsonl", speech_rows)
    print(f"{version}; wrote {root}\n{summary(root)}")


if __name__ == "__main__":
    main()

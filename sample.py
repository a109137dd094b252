"""Talk to a nano_omni model: ask with text, audio, an image or a video; get text and, if you like, speech.

    python sample.py                                            # the shipped tiny model says hello (out.wav)
    python sample.py --text "three seven one" --voice slt --out out.wav     # speak exactly this text
    python sample.py --prompt "what is two plus three?"                      # a text answer
    python sample.py --audio tiny_data/speech/slt-0001.flac                  # "what does the voice say?"
    python sample.py --image tiny_data/images/test-0000.png --prompt "what shape is this?" --speak
    python sample.py --video tiny_data/video/test-0000.npz --prompt "what colour was the shape when the voice said now?"
    python sample.py --text "red circle" --stream                            # write audio as it is produced
    python sample.py --checkpoint DIR ...                                    # another model: a run of train_tiny.py
                                                                              # or an official Qwen2.5-Omni directory
A video is a folder of frames (with audio.wav), an .npz of frames (with the .flac beside it), or a video file
(needs PyAV). Audio is written at 24 kHz and atomically: the file appears whole or not at all, and an existing one
is replaced only by a complete new one (a stream goes to OUT.part first; a run killed outright, SIGKILL, may leave
that .part behind, never a half-written OUT). Bad arguments and unreadable inputs stop with one line naming them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHIPPED = Path(__file__).resolve().parent / "checkpoints" / "tiny"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(SHIPPED), help="model directory (default: the shipped tiny model)")
    ap.add_argument("--text", help="speak exactly this text")
    ap.add_argument("--prompt", help="a question or instruction")
    ap.add_argument("--audio", help="an audio file to ask about")
    ap.add_argument("--image", help="an image file to ask about")
    ap.add_argument("--video", help="a video (folder of frames, .npz of frames, or a video file)")
    ap.add_argument("--fps", type=float, default=2.0, help="frame rate of a folder or .npz of frames")
    ap.add_argument("--speak", action="store_true", help="also speak the answer")
    ap.add_argument("--stream", action="store_true", help="stream: write audio as it is produced")
    ap.add_argument("--voice", help="voice name (default: the model's first)")
    ap.add_argument("--out", default="out.wav", help="where speech is written")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest for the tiny model)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be at least 1, got {a.threads}")
    if a.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    if not (math.isfinite(a.fps) and a.fps > 0):
        ap.error(f"--fps must be a positive number of frames per second, got {a.fps}")
    for flag, path, folder_ok in (("--audio", a.audio, False), ("--image", a.image, False),
                                  ("--video", a.video, True)):
        if path is not None and not Path(path).exists():
            ap.error(f"{flag} {path}: no such file")
        if path is not None and Path(path).is_dir() and not folder_ok:
            ap.error(f"{flag} {path} is a folder; give a file")
    if a.text is not None and not a.text.strip():
        ap.error("--text is empty: give the words to speak")
    if a.prompt is not None and not a.prompt.strip():
        ap.error("--prompt is empty")
    if a.text and (a.audio or a.image or a.video or a.prompt):
        ap.error("--text speaks a text; it cannot be combined with --prompt, --audio, --image or --video")
    return a


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be written (nothing is created by the check)."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise SystemExit(f"cannot write {path}: the folder {parent} does not exist")
    if path.is_dir():
        raise SystemExit(f"cannot write {path}: it is a folder")
    import os
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"cannot write {path}: permission denied")


def write_wav(path: Path, wav: torch.Tensor, sr: int) -> None:
    import soundfile as sf
    from nano_omni.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    sf.write(buf, wav.float().clamp(-1, 1).cpu().numpy(), sr, format="WAV", subtype="PCM_16")
    atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def streamed_wav(path: Path, sr: int):
    """A 16-bit WAV written chunk by chunk to `path`.part, which becomes `path` only when the stream ends well:
    an interrupted stream never replaces an existing file with a partial one."""
    import soundfile as sf

    part = path.with_name(path.name + ".part")
    try:
        with sf.SoundFile(str(part), "w", samplerate=sr, channels=1, subtype="PCM_16", format="WAV") as f:
            yield f
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if sf.info(str(part)).frames == 0:      # nothing was said: an existing file stays as it was
        part.unlink()
        return
    part.replace(path)


def main(argv=None):
    from nano_omni.checkpoint import CheckpointError
    from nano_omni.training import pick_device

    a = parse(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    speaking = bool(a.text) or a.speak or a.stream or not (a.prompt or a.audio or a.image or a.video)
    if speaking:
        check_writable(out)
    ck = Path(a.checkpoint)
    if not ck.is_dir():
        hint = " (run `python train_tiny.py` to make one)" if ck == SHIPPED else ""
        raise SystemExit(f"no model at {ck}{hint}")
    try:
        device = pick_device(a.device)
    except ValueError as e:
        raise SystemExit(f"sample.py: --device: {e}") from None
    torch.set_num_threads(a.threads)
    try:
        run(a, out, speaking, ck, device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:   # an input or model the checks above let by
        raise SystemExit(f"sample.py: {e}") from None


def run(a, out: Path, speaking: bool, ck: Path, device: torch.device) -> None:
    from nano_omni.data import IMAGE_PIXELS, VIDEO_PIXELS
    from nano_omni.pretrained import load_model
    from nano_omni.processor import Processor
    from nano_omni.tokenizer import DEFAULT_SYSTEM, SPEECH_SYSTEM, chat_template

    model, tok = load_model(ck, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    if tok is None:
        raise SystemExit(f"{ck} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    cfg = model.cfg
    tiny = cfg.thinker.vocab_size < 1024                          # our toy models: no system prompt
    system = None if tiny else (SPEECH_SYSTEM if speaking else DEFAULT_SYSTEM)
    if speaking:
        if not getattr(model, "voices", None):
            raise SystemExit(f"{ck} has no voices, so it cannot speak (text answers still work without --speak)")
        if a.voice is not None and a.voice not in model.voices:
            raise SystemExit(f"unknown voice {a.voice!r}; this model has {', '.join(sorted(model.voices))}")
    voice = a.voice or next(iter(getattr(model, "voices", {}) or {"": None}))

    # -- speak a given text ----------------------------------------------------------------------------------
    if a.text or not (a.prompt or a.audio or a.image or a.video):
        text = a.text or "hello there"
        # the toy BPE holds each of its words whole (official vocabularies split words freely: not checked there)
        unknown = [w for w in text.split() if len(tok.encode(" " + w)) > 1] if tiny else []
        if unknown:
            verb = "is not a word" if len(unknown) == 1 else "are not words"
            print(f"note: {', '.join(map(repr, unknown))} {verb} of this tiny model's vocabulary; it learnt to say "
                  f"digits, colours, shapes and a few phrases, so expect it to mumble there", file=sys.stderr)
        prompt = tok.encode(chat_template([{"role": "user", "content": f"say: {text}"}], system=system))
        t0 = time.perf_counter()
        prompt_t = torch.tensor([prompt], device=device)
        if a.stream:   # PCM chunks reach the file while the Talker is still writing codes
            first_pcm, n = None, 0
            with streamed_wav(out, cfg.vocoder.sample_rate) as f:
                for pcm in model.say_stream(prompt_t, tok.encode(text), voice, seed=a.seed):
                    first_pcm = time.perf_counter() - t0 if first_pcm is None else first_pcm
                    f.write(pcm.float().clamp(-1, 1).cpu().numpy())
                    f.flush()
                    n += pcm.numel()
                if n == 0:
                    raise SystemExit("the Talker stopped before making any sound; try another --seed")
            print(f"{voice} says {text!r}: first audio after {1e3 * first_pcm:.0f} ms; {n / cfg.vocoder.sample_rate:.2f} s "
                  f"of audio in {time.perf_counter() - t0:.2f} s -> {out}")
            return
        codes, wav = model.say(prompt_t, tok.encode(text), voice, seed=a.seed)
        if wav.numel() == 0:
            raise SystemExit("the Talker stopped before making any sound; try another --seed")
        write_wav(out, wav, cfg.vocoder.sample_rate)
        print(f"{voice} says {text!r}: {len(codes)} codes, {wav.numel() / cfg.vocoder.sample_rate:.2f} s of audio "
              f"in {time.perf_counter() - t0:.2f} s -> {out}")
        return

    # -- ask ---------------------------------------------------------------------------------------------------
    items = []
    if a.audio:
        items.append({"type": "audio", "audio": a.audio})
    if a.image:
        items.append({"type": "image", "image": a.image})
    aiv = False
    if a.video:
        v = Path(a.video)
        if v.suffix == ".npz":
            try:
                frames = np.load(v)["frames"]
            except (OSError, ValueError, KeyError, EOFError) as e:     # not an npz, or no "frames" array in it
                raise ValueError(f"--video {v}: cannot read its frames (an .npz holding a 'frames' array): "
                                 f"{type(e).__name__}: {e}") from None
            snd = v.with_suffix(".flac")
            items.append({"type": "video", "video": frames, "fps": a.fps, **({"audio": str(snd)} if snd.is_file() else {})})
            aiv = snd.is_file()
        else:
            items.append({"type": "video", "video": str(v), "fps": a.fps})
            aiv = (v / "audio.wav").is_file() if v.is_dir() else True
    question = a.prompt or ("what does the voice say?" if a.audio and not (a.image or a.video) else "describe it")
    items.append(question)
    proc = Processor(cfg, tok, **({"image_pixels": IMAGE_PIXELS, "video_pixels": VIDEO_PIXELS} if tiny else {}))
    x = proc([{"role": "user", "content": items}], use_audio_in_video=aiv, system=system).to(device)
    t0 = time.perf_counter()
    if not (a.speak or a.stream):
        gen = model.thinker.generate_from(x, max_new_tokens=a.max_new_tokens)
        print(tok.decode([t for t in gen.tokens[0].tolist() if t != cfg.tokens.pad], skip_special=True).strip())
        return
    first_text = first_pcm = None
    text_ids, pcm = [], []
    with streamed_wav(out, cfg.vocoder.sample_rate) as f:
        for kind, val in model.stream(x, voice, seed=a.seed, thinker_kw={"max_new_tokens": a.max_new_tokens}):
            now = time.perf_counter() - t0
            if kind == "text":
                first_text = now if first_text is None else first_text
                text_ids.append(int(val[0]))
                if a.stream:
                    print(tok.decode([text_ids[-1]], skip_special=True), end="", flush=True)
            else:
                first_pcm = now if first_pcm is None else first_pcm
                f.write(val.float().clamp(-1, 1).cpu().numpy())     # audio reaches the file as it is produced
                f.flush()
                pcm.append(val)
    answer = tok.decode([t for t in text_ids if t != cfg.tokens.pad], skip_special=True).strip()
    print(("\n" if a.stream else "") + answer)
    if first_pcm is None:
        print(f"(no speech was produced; {out} was not written)")
    else:
        n = sum(p.numel() for p in pcm)
        print(f"first text token after {1e3 * first_text:.0f} ms, first audio after {1e3 * first_pcm:.0f} ms "
              f"({1e3 * (first_pcm - first_text):.0f} ms after the first text token); {n / cfg.vocoder.sample_rate:.2f} s "
              f"of audio -> {out}")


if __name__ == "__main__":
    main()

"""The toy data (tiny_data/) as the training script and the evaluation read it.

    load_examples(split)  the understanding tasks: one dict per example (see tiny_data/README.md)
    conversation(ex)      -> ChatML messages with the example's media items, and its answer
    ThinkerData           examples -> processed prompts + answer ids, cached once; batches with labels
    load_speech(split)    the utterances (speaker, transcript, 24-kHz waveform) for the speech half

Every problem in the data is reported with the file (and line or example id) it comes from: a missing or corrupt
manifest or media file, an empty split, an unknown task, a missing field, a character outside the data's
alphabet.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .audio_io import SAMPLE_RATE, load_audio
from .processor import OmniInputs, Processor
from .toy import (PAD_S, PICTURE_QUESTIONS, TEXT_QUESTIONS, VIDEO_FPS, VIDEO_QUESTION, clip_scene, cue_track,
                  draw_picture, picture_answer, render_clip, window)

ROOT = Path(__file__).resolve().parent.parent / "tiny_data"
TASKS = ("asr", "image_shape", "image_colour", "image_count", "video_cue_colour", "text_add", "text_copy",
         "text_count")
ALPHABET = re.compile(r"^[a-z :?.,']*$")      # questions, answers and transcripts are lower-case words
SYSTEM = None                                 # the tiny models are trained without a system prompt
IMAGE_PIXELS = (84 * 84, 84 * 84)             # the toy images stay at their own size: 3x3 tokens (read at 168 px,
                                              # 6x6, shape alone is learnt far sooner, but a picture step costs
                                              # 2.4x as much: docs/experiments.md, "Tried and not kept")
VIDEO_PIXELS = (56 * 56, 56 * 56)             # video frames: 2x2 tokens per frame pair


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (run tiny_data/make_data.py?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
    return rows


def _check_text(where: str, field: str, text) -> None:
    if not isinstance(text, str) or not ALPHABET.match(text):
        raise ValueError(f"{where}: {field} {text!r} holds characters outside the data's alphabet [a-z :?.,']")


def load_examples(split: str, root: str | Path = ROOT, tasks=None) -> list[dict]:
    """The examples of `split` ("train" or "test"), optionally only `tasks`. Media paths stay relative to root."""
    root = Path(root)
    path = root / f"{split}.jsonl"
    rows = _read_jsonl(path)
    out = []
    for i, ex in enumerate(rows, 1):
        where = f"{path}, line {i} ({ex.get('id', '?')})"
        if ex.get("task") not in TASKS:
            raise ValueError(f"{where}: unknown task {ex.get('task')!r}; known: {', '.join(TASKS)}")
        for field in ("id", "question", "answer"):
            if field not in ex:
                raise ValueError(f"{where}: missing field {field!r}")
        _check_text(where, "question", ex["question"])
        _check_text(where, "answer", ex["answer"])
        media = [ex.get("audio"), ex.get("image")] + [(ex.get("video") or {}).get(k) for k in ("frames", "audio")]
        for m in media:
            if m is not None and not (root / m).is_file():
                raise FileNotFoundError(f"{where}: media file {root / m} does not exist")
        if tasks is None or ex["task"] in tasks:
            out.append(ex)
    if not out:
        raise ValueError(f"{path}: the split holds no examples" + (f" for tasks {sorted(tasks)}" if tasks else ""))
    return out


def conversation(ex: dict, root: str | Path = ROOT) -> tuple[list[dict], str, bool]:
    """(messages for the Processor, answer text, use_audio_in_video) for one example."""
    root = Path(root)
    items = []
    if ex.get("audio") is not None:     # a path under root, or (waveform, rate) in memory (spliced_speech)
        au = ex["audio"]
        items.append({"type": "audio", "audio": str(root / au) if isinstance(au, (str, Path)) else au})
    if ex.get("image") is not None:     # a path under root, or a picture in memory (fresh_picture)
        im = ex["image"]
        items.append({"type": "image", "image": str(root / im) if isinstance(im, (str, Path)) else im})
    aiv = False
    if ex.get("video"):                 # paths under root, or frames and (waveform, rate) in memory (fresh_clip)
        v, frames, au = ex["video"], ex["video"]["frames"], ex["video"]["audio"]
        if isinstance(frames, (str, Path)):
            try:
                frames = np.load(root / frames)["frames"]
            except Exception as e:
                raise ValueError(f"{root / v['frames']}: cannot read the video frames ({e})") from None
        items.append({"type": "video", "video": frames, "fps": v["fps"],
                      "audio": str(root / au) if isinstance(au, (str, Path)) else au})
        aiv = True
    items.append(ex["question"])
    return [{"role": "user", "content": items}], ex["answer"], aiv


@dataclass
class Example:
    inputs: OmniInputs        # the whole conversation, answers included, one row
    answer_spans: list        # [(start, end)] token ranges of every answer (with its <|im_end|>)
    task: str
    answer: str               # the last answer

    @property
    def n_prompt(self) -> int:
        """Tokens before the last answer: the prompt the model must complete."""
        return self.answer_spans[-1][0]


def answer_spans(ids: list[int], im_start: int, im_end: int, assistant: list[int]) -> list[tuple[int, int]]:
    """Token ranges of the assistant answers: after <|im_start|>assistant\n, up to and including <|im_end|>."""
    spans, head = [], [im_start] + assistant
    i = 0
    while i < len(ids):
        if ids[i: i + len(head)] == head:
            a = i + len(head)
            b = ids.index(im_end, a) + 1 if im_end in ids[a:] else len(ids)
            spans.append((a, b))
            i = b
        else:
            i += 1
    return spans


def multi_turn(examples: list[dict], root: str | Path = ROOT) -> tuple[list[dict], bool]:
    """Several examples as one conversation, turn after turn: a longer, multi-item prompt (training stage 3)."""
    msgs, aiv = [], False
    for ex in examples:
        m, answer, v = conversation(ex, root)
        msgs += m + [{"role": "assistant", "content": answer}]
        aiv = aiv or v
    return msgs, aiv


class ThinkerData:
    """Processed conversations, cached once, and labelled batches. Labels are -100 except on the answers and
    their <|im_end|>: the Thinker learns to write answers, not to predict questions.

    examples: dicts from load_examples (one turn each), or lists of them (one multi-turn conversation each)."""

    def __init__(self, examples: list, processor: Processor, tokenizer, root: str | Path = ROOT,
                 avoid: frozenset[str] = frozenset()):
        """avoid: questions (text tasks) and transcripts (asr) a fresh item must never be: the held-out split's,
        see `batch`."""
        self.proc, self.tok, self.root, self.avoid = processor, tokenizer, root, avoid
        self.speech = SpeechPieces([ex for ex in examples if isinstance(ex, dict) and ex["task"] == "asr"], root)
        self.clips = [ex for ex in examples if isinstance(ex, dict) and ex["task"] == "video_cue_colour"]
        self.assistant = tokenizer.encode("assistant\n")
        self.items: list[Example] = [self.example(ex) for ex in examples]

    def example(self, ex, positions: bool = True) -> Example:
        """One example dict (or a list of them: one multi-turn conversation), processed and with its answer spans
        (positions=False: without its own positions, for an item that only enters batches; see Processor)."""
        group = ex if isinstance(ex, list) else [ex]
        msgs, aiv = multi_turn(group, self.root)
        try:
            x = self.proc([msgs], use_audio_in_video=aiv, system=SYSTEM, add_generation_prompt=False,
                          positions=positions)
        except (ValueError, OSError) as e:
            raise ValueError(f"example {group[-1]['id']}: {e}") from None
        x.use_audio_in_video = True             # harmless for rows without video; lets every row share a batch
        tk = self.proc.cfg.tokens
        spans = answer_spans(x.input_ids[0].tolist(), tk.im_start, tk.im_end, self.assistant)
        return Example(x, spans, group[-1]["task"], group[-1]["answer"])

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: list[int], augment_seed: int | None = None, redraw_seed: int | None = None,
              redraw: frozenset[str] = frozenset(PICTURE_QUESTIONS)) -> tuple[OmniInputs, torch.Tensor]:
        """(inputs, labels (B, T)) for the items `idx`, right-padded. With augment_seed, the audio features are
        masked SpecAugment-style; with redraw_seed, every single-turn item of a task in `redraw` (picture tasks,
        text_copy / text_count, video_cue_colour) is replaced by a fresh one of the same task: a newly drawn
        picture or clip or a new question, with its answer; for asr every other item (by seed) is, with a spliced
        utterance. Training only; both depend only on (seed, item), so they do not change with how a batch is split
        over processes."""
        items = [self.items[i] for i in idx]
        if redraw_seed is not None:
            items = [self.example(self.fresh(it.task, redraw_seed * 1_000_003 + i), positions=False)
                     if it.task in redraw and len(it.answer_spans) == 1
                     and (it.task != "asr" or (self.speech.speakers and (redraw_seed + i) % 2)) else it
                     for i, it in zip(idx, items)]
        x = self.proc.collate([it.inputs for it in items], padding_side="right")
        if augment_seed is not None and x.audio_features is not None:
            gens = [torch.Generator().manual_seed(augment_seed * 1_000_003 + i)
                    for i, it in zip(idx, items)
                    for _ in range(0 if it.inputs.audio_lengths is None else len(it.inputs.audio_lengths))]
            x.audio_features = spec_augment(x.audio_features, x.audio_lengths, gens)
        labels = torch.full_like(x.input_ids, -100)
        for b, it in enumerate(items):
            for a, e in it.answer_spans:
                labels[b, a: e] = x.input_ids[b, a: e]
        return x, labels

    def fresh(self, task: str, seed: int) -> dict:
        """A new example of `task` (a picture task, a TEXT_QUESTIONS task, asr: a spliced utterance, or
        video_cue_colour: a new clip with a cue word of the training clips), never one of the `avoid` questions or
        transcripts."""
        if task in PICTURE_QUESTIONS:
            return fresh_picture(task, seed)
        if task == "video_cue_colour" and self.cue_words:
            return fresh_clip(seed, self.cue_words)
        rng = np.random.default_rng(seed)
        if task == "asr" and self.speech.speakers:
            return self.speech.splice(rng, seed, self.avoid)
        if task not in TEXT_QUESTIONS:
            raise ValueError(f"task {task!r} has no fresh items here; tasks that do: "
                             f"{sorted(PICTURE_QUESTIONS) + sorted(TEXT_QUESTIONS)}, asr given digit recordings "
                             f"and video_cue_colour given clips")
        while True:
            q, a = TEXT_QUESTIONS[task](rng)
            if q not in self.avoid:
                return {"id": f"fresh-{task}-{seed}", "task": task, "question": q, "answer": a}

    @cached_property
    def cue_words(self) -> list[np.ndarray]:
        """The cue words of the training clips (read once, when a fresh clip is first asked for)."""
        return cue_words(self.clips, self.root)

    def prompts(self, idx: list[int]) -> OmniInputs:
        """The prompts of the items `idx` (everything before their last answer), left-padded for generation."""
        out = []
        for i in idx:
            it = self.items[i]
            p = OmniInputs(**{**it.inputs.__dict__})
            p.input_ids = it.inputs.input_ids[:, : it.n_prompt]
            p.attention_mask = torch.ones_like(p.input_ids)
            out.append(p)
        return self.proc.collate(out, padding_side="left")


def fresh_picture(task: str, seed: int) -> dict:
    """A new example of picture task `task` ("image_shape", "image_colour" or "image_count"): a picture drawn in
    memory by the generator of tiny_data/, seeded by `seed`."""
    im, meta = draw_picture(np.random.default_rng(seed))
    return {"id": f"fresh-{task}-{seed}", "task": task, "question": PICTURE_QUESTIONS[task],
            "answer": picture_answer(task, meta), "image": im}


def cue_words(clips: list[dict], root: str | Path = ROOT) -> list[np.ndarray]:
    """The cue word of each clip, cut from its sound track with PAD_S of silence either side, as recorded in the
    manifest ("cue": {"start", "end"}, seconds, to the millisecond): float32 waveforms at SAMPLE_RATE."""
    words = []
    for ex in clips:
        path = Path(root) / ex["video"]["audio"]
        try:
            wav, rate = sf.read(str(path), dtype="float32")
            start, end = ex["cue"]["start"], ex["cue"]["end"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"clip {ex.get('id', '?')}: its cue has no {e} (start and end in seconds)") from None
        except Exception as e:
            raise ValueError(f"{path}: cannot read the clip's sound ({e})") from None
        if rate != SAMPLE_RATE or wav.ndim != 1:
            raise ValueError(f"{path}: expected mono {SAMPLE_RATE}-Hz audio, got {rate} Hz, shape {wav.shape}")
        lo, hi = round((start - PAD_S) * rate), round((end + PAD_S) * rate)
        if not 0 <= start < end <= len(wav) / rate:
            raise ValueError(f"clip {ex['id']}: cue {start}-{end} s lies outside its {len(wav) / rate:.2f}-s track")
        words.append(window(wav, lo, hi))
    return words


def fresh_clip(seed: int, words: list[np.ndarray]) -> dict:
    """A new video_cue_colour example: a clip drawn in memory as tiny_data/make_data.py draws them (a new shape,
    place and colour schedule), its sound one of `words` (cue_words) laid at a new moment; seeded by `seed`."""
    rng = np.random.default_rng(seed)
    scene = clip_scene(rng)
    word = words[int(rng.integers(len(words)))]
    track, cue = cue_track(rng, word, SAMPLE_RATE, round(PAD_S * SAMPLE_RATE))
    return {"id": f"fresh-video_cue_colour-{seed}", "task": "video_cue_colour", "question": VIDEO_QUESTION,
            "answer": scene["schedule"][cue["second"]],
            "video": {"frames": render_clip(scene), "fps": VIDEO_FPS, "audio": (track, SAMPLE_RATE)},
            "scene": scene, "cue": cue}


DIGIT_WORDS = frozenset("zero one two three four five six seven eight nine".split())


class SpeechPieces:
    """Training utterances to splice into new ones (`splice`): a fresh asr item says a word sequence that no
    recording says. The held-out digit strings are new sequences of known words; a model that heard each training
    string many times learns the strings whole (an asr-only run ends up writing every training string right and
    almost none of the unseen 3- and 4-digit ones). Spliced items teach it to hear word after word.

    Two recipes, same speaker, 40-160 ms of silence between the pieces: digit pieces (digit strings and single
    digits) joined into 2-4 digits, or a colour then a shape ("red" + "circle"). train_tiny.py can give them to
    the Talker too, at the codec's rate (--train.s4_spliced), and stage 4 joins the same draws' codes instead
    (train_tiny.CodeSplicer), half of those texts drawn word by word (`draw_words`)."""

    def __init__(self, examples: list[dict], root: str | Path = ROOT, rate: int = SAMPLE_RATE):
        """examples: asr examples (text in "answer") or utterances from `load_speech` (text in "transcript", their
        "wav" already at `rate`); rate: the rate the pieces are joined at (the audio encoder's by default, the
        codec's 24 kHz for the Talker)."""
        self.root, self.rate = Path(root), rate
        self.pieces: dict[tuple[str, str], list[dict]] = {}
        for ex in examples:
            words = self.text(ex).split()
            kind = ("digits" if all(w in DIGIT_WORDS for w in words)
                    else ex.get("kind") if ex.get("kind") in ("colour", "shape") else None)
            if kind and isinstance(ex.get("audio"), (str, Path)):
                self.pieces.setdefault((ex["speaker"], kind), []).append(ex)
        self.speakers = sorted({spk for spk, kind in self.pieces if (spk, "digits") in self.pieces})
        self._wav: dict[str, np.ndarray] = {}

    @staticmethod
    def text(ex: dict) -> str:
        return ex["answer"] if "answer" in ex else ex["transcript"]

    def wav(self, ex: dict) -> np.ndarray:
        if ex["audio"] not in self._wav:
            wav = ex["wav"] if "wav" in ex else load_audio(self.root / ex["audio"], target_rate=self.rate)
            self._wav[ex["audio"]] = np.asarray(wav, dtype=np.float32)
        return self._wav[ex["audio"]]

    def splice(self, rng: np.random.Generator, seed: int, avoid: frozenset[str] = frozenset()) -> dict:
        """A new utterance drawn with `rng`, its transcript none of `avoid` (drawn again until so)."""
        spk, chosen, gaps = self.draw(rng, avoid)
        parts = [self.wav(chosen[0])]
        for ex, gap in zip(chosen[1:], gaps):
            parts += [np.zeros(int(self.rate * gap), np.float32), self.wav(ex)]
        return {"id": f"fresh-asr-{seed}", "task": "asr", "question": chosen[0].get("question"),
                "answer": " ".join(self.text(ex) for ex in chosen), "audio": (np.concatenate(parts), self.rate),
                "speaker": spk, "pieces": [ex["id"] for ex in chosen]}

    def draw(self, rng: np.random.Generator,
             avoid: frozenset[str] = frozenset()) -> tuple[str, list[dict], list[float]]:
        """What `splice` joins, without joining it: (speaker, the pieces in order, the silence before each piece
        after the first, in seconds). The Talker's fresh items join the pieces' codes instead of their waveforms."""
        while True:
            spk, chosen, gaps = self._draw(rng)
            if " ".join(self.text(ex) for ex in chosen) not in avoid:
                return spk, chosen, gaps

    def _draw(self, rng: np.random.Generator) -> tuple[str, list[dict], list[float]]:
        spk = self.speakers[int(rng.integers(len(self.speakers)))]
        if rng.random() < 0.5 and (spk, "colour") in self.pieces and (spk, "shape") in self.pieces:
            chosen = [self._pick(rng, spk, "colour"), self._pick(rng, spk, "shape")]
        else:
            chosen, n = [], 0                           # two pieces or more, four digits at most
            while len(chosen) < 2 or (n < 4 and rng.random() < 0.5):
                room = 4 - n - (1 if not chosen else 0)     # the first piece leaves room for a second
                fits = [ex for ex in self.pieces[(spk, "digits")] if len(self.text(ex).split()) <= room]
                if not fits:
                    break
                ex = fits[int(rng.integers(len(fits)))]
                chosen.append(ex)
                n += len(self.text(ex).split())
        return spk, chosen, self._pauses(rng, chosen)

    def draw_words(self, rng: np.random.Generator,
                   avoid: frozenset[str] = frozenset()) -> tuple[str, list[dict], list[float]]:
        """Like `draw`, but 2-4 digits each from a recording of that one digit: a join between every two words
        (a `draw` of digit strings mostly joins two strings once)."""
        while True:
            spk = self.speakers[int(rng.integers(len(self.speakers)))]
            singles = [ex for ex in self.pieces[(spk, "digits")] if len(self.text(ex).split()) == 1]
            if not singles:                             # this voice recorded no digit alone
                return self.draw(rng, avoid)
            chosen = [singles[int(rng.integers(len(singles)))] for _ in range(int(rng.integers(2, 5)))]
            if " ".join(self.text(ex) for ex in chosen) not in avoid:
                return spk, chosen, self._pauses(rng, chosen)

    @staticmethod
    def _pauses(rng: np.random.Generator, chosen: list[dict]) -> list[float]:
        """The silence before each piece after the first: 40-160 ms, in seconds."""
        return [float(rng.uniform(0.04, 0.16)) for _ in chosen[1:]]

    def _pick(self, rng, spk, kind) -> dict:
        group = self.pieces[(spk, kind)]
        return group[int(rng.integers(len(group)))]


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, gens: list[torch.Generator], n_time: int = 2,
                 max_time: int = 12, n_freq: int = 2, max_freq: int = 16) -> torch.Tensor:
    """SpecAugment (Park et al. 2019): hide a few random stretches of time and bands of frequency in each audio's
    log-mel, so the model cannot lean on any one of them. feats (n_mels, sum L), lengths (n_audio,), one generator
    per audio -> a copy."""
    out = feats.clone()
    start = 0
    for L, g in zip(lengths.tolist(), gens):
        piece = out[:, start: start + L]                                     # a view into `out`
        fill = piece.mean()
        for _ in range(n_time):
            w = int(torch.randint(0, max_time + 1, (1,), generator=g))
            t0 = int(torch.randint(0, max(1, L - w), (1,), generator=g))
            piece[:, t0: t0 + w] = fill
        for _ in range(n_freq):
            w = int(torch.randint(0, max_freq + 1, (1,), generator=g))
            f0 = int(torch.randint(0, max(1, feats.shape[0] - w), (1,), generator=g))
            piece[f0: f0 + w] = fill
        start += L
    return out


def _speech_manifest(root: Path) -> list[tuple[str, dict]]:
    """speech.jsonl's rows, checked, each with where it is (for error messages)."""
    path = root / "speech.jsonl"
    out = []
    for i, r in enumerate(_read_jsonl(path), 1):
        where = f"{path}, line {i} ({r.get('id', '?')})"
        for field in ("speaker", "transcript", "audio", "split"):
            if field not in r:
                raise ValueError(f"{where}: missing field {field!r}")
        _check_text(where, "transcript", r["transcript"])
        out.append((where, r))
    return out


def load_speech(split: str | None = None, root: str | Path = ROOT, sample_rate: int = 24000, speakers=None) -> list[dict]:
    """Utterances from speech.jsonl: dicts with speaker, transcript, split and 'wav' ((n,) at `sample_rate`)."""
    root = Path(root)
    path = root / "speech.jsonl"
    out = []
    for where, r in _speech_manifest(root):
        if (split is None or r["split"] == split) and (speakers is None or r["speaker"] in speakers):
            try:
                wav = load_audio(root / r["audio"], target_rate=sample_rate)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"{where}: {e}") from None
            out.append({**r, "wav": wav})
    if not out:
        raise ValueError(f"{path}: no utterances for split={split!r}, speakers={speakers!r}")
    return out


def toy_corpus(root: str | Path = ROOT) -> list[str]:
    """Every turn of the training split as ChatML writes it between <|im_start|> and <|im_end|> (the role, a
    newline, the text): questions, answers, transcripts, and the speaking prompts made of them ("say: ...",
    stage 4). The tiny models' tokenizer is learnt on it (`toy_tokenizer`)."""
    root = Path(root)
    texts = [t for ex in load_examples("train", root) for t in (f"user\n{ex['question']}", f"assistant\n{ex['answer']}")]
    for _, r in _speech_manifest(root):
        if r["split"] == "train":
            texts += [f"user\nsay: {r['transcript']}", f"assistant\n{r['transcript']}"]
    return texts


def toy_tokenizer(tokens, max_vocab: int, extra: dict[str, int] | None = None, root: str | Path = ROOT):
    """A byte-level BPE learnt on the toy corpus (`QwenBPE.learn`): Qwen's special tokens at `tokens`' ids and the
    `extra` ones (e.g. the voices' tokens) at theirs, the merges on the ids after them, at most `max_vocab` ids in
    all. Every word of the toy world becomes one token, as most English words are one token in Qwen's real
    vocabulary; bytes stay, so any text still encodes."""
    from .bpe import QwenBPE
    from .tokenizer import special_ids

    special = {**special_ids(tokens), **(extra or {})}
    return QwenBPE.learn(toy_corpus(root), special, max_vocab, max(special.values()) + 1)

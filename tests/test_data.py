"""tiny_data reading (every broken-data case named) and the k-means speech codec."""
import json
import shutil

import numpy as np
import pytest
import torch

from nano_omni.codec import SpeechCodec
from nano_omni.config import get_config
from nano_omni.data import ROOT, ThinkerData, answer_spans, load_examples, load_speech
from nano_omni.processor import Processor
from nano_omni.tokenizer import ByteTokenizer

CFG = get_config("tiny")


@pytest.fixture()
def data_copy(tmp_path):
    """A small copy of tiny_data: a few examples per split, with the files they use."""
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(l) for l in (ROOT / f"{split}.jsonl").read_text().splitlines()]
        keep, seen = [], set()
        for r in rows:
            if r["task"] not in seen:
                seen.add(r["task"])
                keep.append(r)
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in keep) + "\n")
        for r in keep:
            for rel in [r.get("audio"), r.get("image")] + [(r.get("video") or {}).get(k) for k in ("frames", "audio")]:
                if rel:
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / rel, root / rel)
    speech = [json.loads(l) for l in (ROOT / "speech.jsonl").read_text().splitlines()][:3]
    (root / "speech.jsonl").write_text("\n".join(json.dumps(r) for r in speech) + "\n")
    for r in speech:
        (root / r["audio"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / r["audio"], root / r["audio"])
    return root


def _edit(path, fn):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    rows = fn(rows)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_examples_make_labelled_batches(data_copy):
    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    ex = load_examples("train", data_copy)
    assert {e["task"] for e in ex} == {"asr", "image_shape", "image_colour", "image_count", "video_cue_colour",
                                       "text_add", "text_copy", "text_count"}
    d = ThinkerData(ex[:3], Processor(CFG, tok), tok, data_copy)
    x, labels = d.batch([0, 1, 2])
    for b in range(3):
        assert tok.decode(x.input_ids[b][labels[b] != -100]) == ex[b]["answer"] + "<|im_end|>"


def test_answer_spans():
    ids = [9, 1, 5, 6, 7, 2, 9, 1, 5, 8, 2]          # <s> a: 6 7 </s>, <s> a: 8 </s>
    assert answer_spans(ids, 1, 2, [5]) == [(3, 6), (9, 11)]


def test_broken_data_is_named(data_copy):
    _edit(data_copy / "train.jsonl", lambda rows: rows + [{**rows[0], "id": "bad-1", "audio": "speech/none.flac"}])
    with pytest.raises(FileNotFoundError, match=r"bad-1.*media file .*none\.flac does not exist"):
        load_examples("train", data_copy)
    (data_copy / "test.jsonl").write_text('{"id": 1, "task": "asr"\n')
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: not valid JSON"):
        load_examples("test", data_copy)
    (data_copy / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="the split holds no examples"):
        load_examples("test", data_copy)
    (data_copy / "test.jsonl").write_text(json.dumps({"id": "q", "task": "text_copy", "question": "copy: Hello!",
                                                      "answer": "Hello!"}) + "\n")
    with pytest.raises(ValueError, match=r"question 'copy: Hello!' holds characters outside the data's alphabet"):
        load_examples("test", data_copy)
    (data_copy / "test.jsonl").write_text(json.dumps({"id": "q", "task": "juggling", "question": "a", "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match="unknown task 'juggling'"):
        load_examples("test", data_copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples("valid", data_copy)


def test_broken_speech_is_named(data_copy):
    first = json.loads((data_copy / "speech.jsonl").read_text().splitlines()[0])
    (data_copy / first["audio"]).write_bytes(b"not a flac file")
    with pytest.raises(ValueError, match=rf"speech\.jsonl, line 1 .*cannot read audio file .*{first['audio']}"):
        load_speech(None, data_copy)
    _edit(data_copy / "speech.jsonl", lambda rows: [{**rows[1], "transcript": "Ça va?"}])
    with pytest.raises(ValueError, match="transcript 'Ça va\\?' holds characters outside"):
        load_speech(None, data_copy)


def test_codec_is_deterministic_and_round_trips(tmp_path):
    utts = load_speech("test", speakers={"slt"})[:6]
    proto = SpeechCodec(torch.zeros(1, 160), 2, CFG.vocoder)
    mels = [proto.mel(u["wav"]) for u in utts]
    a = SpeechCodec.fit(mels, 32, iters=8, vocoder=CFG.vocoder)
    b = SpeechCodec.fit(mels, 32, iters=8, vocoder=CFG.vocoder)
    assert torch.equal(a.centroids, b.centroids)
    codes = a.encode(utts[0]["wav"])
    assert codes.shape[0] == mels[0].shape[0] // 2 and int(codes.max()) < 32
    rec = a.decode_mel(codes)
    err = float((rec - mels[0][: rec.shape[0]]).pow(2).mean())
    assert err < 0.5 * float(mels[0].var())                  # the centroids explain most of the spectrum
    a.save(tmp_path / "c.safetensors")
    assert torch.equal(SpeechCodec.load(tmp_path / "c.safetensors").encode(utts[0]["wav"]), codes)
    from safetensors import safe_open
    from safetensors.torch import save
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:   # one metadata key: the same codec, the same bytes
        assert list(f.metadata()) == ["codec"]
    legacy = {"frames_per_code": "2", "vocoder": json.dumps(CFG.vocoder.__dict__)}   # files of earlier runs
    (tmp_path / "old.safetensors").write_bytes(save({"centroids": a.centroids}, metadata=legacy))
    old = SpeechCodec.load(tmp_path / "old.safetensors")
    assert torch.equal(old.centroids, a.centroids) and old.frames_per_code == 2 and old.vocoder == CFG.vocoder
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid codec file"):
        SpeechCodec.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"codes must be a 1-D tensor of ids in \[0, 32\)"):
        a.decode_mel(torch.tensor([40]))


def test_toy_pictures_redraw_the_committed_ones():
    """nano_omni.toy draws exactly what tiny_data holds: a committed picture redrawn from its metadata is the same
    picture, pixel for pixel (the generator and training share one drawing function)."""
    import numpy as np
    from PIL import Image

    from nano_omni.toy import render_picture

    for e in load_examples("test", tasks={"image_shape"})[:5]:
        im = render_picture(e["shape"], e["colour"], e["positions"], e["radius"])
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(ROOT / e["image"]).convert("RGB")))


def test_fresh_pictures_replace_picture_items_only(data_copy):
    import numpy as np

    from nano_omni.data import fresh_picture
    from nano_omni.toy import COLOURS

    a, b = fresh_picture("image_colour", 7), fresh_picture("image_colour", 7)
    assert a["answer"] == b["answer"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(fresh_picture("image_colour", 8)["image"]))
    px = np.asarray(a["image"]).reshape(-1, 3)
    assert np.all(px[px.sum(1) > 0] == COLOURS[a["answer"]])           # the answer is the colour drawn

    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    ex = load_examples("train", data_copy)
    d = ThinkerData(ex, Processor(CFG, tok), tok, data_copy)
    idx = list(range(len(ex)))
    x0, l0 = d.batch(idx)
    x1, l1 = d.batch(idx, redraw_seed=3)
    x2, _ = d.batch(idx, redraw_seed=3)
    assert torch.equal(x1.pixel_values, x2.pixel_values) and torch.equal(x1.input_ids, x2.input_ids)
    assert not torch.equal(x0.pixel_values, x1.pixel_values)
    for i, e in enumerate(ex):
        answer = tok.decode(x1.input_ids[i][l1[i] != -100])
        if e["task"].startswith("image_"):
            assert answer == fresh_picture(e["task"], 3 * 1_000_003 + i)["answer"] + "<|im_end|>"
        else:   # audio, video and text items are the committed ones
            assert answer == e["answer"] + "<|im_end|>"
            assert torch.equal(x0.input_ids[i][l0[i] != -100], x1.input_ids[i][l1[i] != -100])


def test_fresh_items_leave_positions_to_the_batch(data_copy):
    """A fresh item (built every training step) skips its own single-row positions; collate computes the batch's,
    so the batch is the same, field for field, as one of items built with theirs."""
    from dataclasses import fields

    from nano_omni.toy import PICTURE_QUESTIONS, TEXT_QUESTIONS

    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    d = ThinkerData(load_examples("train", data_copy), Processor(CFG, tok), tok, data_copy)
    fresh = [d.fresh(task, s) for task in [*PICTURE_QUESTIONS, *TEXT_QUESTIONS, "video_cue_colour"] for s in range(2)]
    full = [d.example(f).inputs for f in fresh]
    bare = [d.example(f, positions=False).inputs for f in fresh]
    assert all(x.positions is not None for x in full)
    assert all(x.positions is None and x.rope_deltas is None for x in bare)
    a, b = d.proc.collate(full, padding_side="right"), d.proc.collate(bare, padding_side="right")
    assert a.positions is not None and a.pixel_values is not None and a.pixel_values_videos is not None
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def test_fresh_text_items_are_right_and_never_held_out(data_copy):
    from nano_omni.toy import NUMBERS, PICTURE_QUESTIONS, TEXT_QUESTIONS

    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    ex = load_examples("train", data_copy)
    d = ThinkerData(ex, Processor(CFG, tok), tok, data_copy)
    for seed in range(200):
        c, n = d.fresh("text_copy", seed), d.fresh("text_count", seed)
        assert c == d.fresh("text_copy", seed)                                   # a function of the seed
        assert c["question"] == f"copy: {c['answer']}" and 1 <= len(c["answer"].split()) <= 3
        target, words = n["question"].removeprefix("how many times is ").rstrip("?").split(" in: ")
        assert n["answer"] == NUMBERS[words.split().count(target)] and 3 <= len(words.split()) <= 6
    # a question of the held-out split is drawn again: avoid the first draw of seed 0 and get another one
    first = d.fresh("text_count", 0)
    avoiding = ThinkerData(ex[:1], Processor(CFG, tok), tok, data_copy, avoid=frozenset([first["question"]]))
    assert avoiding.fresh("text_count", 0)["question"] != first["question"]
    with pytest.raises(ValueError, match="task 'text_add' has no fresh items here"):
        d.fresh("text_add", 0)
    # in a batch, only the tasks asked for are replaced
    idx = list(range(len(ex)))
    x0, l0 = d.batch(idx)
    x1, l1 = d.batch(idx, redraw_seed=3, redraw=frozenset(TEXT_QUESTIONS))
    for i, e in enumerate(ex):
        answer = tok.decode(x1.input_ids[i][l1[i] != -100])
        if e["task"] in TEXT_QUESTIONS:
            assert answer == d.fresh(e["task"], 3 * 1_000_003 + i)["answer"] + "<|im_end|>"
        else:   # pictures too: they were not asked for
            assert e["task"] not in PICTURE_QUESTIONS or torch.equal(x0.input_ids[i], x1.input_ids[i])
            assert answer == e["answer"] + "<|im_end|>"


def test_spliced_speech_says_new_word_sequences():
    """Fresh asr items: recordings of one speaker joined by 40-160 ms of silence; 2-4 digits or a colour and a
    shape; the transcript is the pieces' transcripts in order, never a held-out one."""
    import itertools

    import numpy as np

    from nano_omni.data import DIGIT_WORDS, SpeechPieces
    from nano_omni.toy import COLOURS, SHAPES

    ex = load_examples("train", tasks={"asr"})
    by_id = {e["id"]: e for e in ex}
    pieces = SpeechPieces(ex)
    kinds = set()
    for seed in range(60):
        e = pieces.splice(np.random.default_rng(seed), seed)
        words, (wav, rate), used = e["answer"].split(), e["audio"], [by_id[i] for i in e["pieces"]]
        assert rate == 16000 and len(used) >= 2 and {u["speaker"] for u in used} == {e["speaker"]}
        assert e["answer"] == " ".join(u["answer"] for u in used)
        digits = 2 <= len(words) <= 4 and set(words) <= DIGIT_WORDS
        assert digits or (len(used) == 2 and used[0]["answer"] in COLOURS and used[1]["answer"] in SHAPES), words
        kinds.add(digits)
        first = pieces.wav(used[0])
        assert np.array_equal(wav[: len(first)], first)
        silence = len(wav) - sum(len(pieces.wav(u)) for u in used)
        assert 0.04 * rate * (len(used) - 1) - 1 <= silence <= 0.16 * rate * (len(used) - 1) + 1
    assert kinds == {True, False}                                                  # both recipes are drawn
    # draw_words (the Talker's word-by-word texts): 2-4 single-digit recordings of one voice, never `avoid`;
    # a voice that recorded no digit alone falls back on `draw`
    singles = {e["answer"] for e in ex if e["answer"] in DIGIT_WORDS}
    avoid = frozenset(" ".join(w) for w in itertools.product(sorted(singles), repeat=2))   # no two-digit texts
    for seed in range(40):
        spk, chosen, gaps = pieces.draw_words(np.random.default_rng(seed), avoid)
        assert 3 <= len(chosen) <= 4 and len(gaps) == len(chosen) - 1 and all(0.04 <= g <= 0.16 for g in gaps)
        assert {c["speaker"] for c in chosen} == {spk} and all(c["answer"] in DIGIT_WORDS for c in chosen)
    strings_only = SpeechPieces([e for e in ex if e["answer"] not in DIGIT_WORDS])
    for seed in range(10):
        spk, chosen, gaps = strings_only.draw_words(np.random.default_rng(seed), avoid)
        text = " ".join(c["answer"] for c in chosen)
        assert text not in avoid and not any(c["answer"] in DIGIT_WORDS for c in chosen)
    # in ThinkerData: a held-out transcript is drawn again, and a batch replaces every other asr item
    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    slt = [e for e in ex if e["speaker"] == "slt"][:40]
    d = ThinkerData(slt, Processor(CFG, tok), tok)
    first = d.fresh("asr", 0)
    assert first == {**d.fresh("asr", 0), "audio": first["audio"]}                # a function of the seed
    avoiding = ThinkerData(slt, Processor(CFG, tok), tok, avoid=frozenset([first["answer"]]))
    assert avoiding.fresh("asr", 0)["answer"] != first["answer"]
    idx = list(range(8))
    x, labels = d.batch(idx, redraw_seed=3, redraw=frozenset({"asr"}))
    for i in idx:
        answer = tok.decode(x.input_ids[i][labels[i] != -100]).removesuffix("<|im_end|>")
        assert answer == (d.fresh("asr", 3 * 1_000_003 + i)["answer"] if (3 + i) % 2 else slt[i]["answer"])


def test_toy_tokenizer_makes_every_word_one_token():
    """The tiny models' BPE, learnt on the training texts: every word of the toy world is one token (as it stands
    in the texts: " seven" inside a sentence, "seven" at its start), specials and bytes keep their ids, any text
    still round-trips."""
    from nano_omni.bpe import pretokenize
    from nano_omni.data import toy_corpus, toy_tokenizer
    tok = toy_tokenizer(CFG.tokens, 1024, extra={f"<|voice_{i}|>": CFG.tokens.max_id + 1 + i for i in range(4)})
    words = {w for t in toy_corpus() for w in pretokenize(t)}
    assert len(words) > 100
    for w in words:
        assert len(tok.encode(w)) == 1, w
    text = "<|im_start|>user\nhow many times is red in: red blue red?<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == CFG.tokens.im_start and ids[-1] == CFG.tokens.im_end and len(ids) == 15
    assert tok.decode(ids) == text and tok.decode(tok.encode("Zürich 42!")) == "Zürich 42!"
    assert min(i for s, i in tok.vocab.items() if len(s) > 1) == CFG.tokens.max_id + 5 and tok.vocab_size <= 1024
    assert tok.encode("<|voice_3|>") == [CFG.tokens.max_id + 4]           # the extra specials keep their ids
    assert tok.decode(range(tok.vocab_size), skip_special=True)          # every id decodes


def _loud_middle(wav, rate) -> float:
    """The middle, in seconds, of the stretch of a track where the cue word is loud."""
    loud = np.nonzero(np.abs(wav) > 0.1 * np.abs(wav).max())[0]
    return (loud[0] + loud[-1]) / 2 / rate


def _colour_at(frames, fps, t) -> str:
    """The colour of the lit pixels of the frame on screen at t seconds."""
    from nano_omni.toy import COLOURS

    px = frames[int(t * fps)].reshape(-1, 3)
    (rgb,) = {tuple(p) for p in px[px.sum(1) > 0]}                        # one colour per frame
    return next(name for name, c in COLOURS.items() if c == rgb)


def test_committed_clips_are_what_the_clip_generator_draws():
    """Training draws fresh clips with nano_omni/toy.py, the functions make_data.py drew the committed ones with:
    each committed clip's frames are render_clip of its metadata, pixel for pixel; and its cue word, cut from the
    track where the manifest says it is, holds all of the track's sound."""
    import soundfile as sf

    from nano_omni.data import cue_words
    from nano_omni.toy import render_clip

    for split in ("train", "test"):
        clips = load_examples(split, tasks={"video_cue_colour"})
        for ex, word in zip(clips, cue_words(clips)):
            scene = {"shape": ex["shape"], "position": ex["position"], "radius": ex["radius"],
                     "schedule": [s["colour"] for s in ex["schedule"]]}
            assert np.array_equal(render_clip(scene), np.load(ROOT / ex["video"]["frames"])["frames"]), ex["id"]
            track, rate = sf.read(str(ROOT / ex["video"]["audio"]), dtype="float32")
            assert np.sum(word.astype(np.float64) ** 2) >= 0.9999 * np.sum(track.astype(np.float64) ** 2), ex["id"]
            assert abs(len(word) / rate - (ex["cue"]["end"] - ex["cue"]["start"] + 0.1)) < 0.002, ex["id"]


def test_fresh_clips_answer_what_sound_and_picture_show(data_copy):
    """A fresh clip is a function of its seed; its answer is the colour on screen while the cue word is loud,
    recomputed from the frames and the track alone; over many seeds the cue falls in every second and the answer
    is not the clip's most frequent colour often enough to guess."""
    from nano_omni.data import cue_words, fresh_clip
    from nano_omni.toy import VIDEO_FPS, VIDEO_SECONDS

    words = cue_words(load_examples("train", tasks={"video_cue_colour"})[:20])
    a, b = fresh_clip(5, words), fresh_clip(5, words)
    assert a["answer"] == b["answer"] and np.array_equal(a["video"]["frames"], b["video"]["frames"])
    assert not np.array_equal(a["video"]["frames"], fresh_clip(6, words)["video"]["frames"])
    seconds, modal = set(), 0
    for seed in range(100):
        c = fresh_clip(seed, words)
        frames, (track, rate) = c["video"]["frames"], c["video"]["audio"]
        assert frames.shape == (int(VIDEO_SECONDS * VIDEO_FPS), 56, 56, 3) and len(track) == VIDEO_SECONDS * rate
        t = _loud_middle(track, rate)
        assert _colour_at(frames, VIDEO_FPS, t) == c["answer"], seed
        seconds.add(int(t))
        colours = [_colour_at(frames, VIDEO_FPS, s) for s in range(VIDEO_SECONDS)]
        modal += c["answer"] == max(colours, key=colours.count)
    assert seconds == set(range(VIDEO_SECONDS)) and modal < 70


def test_fresh_clips_replace_video_items_in_a_batch(data_copy):
    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    ex = load_examples("train", data_copy)
    d = ThinkerData(ex, Processor(CFG, tok), tok, data_copy)
    idx = list(range(len(ex)))
    x0, l0 = d.batch(idx)
    x1, l1 = d.batch(idx, redraw_seed=3, redraw=frozenset(["video_cue_colour"]))
    (v,) = [i for i, e in enumerate(ex) if e["task"] == "video_cue_colour"]
    assert tok.decode(x1.input_ids[v][l1[v] != -100]) == d.fresh("video_cue_colour", 3 * 1_000_003 + v)["answer"] \
        + "<|im_end|>"
    assert not torch.equal(x0.pixel_values_videos, x1.pixel_values_videos)
    assert not torch.equal(x0.audio_features, x1.audio_features)         # a new track: the word moved
    for i, e in enumerate(ex):
        if i != v:
            assert torch.equal(x0.input_ids[i], x1.input_ids[i]), e["task"]


def test_clips_without_a_readable_cue_are_named(data_copy):
    from nano_omni.data import cue_words

    (clip,) = load_examples("train", data_copy, tasks={"video_cue_colour"})
    with pytest.raises(ValueError, match=rf"clip {clip['id']}: its cue has no 'end'"):
        cue_words([{**clip, "cue": {"start": 0.5}}], data_copy)
    with pytest.raises(ValueError, match=rf"clip {clip['id']}: cue 3.9-4.5 s lies outside its 4.00-s track"):
        cue_words([{**clip, "cue": {"start": 3.9, "end": 4.5}}], data_copy)
    (data_copy / clip["video"]["audio"]).write_bytes(b"not a flac")
    with pytest.raises(ValueError, match=r"train-\d+\.flac: cannot read the clip's sound"):
        cue_words([clip], data_copy)
    tok = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
    no_clips = ThinkerData(load_examples("train", data_copy, tasks={"text_add"}), Processor(CFG, tok), tok, data_copy)
    with pytest.raises(ValueError, match="'video_cue_colour' has no fresh items here.*video_cue_colour given clips"):
        no_clips.fresh("video_cue_colour", 0)

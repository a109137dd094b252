"""The committed toy dataset (tiny_data/): manifests, media files, splits, and answers recomputed from the media.

Every check reads the committed files only; regenerating them needs flite and is not part of the suite.
"""
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nano_omni.toy import CUE_MARGIN, IMAGE_SIZE, VIDEO_SECONDS, VIDEO_SIZE

ROOT = Path(__file__).resolve().parent.parent / "tiny_data"
_spec = importlib.util.spec_from_file_location("make_data", ROOT / "make_data.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

TASKS = {"asr", "image_shape", "image_colour", "image_count", "video_cue_colour", "text_add", "text_copy", "text_count"}
TEXT = re.compile(r"[a-z]+( [a-z]+)*")                  # answers and transcripts: lower-case words, single spaces
QUESTION = re.compile(r"[a-z :?.]+")


def read(name):
    with open(ROOT / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data():
    return {"train": read("train"), "test": read("test"), "speech": read("speech")}


def media(ex):
    """The files an example reads, relative to tiny_data/."""
    paths = [ex[k] for k in ("audio", "image") if k in ex]
    if "video" in ex:
        paths += [ex["video"]["frames"], ex["video"]["audio"]]
    return paths


def nearest_colour(rgb):
    names = list(gen.COLOURS)
    return names[int(np.argmin([np.abs(np.subtract(rgb, gen.COLOURS[n], dtype=float)).sum() for n in names]))]


def test_manifests_fields_ids_and_text(data):
    for split in ("train", "test"):
        for ex in data[split]:
            assert {"id", "task", "question", "answer"} <= ex.keys(), ex
            assert ex["task"] in TASKS and ex["id"].startswith(f"{ex['task']}-{split}-"), ex["id"]
            assert QUESTION.fullmatch(ex["question"]) and TEXT.fullmatch(ex["answer"]), ex
            assert ex["answer"].isascii() and ex["question"].isascii()
    ids = {s: [ex["id"] for ex in data[s]] for s in ("train", "test")}
    assert len(set(ids["train"])) == len(ids["train"]) and len(set(ids["test"])) == len(ids["test"])
    assert not set(ids["train"]) & set(ids["test"])
    for split in ("train", "test"):
        counts = Counter(ex["task"] for ex in data[split])
        assert set(counts) == TASKS, f"{split} lacks {TASKS - set(counts)}"
        assert min(counts.values()) >= (200 if split == "train" else 50), counts


def test_every_file_exists_loads_and_belongs_to_one_split(data):
    used = {}
    for split in ("train", "test"):
        for ex in data[split]:
            for p in media(ex):
                used.setdefault(p, set()).add(split)
    assert all(len(s) == 1 for s in used.values()), [p for p, s in used.items() if len(s) > 1][:5]
    for p in used:
        path = ROOT / p
        assert path.is_file(), p
        if p.endswith(".flac"):
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), (p, info)
            wav, _ = sf.read(str(path), dtype="int16")
            assert len(wav) > 0 and np.abs(wav).max() > 1000, p          # not silent
        elif p.endswith(".png"):
            with Image.open(path) as im:
                assert (im.mode, im.size) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE)), p
                im.load()
        elif p.endswith(".npz"):
            frames = np.load(path)["frames"]
            assert frames.dtype == np.uint8 and frames.shape == (8, VIDEO_SIZE, VIDEO_SIZE, 3), p
        else:
            raise AssertionError(f"unexpected media file {p}")
    # nothing generated lies around unreferenced (a stale file from an older run would be shipped for nothing)
    on_disk = {str(f.relative_to(ROOT)) for sub in ("speech", "images", "video")
               for f in (ROOT / sub).rglob("*") if f.is_file()}
    assert on_disk == set(used) | {u["audio"] for u in data["speech"]}


def test_speech_manifest_matches_asr_examples(data):
    speech = data["speech"]
    assert len({u["id"] for u in speech}) == len(speech)
    by_path = {u["audio"]: u for u in speech}
    for split in ("train", "test"):
        asr = [ex for ex in data[split] if ex["task"] == "asr"]
        assert {ex["audio"] for ex in asr} == {u["audio"] for u in speech if u["split"] == split}
        for ex in asr:
            u = by_path[ex["audio"]]
            assert ex["answer"] == ex["transcript"] == u["transcript"] and ex["speaker"] == u["speaker"]
            assert set(u["transcript"].split()) <= set(gen.NUMBERS) | set(gen.COLOURS) | set(gen.SHAPES) | \
                {w for p in gen.PHRASES for w in p.split()}, u
        assert {u["speaker"] for u in speech if u["split"] == split} == set(gen.VOICES)
    # held-out test strings: digit strings and some colour-shape pairs are never heard in train
    train = {u["transcript"] for u in speech if u["split"] == "train"}
    for kind in ("digits", "colour_shape"):
        test = {u["transcript"] for u in speech if u["split"] == "test" and u["kind"] == kind}
        assert test and not test & train, kind
    assert all(2 <= len(u["transcript"].split()) <= 4 for u in speech if u["kind"] == "digits")


def test_image_answers_match_the_pixels(data):
    for split in ("train", "test"):
        for ex in (e for e in data[split] if e["task"].startswith("image_")):
            want = {"image_shape": ex["shape"], "image_colour": ex["colour"], "image_count": gen.NUMBERS[ex["count"]]}
            assert ex["answer"] == want[ex["task"]] and ex["count"] == len(ex["positions"]) and 1 <= ex["count"] <= 3
            if ex["task"] != "image_colour":
                continue                                                    # one pixel check per picture
            a = np.asarray(Image.open(ROOT / ex["image"]))
            for x, y in ex["positions"]:
                assert tuple(a[y, x]) == gen.COLOURS[ex["colour"]], (ex["id"], x, y)
            lit = a.reshape(-1, 3)[a.reshape(-1, 3).any(axis=1)]           # every non-black pixel has the colour
            assert (lit == gen.COLOURS[ex["colour"]]).all(), ex["id"]


def test_video_cue_answer_recomputed_from_frames_and_track(data):
    pad = gen.PAD_S
    for split in ("train", "test"):
        clips = [e for e in data[split] if e["task"] == "video_cue_colour"]
        for ex in clips:
            v, cue, sched = ex["video"], ex["cue"], ex["schedule"]
            frames = np.load(ROOT / v["frames"])["frames"]                  # (T, H, W, 3)
            x, y = ex["position"]
            shown = [nearest_colour(frames[t, y, x]) for t in range(len(frames))]
            # the frames follow the schedule: frame t is on screen during [t / fps, (t + 1) / fps)
            for t, c in enumerate(shown):
                (seg,) = [s for s in sched if s["start"] <= t / v["fps"] < s["end"]]
                assert c == seg["colour"], (ex["id"], t)
            assert len(set(shown)) >= 3, ex["id"]                           # the frames alone cannot answer
            # the answer is the colour on screen at the cue's midpoint, far from any colour change
            assert shown[int(cue["mid"] * v["fps"])] == ex["answer"], ex["id"]
            changes = [b["start"] for a, b in zip(sched, sched[1:]) if a["colour"] != b["colour"]]
            assert all(abs(cue["mid"] - c) >= CUE_MARGIN - 1e-9 for c in changes), ex["id"]
            assert int(cue["start"]) == int(cue["mid"]) and cue["end"] <= int(cue["mid"]) + 1, ex["id"]
            # the sound is where the metadata says: silence outside the padded word, speech inside
            wav, sr = sf.read(str(ROOT / v["audio"]), dtype="int16")
            assert len(wav) == len(frames) / v["fps"] * sr
            lo, hi = int((cue["start"] - pad) * sr) - 1, int((cue["end"] + pad) * sr) + 2
            assert not wav[: max(lo, 0)].any() and not wav[hi:].any(), ex["id"]
            assert np.abs(wav[int(cue["start"] * sr): int(cue["end"] * sr)]).max() > 1000, ex["id"]
        # the cue falls in every second of the clip, so the position of the word carries the answer
        assert {int(e["cue"]["mid"]) for e in clips} == set(range(VIDEO_SECONDS))


def test_text_answers_are_right_and_test_questions_are_new(data):
    num = {w: i for i, w in enumerate(gen.NUMBERS)}
    for split in ("train", "test"):
        for ex in data[split]:
            q, a = ex["question"], ex["answer"]
            if ex["task"] == "text_add":
                a1, a2 = [w for w in re.findall(r"[a-z]+", q) if w in num]
                assert num[a] == num[a1] + num[a2], q
            elif ex["task"] == "text_copy":
                assert q == f"copy: {a}", q
            elif ex["task"] == "text_count":
                target, items = re.fullmatch(r"how many times is (\w+) in: ([a-z ]+)\?", q).groups()
                assert num[a] == items.split().count(target), q
    for task in ("text_add", "text_copy", "text_count"):
        train = {e["question"] for e in data["train"] if e["task"] == task}
        test = {e["question"] for e in data["test"] if e["task"] == task}
        assert not train & test, task


def test_total_size_under_budget():
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert total < 25e6, f"tiny_data holds {total / 1e6:.1f} MB; the budget is 25 MB"


def test_readme_tables_are_the_generator_summary():
    readme = (ROOT / "README.md").read_text()
    missing = [line for line in gen.summary(ROOT).splitlines() if line.strip() and line.rstrip() not in readme]
    assert not missing, f"tiny_data/README.md is out of date (python tiny_data/make_data.py --summary): {missing}"

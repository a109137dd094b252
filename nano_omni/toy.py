"""The toy world of tiny_data/: its words, pictures and clips, shared by the generator script and by training.

tiny_data/make_data.py draws the committed pictures with `draw_picture`, the clips with `clip_scene`,
`render_clip` and `cue_track`, and writes the copying and counting questions with `copy_question` /
`count_question`; training (train_tiny.py, stage 2) can make fresh ones with the same functions at every step
(`--train.fresh_pictures`, `--train.fresh_text` and `--train.fresh_video`, all on by default; a fresh clip's cue
word is cut from the training clips' own tracks: data.fresh_clip). A model of this size memorises 400 pictures,
clips or questions long before it learns what a star looks like, how to count or when a word was said; an
endless supply of new items of the same kind is what makes it learn the task. The held-out test items are never
regenerated: they are other draws from the same distribution, exactly as the committed train items are, and a
fresh question that happens to equal a held-out one is drawn again.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBERS = DIGITS + ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                    "eighteen", "nineteen", "twenty")
COLOURS = {"red": (230, 25, 25), "green": (30, 190, 40), "blue": (40, 90, 255),
           "yellow": (250, 225, 20), "purple": (165, 60, 230), "orange": (255, 140, 0)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
TEXT_WORDS = tuple(COLOURS) + SHAPES + DIGITS          # the words the copying task copies
IMAGE_SIZE = 84
PICTURE_QUESTIONS = {"image_shape": "what shape is this?",
                     "image_colour": "what colour is the shape?",
                     "image_count": "how many shapes are there?"}
VIDEO_SIZE, VIDEO_FPS, VIDEO_SECONDS = 56, 2.0, 4    # clips: 8 frames of 56x56, a colour per whole second
PAD_S = 0.05                                         # silence kept before and after each recorded word
CUE_WORD, CUE_MARGIN = "now", 0.3                    # the cue's midpoint stays >= 0.3 s from any colour change
VIDEO_QUESTION = f"what colour was the shape when the voice said {CUE_WORD}?"
PICTURE_ANSWERS = {"image_shape": SHAPES, "image_colour": tuple(COLOURS),     # what each can answer (draw_picture
                   "image_count": NUMBERS[1:4]}                               # draws one to three shapes)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, rgb: tuple) -> None:
    """A filled shape of half-size r centred on (cx, cy); every shape covers its own centre pixel."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        h = round(r * 0.85)                                   # a square of side 2r would look bigger than the rest
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
    elif shape == "triangle":                                 # equilateral, centroid at (cx, cy)
        draw.polygon([(cx, cy - r), (cx - 0.87 * r, cy + 0.5 * r), (cx + 0.87 * r, cy + 0.5 * r)], fill=rgb)
    elif shape == "star":                                     # five points, inner radius 0.45 r
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + a * np.cos(t), cy - a * np.sin(t)) for a, t in zip(radii, angles)], fill=rgb)
    elif shape == "cross":                                    # a plus sign with arms 0.35 r thick each side
        t = round(r * 0.35)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=rgb)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def place(rng: np.random.Generator, count: int, r: int, size: int) -> list[list[int]]:
    """`count` centres inside a size x size picture, 2 px from the border, shapes at least 4 px apart."""
    while True:
        centres = rng.integers(r + 2, size - r - 2, size=(count, 2))
        gaps = [np.hypot(*(centres[i] - centres[j])) for i in range(count) for j in range(i)]
        if all(g >= 2 * r + 4 for g in gaps):
            return centres.tolist()


def draw_picture(rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One toy picture: 1-3 copies of one shape in one colour on black, and what it shows
    {"shape", "colour", "count", "positions", "radius"}."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    count, r = int(rng.integers(1, 4)), int(rng.integers(9, 13))
    centres = place(rng, count, r, IMAGE_SIZE)
    return render_picture(shape, colour, centres, r), {"shape": shape, "colour": colour, "count": count,
                                                        "positions": centres, "radius": r}


def render_picture(shape: str, colour: str, positions: list, r: int) -> Image.Image:
    """The picture that a toy picture's metadata describes: `shape` in `colour` at each centre, on black."""
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    for cx, cy in positions:
        draw_shape(ImageDraw.Draw(im), shape, cx, cy, r, COLOURS[colour])
    return im


def picture_answer(task: str, meta: dict) -> str:
    """The answer a picture task expects for a picture described by `meta`."""
    return {"image_shape": meta["shape"], "image_colour": meta["colour"], "image_count": NUMBERS[meta["count"]]}[task]


def colour_schedule(rng: np.random.Generator) -> list[str]:
    """One colour per second of a clip; at least three different colours, so the frames alone never give the
    answer."""
    names = list(COLOURS)
    while True:
        seq = [names[i] for i in rng.integers(len(names), size=VIDEO_SECONDS)]
        if len(set(seq)) >= 3:
            return seq


def clip_scene(rng: np.random.Generator) -> dict:
    """What a clip shows: {"shape", "position", "radius", "schedule" (a colour per second)}."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = int(rng.integers(10, 15))
    (cx, cy), = place(rng, 1, r, VIDEO_SIZE)
    return {"shape": shape, "position": [cx, cy], "radius": r, "schedule": colour_schedule(rng)}


def render_clip(scene: dict) -> np.ndarray:
    """The frames a clip's scene describes: (T, H, W, 3) uint8, the shape on black in the colour of its second."""
    n = int(VIDEO_SECONDS * VIDEO_FPS)
    frames = np.zeros((n, VIDEO_SIZE, VIDEO_SIZE, 3), np.uint8)
    for f in range(n):
        im = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), (0, 0, 0))
        draw_shape(ImageDraw.Draw(im), scene["shape"], *scene["position"], scene["radius"],
                   COLOURS[scene["schedule"][int(f / VIDEO_FPS)]])
        frames[f] = np.asarray(im)
    return frames


def window(wav: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Samples lo..hi of `wav`, zeros where the window reaches past either end."""
    return np.pad(wav[max(lo, 0): hi], (max(-lo, 0), max(hi - len(wav), 0)))


def cue_track(rng: np.random.Generator, word: np.ndarray, rate: int, pad: int) -> tuple[np.ndarray, dict]:
    """A clip's sound: silence with `word` (samples at `rate`, `pad` samples of silence kept at each end) laid so
    that its spoken middle falls in a random second k, >= CUE_MARGIN from that second's ends, the whole spoken
    word inside it. Returns (track of VIDEO_SECONDS * rate samples, {"second": k, "start", "end", "mid"} in s)."""
    k = int(rng.integers(VIDEO_SECONDS))
    mid = round(float(k + rng.uniform(CUE_MARGIN, 1 - CUE_MARGIN)), 3)
    spoken = (len(word) - 2 * pad) / rate                                    # the word without its padding
    if mid - spoken / 2 < k or mid + spoken / 2 > k + 1:
        raise ValueError(f"the cue word ({spoken:.2f} s) around {mid} s leaves second {k}; widen CUE_MARGIN")
    start = int(round((mid - spoken / 2) * rate)) - pad                      # where the padded word begins
    track = np.zeros(VIDEO_SECONDS * rate, word.dtype)
    lo, hi = max(start, 0), min(start + len(word), len(track))              # the padding may be cut at the ends
    track[lo:hi] = word[lo - start: hi - start]
    return track, {"second": k, "start": round(mid - spoken / 2, 3), "end": round(mid + spoken / 2, 3), "mid": mid}


def copy_question(rng: np.random.Generator) -> tuple[str, str]:
    """text_copy: 'copy: <1-3 words>' and the words."""
    s = " ".join(TEXT_WORDS[i] for i in rng.integers(len(TEXT_WORDS), size=int(rng.integers(1, 4))))
    return f"copy: {s}", s


def count_question(rng: np.random.Generator) -> tuple[str, str]:
    """text_count: how often a colour occurs in a list of 3-6 colours (0-3 times), and the count as a word."""
    target, c = list(COLOURS)[rng.integers(len(COLOURS))], int(rng.integers(0, 4))
    others = [x for x in COLOURS if x != target]
    n_others = int(rng.integers(max(0, 3 - c), 7 - c))                     # three to six words in all
    items = [target] * c + [others[i] for i in rng.integers(len(others), size=n_others)]
    items = [items[i] for i in rng.permutation(len(items))]
    return f"how many times is {target} in: {' '.join(items)}?", NUMBERS[c]


TEXT_QUESTIONS = {"text_copy": copy_question, "text_count": count_question}   # the text tasks with fresh items

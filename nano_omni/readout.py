"""The encoders read out through the LLM's own output layer: what stage 1 of the tiny recipe trains them with.

Qwen2.5-Omni's encoders start trained (Qwen2.5-VL's vision encoder, Whisper-large-v3's audio encoder); the tiny
model's start random, and through a random frozen LLM they learn next to nothing. train_tiny.py's stage 1 ends with
two parts that stand in for that pretraining, each scoring an encoder's output through the LLM's frozen final norm
and output layer (`lm_head`), so that no head is added and thrown away:

    PictureReadout   a picture's merged vision tokens, averaged -> the answer words of each picture question
    SpeechReadout    every audio token -> a blank (the pad token's row) or a token transcripts are written in (CTC)

Stage 2 keeps SpeechReadout's CTC loss beside the Thinker's own on its asr batches (joint CTC and attention
training, as in Watanabe et al. 2017: the encoder keeps every spoken word in its own stretch of audio tokens,
which held-out transcripts need most where a digit is said twice; train_tiny.py, --train.s2_ctc).

`readout_accuracy` measures what an encoder knows on its own this way: meaningful on a checkpoint right after stage
1 (`python train_tiny.py --out R --stage 1`, then `python -m nano_omni.evaluate --checkpoint R/checkpoint
--readouts`); stage 2 trains the output layer on, and the readouts of a finished model no longer line up.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .audio_enc import AudioEncoder
from .data import IMAGE_PIXELS, ROOT, ThinkerData, load_examples
from .toy import PICTURE_ANSWERS, draw_picture, picture_answer
from .vision_io import preprocess_images


class PictureReadout(nn.Module):
    """A picture's merged tokens are averaged, put through the LLM's final norm and output layer, and scored against
    the answer words of each picture question (which shape, which colour, how many; a word of several tokens by
    the mean of their rows). forward -> {task: logits (n_pictures, n_answers)}, answers in PICTURE_ANSWERS order."""

    def __init__(self, thinker: nn.Module, tok):
        super().__init__()
        self.thinker = thinker
        self.words = {task: [tok.encode(w) for w in ws] for task, ws in PICTURE_ANSWERS.items()}

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        th = self.thinker
        units = (grid_thw.prod(-1) // th.visual.cfg.merge_unit).tolist()
        y = th.visual(pixel_values, grid_thw)
        h = th.model.norm(torch.stack([u.mean(0) for u in y.split(units)]))          # (n, d)
        w = th.lm_head.weight
        return {task: h @ torch.stack([w[ids].mean(0) for ids in rows]).T for task, rows in self.words.items()}


class SpeechReadout(nn.Module):
    """Each audio token, through the LLM's final norm and output layer, scored on a blank (`blank`, the pad token's
    row) and on the tokens `ids` transcripts are written in. forward -> logits (total audio tokens, 1 + len(ids)),
    the audios one after another; column 0 is the blank."""

    def __init__(self, thinker: nn.Module, ids: list[int], blank: int):
        super().__init__()
        self.thinker = thinker
        self.register_buffer("rows", torch.tensor([blank, *ids]), persistent=False)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.thinker.audio_tower(features, lengths))

    def head(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """The scores of audio tokens the encoder already gave (total audio tokens, d) -> (total, 1 + len(ids)):
        what stage 2 scores its asr batches' audio with, beside the Thinker's own loss (train_tiny.py, s2_ctc)."""
        th = self.thinker
        return th.model.norm(audio_embeds) @ th.lm_head.weight[self.rows].T


def transcript_tokens(tok, examples: list[dict]) -> list[int]:
    """Every token a transcript of `examples` (or a splice of their words) can be written with: each word's
    tokens with and without the space before it."""
    words = {w for e in examples for w in e["answer"].split()}
    return sorted({i for w in words for i in tok.encode(w) + tok.encode(" " + w)})


def ctc_greedy(logits: torch.Tensor) -> list[int]:
    """Best path of one audio's (T, 1 + n) readout logits: repeats merged, then blanks (column 0) dropped;
    returns columns (1-based into the readout's ids)."""
    best = logits.argmax(-1).tolist()
    return [c for j, c in enumerate(best) if c != 0 and (j == 0 or c != best[j - 1])]


@torch.no_grad()
def readout_accuracy(model, tok, proc, root=ROOT, n_pictures: int = 300, seed: int = 99) -> dict[str, float]:
    """Exact match of each readout: the three picture questions on `n_pictures` newly drawn pictures (a fixed
    draw, none of training's), and the held-out asr transcripts spelled by the speech readout's best path (the
    tokens of the training transcripts' words, as in training)."""
    th = model.thinker
    dev = next(th.parameters()).device
    pics = [draw_picture(np.random.default_rng([seed, i])) for i in range(n_pictures)]
    pv, grid = preprocess_images([im for im, _ in pics], model.cfg.vision, *IMAGE_PIXELS)
    logits = PictureReadout(th, tok)(pv.to(dev), grid.to(dev))
    out = {task: float(np.mean([ws[k] == picture_answer(task, m)
                                for k, (_, m) in zip(logits[task].argmax(-1).tolist(), pics)]))
           for task, ws in PICTURE_ANSWERS.items()}
    ids = transcript_tokens(tok, load_examples("train", root, tasks={"asr"}))
    readout = SpeechReadout(th, ids, model.cfg.tokens.pad).to(dev)
    test = load_examples("test", root, tasks={"asr"})
    data = ThinkerData(test, proc, tok, root)
    right = 0
    for k in range(0, len(test), 16):
        idx = list(range(k, min(k + 16, len(test))))
        x, _ = data.batch(idx)
        n_tok = [AudioEncoder.token_count(int(n)) for n in x.audio_lengths]
        for i, lg in zip(idx, readout(x.audio_features.to(dev), x.audio_lengths.to(dev)).split(n_tok)):
            text = tok.decode([ids[c - 1] for c in ctc_greedy(lg)])
            right += " ".join(text.split()) == test[i]["answer"]
    out["asr"] = right / len(test)
    return out

"""The multimodal processor: conversations with text, audio, images and video -> one batch the Thinker reads.

Paper: Qwen2.5-Omni sections 2.2 and 4.1 (ChatML; audio and video interleaved in 2-s chunks). Reference 1.7, 3a.

    conversation --chat_template--> ChatML text with one placeholder per media item --tokenizer--> ids
    each media item --front end--> features, and the number of LLM tokens its encoder will return
    each placeholder --expanded to exactly that many tokens--> ids; audio-in-video becomes
        <|vision_bos|><|audio_bos|> [video chunk 0][audio chunk 0][video chunk 1]... <|audio_eos|><|vision_eos|>
    rows padded (left by default, for generation) -> input_ids, attention_mask
    tmrope.get_rope_index -> positions (3, B, T), rope deltas (B, 1)

A media item is a dict: {"type": "audio", "audio": path | (array, sample_rate)}, {"type": "image", "image": path |
PIL image | array}, {"type": "video", "video": folder of frames | .mp4 path | (T, H, W, 3) array, "fps": frame rate
of the given frames, "audio": optional path | (array, sample_rate)}. A folder of frames may hold its sound as
`audio.wav`. Reading .mp4 needs the optional package PyAV (`pip install av`).

Documented normalisations: a video's audio track shorter or longer than its frames is kept as it is (the 2-s
chunks interleave while both last, then the longer one continues alone; TMRoPE places every token at its own
time). Placeholder tokens typed into the text are an error: media enter as items.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .audio_enc import log_mel
from .audio_io import load_audio
from .config import OmniConfig
from .tmrope import audio_in_video_layout, audio_token_count, get_rope_index
from .tokenizer import DEFAULT_SYSTEM, chat_template
from .vision_io import preprocess_image, preprocess_video

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class OmniInputs:
    """Everything the Thinker reads for one batch. Media tensors hold all items of the batch in reading order."""
    input_ids: torch.Tensor                          # (B, T)
    attention_mask: torch.Tensor                     # (B, T) 1 = real token
    positions: torch.Tensor | None                   # (3, B, T) TMRoPE ids (None: not computed, see __call__)
    rope_deltas: torch.Tensor | None                 # (B, 1)
    audio_features: torch.Tensor | None = None       # (n_mels, sum of frames), standalone and in-video audio
    audio_lengths: torch.Tensor | None = None        # (n_audio,) mel frames each
    pixel_values: torch.Tensor | None = None         # (sum of patches, patch_dim), images
    image_grid_thw: torch.Tensor | None = None       # (n_image, 3)
    pixel_values_videos: torch.Tensor | None = None  # (sum of patches, patch_dim), videos
    video_grid_thw: torch.Tensor | None = None       # (n_video, 3)
    second_per_grid: torch.Tensor | None = None      # (n_video,)
    use_audio_in_video: bool = False

    def to(self, device) -> "OmniInputs":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return OmniInputs(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    def model_kwargs(self) -> dict:
        """Keyword arguments for Thinker.forward / Thinker.generate."""
        skip = {"use_audio_in_video", "second_per_grid", "rope_deltas"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def load_video(source, fps: float | None = None, audio=None):
    """A video item -> (frames: list of PIL images or a (T, H, W, 3) array, frame rate, mono 16-kHz audio or None).

    source: a folder of image files (sorted by name; `fps` required; `audio.wav` inside is its sound), a
    (T, H, W, 3) array (`fps` required), or a video file read with PyAV.
    """
    wav = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise ValueError(f"video folder {path} holds no image frames ({', '.join(IMAGE_EXTS)})")
            if fps is None:
                raise ValueError(f"video folder {path}: pass the frame rate of its frames as 'fps'")
            frames = [str(p) for p in files]
            if audio is None and (path / "audio.wav").is_file():
                audio = path / "audio.wav"
        elif path.is_file():
            frames, fps, wav = _read_video_file(path)
        else:
            raise FileNotFoundError(f"video {path} does not exist")
    else:
        frames = np.asarray(source)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"a video array must have shape (T, H, W, 3), got {frames.shape}")
        if fps is None:
            raise ValueError("a video array needs its frame rate as 'fps'")
    if audio is not None:
        wav = load_audio(audio[0], audio[1]) if isinstance(audio, tuple) else load_audio(audio)
    return frames, float(fps), wav


def _read_video_file(path: Path):
    try:
        import av  # optional dependency
    except ImportError:
        raise ImportError(f"reading the video file {path} needs the optional package PyAV: pip install av "
                          f"(or pass a folder of frames with an audio.wav)") from None
    try:
        with av.open(str(path)) as box:
            if not box.streams.video:
                raise ValueError("the file holds no video stream")
            vstream = box.streams.video[0]
            fps = float(vstream.average_rate or 25)
            frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
        wav = None
        with av.open(str(path)) as box:
            if box.streams.audio:
                rate = box.streams.audio[0].rate
                to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)   # any sample format -> float
                pcm = [r.to_ndarray().reshape(-1) for f in box.decode(audio=0) for r in to_mono.resample(f)]
                if pcm:
                    wav = load_audio(np.concatenate(pcm).astype(np.float32), rate)
    except Exception as e:
        raise ValueError(f"cannot read video file {path}: {e}") from None
    return np.stack(frames), fps, wav


class Processor:
    """Turns conversations into OmniInputs. `tokenizer` has `.encode(text)` with special tokens."""

    def __init__(self, cfg: OmniConfig, tokenizer, *, video_fps: float = 2.0, max_audio_seconds: float | None = None,
                 image_pixels: tuple[int, int] | None = None, video_pixels: tuple[int, int] | None = None):
        """image_pixels / video_pixels: (min, max) pixel budget per image / per frame (defaults: the official
        budgets in vision_io: images 4..16384 tokens, video frames 128..768 tokens of 28x28 pixels)."""
        self.cfg, self.tok, self.video_fps = cfg, tokenizer, video_fps
        self.max_audio_seconds = cfg.audio.max_seconds if max_audio_seconds is None else max_audio_seconds
        self.image_pixels = image_pixels or (None, None)
        self.video_pixels = video_pixels or (None, None)

    def __call__(self, conversations, *, use_audio_in_video: bool = False, system: str | None = DEFAULT_SYSTEM,
                 add_generation_prompt: bool = True, padding_side: str = "left", positions: bool = True) -> OmniInputs:
        """positions=False leaves positions and rope_deltas None: for an item that only ever enters a batch through
        `collate`, which computes the batch's own (training builds a fresh item every step; its single-row positions
        cost ~1 ms for a picture and were thrown away)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]                       # one conversation
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tk = self.cfg.tokens
        rows, mels, images, image_grids, videos, video_grids, spgs = [], [], [], [], [], [], []
        for ci, conv in enumerate(conversations):
            items = [it for m in conv for it in (m.get("content") if isinstance(m.get("content"), list) else [])]
            media = [it for it in items if isinstance(it, dict) and it.get("type") in ("audio", "image", "video")]
            ids = self.tok.encode(chat_template(conv, system=system, add_generation_prompt=add_generation_prompt))
            self._check_placeholders(ci, ids, media)
            expansion = []                                         # per media item: the tokens replacing its pad
            for it in media:
                kind = it["type"]
                if kind == "audio":
                    mel = self._audio(it, ci)
                    mels.append(mel)
                    expansion.append([tk.audio_pad] * audio_token_count(mel.shape[1]))
                elif kind == "image":
                    pv, grid = preprocess_image(it.get("image"), self.cfg.vision, *self.image_pixels)
                    images.append(pv)
                    image_grids.append(grid)
                    expansion.append([tk.image_pad] * (int(grid.prod()) // self.cfg.vision.merge_unit))
                else:
                    frames, fps, wav = load_video(it.get("video"), it.get("fps"), it.get("audio"))
                    pv, grid, spg = preprocess_video(frames, self.cfg.vision, fps, self.video_fps,
                                                     min_pixels=self.video_pixels[0], max_pixels=self.video_pixels[1])
                    videos.append(pv)
                    video_grids.append(grid)
                    spgs.append(spg)
                    n_video = int(grid.prod()) // self.cfg.vision.merge_unit
                    if not use_audio_in_video:
                        expansion.append([tk.video_pad] * n_video)
                        continue
                    if wav is None:
                        raise ValueError(f"conversation {ci}: use_audio_in_video=True but a video item has no "
                                         f"audio track (give it an 'audio' or an audio.wav in its folder)")
                    mel = log_mel(self._fit_audio(wav, ci))
                    mels.append(mel)
                    layout = audio_in_video_layout(grid[0].tolist(), spg, audio_token_count(mel.shape[1]),
                                                   self.cfg.vision.spatial_merge_size,
                                                   self.cfg.position_id_per_seconds, self.cfg.seconds_per_chunk)
                    toks = [tk.audio_bos]
                    for part, n in layout:
                        toks += [tk.video_pad if part == "video" else tk.audio_pad] * n
                    expansion.append(toks + [tk.audio_eos])
            rows.append(self._expand(ids, expansion))
        return self._batch(rows, mels, images, image_grids, videos, video_grids, spgs, use_audio_in_video, padding_side,
                           positions)

    # -- pieces ------------------------------------------------------------------------------------------------
    def _audio(self, it, ci) -> torch.Tensor:
        src = it.get("audio")
        if src is None:
            raise ValueError(f"conversation {ci}: an audio item has no 'audio' (a path or (array, sample_rate))")
        wav = load_audio(src[0], src[1], self.max_audio_seconds) if isinstance(src, tuple) else \
            load_audio(src, max_seconds=self.max_audio_seconds)
        return log_mel(self._fit_audio(wav, ci))

    def _fit_audio(self, wav, ci):
        secs = wav.numel() / 16000
        if secs > self.max_audio_seconds:
            raise ValueError(f"conversation {ci}: audio of {secs:.1f} s is longer than the configured maximum "
                             f"{self.max_audio_seconds} s")
        if audio_token_count(wav.numel() // 160) < 1:
            raise ValueError(f"conversation {ci}: audio of {wav.numel()} samples ({1000 * secs:.0f} ms) is shorter "
                             f"than one audio token (40 ms)")
        return wav

    def _check_placeholders(self, ci, ids, media):
        tk = self.cfg.tokens
        for kind, pad in (("audio", tk.audio_pad), ("image", tk.image_pad), ("video", tk.video_pad)):
            n_pad, n_items = ids.count(pad), sum(1 for it in media if it["type"] == kind)
            if n_pad != n_items:
                raise ValueError(f"conversation {ci} has {n_pad} {kind} placeholder(s) but {n_items} {kind} item(s); "
                                 f"do not write placeholder tokens in the text, add media items instead")

    def _expand(self, ids, expansion) -> list[int]:
        tk = self.cfg.tokens
        out, k = [], 0
        for t in ids:
            if t in tk.media_pads:
                out.extend(expansion[k])
                k += 1
            else:
                out.append(t)
        return out

    def collate(self, items: list[OmniInputs], padding_side: str = "right") -> OmniInputs:
        """Join single-conversation OmniInputs into one padded batch (positions are recomputed for the batch)."""
        if not items:
            raise ValueError("collate needs at least one item")
        if len({it.use_audio_in_video for it in items}) > 1:
            raise ValueError("collate: items disagree on use_audio_in_video")
        rows, mels, images, igrids, videos, vgrids, spgs = [], [], [], [], [], [], []
        for it in items:
            for b in range(it.input_ids.shape[0]):
                rows.append(it.input_ids[b][it.attention_mask[b].bool()].tolist())
            if it.audio_features is not None:
                mels += list(it.audio_features.split(it.audio_lengths.tolist(), dim=1))
            if it.pixel_values is not None:
                images.append(it.pixel_values)
                igrids.append(it.image_grid_thw)
            if it.pixel_values_videos is not None:
                videos.append(it.pixel_values_videos)
                vgrids.append(it.video_grid_thw)
                spgs += it.second_per_grid.tolist()
        return self._batch(rows, mels, images, igrids, videos, vgrids, spgs, items[0].use_audio_in_video, padding_side)

    def _batch(self, rows, mels, images, image_grids, videos, video_grids, spgs, aiv, side,
               with_positions: bool = True) -> OmniInputs:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.cfg.tokens.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[b, sl] = torch.tensor(r)
            mask[b, sl] = 1
        cat = lambda xs: torch.cat(xs) if xs else None
        audio_lengths = torch.tensor([m.shape[1] for m in mels]) if mels else None
        kw = dict(image_grid_thw=cat(image_grids), video_grid_thw=cat(video_grids),
                  second_per_grid=torch.tensor(spgs, dtype=torch.float32) if spgs else None)
        positions = deltas = None
        if with_positions:
            positions, deltas = get_rope_index(ids, self.cfg.tokens, attention_mask=mask, audio_lengths=audio_lengths,
                                               use_audio_in_video=aiv,
                                               spatial_merge_size=self.cfg.vision.spatial_merge_size,
                                               position_id_per_seconds=self.cfg.position_id_per_seconds,
                                               seconds_per_chunk=self.cfg.seconds_per_chunk, **kw)
        return OmniInputs(ids, mask, positions, deltas, torch.cat(mels, 1) if mels else None, audio_lengths,
                          cat(images), kw["image_grid_thw"], cat(videos), kw["video_grid_thw"], kw["second_per_grid"], aiv)

"""Qwen2.5-Omni, wired: Thinker (with its encoders) -> Talker -> Token2Wav, offline and streaming.

Paper: Qwen2.5-Omni sections 2.1-2.4. This is where the components meet; each of them lives in its own file.

    generate(): the Thinker writes the reply; the Talker turns (hidden states + embeddings of the reply) into
                codes; Token2Wav turns codes into a 24 kHz waveform. Returns text ids, codes and the waveform.
    stream():   the same, but everything runs as soon as it can: the Talker reads reply token k at its step k
                while the Thinker is still writing, codes go to streaming Token2Wav, and ("text", ids) and
                ("audio", pcm) events come out as they are ready.

Voices: a voice is the Talker's speaker token (`bos_id`, a token of the Thinker's vocabulary whose embedding
starts the Talker's codec track), an x-vector `cond` (1, enc_emb_dim) and a reference mel `ref_mel` (1, T, mel)
for the DiT, as in the official `spk_dict.pt`. `load_voices` reads our safetensors format, or the official
torch file through torch's weights-only unpickler, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .audio_enc import AudioEncoder
from .checkpoint import atomic_write_bytes
from .config import OmniConfig
from .processor import OmniInputs
from .talker import Talker, TalkerPrompt
from .thinker import Thinker, ThinkerStep
from .tmrope import get_rope_index
from .token2wav import FrameNoise, Token2Wav
from .vision_enc import VisionEncoder


@dataclass
class Voice:
    bos_id: int
    cond: torch.Tensor       # (1, enc_emb_dim)
    ref_mel: torch.Tensor    # (1, T, mel_dim)


def check_voice(name: str, v, cfg: OmniConfig) -> Voice:
    if not isinstance(v, Voice):
        raise ValueError(f"voice {name!r} must be a Voice, got {type(v).__name__}")
    if not isinstance(v.bos_id, int) or not (0 <= v.bos_id < cfg.thinker.vocab_size):
        raise ValueError(f"voice {name!r}: bos_id must be a token id below {cfg.thinker.vocab_size}, got {v.bos_id!r}")
    if not isinstance(v.cond, torch.Tensor) or tuple(v.cond.shape) != (1, cfg.dit.enc_emb_dim):
        raise ValueError(f"voice {name!r}: cond must have shape (1, {cfg.dit.enc_emb_dim}), got "
                         f"{tuple(getattr(v.cond, 'shape', ()))}")
    if not isinstance(v.ref_mel, torch.Tensor) or v.ref_mel.ndim != 3 or v.ref_mel.shape[0] != 1 \
            or v.ref_mel.shape[2] != cfg.dit.mel_dim:
        raise ValueError(f"voice {name!r}: ref_mel must have shape (1, T, {cfg.dit.mel_dim}), got "
                         f"{tuple(getattr(v.ref_mel, 'shape', ()))}")
    if not (torch.isfinite(v.cond).all() and torch.isfinite(v.ref_mel).all()):
        raise ValueError(f"voice {name!r} holds NaN or infinite values")
    return v


def save_voices(path: str | os.PathLike, voices: dict[str, Voice]) -> None:
    """Our voice file: safetensors with '<name>.cond' and '<name>.ref_mel', the bos ids in the metadata."""
    from safetensors.torch import save

    tensors, meta = {}, {}
    for name, v in voices.items():
        tensors[f"{name}.cond"] = v.cond.float().clone().contiguous()      # clones: safetensors refuses shared storage
        tensors[f"{name}.ref_mel"] = v.ref_mel.float().clone().contiguous()
        meta[name] = v.bos_id
    atomic_write_bytes(path, save(tensors, metadata={"bos_ids": json.dumps(meta)}))


def load_voices(path: str | os.PathLike, cfg: OmniConfig) -> dict[str, Voice]:
    """Read voices from our .safetensors file or an official spk_dict.pt. Nothing is ever executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"voices file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("bos_ids", "{}"))
                raw = {n: Voice(int(b), f.get_tensor(f"{n}.cond"), f.get_tensor(f"{n}.ref_mel")) for n, b in meta.items()}
        except Exception as e:
            raise ValueError(f"voices file {path} is not a valid nano_omni voices file: {e}") from None
    else:
        import pickle

        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)   # the safe unpickler
        except pickle.UnpicklingError as e:
            raise ValueError(f"voices file {path} holds objects other than tensors (refused, nothing was run): "
                             f"{str(e).splitlines()[0]}") from None
        except Exception as e:
            raise ValueError(f"cannot read voices file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"voices file {path} must hold a dict of voices, got {type(data).__name__}")
        raw = {}
        for name, entry in data.items():
            missing = {"bos_token", "cond", "ref_mel"} - set(entry if isinstance(entry, dict) else {})
            if missing:
                raise ValueError(f"voices file {path}: voice {name!r} lacks {sorted(missing)}")
            bos = entry["bos_token"]
            cond, ref = entry["cond"], entry["ref_mel"]
            if not (isinstance(cond, torch.Tensor) and isinstance(ref, torch.Tensor)):
                raise ValueError(f"voices file {path}: voice {name!r} must hold tensors for cond and ref_mel")
            raw[name] = Voice(int(bos.item() if isinstance(bos, torch.Tensor) else bos),
                              cond.float().reshape(1, -1), ref.float()[None] if ref.ndim == 2 else ref.float())
    if not raw:
        raise ValueError(f"voices file {path} holds no voices")
    return {n: check_voice(n, v, cfg) for n, v in raw.items()}


@dataclass
class OmniOutput:
    tokens: torch.Tensor            # (B, N) text ids of the reply
    codes: torch.Tensor | None      # (B, M) speech codes (padded with codec_pad after a row's stop)
    wav: list[torch.Tensor] | None  # one (samples,) waveform per row, at cfg.vocoder.sample_rate


class Omni(nn.Module):
    def __init__(self, cfg: OmniConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg, audio_tower=AudioEncoder(cfg.audio), visual=VisionEncoder(cfg.vision))
        if cfg.enable_audio_output:
            self.talker = Talker(cfg)
            self.token2wav = Token2Wav(cfg)
        self.voices: dict[str, Voice] = {}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the Thinker's embedding: present in every configuration)."""
        return self.thinker.model.embed_tokens.weight.device

    def _noise(self, seed: int) -> FrameNoise:
        """The DiT's starting noise of an utterance: fixed per mel frame, the same offline and streamed."""
        return FrameNoise(seed, self.cfg.dit.mel_dim, self.cfg.dit.block_size)

    def _session(self, v: Voice, seed: int, t2w_kw: dict | None):
        """A streaming Token2Wav session for voice `v` with the utterance noise of `seed`."""
        return self.token2wav.session(v.cond, v.ref_mel, noise=self._noise(seed), **(t2w_kw or {}))

    def voice(self, name: str | None) -> Voice:
        if not self.voices:
            raise ValueError("no voices are loaded: load_voices(...) or set model.voices")
        name = name or next(iter(self.voices))
        if name not in self.voices:
            raise ValueError(f"unknown voice {name!r}; available: {sorted(self.voices)}")
        v, dev = self.voices[name], self.device
        if v.cond.device != dev or v.ref_mel.device != dev:   # voice files are read on the CPU: follow the model
            v = self.voices[name] = Voice(v.bos_id, v.cond.to(dev), v.ref_mel.to(dev))
        return v

    # -- the glue between Thinker and Talker ---------------------------------------------------------------
    def _talker_prompt(self, inputs: OmniInputs, first: ThinkerStep, second: ThinkerStep, voice: Voice) -> TalkerPrompt:
        tk = self.cfg.tokens
        ids, mask = inputs.input_ids, inputs.attention_mask
        B = ids.shape[0]
        pads = torch.tensor(tk.media_pads, device=ids.device)
        media = torch.isin(ids, pads)
        prompt_embeds = first.embeds.masked_fill(media[..., None], 0.0)          # E(x) is zero at media rows
        spk_ids = torch.full((B, 1), voice.bos_id, device=ids.device)
        speaker = self.thinker.model.embed_tokens(spk_ids)                        # (B, 1, d)
        first_reply = second.hidden + second.embeds                               # R_0, (B, 1, d)
        # The reply's first token is text to the positions whatever its id: an untrained Thinker can say a media
        # placeholder, which get_rope_index would take for a picture or a sound the prompt does not hold (the
        # reference finds media by their start tokens, so a stray placeholder is text to it as well).
        said = first.token[:, None]
        said = said.masked_fill(torch.isin(said, pads), tk.im_end)
        text_ids = torch.cat([ids, spk_ids, said], 1)
        full_mask = torch.cat([mask, mask.new_ones(B, 2)], 1)
        positions, deltas = get_rope_index(
            text_ids, tk, attention_mask=full_mask, image_grid_thw=inputs.image_grid_thw,
            video_grid_thw=inputs.video_grid_thw, audio_lengths=inputs.audio_lengths,
            second_per_grid=inputs.second_per_grid, use_audio_in_video=inputs.use_audio_in_video,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            position_id_per_seconds=self.cfg.position_id_per_seconds, seconds_per_chunk=self.cfg.seconds_per_chunk)
        return self.talker.prompt(first.hidden, prompt_embeds, speaker, first_reply, positions, deltas, mask)

    def _events(self, inputs: OmniInputs, voice: str | None, thinker_kw: dict, talker_kw: dict, t2w_kw: dict,
                seed: int):
        """The streaming pipeline as a generator of ("text", (B,) ids) and ("codes", (B,) codes) events."""
        v = self.voice(voice)
        tk = self.cfg.tokens
        media = {k: x for k, x in inputs.model_kwargs().items() if k not in ("input_ids", "attention_mask", "positions")}
        steps = self.thinker.stream(inputs.input_ids, inputs.attention_mask, positions=inputs.positions,
                                    deltas=inputs.rope_deltas, media=media, **thinker_kw)
        eos = self.thinker.model.embed_tokens(torch.tensor([tk.tts_text_eos, tk.tts_text_pad],
                                                           device=inputs.input_ids.device))  # (2, d)
        first = next(steps)
        yield "text", first.token
        second = next(steps, None)
        if second is None:                                   # the Thinker stopped at once: nothing to say
            return
        yield "text", second.token
        prompt = self._talker_prompt(inputs, first, second, v)
        B = first.token.shape[0]
        # e[b]: the length of row b's reply (the index of its eos; at least 1, as the reference), -1 while unknown
        stop = torch.tensor(thinker_kw.get("stop_ids") or [tk.im_end], device=first.token.device)
        is_end = lambda tok: torch.isin(tok, stop)                       # noqa: E731
        e = torch.where(is_end(first.token) | is_end(second.token), 1, -1)
        text_events: list[torch.Tensor] = []

        def text_track():
            """Talker step k >= 1 reads R_k = H + E of reply token k (from Thinker step k + 1) while k < e,
            E(tts_eos) at k = e, E(tts_pad) after. Thinker steps are pulled only when a row needs them."""
            nonlocal e
            k = 1
            while True:
                row = eos[1].expand(B, -1)                                   # E(tts_pad) by default
                need = (e < 0) | (e > k)
                if bool(need.any()):
                    st = next(steps, None)
                    if st is None:                                           # max_new_tokens: the reply ends here
                        e = torch.where(e < 0, k, e)
                    else:
                        text_events.append(st.token)
                        e = torch.where(is_end(st.token) & (e < 0), k + 1, e)
                        row = torch.where(need[:, None], (st.hidden + st.embeds)[:, 0], row)
                row = torch.where((e == k)[:, None], eos[0], row)
                yield row[:, None]                                           # (B, 1, d)
                if bool(((e >= 0) & (e < k)).all()):                         # this item was all pad: done
                    return
                k += 1

        tc = self.cfg.talker
        # never let the Talker pick an id the DiT cannot read (the reference only suppresses codec_bos; a trained
        # model gives the other special ids ~0 probability, a fresh one does not)
        unreadable = [i for i in range(self.cfg.dit.num_embeds + 1, tc.vocab_size) if i not in (tc.codec_pad, tc.codec_eos)]
        talker_kw = {"suppress_ids": sorted({tc.codec_bos, *unreadable}), **talker_kw}
        for code in self.talker.stream(prompt, text_track(), seed=seed, **talker_kw):
            while text_events:
                yield "text", text_events.pop(0)
            yield "codes", code
        while text_events:
            yield "text", text_events.pop(0)
        for st in steps:                                       # the Thinker may still have text to finish
            yield "text", st.token

    # -- speaking a given text -------------------------------------------------------------------------------
    @torch.no_grad()
    def say(self, prompt_ids: torch.Tensor, reply_ids: list[int], voice: str | None = None, *, seed: int = 0,
            talker_kw: dict | None = None, t2w_kw: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Speak `reply_ids` as the reply to the text prompt `prompt_ids` (1, T): the reply is fed to the Thinker
        (not generated), so exactly that text is spoken. Returns (codes (N,), wav (samples,))."""
        v = self.voice(voice)
        codes = [c for c in self._say_codes(prompt_ids, reply_ids, v, seed, talker_kw)]
        if not codes:
            return torch.zeros(0, dtype=torch.long, device=prompt_ids.device), torch.zeros(0)
        codes = torch.cat(codes)
        t2w_kw = dict(t2w_kw or {})
        noise = t2w_kw.pop("noise", None) or self._noise(seed)
        return codes, self.token2wav(codes[None], v.cond, v.ref_mel, noise=noise, **t2w_kw)[0]

    @torch.no_grad()
    def say_stream(self, prompt_ids: torch.Tensor, reply_ids: list[int], voice: str | None = None, *, seed: int = 0,
                   talker_kw: dict | None = None, t2w_kw: dict | None = None) -> Iterator[torch.Tensor]:
        """say(), streamed: yield PCM chunks (samples,) as soon as the streaming Token2Wav releases them, while
        the Talker is still writing codes. Same codes and the same per-frame noise as say()."""
        v = self.voice(voice)
        t2w = self._session(v, seed, t2w_kw)
        for code in self._say_codes(prompt_ids, reply_ids, v, seed, talker_kw):
            yield from t2w.push(code.view(1, 1))
        if t2w.codes.shape[1]:
            yield from t2w.finish()

    def _say_codes(self, prompt_ids, reply_ids: list[int], v: Voice, seed: int, talker_kw) -> Iterator[torch.Tensor]:
        """The Talker's codes (1,) for a given reply, one per step, up to (not including) its stop code."""
        if not reply_ids:
            raise ValueError("there is nothing to say: the reply text is empty")
        tk, tc = self.cfg.tokens, self.cfg.talker
        dev = prompt_ids.device
        T = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids, torch.tensor([reply_ids], device=dev)], 1)
        out = self.thinker(ids)
        rows = out.hidden + out.embeds                                            # H + E, (1, T + R, d)
        spk = self.thinker.model.embed_tokens(torch.tensor([[v.bos_id]], device=dev))
        text_ids = torch.cat([prompt_ids, torch.tensor([[v.bos_id, reply_ids[0]]], device=dev)], 1)
        pos, deltas = get_rope_index(text_ids, tk)
        prompt = self.talker.prompt(out.hidden[:, :T], out.embeds[:, :T], spk, rows[:, T: T + 1], pos, deltas)
        eos_pad = self.thinker.model.embed_tokens(torch.tensor([tk.tts_text_eos, tk.tts_text_pad], device=dev))
        from .talker import reply_text_track
        track = reply_text_track(rows[:, T:], torch.tensor([len(reply_ids)], device=dev), eos_pad[0], eos_pad[1])
        unreadable = [i for i in range(self.cfg.dit.num_embeds + 1, tc.vocab_size) if i not in (tc.codec_pad, tc.codec_eos)]
        kw = {"suppress_ids": sorted({tc.codec_bos, *unreadable}), **(talker_kw or {})}
        for code in self.talker.stream(prompt, track, seed=seed, **kw):
            if int(code[0]) in (tc.codec_pad, tc.codec_eos):
                return
            yield code

    # -- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, inputs: OmniInputs, voice: str | None = None, *, seed: int = 0, thinker_kw: dict | None = None,
               talker_kw: dict | None = None, t2w_kw: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ("text", ids (B,)) and ("audio", pcm (samples,)) as soon as each is ready. One row only for audio."""
        if inputs.input_ids.shape[0] != 1:
            raise ValueError("stream() speaks one conversation at a time; use generate() for a batch")
        thinker_kw = {"max_new_tokens": 256, **(thinker_kw or {})}
        v = self.voice(voice)
        tc = self.cfg.talker
        t2w = self._session(v, seed, t2w_kw)
        stopped = False
        for kind, x in self._events(inputs, voice, thinker_kw, talker_kw or {}, {}, seed):
            if kind == "text":
                yield "text", x
            elif not stopped:
                if int(x[0]) in (tc.codec_pad, tc.codec_eos):
                    stopped = True
                    continue
                for pcm in t2w.push(x.view(1, 1)):
                    yield "audio", pcm
        if t2w.codes.shape[1]:
            for pcm in t2w.finish():
                yield "audio", pcm

    @torch.no_grad()
    def generate(self, inputs: OmniInputs, voice: str | None = None, *, speak: bool = True, seed: int = 0,
                 thinker_kw: dict | None = None, talker_kw: dict | None = None, t2w_kw: dict | None = None) -> OmniOutput:
        """Text (and, with speak, codes and a waveform per row) for a batch."""
        thinker_kw = {"max_new_tokens": 256, **(thinker_kw or {})}
        if not speak or not self.cfg.enable_audio_output:
            out = self.thinker.generate_from(inputs, **thinker_kw)
            return OmniOutput(out.tokens, None, None)
        text, codes = [], []
        for kind, x in self._events(inputs, voice, thinker_kw, talker_kw or {}, {}, seed):
            (text if kind == "text" else codes).append(x)
        tokens = torch.stack(text, 1)
        tc = self.cfg.talker
        if not codes:
            return OmniOutput(tokens, None, [])
        codes_t = torch.stack(codes, 1)
        v = self.voice(voice)
        t2w_kw = dict(t2w_kw or {})
        noise = t2w_kw.pop("noise", None) or self._noise(seed)
        wavs = []
        for row in codes_t:
            stop = ((row == tc.codec_pad) | (row == tc.codec_eos)).nonzero()
            n = int(stop[0]) if len(stop) else row.shape[0]
            wavs.append(self.token2wav(row[None, :n], v.cond, v.ref_mel, noise=noise, **t2w_kw)[0] if n else torch.zeros(0))
        return OmniOutput(tokens, codes_t, wavs)

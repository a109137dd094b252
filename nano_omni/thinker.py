"""The Thinker: the Qwen2.5 language model that reads every modality and writes the text reply.

Paper: Qwen2.5-Omni sections 2.1-2.3. Reference 1.1, 3d.

    ids --embed_tokens--> (B, T, d) --scatter audio / image / video features into their placeholders-->
        --Decoder (GQA, SwiGLU, M-RoPE)--> hidden (B, T, d) --lm_head--> logits (B, T, vocab)

The encoders are handed in by `omni.py` (`audio_tower`, `visual`); this file never imports them, it only scatters
what they return. `generate()`/`stream()` return, beside the tokens, the two things the Talker reads for every
token: the input embedding E(x) and the final hidden state H(x). (E still holds the media features here;
omni.py zeroes the media rows before the Talker reads them, as the official model does.)

Simplifications: no sliding-window layers (the official config disables them); dropout is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .config import OmniConfig
from .decoder import Decoder, KVCache
from .layers import check_ids, check_tensor
from .sampling import SamplingConfig, make_generator, sample_next
from .tmrope import decode_positions, text_positions


@dataclass
class ThinkerOutput:
    logits: torch.Tensor   # (B, T, vocab)
    hidden: torch.Tensor   # (B, T, d) after the final norm
    embeds: torch.Tensor   # (B, T, d) decoder input


@dataclass
class ThinkerStep:
    token: torch.Tensor    # (B,) the token chosen at this step
    hidden: torch.Tensor   # (B, t, d) hidden states of the inputs fed at this step (t = prompt length, then 1)
    embeds: torch.Tensor   # (B, t, d) their input embeddings


@dataclass
class GenerateOutput:
    tokens: torch.Tensor   # (B, N) generated ids; rows that stopped early are filled with the pad id
    hidden: torch.Tensor   # (B, T + N - 1, d) hidden state of every position that was fed
    embeds: torch.Tensor   # (B, T + N - 1, d) input embedding of every position that was fed
    prompt_len: int


class Thinker(nn.Module):
    def __init__(self, cfg: OmniConfig, audio_tower: nn.Module | None = None, visual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg.thinker)
        self.lm_head = nn.Linear(cfg.thinker.d_model, cfg.thinker.vocab_size, bias=False)
        if cfg.thinker.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.audio_tower = audio_tower
        self.visual = visual

    # -- the scatter hook ----------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, audio_embeds=None, image_embeds=None, video_embeds=None) -> torch.Tensor:
        """Token embeddings with encoder features written, in order, over the placeholder tokens.

        audio_embeds etc. are (n, d) rows, all items of the batch concatenated in reading order.
        """
        check_ids("input_ids", input_ids, self.cfg.thinker.vocab_size)
        x = self.model.embed_tokens(input_ids)                                       # (B, T, d)
        tk = self.cfg.tokens
        for name, pad, feats in (("audio", tk.audio_pad, audio_embeds), ("image", tk.image_pad, image_embeds),
                                 ("video", tk.video_pad, video_embeds)):
            where = input_ids == pad                                                 # (B, T)
            if feats is None:
                continue
            check_tensor(f"{name}_embeds", feats, 2, last=x.shape[-1])
            n_slots = int(where.sum())
            if n_slots != feats.shape[0]:
                raise ValueError(f"the prompt has {n_slots} {name} placeholder tokens but {feats.shape[0]} "
                                 f"{name} feature rows were given")
            x = x.masked_scatter(where[..., None], feats.to(x.dtype))
        return x

    def encode_media(self, audio_features=None, audio_lengths=None, pixel_values=None, image_grid_thw=None,
                     pixel_values_videos=None, video_grid_thw=None) -> dict:
        """Run the encoders handed to this Thinker; returns the feature rows for `embed` (None where no media)."""
        out = {}
        if audio_features is not None:
            if self.audio_tower is None:
                raise ValueError("audio was given but this Thinker was built without an audio encoder")
            out["audio_embeds"] = self.audio_tower(audio_features, audio_lengths)
        for key, pv, grid in (("image_embeds", pixel_values, image_grid_thw),
                              ("video_embeds", pixel_values_videos, video_grid_thw)):
            if pv is not None:
                if self.visual is None:
                    raise ValueError("images or video were given but this Thinker was built without a vision encoder")
                out[key] = self.visual(pv, grid)
        return out

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, *, positions=None, inputs_embeds=None,
                cache: KVCache | None = None, audio_embeds=None, image_embeds=None, video_embeds=None,
                **media) -> ThinkerOutput:
        """input_ids (B, T) or inputs_embeds (B, T, d); attention_mask (B, T) 1 = real, 0 = padding.

        media: raw inputs for the encoders (audio_features, audio_lengths, pixel_values, image_grid_thw,
        pixel_values_videos, video_grid_thw), as `processor.OmniInputs.model_kwargs()` gives them.
        positions (3, B, T): the TMRoPE ids (tmrope.get_rope_index). When omitted they are the text positions,
        or, with a cache that has seen a prompt, the positions that follow it. Media prompts need their
        TMRoPE ids from tmrope.get_rope_index (the processor provides them).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            enc = self.encode_media(**media)
            inputs_embeds = self.embed(input_ids, enc.get("audio_embeds", audio_embeds),
                                       enc.get("image_embeds", image_embeds), enc.get("video_embeds", video_embeds))
        check_tensor("inputs_embeds", inputs_embeds, 3, last=self.cfg.thinker.d_model)
        B, T, _ = inputs_embeds.shape
        key_valid = _mask_to_bool(attention_mask, B, T, inputs_embeds.device)
        if positions is None:
            positions = self._default_positions(input_ids, key_valid, cache, B, T)
        elif positions.shape != (3, B, T):
            raise ValueError(f"positions must have shape (3, B, T) = {(3, B, T)}, got {tuple(positions.shape)}")
        hidden = self.model(inputs_embeds, positions, key_valid if attention_mask is not None else None, cache)
        return ThinkerOutput(self.lm_head(hidden), hidden, inputs_embeds)

    def _default_positions(self, input_ids, key_valid, cache, B, T):
        if cache is not None and cache.deltas is not None:
            pos = decode_positions(cache.deltas, cache.n_seen, T)
            return pos + (key_valid.long().cumsum(1) - key_valid.long() - torch.arange(T, device=pos.device))
        pos, deltas = text_positions(key_valid)
        if cache is not None:
            cache.deltas = deltas
        return pos.to(key_valid.device)

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, input_ids, attention_mask=None, *, positions=None, deltas=None, inputs_embeds=None,
               media: dict | None = None, sampling: SamplingConfig | None = None,
               **sampling_kw) -> Iterator[ThinkerStep]:
        """Yield one ThinkerStep per generated token, as soon as it is chosen.

        positions/deltas: the prompt's TMRoPE ids and deltas (from tmrope.get_rope_index); text ids by default.
        media: raw encoder inputs (see forward); their features are scattered into the prompt.
        Sampling options: a SamplingConfig, or its fields as keywords (temperature=0.7, top_k=20, seed=0 ...);
        stop_ids default to <|im_end|>.
        """
        cfg = sampling or SamplingConfig(**sampling_kw)
        stop_ids = cfg.stop_ids or [self.cfg.tokens.im_end]
        check_ids("input_ids", input_ids, self.cfg.thinker.vocab_size)
        B, T = input_ids.shape
        key_valid = _mask_to_bool(attention_mask, B, T, input_ids.device)
        if positions is None:
            positions, deltas = text_positions(key_valid)
        elif deltas is None:
            raise ValueError("pass the rope deltas together with the positions (both come from get_rope_index)")
        embeds = self.embed(input_ids, **self.encode_media(**(media or {}))) if inputs_embeds is None else inputs_embeds
        cache = KVCache(self.cfg.thinker.n_layer)
        cache.deltas = deltas.to(input_ids.device)
        history = input_ids
        gen = make_generator(cfg.seed, input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        stop = torch.tensor(stop_ids, device=input_ids.device)

        def forward_and_pick(x, pos, valid):
            # inference mode makes every small op of a decoding step cheaper; the caller gets ordinary tensors
            # (clones), which it may modify in place or keep for autograd
            with torch.inference_mode():
                hidden = self.model(x, pos, valid, cache)
                tok = sample_next(self.lm_head(hidden[:, -1]), history, cfg, gen).masked_fill(done, self.cfg.tokens.pad)
            return tok.clone(), hidden.clone()

        tok, hidden = forward_and_pick(embeds, positions.to(input_ids.device), key_valid)
        for step in range(cfg.max_new_tokens):
            yield ThinkerStep(tok, hidden, embeds)
            done = done | torch.isin(tok, stop)
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                return
            if cfg.repetition_penalty != 1.0:                                         # only the penalty reads it
                history = torch.cat([history, tok[:, None]], 1)
            embeds = self.model.embed_tokens(tok[:, None])                            # (B, 1, d)
            pos = decode_positions(cache.deltas, cache.n_seen, 1)                     # (3, B, 1)
            tok, hidden = forward_and_pick(embeds, pos, None)

    @torch.no_grad()
    def generate_from(self, inputs, **kw) -> GenerateOutput:
        """generate() for a processor.OmniInputs batch (media, TMRoPE ids and deltas included)."""
        media = {k: v for k, v in inputs.model_kwargs().items() if k not in ("input_ids", "attention_mask", "positions")}
        return self.generate(inputs.input_ids, inputs.attention_mask, positions=inputs.positions,
                             deltas=inputs.rope_deltas, media=media, **kw)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kw) -> GenerateOutput:
        """Run `stream` to the end and collect tokens, hidden states and embeddings."""
        steps = list(self.stream(input_ids, attention_mask, **kw))
        return GenerateOutput(
            tokens=torch.stack([s.token for s in steps], 1),
            hidden=torch.cat([s.hidden for s in steps], 1),
            embeds=torch.cat([s.embeds for s in steps], 1),
            prompt_len=input_ids.shape[1],
        )


def _mask_to_bool(attention_mask, B, T, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must be a (B, T) = {(B, T)} tensor of 0/1, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return attention_mask.bool()

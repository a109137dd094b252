"""The Talker: a dual-track autoregressive model that turns the Thinker's reply into speech codes.

Paper: Qwen2.5-Omni sections 2.3 and 4.3 (Talker reads the Thinker's high-level representations and the text
tokens, and predicts discrete speech tokens). Reference 1.4, 3e.

Two tracks are *added*, not concatenated, at every step k, in the Thinker's width d:
    text track   R_k = H(reply_k) + E(reply_k)     the Thinker's final hidden state + input embedding of reply token k
                 after the reply: E(<tts_text_eos>) once, then E(<tts_text_pad>) for as long as speech goes on
    codec track  C(code_{k-1})                     the Talker's own previous code (C = model.embed_tokens, in width d)
    x_k = R_k + C(code_{k-1})  -> thinker_to_talker_proj (d -> d_talker) -> Qwen2 decoder (M-RoPE) -> codec_head

The sequence the Talker reads (one row; T prompt tokens):
    [ H(p_0)+E(p_0) ... H(p_T-1)+E(p_T-1) ,  E(speaker_bos)+C(codec_pad) ,  R_0+C(codec_bos) ]  then R_k+C(code_k-1)
    prompt rows carry no codec embedding; E is zero at media placeholders (audio/image/video rows).
Positions: TMRoPE ids of [prompt ids, speaker_bos, reply_0], continued one per step while decoding.
Sampling (official defaults): top-k 40, top-p 0.8, temperature 0.9, repetition penalty 1.05, codec_bos suppressed,
stop at codec_pad or codec_eos.

Shapes: d = thinker width (embed_dim), D = talker d_model; x (B, T, d); codes (B, N).
Streaming: `stream()` reads the text track from an iterator, one item per step, so it can run while the
Thinker is still writing: step k only needs reply token k (or the news that the reply has ended).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .config import OmniConfig
from .decoder import Decoder, KVCache
from .layers import check_finite, check_ids, check_tensor
from .sampling import SamplingConfig, make_generator, sample_next
from .tmrope import decode_positions

TALKER_SAMPLING = dict(do_sample=True, top_k=40, top_p=0.8, temperature=0.9, repetition_penalty=1.05,
                       max_new_tokens=4096)


@dataclass
class TalkerPrompt:
    """Everything the Talker's first step reads (built by `Talker.prompt`)."""
    embeds: torch.Tensor        # (B, T + 2, d) prompt rows, speaker row, first reply row (codec embeddings added)
    positions: torch.Tensor     # (3, B, T + 2)
    deltas: torch.Tensor        # (B, 1) rope deltas for decoding
    key_valid: torch.Tensor     # (B, T + 2) bool


class Talker(nn.Module):
    def __init__(self, cfg: OmniConfig):
        super().__init__()
        tc = cfg.talker
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(tc.embed_dim, tc.d_model)
        self.model = Decoder(tc)                  # model.embed_tokens: the codec embedding C, (vocab, d)
        self.codec_head = nn.Linear(tc.d_model, tc.vocab_size, bias=False)

    def codec_embed(self, codes: torch.Tensor) -> torch.Tensor:
        check_ids("codes", codes, self.cfg.talker.vocab_size, ndim=codes.ndim)
        return self.model.embed_tokens(codes)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d): the two tracks already added -> codec logits (B, T, vocab), fp32."""
        check_tensor("x", x, 3, last=self.cfg.talker.embed_dim)
        h = self.model(self.thinker_to_talker_proj(x), positions, key_valid, cache)
        return self.codec_head(h).float()

    # -- the first step --------------------------------------------------------------------------------------
    def prompt(self, prompt_hidden: torch.Tensor, prompt_embeds: torch.Tensor, speaker_embed: torch.Tensor,
               first_reply: torch.Tensor, positions: torch.Tensor, deltas: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> TalkerPrompt:
        """Assemble the Talker's first input.

        prompt_hidden, prompt_embeds (B, T, d): H and E of the prompt (E zeroed at media placeholders);
        speaker_embed (B, 1, d): E(speaker_bos); first_reply (B, 1, d): R_0;
        positions (3, B, T + 2), deltas (B, 1): TMRoPE of [prompt ids, speaker_bos, reply_0];
        attention_mask (B, T) of the prompt (1 = real).
        """
        tc = self.cfg.talker
        B, T, d = prompt_embeds.shape
        for name, t, n in (("prompt_hidden", prompt_hidden, T), ("speaker_embed", speaker_embed, 1),
                           ("first_reply", first_reply, 1)):
            check_tensor(name, t, 3, last=d)
            if t.shape[:2] != (B, n):
                raise ValueError(f"{name} must have shape ({B}, {n}, {d}), got {tuple(t.shape)}")
        for name, t in (("prompt_hidden", prompt_hidden), ("prompt_embeds", prompt_embeds),
                        ("speaker_embed", speaker_embed), ("first_reply", first_reply)):
            check_finite(name, t)
        dev = prompt_embeds.device
        pad_bos = self.model.embed_tokens(torch.tensor([tc.codec_pad, tc.codec_bos], device=dev))   # (2, d)
        x = torch.cat([prompt_hidden + prompt_embeds,
                       speaker_embed + pad_bos[0],
                       first_reply + pad_bos[1]], dim=1)                                          # (B, T+2, d)
        valid = torch.ones(B, T + 2, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            valid[:, :T] = attention_mask.bool()
        if positions.shape != (3, B, T + 2):
            raise ValueError(f"positions must have shape (3, B, T + 2) = {(3, B, T + 2)}, got {tuple(positions.shape)}")
        return TalkerPrompt(x, positions, deltas, valid)

    # -- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, prompt: TalkerPrompt, text_track: Iterable[torch.Tensor],
               sampling: SamplingConfig | None = None, **sampling_kw) -> Iterator[torch.Tensor]:
        """Yield the next code (B,) at every step.

        text_track: the text-track rows for steps 1, 2, ...: each (B, 1, d) = R_k, or E(tts_eos) / E(tts_pad)
        once a row's reply has ended. It is read lazily, one item per step; when it runs dry the last item
        (the pad embedding) is reused. Rows stop at codec_pad / codec_eos and then emit codec_pad.
        """
        tc = self.cfg.talker
        kw = dict(TALKER_SAMPLING, stop_ids=[tc.codec_pad, tc.codec_eos], suppress_ids=[tc.codec_bos])
        if sampling_kw.get("do_sample") is False:      # greedy: the default sampling knobs do not apply
            kw.update(temperature=1.0, top_k=0, top_p=1.0)
        kw.update(sampling_kw)
        cfg = sampling or SamplingConfig(**kw)
        stop_ids = cfg.stop_ids or [tc.codec_pad, tc.codec_eos]
        B, L, _ = prompt.embeds.shape
        dev = prompt.embeds.device
        cache = KVCache(tc.n_layer)
        cache.deltas = prompt.deltas
        # the token history the repetition penalty sees, as the reference: mask ids, pad, bos, then codes
        history = torch.cat([torch.full((B, L - 2), tc.codec_mask, device=dev),
                             torch.tensor([[tc.codec_pad, tc.codec_bos]], device=dev).expand(B, 2)], 1)
        gen = make_generator(cfg.seed, dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stop = torch.tensor(stop_ids, device=dev)

        def forward_and_pick(x, pos, valid):
            # inference mode makes every small op of a step cheaper; the caller gets an ordinary tensor (a clone)
            with torch.inference_mode():
                code = sample_next(self(x, pos, valid, cache)[:, -1], history, cfg, gen).masked_fill(done, tc.codec_pad)
            return code.clone()

        code = forward_and_pick(prompt.embeds, prompt.positions, prompt.key_valid)
        track = iter(text_track)
        last_text = None
        for step in range(cfg.max_new_tokens):
            yield code
            done = done | torch.isin(code, stop)
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                return
            if cfg.repetition_penalty != 1.0:                                         # only the penalty reads it
                history = torch.cat([history, code[:, None]], 1)
            last_text = next(track, last_text)
            if last_text is None:
                raise ValueError("text_track is empty: it must yield at least the text-pad embedding")
            x = last_text + self.model.embed_tokens(code[:, None])                     # (B, 1, d)
            code = forward_and_pick(x, decode_positions(cache.deltas, cache.n_seen, 1), None)

    @torch.no_grad()
    def generate(self, prompt: TalkerPrompt, text_track: Iterable[torch.Tensor], **kw) -> torch.Tensor:
        """All codes (B, N), each row padded with codec_pad after its stop code."""
        return torch.stack(list(self.stream(prompt, text_track, **kw)), 1)


def reply_text_track(reply_rows: torch.Tensor, reply_len: torch.Tensor, eos_embed: torch.Tensor,
                     pad_embed: torch.Tensor) -> Iterator[torch.Tensor]:
    """The text track for steps 1, 2, ... from a finished reply.

    reply_rows (B, N, d): R_0 .. R_{N-1}; reply_len (B,): how many of them are real text for each row
    (the index of the row's eos); eos_embed, pad_embed (d,) or (1, d).
    Step k >= 1 gets R_k while k < reply_len, then E(tts_eos) at k = reply_len, then E(tts_pad).
    """
    B, N, d = reply_rows.shape
    eos, pad = eos_embed.reshape(1, d), pad_embed.reshape(1, d)
    k = 1
    while True:
        row = reply_rows[:, k] if k < N else pad.expand(B, d)
        row = torch.where((k == reply_len)[:, None], eos, row)
        row = torch.where((k > reply_len)[:, None], pad, row)
        yield row[:, None]                                                              # (B, 1, d)
        if bool((k > reply_len).all()):
            return
        k += 1

"""Token2Wav: speech codes -> mel (flow-matching DiT) -> waveform (BigVGAN), offline or streaming.

Paper: Qwen2.5-Omni section 2.4 (sliding-window DiT, chunked BigVGAN, low first-packet latency). Reference 3f.
Like omni.py, this file only wires components (dit.py, vocoder.py) together; it holds no model of its own.

Offline:  mel = DiT.sample(all codes, noise for all frames); wav = BigVGAN(mel).

Streaming (the official recipe's windows, with our choices of first-chunk size and vocoder overlap):
    codes arrive in pieces; frames are counted in mel frames (2 per code, 100 per second).
    DiT   chunks of c = 3 blocks = 72 frames (36 codes, 0.72 s), except the first, which is f = 2 blocks (48 frames)
          so that the first sound leaves sooner: chunk 0 = frames [0, f), chunk i = [f + c(i-1), f + ci). A chunk
          is ready once the codes of one more block (24 frames) exist. The ODE runs on the chunk's window with
          2 blocks of past and 1 block of future codes and noise, and keeps the middle. The noise is fixed per
          frame for the whole utterance (`FrameNoise`), so a frame gets the same noise offline and in every window
          that contains it.
    BigVGAN  once mel frames [0, m) are final, the samples of frames [e, m - right) can be written: the vocoder
          runs on frames [e - left, m) and keeps the samples of [e, m - right); (left, right) is its receptive
          field, so these samples equal the offline ones exactly.
    PCM leaves as a generator of (samples,) chunks.

How exact is streaming? BigVGAN: exact (the overlap covers its receptive field). DiT: one velocity evaluation
sees 2 blocks back and 1 ahead (the layer masks), and the window supplies exactly that much context, so a
single Euler step is exact. Every further evaluation widens the dependence by the same amount, so with the
official 10-step RK4 (36 evaluations) frames near a window's edge differ from the offline result; the tests
measure that seam error and bound it. With enough context (`past_blocks`/`future_blocks` >= evaluations x
(back, ahead)) streaming is exact again, at the price of latency.

First packet: chunk 0 needs codes for frames [0, f + 1 block) = 36 codes; then the vocoder writes frames
[0, f - right). `first_packet_codes()` returns that number for any configuration. Why 2 blocks and not 1: the
vocoder holds back `right` frames (18 for the tiny preset, 34 for the official one), so a 1-block first chunk would
release almost no sound, and its short packet would run dry before the next, 3-block chunk is ready.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .config import OmniConfig
from .dit import DiT
from .vocoder import BigVGAN, receptive_field


class FrameNoise:
    """The ODE's starting noise, fixed per mel frame: block k of `block` frames is drawn from a generator seeded
    with (seed, k). Any range of frames can be asked for, in any order, and always gets the same values."""

    def __init__(self, seed: int, mel_dim: int, block: int = 24):
        self.seed, self.mel_dim, self.block = seed, mel_dim, block
        self._cache: dict[int, torch.Tensor] = {}

    def _block(self, k: int) -> torch.Tensor:
        if k not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            self._cache[k] = torch.randn(self.block, self.mel_dim, generator=g)
        return self._cache[k]

    def get(self, start: int, end: int) -> torch.Tensor:
        """(1, end - start, mel_dim)"""
        if end <= start:
            return torch.zeros(1, 0, self.mel_dim)
        k0, k1 = start // self.block, (end - 1) // self.block
        x = torch.cat([self._block(k) for k in range(k0, k1 + 1)])               # (blocks * block, mel)
        return x[start - k0 * self.block: end - k0 * self.block][None]


class Token2Wav(nn.Module):
    def __init__(self, cfg: OmniConfig):
        super().__init__()
        self.cfg = cfg
        self.code2wav_dit_model = DiT(cfg.dit)
        self.code2wav_bigvgan_model = BigVGAN(cfg.vocoder)

    # -- offline -----------------------------------------------------------------------------------------------
    def ode_settings(self, steps=None, guidance=None, sway=None, solver=None) -> dict:
        """The DiT sampler settings: the given ones, else the config's (official: RK4, 10 points, 0.5, -1)."""
        d = self.cfg.dit
        return dict(steps=d.ode_steps if steps is None else steps, guidance=d.guidance if guidance is None else guidance,
                    sway=d.sway if sway is None else sway, solver=d.ode_solver if solver is None else solver)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor, *, steps: int | None = None,
                guidance: float | None = None, sway: float | None = None, solver: str | None = None,
                noise: FrameNoise | torch.Tensor | None = None, return_mel: bool = False):
        """codes (1, N), cond (1, enc_emb_dim), ref_mel (1, T_ref, mel) -> wav (1, 2N * hop) [and mel (1, 2N, mel)].

        noise: a FrameNoise (default: seed 0) or the starting noise itself, (1, 2N, mel)."""
        _check_codes(codes, self.cfg)
        T = codes.shape[1] * self.cfg.dit.repeats
        if not isinstance(noise, torch.Tensor):
            noise = (noise or FrameNoise(0, self.cfg.dit.mel_dim, self.cfg.dit.block_size)).get(0, T)
        mel = self.code2wav_dit_model.sample(codes, cond.float(), ref_mel.float(), noise=noise.to(ref_mel.device),
                                             **self.ode_settings(steps, guidance, sway, solver))  # (1, T, mel)
        wav = self.code2wav_bigvgan_model(mel.transpose(1, 2))                                  # (1, T * hop)
        return (wav, mel) if return_mel else wav

    # -- streaming ---------------------------------------------------------------------------------------------
    def first_packet_codes(self, first_chunk_blocks: int = 2, future_blocks: int = 1) -> int:
        """How many codes must exist before the first PCM chunk can leave."""
        d = self.cfg.dit
        return -(-(first_chunk_blocks + future_blocks) * d.block_size // d.repeats)

    def session(self, cond: torch.Tensor, ref_mel: torch.Tensor, **kw) -> "Token2WavStream":
        """A push-style streaming session: `push(codes)` returns the PCM chunks that became ready, `finish()`
        the rest. Keywords as `stream`."""
        return Token2WavStream(self, cond, ref_mel, **kw)

    @torch.no_grad()
    def stream(self, code_pieces: Iterable[torch.Tensor], cond: torch.Tensor, ref_mel: torch.Tensor,
               stats: dict | None = None, **kw) -> Iterator[torch.Tensor]:
        """Yield PCM chunks (samples,) while codes arrive. code_pieces: (1, n) tensors of new codes, in order.

        Keywords: steps, guidance, sway, solver, noise (a FrameNoise), first_chunk_blocks (2), chunk_blocks (3),
        past_blocks (2), future_blocks (1). stats (optional dict) receives 'mel' (the streamed mel, (1, T, mel)) and
        'codes_at_chunk' (how many codes had arrived when each PCM chunk left).
        """
        s = self.session(cond, ref_mel, **kw)
        for piece in code_pieces:
            yield from s.push(piece)
        yield from s.finish()
        if stats is not None:
            stats.update(mel=s.mel(), codes_at_chunk=s.codes_at_chunk)


class Token2WavStream:
    """State of one streamed utterance (see the module docstring for the recipe)."""

    def __init__(self, t2w: Token2Wav, cond, ref_mel, *, steps: int | None = None, guidance: float | None = None,
                 sway: float | None = None, solver: str | None = None, noise: FrameNoise | None = None,
                 first_chunk_blocks: int = 2, chunk_blocks: int = 3, past_blocks: int = 2, future_blocks: int = 1):
        d = t2w.cfg.dit
        self.t2w, self.cond, self.ref_mel = t2w, cond.float(), ref_mel.float()
        self.ode = t2w.ode_settings(steps, guidance, sway, solver)
        self.noise = noise or FrameNoise(0, d.mel_dim, d.block_size)
        self.rep = d.repeats
        for name, n, least in (("first_chunk_blocks", first_chunk_blocks, 1), ("chunk_blocks", chunk_blocks, 1),
                               ("past_blocks", past_blocks, 0), ("future_blocks", future_blocks, 0)):
            if not isinstance(n, int) or isinstance(n, bool) or n < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {n!r}")
        self.first, self.chunk, self.past, self.fut = (n * d.block_size for n in (first_chunk_blocks, chunk_blocks,
                                                                                   past_blocks, future_blocks))
        self.left, self.right = receptive_field(t2w.cfg.vocoder)
        self.hop = t2w.cfg.vocoder.hop_length
        self.codes = torch.zeros(1, 0, dtype=torch.long, device=ref_mel.device)
        self.mels: list[torch.Tensor] = []     # final mel chunks, (1, c, mel) each
        self.done = 0                          # mel frames finalised by the DiT
        self.emitted = 0                       # mel frames whose samples have left
        self.codes_at_chunk: list[int] = []
        self.marks: list[tuple[str, float]] = []   # ("mel" | "pcm", time.perf_counter()) when each chunk was final

    def mel(self) -> torch.Tensor:
        return torch.cat(self.mels, 1)

    @torch.no_grad()
    def push(self, piece: torch.Tensor) -> list[torch.Tensor]:
        """Add new codes (1, n); return the PCM chunks that are now final."""
        _check_codes(piece, self.t2w.cfg, allow_empty=True)
        self.codes = torch.cat([self.codes, piece.to(self.codes.device)], 1)
        avail, out = self.codes.shape[1] * self.rep, []
        while avail >= self._next_end() + self.fut:            # the next chunk has its future context
            self._dit_chunk(self._next_end(), avail)
            out += self._vocode(final=False)
        return out

    @torch.no_grad()
    def finish(self) -> list[torch.Tensor]:
        """No more codes: finish the tail (no future left to wait for) and flush the vocoder."""
        total = self.codes.shape[1] * self.rep
        if total == 0:
            raise ValueError("no codes arrived: cannot make speech from an empty code sequence")
        while self.done < total:
            self._dit_chunk(min(self._next_end(), total), total)
        return self._vocode(final=True)

    def _next_end(self) -> int:
        """Last frame (exclusive) of the next DiT chunk: the first is shorter, so the first packet leaves sooner."""
        return self.first if self.done == 0 else self.done + self.chunk

    def _dit_chunk(self, hi: int, total: int) -> None:
        lo, rep = self.done, self.rep
        a, b = max(0, lo - self.past), min(total, hi + self.fut)            # window with context, in frames
        a_code, b_code = a // rep, -(-b // rep)
        mel = self.t2w.code2wav_dit_model.sample(self.codes[:, a_code:b_code], self.cond, self.ref_mel,
                                                  noise=self.noise.get(a_code * rep, b_code * rep).to(self.codes.device),
                                                  **self.ode)
        self.mels.append(mel[:, lo - a_code * rep: hi - a_code * rep])        # (1, hi - lo, mel)
        self.done = hi
        self.marks.append(("mel", time.perf_counter()))

    def _vocode(self, final: bool) -> list[torch.Tensor]:
        stop = self.done if final else self.done - self.right
        if stop <= self.emitted:
            return []
        a = max(0, self.emitted - self.left)
        mel = torch.cat(self.mels, 1)[:, a: self.done]                        # (1, done - a, mel)
        wav = self.t2w.code2wav_bigvgan_model(mel.transpose(1, 2))             # (1, (done - a) * hop)
        out = wav[0, (self.emitted - a) * self.hop: (stop - a) * self.hop]
        self.emitted = stop
        self.codes_at_chunk.append(self.codes.shape[1])
        self.marks.append(("pcm", time.perf_counter()))
        return [out]


def _check_codes(codes, cfg: OmniConfig, allow_empty: bool = False) -> None:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.shape[0] != 1:
        raise ValueError(f"codes must be a (1, N) tensor, got {getattr(codes, 'shape', type(codes).__name__)}")
    if codes.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"codes must hold integer ids, got {codes.dtype}")
    if codes.shape[1] == 0:
        if allow_empty:
            return
        raise ValueError("codes is empty: cannot make speech from an empty code sequence")
    hi = cfg.dit.num_embeds
    if int(codes.min()) < 0 or int(codes.max()) > hi:
        raise ValueError(f"codes must lie in [0, {hi}], got values in [{int(codes.min())}, {int(codes.max())}]")

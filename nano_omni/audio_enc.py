"""The audio encoder: waveform -> 128-bin log-mel -> Whisper-style Transformer in 2-s chunks -> 25 tokens/s.

Paper: Qwen2.5-Omni section 2.2 (audio at 16 kHz, 128 mel bins, 25 ms window, 10 ms hop, one token per 40 ms)
and 2.4 (attention in 2-s blocks so audio can be prefilled as it arrives). Reference 1.2, 1.8, 3b.

Front end (hand-written; reading and resampling live in audio_io.py, shared with the speech codec):
    load_audio   any file soundfile reads, or an array + its rate -> mono float32 at 16 kHz (audio_io.py)
    log_mel      the Whisper recipe: STFT (n_fft 400, hop 160, periodic Hann), |X|^2, 128 Slaney mel bins
                 0-8 kHz, log10 with a 1e-10 clamp, floor at (max - 8), then (x + 4) / 4

Encoder, per audio of L mel frames (shapes: D = d_model, L' = (L - 1) // 2 + 1 frames after the stride-2 conv):
    split into chunks of 200 frames (the last holds the rest)        -> (n_chunks, 128, <=200)
    conv1 (k3) + GELU, conv2 (k3, stride 2) + GELU, per chunk         -> (n_chunks, <=100, D)
    + sinusoid positions, restarting at 0 in every chunk
    pack the real frames of all chunks                                 -> (sum L', D)
    n_layer pre-LayerNorm blocks; attention only inside each chunk (block attention, segments = chunks)
    average-pool pairs of frames per audio                             -> (L' // 2, D) = 25 tokens/s
    ln_post, proj to the LLM width                                     -> (L' // 2, output_dim)

Because everything before the pooling stays inside a 2-s chunk, and a full chunk has an even number of frames,
encoding a long audio chunk by chunk as it arrives gives exactly the tokens of encoding it whole
(`encode_streaming`). Simplification: `audio_bos_eos_token` exists in the checkpoint but is never used by the
official model; we keep the parameter only so the official weights load.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import block_attention, block_pattern
from .audio_io import SAMPLE_RATE, load_audio, resample  # noqa: F401  (re-exported: the encoder's front end)
from .config import AudioConfig

N_FFT, HOP = 400, 160


# ----------------------------------------------------------------------------------------------------------------
# Log-mel features (the Whisper recipe).
# ----------------------------------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_step = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / log_step, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(log_step * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(n_mels: int = 128, n_fft: int = N_FFT, sr: int = SAMPLE_RATE, fmin: float = 0.0,
                fmax: float = 8000.0) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the Slaney mel scale, each scaled to unit area (Slaney)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))    # (n_mels + 2,)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (fft_freqs[:, None] - lo) / (mid - lo)
    down = (hi - fft_freqs[:, None]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(up, down))                                          # (n_freq, n_mels)
    return torch.from_numpy(tri * (2.0 / (hi - lo)))


_MEL_CACHE: dict[int, torch.Tensor] = {}


def log_mel(wav: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """(n,) mono 16 kHz -> (n_mels, n // 160) log-mel features, as transformers' WhisperFeatureExtractor.

    The extractor pads the audio with zeros to 300 s, so the frames at the end of the real audio see zeros
    (not a reflection), and the (max - 8) floor takes the maximum over every frame that touches the audio. Both
    are reproduced here without computing the padding.
    """
    if wav.ndim != 1:
        raise ValueError(f"log_mel expects a mono (n,) waveform, got shape {tuple(wav.shape)}")
    n = wav.shape[0]
    frames = n // HOP
    if n_mels not in _MEL_CACHE:
        _MEL_CACHE[n_mels] = mel_filters(n_mels).to(torch.float32)
    fb = _MEL_CACHE[n_mels]
    x = F.pad(wav.float(), (0, N_FFT + HOP))                 # trailing zeros, as the extractor's padding
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                      return_complex=True)                   # (201, frames + ...)
    power = spec.abs() ** 2
    mel = fb.T @ power                                       # (n_mels, ...)
    logm = torch.clamp(mel, min=1e-10).log10()
    touching = min(logm.shape[1], (n + N_FFT // 2 + HOP - 1) // HOP + 1)   # frames that see any real sample
    top = logm[:, :touching].max()
    logm = torch.maximum(logm[:, :frames], top - 8.0)
    return (logm + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------------------------------------------
def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) = [sin | cos] of positions times log-spaced inverse timescales."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)   # no key bias in the checkpoint
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, pattern):
        T = x.shape[0]
        q, k, v = (p(x).view(1, T, self.n_head, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))       # (1, H, T, hd)
        y = block_attention(q, k, v, pattern)                               # (1, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(T, -1))             # (T, D)


class AudioLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = AudioAttention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x, pattern):
        x = x + self.self_attn(self.self_attn_layer_norm(x), pattern)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)        # in the checkpoint, unused
        self.layers = nn.ModuleList(AudioLayer(cfg) for _ in range(cfg.n_layer))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.output_dim)

    def derived_buffers(self) -> dict:
        """Buffers computed from the config, never stored in a checkpoint (rebuilt after a meta-device load)."""
        return {"positional_embedding": sinusoids(self.cfg.max_source_positions, self.cfg.d_model)}

    @staticmethod
    def token_count(mel_frames: int) -> int:
        """Tokens for an audio of `mel_frames` frames: (L' - 2) // 2 + 1 = L' // 2 with L' = (L - 1) // 2 + 1."""
        return ((mel_frames - 1) // 2 + 1) // 2

    def forward(self, features: torch.Tensor, lengths) -> torch.Tensor:
        """features (n_mels, sum L) packed along time, lengths (n_audio,) mel frames each
        -> (sum of tokens, output_dim), the audios' tokens one after another."""
        cfg = self.cfg
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != cfg.n_mels:
            raise ValueError(f"features must be a ({cfg.n_mels}, total_frames) tensor, got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        lengths = torch.as_tensor(lengths, dtype=torch.long).view(-1).tolist()
        if sum(lengths) != features.shape[1] or min(lengths, default=0) <= 0:
            raise ValueError(f"lengths {lengths} must be positive and sum to the {features.shape[1]} frames given")
        for L in lengths:
            if self.token_count(L) < 1:
                raise ValueError(f"an audio of {L} mel frames ({L * 10} ms) is shorter than one audio token; "
                                 f"it needs at least 3 frames (30 ms)")
        # 1) 2-s chunks, each padded to the longest chunk
        W = cfg.chunk_frames
        chunk_lens = [min(W, L - s) for L in lengths for s in range(0, L, W)]
        chunks = features.T.split(chunk_lens)                                     # each (len, n_mels)
        x = nn.utils.rnn.pad_sequence(chunks, batch_first=True).transpose(1, 2)   # (n_chunks, n_mels, Lc)
        x = x.to(self.conv1.weight.dtype)
        lens = torch.tensor(chunk_lens, device=x.device)
        valid = torch.arange(x.shape[2], device=x.device)[None, :] < lens[:, None]  # (n_chunks, Lc)
        # 2) conv stem per chunk; zeroing the padded frames makes each chunk see zeros past its end
        x = F.gelu(self.conv1(x)) * valid[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)                                 # (n_chunks, Lc', D)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)               # positions restart per chunk
        after = (lens - 1) // 2 + 1                                               # real frames per chunk
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < after[:, None]
        x = x[keep]                                                               # (sum L', D) packed
        # 3) Transformer; attention stays inside each chunk
        pattern = block_pattern(1, x.shape[0], seqlens=after.tolist(), device=x.device)
        for layer in self.layers:
            x = layer(x, pattern)
        # 4) average pairs of frames within each audio (an odd last frame is dropped), project
        out, start = [], 0
        for L in lengths:
            n_after = (L - 1) // 2 + 1
            seg = x[start: start + 2 * (n_after // 2)]
            out.append(seg.view(-1, 2, seg.shape[-1]).mean(1))                    # (n_after // 2, D)
            start += n_after
        return self.proj(self.ln_post(torch.cat(out)))


def pack_features(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(n_mels, L_i)] -> packed (n_mels, sum L_i) and lengths (n,)."""
    return torch.cat(mels, dim=1), torch.tensor([m.shape[1] for m in mels])


@torch.no_grad()
def encode_streaming(encoder: AudioEncoder, mel: torch.Tensor):
    """Encode one audio's mel (n_mels, L) 2-s chunk by chunk, yielding each chunk's tokens as it 'arrives'.

    Every chunk but the last has an even number of frames after the conv, so no pooling pair straddles two
    chunks and the concatenated result equals `encoder(mel, [L])`.
    """
    W = encoder.cfg.chunk_frames
    for s in range(0, mel.shape[1], W):
        piece = mel[:, s: s + W]
        if encoder.token_count(piece.shape[1]) > 0:
            yield encoder(piece, [piece.shape[1]])

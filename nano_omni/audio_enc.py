"""The audio encoder: waveform -> 128-bin log-mel -> Whisper-style Transformer in 2-s chunks -> 25 tokens/s.

Paper: Qwen2.5-Omni section 2.2 (audio at 16 kHz, 128 mel bins, 25 ms window, 10 ms hop, one token per 40 ms)
and 2.4 (attention in 2-s blocks so audio can be prefilled as it arrives). Reference 1.2, 1.8, 3b.

Front end (hand-written, no audio library beyond soundfile for reading files):
    load_audio   any file soundfile reads, or an array + its rate -> mono float32 at 16 kHz
    resample     band-limited: a Kaiser-windowed sinc evaluated as a polyphase filter bank
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
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import block_attention, block_pattern
from .config import AudioConfig

SAMPLE_RATE = 16000
N_FFT, HOP = 400, 160


# ----------------------------------------------------------------------------------------------------------------
# Reading and resampling.
# ----------------------------------------------------------------------------------------------------------------
def load_audio(source, sample_rate: int | None = None, max_seconds: float | None = None) -> torch.Tensor:
    """A file path (anything soundfile reads) or an array/tensor with its `sample_rate` -> mono 16 kHz (n,) fp32.

    Normalisations (documented, not errors): several channels are averaged to mono; integer PCM of any width
    (8/16/24/32-bit) is scaled to [-1, 1) by soundfile; any rate is resampled to 16 kHz.
    Errors: unreadable file, empty audio, NaN/inf samples, audio longer than `max_seconds`.
    """
    if isinstance(source, (str, os.PathLike)):
        import soundfile as sf

        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file {path} does not exist")
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)   # (n, channels)
        except Exception as e:
            raise ValueError(f"cannot read audio file {path}: {e}") from None
        wav, where = torch.from_numpy(np.ascontiguousarray(data.T)), str(path)  # (channels, n)
    else:
        if sample_rate is None:
            raise ValueError("pass sample_rate together with an audio array")
        wav, sr, where = torch.as_tensor(np.asarray(source) if not isinstance(source, torch.Tensor) else source), sample_rate, "audio"
        if not (wav.is_floating_point() or wav.dtype in (torch.int16, torch.int32, torch.uint8)):
            raise TypeError(f"{where} must hold float or integer PCM samples, got {wav.dtype}")
        if wav.dtype == torch.int16:
            wav = wav.float() / 32768.0
        elif wav.dtype == torch.int32:
            wav = wav.float() / 2147483648.0
        elif wav.dtype == torch.uint8:
            wav = (wav.float() - 128.0) / 128.0
        if wav.ndim == 1:
            wav = wav[None]
        elif wav.ndim == 2 and wav.shape[0] > wav.shape[1]:
            wav = wav.T                                                         # (n, channels) -> (channels, n)
        elif wav.ndim != 2:
            raise ValueError(f"{where} must have shape (n,) or (channels, n), got {tuple(wav.shape)}")
    if not isinstance(sr, int) or not (1000 <= sr <= 384000):
        raise ValueError(f"{where}: sample rate must be an integer between 1000 and 384000 Hz, got {sr}")
    wav = wav.float().mean(0)                                                   # down-mix to mono: (n,)
    if wav.numel() == 0:
        raise ValueError(f"{where} is empty (0 samples)")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{where} contains NaN or infinite samples")
    if max_seconds is not None and wav.numel() / sr > max_seconds:
        raise ValueError(f"{where} lasts {wav.numel() / sr:.1f} s, longer than the configured maximum {max_seconds} s")
    return resample(wav, sr, SAMPLE_RATE)


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 32, rolloff: float = 0.945,
             beta: float = 14.769656459379492) -> torch.Tensor:
    """Band-limited resampling of (..., n) from orig_sr to new_sr.

    With g = gcd(orig, new), O = orig/g inputs map to N = new/g outputs, so output k*N + p sits at input time
    k*O + p*O/N. Each phase p gets its own windowed-sinc kernel; one strided conv1d evaluates all N phases.
    The sinc cuts off at rolloff * (lower Nyquist); the Kaiser window (beta ~ 14.8) keeps leakage tiny.
    Measured (tests/test_audio.py): flat to 1e-3 up to 80% of the lower Nyquist frequency, and a tone that
    cannot exist at the new rate comes out more than 80 dB down.

    >>> tone = lambda sr, n: torch.sin(2 * math.pi * 440 * torch.arange(n, dtype=torch.float64) / sr).float()
    >>> y = resample(tone(48000, 48000), 48000, 16000)     # 1 s at 48 kHz -> 1 s at 16 kHz
    >>> y.shape, bool((y - tone(16000, 16000))[2000:-2000].abs().max() < 1e-5)
    (torch.Size([16000]), True)
    """
    if orig_sr == new_sr:
        return wav
    g = math.gcd(orig_sr, new_sr)
    O, N = orig_sr // g, new_sr // g
    fc = 0.5 * rolloff * min(O, N) / O                      # cut-off, cycles per input sample
    W = zero_crossings / (2 * fc)                            # half-width of the kernel, input samples
    Wi = math.ceil(W)
    j = torch.arange(-Wi, Wi + O, dtype=torch.float64)       # input offsets seen by one output group
    tau = j[None, :] - torch.arange(N, dtype=torch.float64)[:, None] * O / N   # (N, 2Wi+O) time from each output
    u = (tau / W).clamp(-1, 1)
    window = torch.special.i0(beta * torch.sqrt(1 - u ** 2)) / torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    kernel = 2 * fc * torch.sinc(2 * fc * tau) * window * (tau.abs() <= W)
    n = wav.shape[-1]
    n_out = math.ceil(n * N / O)
    K = math.ceil(n_out / N)                                 # output groups
    x = wav.reshape(-1, 1, n).to(torch.float32)              # (B, 1, n)
    right = (K - 1) * O + 2 * Wi + O - (n + Wi)
    x = F.pad(x, (Wi, max(right, 0)))
    y = F.conv1d(x, kernel.to(torch.float32)[:, None, :], stride=O)   # (B, N, K): phase p of group k
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]          # (B, K*N) interleaved
    return y.reshape(*wav.shape[:-1], n_out)


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

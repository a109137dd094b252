"""Mel spectrograms: the front end that makes training targets, Griffin-Lim to invert them without any training,
and the spectral losses for training a vocoder.

Reference notes 3f: the DiT of Token2Wav writes, and BigVGAN reads, a natural-log amplitude mel with 80 bins at
100 frames/s (24 kHz audio, hop 240). The other settings of the official feature extractor are not published in
the notes, so the ones below are OUR CHOICE, made to match those facts and common vocoder practice:

    n_fft 1024 (43 ms window), periodic Hann window, hop = cfg.hop_length (240), cfg.mel_dim (80) Slaney mel
    filters from 0 Hz to sample_rate / 2 (12 kHz), magnitude (not power), log(max(mel, 1e-5)).

The 1e-5 floor (-100 dB) lies below -95 dB, the level that BigVGAN's input scaling already maps to -1, so the
floor never changes what the vocoder sees.

Framing: frame t is centred on the middle of samples [t * hop, (t + 1) * hop), so a wave of N samples gives
exactly N // hop frames (the last N % hop samples are dropped), and T frames vocode back into T * hop samples.
The window of frame t starts (n_fft - hop) / 2 samples before t * hop; at the ends the wave is mirrored.

Shape glossary: B batch, N samples, T frames, n_freqs = n_fft / 2 + 1 STFT bins, n_mels = cfg.mel_dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import VocoderConfig

N_FFT = 1024
MEL_FLOOR = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The Slaney mel filterbank, by hand.
# ----------------------------------------------------------------------------------------------------------------
def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4).

    >>> hz_to_mel(torch.tensor([0.0, 1000.0, 6400.0], dtype=torch.float64)).tolist()
    [0.0, 15.0, 42.0]
    """
    log_part = 15.0 + 27.0 * torch.log(f.clamp(min=1000.0) / 1000.0) / math.log(6.4)
    return torch.where(f < 1000.0, 3.0 * f / 200.0, log_part)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """The inverse of hz_to_mel."""
    exp_part = 1000.0 * torch.exp((m.clamp(min=15.0) - 15.0) * math.log(6.4) / 27.0)
    return torch.where(m < 15.0, 200.0 * m / 3.0, exp_part)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters, evenly spaced on the mel scale, each scaled to unit area (Slaney). (n_mels, n_freqs) fp32.

    Filter i rises from edge i to its peak at edge i + 1 and falls to zero at edge i + 2, where the n_mels + 2
    edges are evenly spaced in mels from f_min to f_max. Wider filters (high frequencies) are scaled down by
    2 / width, so a flat spectrum gives the same value in every band.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    mels = torch.linspace(hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
                          hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(), n_mels + 2,
                          dtype=torch.float64)
    edges = mel_to_hz(mels)                                                 # (n_mels + 2,) in Hz
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # centre of every STFT bin
    lower, peak, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (freqs - lower) / (peak - lower)                               # (n_mels, n_freqs)
    falling = (upper - freqs) / (upper - peak)
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    return (triangles * 2.0 / (upper - lower)).float()


# ----------------------------------------------------------------------------------------------------------------
# STFT and its inverse with the framing described in the header.
# ----------------------------------------------------------------------------------------------------------------
def _pads(n_fft: int, hop: int) -> tuple[int, int]:
    left = (n_fft - hop) // 2
    return left, n_fft - hop - left                                         # 392 and 392 for 1024 / 240


def _fft_ready(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 (e.g. a vocoder's output under bf16 autocast) -> fp32: cuFFT has no bf16 transforms and half
    precision spectra would be too coarse for a loss anyway. Other dtypes pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def stft(wav: torch.Tensor, hop: int, n_fft: int = N_FFT) -> torch.Tensor:
    """Complex STFT with frame t centred on samples [t hop, (t + 1) hop). wav (B, N) -> (B, n_freqs, N // hop)."""
    T = wav.shape[-1] // hop
    left, right = _pads(n_fft, hop)
    wav = _fft_ready(wav)
    x = F.pad(wav[:, None, :T * hop], (left, right), mode="reflect")[:, 0]  # (B, (T - 1) hop + n_fft)
    window = torch.hann_window(n_fft, dtype=wav.dtype, device=wav.device)
    return torch.stft(x, n_fft, hop, window=window, center=False, return_complex=True)   # (B, n_freqs, T)


def istft(spec: torch.Tensor, hop: int, n_fft: int = N_FFT) -> torch.Tensor:
    """The least-squares inverse of `stft` (Griffin & Lim, 1984). spec (B, n_freqs, T) -> wav (B, T * hop).

    Each frame is brought back to time, windowed again and added at its place (overlap-add); dividing by the
    summed squared windows undoes both windowings. istft(stft(x)) == x for any x of T * hop samples.
    """
    B, _, T = spec.shape
    window = torch.hann_window(n_fft, dtype=spec.real.dtype, device=spec.device)
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[:, None]        # (B, n_fft, T)
    length = (T - 1) * hop + n_fft
    overlap_add = lambda f: F.fold(f, (1, length), (1, n_fft), stride=(1, hop))[:, 0, 0]   # (B, length)
    wav = overlap_add(frames)
    weight = overlap_add(window.pow(2)[None, :, None].expand(1, n_fft, T))  # (1, length)
    left, _ = _pads(n_fft, hop)
    # every kept sample is covered by at least one window, so the weight there is positive
    return (wav / weight.clamp(min=1e-8))[:, left:left + T * hop]           # (B, T * hop)


# ----------------------------------------------------------------------------------------------------------------
# The mel front end and Griffin-Lim.
# ----------------------------------------------------------------------------------------------------------------
def _check_wav(wav, name: str, min_samples: int) -> None:
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N), got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {wav.dtype}")
    if wav.ndim != 2:
        raise ValueError(f"{name} must have shape (B, N) (a batch of mono waves), got {tuple(wav.shape)}")
    if wav.shape[1] < min_samples:
        raise ValueError(f"{name} is too short: {wav.shape[1]} samples, at least {min_samples} are needed")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _min_samples(hop: int, n_fft: int = N_FFT) -> int:
    """Mirroring at the ends needs more kept samples than the longer pad: 480 (2 frames) for hop 240."""
    return (max(_pads(n_fft, hop)) // hop + 1) * hop


def check_mel(mel, mel_dim: int, name: str = "mel") -> None:
    """A mel must be a finite float tensor (B, mel_dim, T) with T >= 1; anything else is a clear error."""
    if not isinstance(mel, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {mel_dim}, T), got {type(mel).__name__}")
    if not mel.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (natural-log amplitudes), got dtype {mel.dtype}")
    if mel.ndim != 3 or mel.shape[1] != mel_dim:
        raise ValueError(f"{name} must have shape (B, {mel_dim}, T) (mel bins in dimension 1), "
                         f"got {tuple(mel.shape)}")
    if mel.shape[2] == 0:
        raise ValueError(f"{name} has no frames (T = 0); at least one is needed")
    if not torch.isfinite(mel).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _filterbank(cfg: VocoderConfig, like: torch.Tensor) -> torch.Tensor:
    fb = mel_filterbank(N_FFT // 2 + 1, cfg.mel_dim, cfg.sample_rate)
    return fb.to(device=like.device, dtype=like.real.dtype)                 # (n_mels, n_freqs)


def mel_spectrogram(wav: torch.Tensor, cfg: VocoderConfig | None = None) -> torch.Tensor:
    """wav (B, N) at cfg.sample_rate -> natural-log amplitude mel (B, cfg.mel_dim, N // cfg.hop_length).

    cfg defaults to VocoderConfig() (24 kHz, hop 240, 80 bins); the other settings are in the file header.
    """
    cfg = cfg or VocoderConfig()
    _check_wav(wav, "wav", _min_samples(cfg.hop_length))
    spec = stft(wav, cfg.hop_length)                                        # (B, n_freqs, T), fp32 for bf16 input
    # the tiny constant keeps the gradient of the square root finite where the spectrum is exactly zero
    magnitude = (spec.real.pow(2) + spec.imag.pow(2) + 1e-12).sqrt()
    mel = _filterbank(cfg, magnitude) @ magnitude                           # (B, n_mels, T)
    return mel.clamp(min=MEL_FLOOR).log()


def mel_to_magnitude(mel: torch.Tensor, cfg: VocoderConfig | None = None, nnls_steps: int = 10) -> torch.Tensor:
    """A linear STFT magnitude whose mel is close to `mel`. (B, n_mels, T) -> (B, n_freqs, T).

    The filterbank maps n_freqs = 513 bins to 80, so it has no inverse. Its pseudo-inverse gives the smallest
    spectrum that reproduces the mel exactly, but part of it is negative, which no magnitude can be; zeroing
    those parts spoils the fit. A few multiplicative updates (Lee & Seung's rule for non-negative least squares:
    m <- m * (A^T y) / (A^T A m)) restore it while keeping every value >= 0.
    """
    cfg = cfg or VocoderConfig()
    check_mel(mel, cfg.mel_dim)
    fb = _filterbank(cfg, mel)                                              # (n_mels, n_freqs)
    target = mel.exp()                                                      # (B, n_mels, T) amplitudes
    magnitude = (torch.linalg.pinv(fb) @ target).clamp(min=0.0) + 1e-8      # (B, n_freqs, T); > 0 so it can grow
    numerator = fb.T @ target
    for _ in range(nnls_steps):
        magnitude = magnitude * numerator / (fb.T @ (fb @ magnitude) + 1e-12)
    return magnitude


def griffin_lim(mel: torch.Tensor, cfg: VocoderConfig | None = None, n_iter: int = 32, momentum: float = 0.99,
                seed: int = 0) -> torch.Tensor:
    """Invert `mel_spectrogram` without a trained model. mel (B, n_mels, T) -> wav (B, T * hop).

    1. Magnitudes from the mel: `mel_to_magnitude`.
    2. Phases (Griffin & Lim, 1984): start from random phases, then repeatedly go to a waveform and back. The
       round trip yields a spectrum that a real waveform has; keep its phases, put back the known magnitudes.
       `momentum` is the fast variant (Perraudin et al., 2013): step past the new phases in the direction they
       moved, which converges in far fewer iterations (0 gives the plain algorithm).
    """
    cfg = cfg or VocoderConfig()
    hop = cfg.hop_length
    magnitude = mel_to_magnitude(mel, cfg)                                  # (B, n_freqs, T)
    if mel.shape[-1] * hop < _min_samples(hop):
        raise ValueError(f"mel has {mel.shape[-1]} frame(s); griffin_lim needs at least {_min_samples(hop) // hop} "
                         f"(its STFT mirrors the wave at the ends)")
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(magnitude.shape, generator=g, dtype=magnitude.dtype).to(mel.device) * 2 * math.pi
    phase = torch.polar(torch.ones_like(magnitude), angles)                 # unit complex numbers
    previous = torch.zeros_like(phase)
    for _ in range(n_iter):
        rebuilt = stft(istft(magnitude * phase, hop), hop)                  # the nearest consistent spectrum
        step = rebuilt + momentum * (rebuilt - previous)
        previous = rebuilt
        phase = step / (step.abs() + 1e-16)
    return istft(magnitude * phase, hop)


# ----------------------------------------------------------------------------------------------------------------
# Losses for training a vocoder (beside the adversarial losses of the training script).
# ----------------------------------------------------------------------------------------------------------------
def _check_pair(pred, true, min_samples: int) -> None:
    _check_wav(pred, "wav_pred", min_samples)
    _check_wav(true, "wav_true", min_samples)
    if pred.shape != true.shape:
        raise ValueError(f"wav_pred {tuple(pred.shape)} and wav_true {tuple(true.shape)} must have the same shape")


def mel_loss(wav_pred: torch.Tensor, wav_true: torch.Tensor, cfg: VocoderConfig | None = None) -> torch.Tensor:
    """Mean absolute difference of the log mels (HiFi-GAN's reconstruction loss). (B, N), (B, N) -> scalar."""
    cfg = cfg or VocoderConfig()
    _check_pair(wav_pred, wav_true, _min_samples(cfg.hop_length))
    return (mel_spectrogram(wav_pred, cfg) - mel_spectrogram(wav_true, cfg)).abs().mean()


def multi_resolution_stft_loss(wav_pred: torch.Tensor, wav_true: torch.Tensor,
                               resolutions=((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))) -> torch.Tensor:
    """Spectral convergence + log-magnitude distance, averaged over several (n_fft, hop, win_length) settings.

    One STFT size trades time resolution for frequency resolution; several together leave a generator no
    artefact that all of them miss (Yamamoto et al., Parallel WaveGAN, 2020). For each resolution:
        spectral convergence ||S_true - S_pred||_F / ||S_true||_F   (dominated by the loud parts)
        log magnitude        mean |log S_true - log S_pred|         (weighs quiet parts equally)
    Both are 0 exactly when the magnitudes agree. (B, N), (B, N) -> scalar.
    """
    _check_pair(wav_pred, wav_true, max(n_fft for n_fft, _, _ in resolutions) // 2 + 1)   # mirrored ends
    wav_pred, wav_true = _fft_ready(wav_pred), _fft_ready(wav_true)
    total = wav_pred.new_zeros(())
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, dtype=wav_pred.dtype, device=wav_pred.device)
        mags = []
        for w in (wav_pred, wav_true):
            spec = torch.stft(w, n_fft, hop, win, window=window, center=True, pad_mode="reflect", return_complex=True)
            # the floor keeps log and its gradient finite in silence
            mags.append((spec.real.pow(2) + spec.imag.pow(2)).clamp(min=1e-7).sqrt())   # (B, n_fft/2+1, frames)
        pred, true = mags
        convergence = (true - pred).flatten(1).norm(dim=1) / true.flatten(1).norm(dim=1)   # (B,)
        total = total + convergence.mean() + (true.log() - pred.log()).abs().mean()
    return total / len(resolutions)

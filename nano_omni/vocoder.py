"""BigVGAN, the vocoder at the end of Qwen2.5-Omni's Token2Wav: a mel spectrogram in, a 24 kHz waveform out.

Paper: BigVGAN (Lee et al., 2023, arXiv 2206.04658), used as the last stage of Qwen2.5-Omni's streaming speech
decoder (arXiv 2503.20215, section 2.4). Reference notes: sections 1.6 and 3f. The oracle is transformers'
`Qwen2_5OmniToken2WavBigVGANModel`; tests/test_vocoder.py checks this file against it.

    mel (B, 80, T)  natural-log amplitude, 100 frames/s
      --normalize_mel--> values in [-1, 1] --conv_pre (k7)--> (B, 1536, T)
      --6 stages: ConvTranspose1d (x5, x3, x2, x2, x2, x2; channels halve each time)
                  then the mean of 3 AMP blocks (kernels 3, 7, 11)--> (B, 24, 240 T)
      --anti-aliased SnakeBeta --conv_post (k7, no bias) --clamp to [-1, 1]--> wav (B, 240 T)

Shape glossary: B batch, C channels, T mel frames, L the time length at whatever rate a layer runs,
N = T * hop waveform samples (hop = prod(upsample_rates) = 240 samples = 10 ms at 24 kHz).

The ideas, in the order they appear below:
1. `normalize_mel`: the DiT writes natural-log amplitudes; the vocoder was trained on a dB scale squeezed into
   [-1, 1].
2. `SnakeBeta`: x + sin^2(alpha x) / beta, a periodic activation. Speech is mostly periodic (voiced sounds), and
   a ReLU network has no built-in notion of periodicity; sin^2 gives it one. alpha sets the frequency, beta the
   amplitude, one pair per channel, both stored as logarithms.
3. Anti-aliasing: any pointwise nonlinearity creates harmonics, and those above the Nyquist frequency fold back
   into the band as inharmonic noise. `AntiAliasedSnakeBeta` doubles the sample rate, applies the activation,
   then low-pass filters and halves the rate again, with one 12-tap Kaiser-windowed sinc filter
   (`kaiser_sinc_filter`). tests/test_vocoder.py measures the difference.
4. `AMPBlock` (anti-aliased multi-periodicity): three residual pairs of dilated convolutions and activations.
5. `BigVGAN`: the generator above. Module names equal the official checkpoint keys under
   `token2wav.code2wav_bigvgan_model.` (including `ups.N.0`, a list inside a list).
6. `receptive_field`: how many mel frames on each side one output sample depends on, computed from the layers;
   the streaming vocoder uses it to choose its overlap.

The mel front end used to make training targets, a Griffin-Lim baseline and the training losses are in mel.py.

Simplifications: none in the computation. Weight normalisation (used while training the original BigVGAN) is not
modelled: the official checkpoint stores plain weights. Where transformers returns `wav.squeeze().cpu()`, we
return (B, N) on the input's device.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VocoderConfig
from .mel import check_mel

# ----------------------------------------------------------------------------------------------------------------
# 1. Input scaling.
# ----------------------------------------------------------------------------------------------------------------
DB_PER_NEPER = 20 / math.log(10)       # 20 log10(e^x) = 8.686 x: natural-log amplitude -> decibels
MIN_DB = -115.0                        # amplitudes below -115 dB are floored ...
REF_DB = 20.0                          # ... every level is lowered by 20 dB ...
# ... and [MIN_DB, 0] dB after the shift is mapped linearly onto [-1, 1], so the window is -95 dB .. +20 dB.


def normalize_mel(mel: torch.Tensor) -> torch.Tensor:
    """Natural-log amplitude mel -> the clamped dB scale in [-1, 1] the vocoder reads.

    The reference computes exp, clamps at -115 dB, takes 20 log10 and subtracts 20 dB; working on the logarithm
    directly gives the same numbers without overflowing exp. +1 is an amplitude of 10 (+20 dB), -1 is -95 dB
    (1.8e-5); everything outside is clamped.

    >>> normalize_mel(torch.tensor([math.log(10.0), 0.0, math.log(1e-5)]))
    tensor([ 1.0000,  0.6522, -1.0000])
    """
    db = DB_PER_NEPER * mel.clamp(min=MIN_DB / DB_PER_NEPER) - REF_DB
    return (2 * (db - MIN_DB) / -MIN_DB - 1).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# 2-3. SnakeBeta and its anti-aliased version.
# ----------------------------------------------------------------------------------------------------------------
class SnakeBeta(nn.Module):
    """y = x + sin^2(alpha x) / beta per channel, with alpha = e^self.alpha, beta = e^self.beta.

    Storing the logarithms keeps alpha, beta positive during training; zeros (alpha = beta = 1) are the
    initial values. sin^2 is never negative, so y >= x: a ramp with periodic ripples. x (B, C, L) -> (B, C, L).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))   # log of the frequency factor
        self.beta = nn.Parameter(torch.zeros(channels))    # log of the inverse ripple amplitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[:, None]                  # (C, 1), broadcast over time
        beta = self.beta.exp()[:, None]                    # (C, 1)
        return x + torch.sin(alpha * x).pow(2) / (beta + 1e-9)


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A low-pass FIR filter: an ideal low-pass (a sinc) cut to `kernel_size` taps by a Kaiser window, (K,) fp32.

    `cutoff` and `half_width` are in cycles per sample (the Nyquist frequency is 0.5). The window's beta follows
    Kaiser's design rule: a filter with M = K/2 - 1 and transition width dw = 4 pi half_width (the reference's
    choice) can reach an attenuation of A = 2.285 M dw + 7.95 dB, and A picks beta. An even K puts the
    filter's centre between two taps. The taps are scaled to sum to 1, so a constant passes unchanged.

    >>> [round(v, 5) for v in kaiser_sinc_filter(0.25, 0.3, 12).tolist()]   # the filter BigVGAN uses everywhere
    [0.00203, 0.00939, -0.02554, -0.05766, 0.12857, 0.44321, 0.44321, 0.12857, -0.05766, -0.02554, 0.00939, 0.00203]
    """
    if not 0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must lie in (0, 0.5] cycles per sample, got {cutoff}")
    attenuation = 2.285 * (kernel_size // 2 - 1) * math.pi * (4 * half_width) + 7.95      # dB
    if attenuation > 50:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    else:
        beta = 0.0                                         # a plain rectangular window
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta, dtype=torch.float32)
    # tap positions relative to the centre: -5.5 .. 5.5 for K = 12, -5 .. 5 for K = 11
    t = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    taps = 2 * cutoff * torch.sinc(2 * cutoff * t) * window
    return taps / taps.sum()


def upsample2x(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Double the sample rate: put a zero between samples, then low-pass; one transposed conv does both.

    x (B, C, L) -> (B, C, 2L); filt (1, 1, K) with K even, applied to every channel (depthwise). The edges are
    padded by repeating the end samples, then the samples those pads produced are cut off again.
    """
    C, K = x.shape[1], filt.shape[-1]
    pad = K // 2 - 1                                       # so every kept output sees K / 2 (real or repeated) inputs
    x = F.pad(x, (pad, pad), mode="replicate")             # (B, C, L + 2 pad)
    y = F.conv_transpose1d(x, filt.expand(C, 1, K), stride=2, groups=C)   # (B, C, 2L + 4 pad + K - 2)
    left, right = 2 * pad + (K - 2) // 2, 2 * pad + (K - 1) // 2          # 15 and 15 for K = 12
    # x2: after zero-stuffing only every other sample carries signal, so the filter must have a gain of 2
    return 2 * y[..., left:y.shape[-1] - right]            # (B, C, 2L)


def downsample2x(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Halve the sample rate: low-pass, then keep every second sample; one strided conv does both.

    x (B, C, 2L) -> (B, C, L); filt (1, 1, K) with K even, depthwise, replicate padding at the edges.
    """
    C, K = x.shape[1], filt.shape[-1]
    x = F.pad(x, (K // 2 - 1, K // 2), mode="replicate")   # (B, C, 2L + K - 1)
    return F.conv1d(x, filt.expand(C, 1, K), stride=2, groups=C)          # (B, C, L)


class AntiAliasedSnakeBeta(nn.Module):
    """SnakeBeta run at twice the sample rate: upsample2x -> SnakeBeta -> downsample2x. (B, C, L) -> (B, C, L).

    At rate 2 fs the activation's new harmonics up to fs are represented faithfully instead of folding back;
    the low-pass inside downsample2x then removes what lies above the original Nyquist frequency fs / 2.
    The filter (cutoff 0.25 cycles per sample at the doubled rate = fs / 2) is derived, so it is a
    non-persistent buffer: it is never stored in a checkpoint.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict:
        """The filter is computed, never stored in a checkpoint (rebuilt after a meta-device load)."""
        return {"filter": kaiser_sinc_filter(0.25, 0.3, 12).view(1, 1, 12)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample2x(self.act(upsample2x(x, self.filter)), self.filter)


# ----------------------------------------------------------------------------------------------------------------
# 4-5. AMP block and the generator.
# ----------------------------------------------------------------------------------------------------------------
class AMPBlock(nn.Module):
    """For each dilation d: x = x + conv2(act(conv1_d(act(x)))). Length-preserving, (B, C, L) -> (B, C, L).

    conv1 is dilated (d = 1, 3, 5 widens the context without more weights), conv2 is not; both pad to keep L.
    Activation 2i feeds convs1[i] and activation 2i + 1 feeds convs2[i] (the order of the checkpoint keys).
    """

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        k, C = kernel_size, channels
        self.convs1 = nn.ModuleList(nn.Conv1d(C, C, k, dilation=d, padding=d * (k - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(C, C, k, padding=(k - 1) // 2) for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnakeBeta(C) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            h = conv1(self.activations[2 * i](x))
            x = x + conv2(self.activations[2 * i + 1](h))
        return x


def _check_architecture(cfg: VocoderConfig) -> None:
    """Two shape rules VocoderConfig does not check: every layer must change the length exactly as intended."""
    for k in cfg.resblock_kernel_sizes:
        if k % 2 == 0:
            raise ValueError(f"resblock_kernel_sizes must be odd (a 'same' padding keeps the length), got {k}")
    for i, (r, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        if k < r or (k - r) % 2:
            raise ValueError(f"upsample_kernel_sizes[{i}] ({k}) - upsample_rates[{i}] ({r}) must be even and >= 0, "
                             f"so that stage {i} makes the signal exactly {r} times longer")


class BigVGAN(nn.Module):
    """mel (B, mel_dim, T), natural-log amplitude -> wav (B, T * hop) in [-1, 1]."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        _check_architecture(cfg)
        self.cfg = cfg
        C0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_dim, C0, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()   # stage i owns resblocks[i * n_kernels : (i + 1) * n_kernels]
        for i, (r, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            c_out = C0 // 2 ** (i + 1)
            # padding (k - r) / 2 on each side makes the output exactly r times longer than the input;
            # the one-element list reproduces the official key layout ups.{i}.0.weight
            self.ups.append(nn.ModuleList([nn.ConvTranspose1d(2 * c_out, c_out, k, stride=r, padding=(k - r) // 2)]))
            for k_res, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock(c_out, k_res, dilations))
        c_last = C0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnakeBeta(c_last)
        self.conv_post = nn.Conv1d(c_last, 1, 7, padding=3, bias=False)

    @property
    def hop_length(self) -> int:
        return self.cfg.hop_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        check_mel(mel, self.cfg.mel_dim)
        n = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(normalize_mel(mel))                               # (B, C0, T)
        for i, (up,) in enumerate(self.ups):
            x = up(x)                                                       # (B, C0 / 2^(i+1), L * r_i)
            # multi-receptive-field fusion: blocks with different kernel sizes look at different time scales
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        x = self.conv_post(self.activation_post(x))                         # (B, 1, T * hop)
        # a clamp, not a tanh: values inside [-1, 1] pass unchanged (and a clamped sample gets no gradient)
        return x.clamp(-1.0, 1.0).squeeze(1)                                # (B, T * hop)


# ----------------------------------------------------------------------------------------------------------------
# 6. Receptive field, from the architecture.
#
# Each helper takes the index range [lo, hi] of a layer's OUTPUT and returns the range of its INPUT that can
# influence it, for a signal long enough that the edges (padding) are not involved. Walking the layers from
# conv_post back to conv_pre turns the samples of one mel frame into a range of mel frames.
# ----------------------------------------------------------------------------------------------------------------
def _conv_span(lo: int, hi: int, k: int, dilation: int = 1, pad: int = 0, stride: int = 1) -> tuple[int, int]:
    # Conv1d: output j reads inputs j * stride - pad + dilation * m for taps m = 0 .. k - 1
    return lo * stride - pad, hi * stride - pad + dilation * (k - 1)


def _transposed_conv_span(lo: int, hi: int, k: int, stride: int, pad: int) -> tuple[int, int]:
    # ConvTranspose1d: input i writes outputs i * stride - pad + m for taps m = 0 .. k - 1
    return -((k - 1 - lo - pad) // stride), (hi + pad) // stride          # ceil and floor divisions


def _activation_span(lo: int, hi: int, k: int = 12) -> tuple[int, int]:
    lo, hi = _conv_span(lo, hi, k, pad=k // 2 - 1, stride=2)              # downsample2x
    pad = k // 2 - 1                                                       # upsample2x: padding, then the crop
    lo, hi = _transposed_conv_span(lo, hi, k, stride=2, pad=2 * pad + (k - 2) // 2)
    return lo - pad, hi - pad                                              # = (lo - 5, hi + 5) for k = 12


def _amp_span(lo: int, hi: int, k: int, dilations: list[int]) -> tuple[int, int]:
    for d in reversed(dilations):
        a, b = _conv_span(lo, hi, k, pad=(k - 1) // 2)                     # convs2
        a, b = _activation_span(a, b)
        a, b = _conv_span(a, b, k, dilation=d, pad=d * (k - 1) // 2)       # convs1
        a, b = _activation_span(a, b)
        lo, hi = min(lo, a), max(hi, b)                                    # the residual path reads [lo, hi] too
    return lo, hi


def receptive_field(cfg: VocoderConfig) -> tuple[int, int]:
    """(left, right): the waveform samples of mel frame t depend on mel frames t - left .. t + right, no others.

    Away from the utterance's ends, a chunk of frames [a, b) is vocoded exactly as in one offline pass if the
    vocoder is fed frames [a - left, b + right) and the samples of frames [a, b) are kept. Computed from the
    layer shapes; tests/test_vocoder.py confirms it by perturbing one input frame.

    >>> receptive_field(VocoderConfig())   # the official architecture
    (34, 34)
    """
    hop = cfg.hop_length
    lo, hi = 0, hop - 1                                                    # the samples of frame 0
    lo, hi = _conv_span(lo, hi, 7, pad=3)                                  # conv_post
    lo, hi = _activation_span(lo, hi)                                      # activation_post
    for i in reversed(range(len(cfg.upsample_rates))):
        spans = [_amp_span(lo, hi, k, d) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)        # the mean of the blocks sees them all
        r, k = cfg.upsample_rates[i], cfg.upsample_kernel_sizes[i]
        lo, hi = _transposed_conv_span(lo, hi, k, stride=r, pad=(k - r) // 2)
    lo, hi = _conv_span(lo, hi, 7, pad=3)                                  # conv_pre, now in mel frames
    return -lo, hi

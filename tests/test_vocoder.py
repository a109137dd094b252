"""BigVGAN vocoder and the mel front end: parity with transformers through our loader, the Kaiser filter, what
anti-aliasing buys, the receptive field, Griffin-Lim, the training losses and bad input. fp32 unless noted."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from nano_omni.checkpoint import load_weights
from nano_omni.config import VocoderConfig, get_config
from nano_omni.mel import (griffin_lim, istft, mel_filterbank, mel_loss, mel_spectrogram, multi_resolution_stft_loss,
                           stft)
from nano_omni.vocoder import (AntiAliasedSnakeBeta, BigVGAN, kaiser_sinc_filter, normalize_mel, receptive_field)
from reference import hf_bigvgan

CFG = get_config("tiny").vocoder
NARROW = VocoderConfig(upsample_initial_channel=64)  # every official layer, 1/24 of the width (1 channel at 24 kHz)
PREFIX = "token2wav.code2wav_bigvgan_model."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convolutions are tiny and overhead-bound; a second thread only adds synchronisation (and waits
    badly on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(cfg, seed=0):
    hf = hf_bigvgan(cfg, seed=seed)
    ours = BigVGAN(cfg).eval()
    load_weights(ours, {PREFIX + k: v for k, v in hf.state_dict().items()}, prefix=PREFIX, source="transformers BigVGAN")
    return hf, ours


def _mel(B, T, n_mels=80, seed=0):
    """Random natural-log mels that stay inside the range the vocoder does not clamp (-95 dB .. +20 dB)."""
    return torch.randn(B, n_mels, T, generator=torch.Generator().manual_seed(seed)) * 1.5 - 4.0


# ----------------------------------------------------------------------------------------------------------------
# Parity with the reference.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CFG, NARROW], ids=["tiny", "official-layers"])
def test_waveform_matches_transformers(cfg):
    hf, ours = _pair(cfg, seed=1)
    mel = _mel(2, 9)
    with torch.no_grad():
        ref, out = hf(mel), ours(mel)
    assert out.shape == (2, 9 * cfg.hop_length) == ref.shape
    # meaningful only if the wave is far above the tolerance and not stuck at the clamp (measured std: 0.043 tiny,
    # 0.0047 with the 1-channel last stage of "official-layers")
    assert ref.std() > 2e-3 and (ref.abs() < 1).float().mean() > 0.9
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_mel_scaling_matches_transformers():
    hf, _ = _pair(CFG)
    mel = torch.linspace(-30, 30, 601).view(1, 1, -1)     # crosses both clamps; exp(30) does not overflow
    torch.testing.assert_close(normalize_mel(mel), hf.process_mel_spectrogram(mel), rtol=0, atol=1e-6)


def test_anti_aliased_activation_matches_transformers():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (Qwen2_5OmniAntiAliasedActivation1d,
                                                                        Qwen2_5OmniSnakeBeta)
    ref = Qwen2_5OmniAntiAliasedActivation1d(Qwen2_5OmniSnakeBeta(5))
    ours = AntiAliasedSnakeBeta(5)
    with torch.no_grad():
        ref.act.alpha.normal_(0, 0.7)
        ref.act.beta.normal_(0, 0.7)
    ours.load_state_dict(ref.state_dict())                 # the filters are not in either state dict
    x = torch.randn(3, 5, 37)                              # an odd length as well
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_kaiser_filter_matches_reference_and_is_a_derived_buffer():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import kaiser_sinc_filter1d
    for cutoff, half_width, k in [(0.25, 0.3, 12), (0.1, 0.05, 12), (0.2, 0.1, 11), (0.4, 0.6, 32)]:
        torch.testing.assert_close(kaiser_sinc_filter(cutoff, half_width, k),
                                   kaiser_sinc_filter1d(cutoff, half_width, k).view(-1), rtol=0, atol=1e-7)
    m = BigVGAN(CFG)
    assert not [k for k in m.state_dict() if "filter" in k]
    assert sum(1 for n, _ in m.named_buffers() if n.endswith("filter")) == 1 + 6 * 6 * len(CFG.resblock_kernel_sizes)


# ----------------------------------------------------------------------------------------------------------------
# What anti-aliasing buys.
# ----------------------------------------------------------------------------------------------------------------
def _aliased_fraction(y: torch.Tensor, k0: int) -> float:
    """Energy at frequencies that are not harmonics of bin k0, relative to the fundamental. A pointwise map of a
    sine can only create harmonics; anything else is a harmonic above Nyquist folded back into the band."""
    N = y.shape[-1]
    power = torch.fft.rfft((y - y.mean()) * torch.hann_window(N, dtype=y.dtype)).abs().pow(2)
    harmonic = torch.zeros_like(power, dtype=torch.bool)
    for c in range(0, N // 2 + 1, k0):
        harmonic[max(c - 4, 0):c + 5] = True                # the Hann window spreads each line over a few bins
    return (power[~harmonic].sum() / power[k0 - 4:k0 + 5].sum()).item()


@pytest.mark.parametrize("k0, log_alpha, factor", [(1229, 0.0, 5.0), (700, math.log(2), 100.0)])
def test_anti_aliasing_removes_folded_harmonics(k0, log_alpha, factor):
    """A sine at k0/4096 cycles per sample through SnakeBeta, at the sample rate and anti-aliased. Measured:
    f = 0.30 (its first new harmonic 0.6 is above Nyquist): 0.126 vs 0.011 folded energy, 11x less;
    f = 0.17 with alpha = 2: 0.081 vs 0.00024, 335x less. Asserted with about 2x and 3x margin."""
    N = 4096
    x = torch.sin(2 * math.pi * k0 / N * torch.arange(N, dtype=torch.float64)).view(1, 1, N)
    act = AntiAliasedSnakeBeta(1).double()
    with torch.no_grad():
        act.act.alpha.fill_(log_alpha)
        plain, filtered = act.act(x)[0, 0], act(x)[0, 0]
    a_plain, a_filtered = _aliased_fraction(plain, k0), _aliased_fraction(filtered, k0)
    assert a_plain > 0.05 and a_plain > factor * a_filtered, (a_plain, a_filtered)


# ----------------------------------------------------------------------------------------------------------------
# Receptive field.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")   # raised inside torch's forward-mode AD
@pytest.mark.parametrize("cfg", [CFG, NARROW], ids=["tiny", "official-layers"])
def test_receptive_field_matches_a_perturbed_frame(cfg):
    """Perturb mel frame t0 and see which samples move. The perturbation is infinitesimal (forward-mode autodiff,
    fp64): a finite bump would be rounded away in the far tail, where its effect is around 1e-100, while a
    tangent is exactly zero only where frame t0 cannot reach."""
    left, right = receptive_field(cfg)
    hop = cfg.hop_length
    torch.manual_seed(0)
    m = BigVGAN(cfg).double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith((".alpha", ".beta")):
                p.normal_(0, 0.5)
    T = 2 * (left + right) + 11                             # every sample t0 reaches sees no padding
    t0 = T // 2
    mel = _mel(1, T).double()
    direction = torch.zeros_like(mel)
    direction[0, :, t0] = torch.randn(80, dtype=torch.float64)
    with torch.no_grad(), fwAD.dual_level():
        wav, moved = fwAD.unpack_dual(m(fwAD.make_dual(mel, direction)))
    frames = (moved[0] != 0).nonzero()[:, 0] // hop          # the frame of every sample that moved
    # a sample of frame t0 + left has frame t0 as its furthest left context
    assert (frames.max().item() - t0, t0 - frames.min().item()) == (left, right)
    # what the streaming vocoder relies on: frames [a, b) from a window with that much context, as offline
    a, b = left + 2, left + 9
    with torch.no_grad():
        chunk = m(mel[..., a - left:b + right])[..., left * hop:(left + b - a) * hop]
    torch.testing.assert_close(chunk, wav[..., a * hop:b * hop], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Mel front end, Griffin-Lim, losses.
# ----------------------------------------------------------------------------------------------------------------
def test_mel_filterbank_matches_transformers_slaney():
    from transformers.audio_utils import mel_filter_bank
    ref = mel_filter_bank(513, 80, 0.0, 12000.0, 24000, norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(mel_filterbank(513, 80, 24000), torch.from_numpy(ref).T.float(), rtol=0, atol=1e-7)


def test_mel_framing_and_stft_round_trip():
    hop, sr = CFG.hop_length, CFG.sample_rate
    x = torch.randn(2, 24239)
    assert mel_spectrogram(x, CFG).shape == (2, 80, 24239 // hop)
    assert mel_spectrogram(x[:, :2 * hop], CFG).shape == (2, 80, 2)
    torch.testing.assert_close(istft(stft(x, hop), hop), x[:, :100 * hop], rtol=0, atol=1e-5)
    # a 3 kHz tone lights up the band whose filter peaks nearest 3 kHz, in every frame
    tone = torch.sin(2 * math.pi * 3000 * torch.arange(sr) / sr)[None]
    peaks = mel_filterbank(513, 80, sr).argmax(1) * (sr / 2) / 512
    assert (mel_spectrogram(tone, CFG)[0].argmax(0) == (peaks - 3000).abs().argmin()).all()


def _harmonic(seconds=0.5, sr=24000):
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 220 * (1 + 0.1 * torch.sin(2 * math.pi * 3 * t))     # a vibrato, so the phases are not trivial
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    return 0.25 * sum(torch.sin(k * phase) / k for k in range(1, 8))[None]   # (1, N)


def test_griffin_lim_reconstructs_a_harmonic_signal():
    wav = _harmonic()
    mel = mel_spectrogram(wav)
    distance = lambda w: (mel_spectrogram(w) - mel).abs().mean().item()
    rebuilt = griffin_lim(mel, n_iter=32)
    assert rebuilt.shape == (1, mel.shape[-1] * CFG.hop_length)
    # measured: 0.27 after 32 iterations, 0.52 with the random starting phases; a noise of equal power: 5.8
    assert distance(rebuilt) < 0.33
    assert distance(rebuilt) < 0.65 * distance(griffin_lim(mel, n_iter=0))


def test_losses_are_zero_for_identical_waves_and_grow_with_noise():
    x = 0.1 * torch.randn(2, 9600, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 9600, generator=torch.Generator().manual_seed(1))
    for loss in (mel_loss, multi_resolution_stft_loss):
        assert loss(x, x).item() == 0.0
        values = [loss(x + level * noise, x).item() for level in (1e-3, 1e-2, 1e-1)]
        assert 0 < values[0] < values[1] < values[2], (loss.__name__, values)
        pred = (x + 0.01 * noise).requires_grad_()
        loss(pred, x).backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_losses_take_a_bf16_prediction_as_bf16_autocast_makes_it():
    """Under bf16 autocast the vocoder's output is bf16 (cuFFT has no bf16 transform: stage 7 once failed on a
    GPU). The spectra are taken in fp32: the loss is the fp32 loss of the rounded wave, with gradients."""
    x = 0.1 * torch.randn(1, 9600, generator=torch.Generator().manual_seed(0))
    pred = (x + 0.01 * torch.randn(1, 9600, generator=torch.Generator().manual_seed(1))).bfloat16().requires_grad_()
    for loss in (mel_loss, multi_resolution_stft_loss):
        value = loss(pred, x)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(loss(pred.detach().float(), x).item(), rel=1e-6)
        value.backward()
        assert pred.grad.dtype == torch.bfloat16 and torch.isfinite(pred.grad.float()).all()
        pred.grad = None


# ----------------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------------
def test_bad_mel_is_rejected_at_the_boundary():
    m = BigVGAN(CFG)
    nan = _mel(1, 4)
    nan[0, 3, 2] = float("nan")
    cases = [(_mel(1, 4)[0], ValueError, r"mel must have shape \(B, 80, T\)"),        # rank 2
             (_mel(1, 4, n_mels=79), ValueError, r"mel must have shape \(B, 80, T\).*\(1, 79, 4\)"),
             (_mel(1, 4).transpose(1, 2), ValueError, r"mel must have shape \(B, 80, T\)"),  # (B, T, 80)
             (_mel(1, 0), ValueError, r"mel has no frames \(T = 0\)"),
             (nan, ValueError, "mel contains NaN or infinite"),
             (torch.zeros(1, 80, 4, dtype=torch.long), TypeError, "mel must be a floating-point tensor"),
             ([[0.0]], TypeError, "mel must be a torch.Tensor")]
    for mel, err, msg in cases:
        with pytest.raises(err, match=msg):
            m(mel)
        with pytest.raises(err, match=msg):
            griffin_lim(mel, CFG)
    with pytest.raises(ValueError, match=r"mel has 1 frame\(s\); griffin_lim needs at least 2"):
        griffin_lim(_mel(1, 1), CFG)


def test_bad_wave_and_config_are_rejected():
    x = torch.randn(1, 4800)
    with pytest.raises(ValueError, match=r"wav must have shape \(B, N\)"):
        mel_spectrogram(x[0])
    with pytest.raises(ValueError, match="wav is too short: 479 samples, at least 480"):
        mel_spectrogram(x[:, :479])
    with pytest.raises(ValueError, match="wav contains NaN"):
        mel_spectrogram(x / 0 * 0)
    with pytest.raises(ValueError, match=r"wav_pred \(1, 4800\) and wav_true \(1, 4799\) must have the same shape"):
        mel_loss(x, x[:, 1:])
    with pytest.raises(ValueError, match="wav_pred is too short: 1000 samples, at least 1025"):
        multi_resolution_stft_loss(x[:, :1000], x[:, :1000])   # the 2048-point STFT mirrors 1024 samples
    with pytest.raises(ValueError, match="resblock_kernel_sizes must be odd"):
        BigVGAN(VocoderConfig(upsample_initial_channel=64, resblock_kernel_sizes=[4], resblock_dilation_sizes=[[1]]))
    with pytest.raises(ValueError, match=r"upsample_kernel_sizes\[0\] \(5\) - upsample_rates\[0\] \(2\) must be even"):
        BigVGAN(VocoderConfig(upsample_initial_channel=64, upsample_rates=[2], upsample_kernel_sizes=[5]))

"""Audio: reading and resampling, Whisper log-mel parity, encoder parity, streaming prefill, bad input."""

import numpy as np
import pytest
import soundfile as sf
import torch

from nano_omni.attention import use_backend
from nano_omni.audio_enc import AudioEncoder, encode_streaming, load_audio, log_mel, pack_features, resample
from nano_omni.checkpoint import load_weights
from nano_omni.config import get_config
from nano_omni.tmrope import audio_token_count
from reference import hf_audio_encoder

CFG = get_config("tiny")
RATES = [8000, 16000, 22050, 44100, 48000]


def speechlike(sr: int, seconds: float) -> np.ndarray:
    """A band-limited (< 2.8 kHz) voiced sound: pitch gliding 80-200 Hz, 14 harmonics, a syllable-like envelope
    and 15-ms raised-cosine fades, defined analytically so it can be evaluated at any sample rate."""
    t = np.arange(int(sr * seconds), dtype=np.float64) / sr
    # f0(t) = 140 + 60 sin(2 pi 0.7 t); the phase is its integral
    phase = 2 * np.pi * (140 * t - 60 / (2 * np.pi * 0.7) * (np.cos(2 * np.pi * 0.7 * t) - 1))
    x = sum(np.sin(k * phase) / k for k in range(1, 15))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.015)
    env *= 0.5 - 0.5 * np.cos(np.pi * np.clip(fade, 0, 1))
    return (0.2 * x * env).astype(np.float32)


SIGNALS = {"speechlike": lambda sr: speechlike(sr, 1.7),
           "silent": lambda sr: np.zeros(sr, np.float32),
           "very_short": lambda sr: speechlike(sr, 0.05)}


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    return lambda x: fe(x, sampling_rate=16000, padding="max_length", return_tensors="pt")["input_features"][0]


@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_log_mel_matches_whisper_feature_extractor(whisper, sr, name):
    """Our front end at any input rate vs the reference extractor on the same sound sampled at 16 kHz."""
    ours = log_mel(load_audio(SIGNALS[name](sr), sr))
    truth16 = SIGNALS[name](16000)
    ref = whisper(truth16)[:, : len(truth16) // 160]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sr", RATES)
def test_log_mel_of_clipped_audio(whisper, sr):
    """Clipping is not band-limited, so there is no unique 16-kHz truth: compare on our resampled waveform."""
    x = np.clip(4 * speechlike(sr, 1.0), -1, 1)
    wav = load_audio(x, sr)
    torch.testing.assert_close(log_mel(wav), whisper(wav.numpy())[:, : len(wav) // 160], rtol=0, atol=1e-4)


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000, 96000])
def test_resampler_is_band_limited(orig):
    t = np.arange(orig, dtype=np.float64) / orig
    tone = lambda f, tt: np.sin(2 * np.pi * f * tt)
    y = resample(torch.from_numpy(tone(440, t) + 0.3 * tone(3000, t)).float(), orig, 16000)
    t16 = np.arange(len(y)) / 16000
    want = tone(440, t16) + 0.3 * tone(3000, t16)
    assert len(y) == 16000
    assert np.abs(y.numpy() - want)[2000:-2000].max() < 1e-5          # pass band: exact to 1e-5
    # flat pass band up to 80% of the lower Nyquist frequency
    edge = 0.8 * min(orig, 16000) / 2
    flat = resample(torch.from_numpy(tone(edge, t)).float(), orig, 16000).double()[2000:-2000]
    assert abs(float((2 * flat.pow(2).mean()).sqrt()) - 1) < 1e-3
    if orig > 18000:                                                    # a 9-kHz tone cannot exist at 16 kHz
        alias = resample(torch.from_numpy(tone(9000, t)).float(), orig, 16000)
        assert alias[2000:-2000].abs().max() < 1e-4                     # suppressed by more than 80 dB


@pytest.mark.parametrize("subtype, sr", [("PCM_U8", 8000), ("PCM_16", 16000), ("PCM_24", 44100),
                                         ("FLOAT", 48000), ("PCM_32", 96000)])
def test_files_of_every_sample_format_and_rate(tmp_path, subtype, sr):
    x = speechlike(sr, 0.5)
    stereo = np.stack([x, 0.5 * x], 1)                                  # (n, 2): down-mixed to the mean
    ext = "wav"
    path = tmp_path / f"a.{ext}"
    sf.write(path, stereo, sr, subtype=subtype)
    wav = load_audio(path)
    want = resample(torch.from_numpy(0.75 * x), sr, 16000)
    tol = {"PCM_U8": 2e-2, "PCM_16": 1e-4}.get(subtype, 1e-5)
    assert wav.shape == want.shape
    assert (wav - want).abs().max() < tol


@pytest.fixture(scope="module")
def encoders():
    hf = hf_audio_encoder(CFG, seed=1)
    ours = AudioEncoder(CFG.audio).eval()
    load_weights(ours, {"thinker.audio_tower." + k: v for k, v in hf.state_dict().items()},
                 prefix="thinker.audio_tower.", source="transformers audio encoder")
    return hf, ours


@pytest.mark.parametrize("lengths", [[200], [537], [537, 200, 93, 3], [401, 1000]])
@pytest.mark.parametrize("backend", ["manual", "fused"])
def test_encoder_matches_transformers(encoders, lengths, backend):
    hf, ours = encoders
    g = torch.Generator().manual_seed(sum(lengths))
    feats = torch.randn(CFG.audio.n_mels, sum(lengths), generator=g)
    with torch.no_grad(), use_backend(backend):
        ref = hf(feats, feature_lens=torch.tensor(lengths)).last_hidden_state
        out = ours(feats, lengths)
    assert out.shape == (sum(audio_token_count(L) for L in lengths), CFG.thinker.d_model)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_backends_agree_on_gradients(encoders):
    _, ours = encoders
    feats = torch.randn(CFG.audio.n_mels, 450)
    grads = []
    for backend in ("manual", "fused"):
        ours.zero_grad()
        with use_backend(backend):
            ours(feats, [450]).pow(2).sum().backward()
        grads.append(ours.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_streaming_prefill_equals_whole(encoders):
    _, ours = encoders
    mel = torch.randn(CFG.audio.n_mels, 1037)
    with torch.no_grad():
        whole = ours(mel, [1037])
    pieces = list(encode_streaming(ours, mel))
    assert [p.shape[0] for p in pieces] == [50, 50, 50, 50, 50, 9]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=1e-5)


def test_real_audio_end_to_end_token_rate(encoders):
    _, ours = encoders
    wav = load_audio(speechlike(22050, 3.0), 22050)
    mel = log_mel(wav)
    feats, lens = pack_features([mel])
    with torch.no_grad():
        tokens = ours(feats, lens)
    assert mel.shape == (128, 300) and tokens.shape[0] == 75          # 3 s -> 300 frames -> 75 tokens (25/s)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_audio_input(tmp_path, encoders):
    _, ours = encoders
    with pytest.raises(ValueError, match="is empty"):
        load_audio(np.zeros(0, np.float32), 16000)
    bad = speechlike(16000, 0.2)
    bad[100] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio(bad, 16000)
    bad[100] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio(bad, 16000)
    with pytest.raises(ValueError, match="longer than the configured maximum 2.0 s"):
        load_audio(speechlike(16000, 3.0), 16000, max_seconds=2.0)
    with pytest.raises(ValueError, match="pass sample_rate"):
        load_audio(speechlike(16000, 0.1))
    with pytest.raises(ValueError, match="sample rate must be an integer"):
        load_audio(speechlike(16000, 0.1), 50)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt this is not audio at all")
    with pytest.raises(ValueError, match="cannot read audio file .*junk.wav"):
        load_audio(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot read audio file .*notes.txt"):
        load_audio(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_audio(tmp_path)
    # shorter than one token: 20 ms of audio is 2 mel frames
    mel = log_mel(load_audio(speechlike(16000, 0.02), 16000))
    with pytest.raises(ValueError, match="shorter than one audio token"):
        ours(mel, [mel.shape[1]])
    with pytest.raises(ValueError, match=r"must be a \(128, total_frames\) tensor"):
        ours(torch.zeros(80, 100), [100])
    with pytest.raises(ValueError, match="sum to the 100 frames"):
        ours(torch.zeros(128, 100), [60])


def test_multichannel_is_downmixed():
    x = speechlike(16000, 0.3)
    six = np.stack([x * k for k in range(6)], 0)                       # (channels, n)
    torch.testing.assert_close(load_audio(six, 16000), torch.from_numpy(x * 2.5))

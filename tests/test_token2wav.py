"""Streaming Token2Wav: chunked DiT + chunked BigVGAN against the offline result; first-packet timing; bad input."""
import pytest
import torch

from nano_omni.config import get_config
from nano_omni.token2wav import FrameNoise, Token2Wav

CFG = get_config("tiny")


def _model(scale: float, seed: int = 0) -> Token2Wav:
    """A Token2Wav whose DiT has random weights of a chosen size (the DiT starts at exactly v = 0)."""
    torch.manual_seed(seed)
    m = Token2Wav(CFG).eval()
    with torch.no_grad():
        for p in m.code2wav_dit_model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 3 * scale / p.shape[1] ** 0.5)
        unclamp_(m)
    return m


def unclamp_(t2w):
    """A random BigVGAN sits at its +1 clamp (every sample equal); zero-mean, small output taps make its waveform
    vary, so waveform comparisons mean something."""
    w = t2w.code2wav_bigvgan_model.conv_post.weight
    w.sub_(w.mean(dim=2, keepdim=True)).mul_(0.25 / w.std())          # taps of each channel sum to zero


def _run(m, N=150, piece=7, **kw):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (1, N), generator=g)
    cond, ref = torch.randn(1, CFG.dit.enc_emb_dim, generator=g), torch.randn(1, 120, 80, generator=g)
    noise = FrameNoise(3, 80, CFG.dit.block_size)
    wav, mel = m(codes, cond, ref, noise=noise, return_mel=True, **{k: v for k, v in kw.items() if k in ("steps", "solver")})
    assert float((wav.abs() > 0.999).float().mean()) < 0.5 and float(wav.std()) > 1e-3   # not stuck at the clamp
    st = {}
    pcm = list(m.stream([codes[:, i: i + piece] for i in range(0, N, piece)], cond, ref, noise=noise, stats=st, **kw))
    return wav[0], mel, torch.cat(pcm), st


def test_streaming_is_exact_when_the_context_covers_the_receptive_field():
    m = _model(0.5)
    # one Euler step = one velocity evaluation: 2 blocks back and 1 ahead is all it can see
    wav, mel, pcm, st = _run(m, steps=2, solver="euler")
    torch.testing.assert_close(st["mel"], mel, rtol=0, atol=1e-5)
    torch.testing.assert_close(pcm, wav, rtol=0, atol=1e-5)
    # three Euler evaluations see 3 x (2 back, 1 ahead): give the windows that much context
    wav, mel, pcm, st = _run(m, steps=4, solver="euler", past_blocks=6, future_blocks=3)
    torch.testing.assert_close(st["mel"], mel, rtol=0, atol=1e-5)
    torch.testing.assert_close(pcm, wav, rtol=0, atol=1e-5)


def test_official_recipe_seam_error_is_bounded():
    """10-step RK4 with 2 blocks of past and 1 of future context: 36 evaluations spread each frame's dependence
    beyond the window, so frames near window edges differ from the offline result. On this random DiT (weights
    drawn at scale 0.5, 150 codes) we measured a largest mel error of 9.1e-4 of the mel's peak and a largest
    waveform error of 1.2e-5 (the waveform's std is 0.045); we assert about 4x and 80x those."""
    m = _model(0.5)
    wav, mel, pcm, st = _run(m, steps=10, solver="rk4")
    err = (st["mel"] - mel).abs()
    assert float(err.max() / mel.abs().max()) < 4e-3
    assert float((pcm - wav).abs().max()) < 1e-3
    # the error lives at the seams: frames well inside a chunk are closer to offline than frames at its edges
    per_frame = err[0].amax(-1)
    first, chunk = 2 * CFG.dit.block_size, 3 * CFG.dit.block_size      # chunk ends: 48, 120, 192, ...
    seams = torch.cat([per_frame[k - 4: k + 4] for k in range(first, per_frame.shape[0] - 4, chunk)])
    middles = torch.cat([per_frame[k + chunk // 2 - 4: k + chunk // 2 + 4] for k in range(first, per_frame.shape[0] - chunk, chunk)])
    assert float(seams.mean()) > float(middles.mean())


def test_first_packet_leaves_after_a_fixed_number_of_codes():
    m = _model(0.1)
    assert m.first_packet_codes() == 36                   # (2 + 1) blocks of 24 frames, 2 frames per code
    assert m.first_packet_codes(3) == 48                  # a first chunk as long as the others: (3 + 1) blocks
    for piece in (1, 5):
        _, _, pcm, st = _run(m, N=120, piece=piece, steps=2, solver="euler")
        first, second = st["codes_at_chunk"][:2]
        assert 36 <= first < 36 + piece                   # the first piece that completes 36 codes releases it
        assert 72 <= second < 72 + piece                  # then 3-block chunks: frames up to 48 + 72 + 24 = 144
    _, _, _, st = _run(m, N=120, piece=1, steps=2, solver="euler", first_chunk_blocks=3)
    assert st["codes_at_chunk"][:2] == [48, 84]
    # the vocoder writes the frames its receptive field allows: chunk 0 = 48 frames minus its right overlap
    from nano_omni.vocoder import receptive_field
    left, right = receptive_field(CFG.vocoder)
    stream = m.stream([torch.randint(0, 256, (1, 36))], torch.randn(1, 32), torch.randn(1, 120, 80), steps=2,
                      solver="euler")
    first_chunk = next(stream)
    assert first_chunk.shape[0] == (48 - right) * CFG.vocoder.hop_length


def test_bad_chunk_sizes():
    m = _model(0.1)
    cond, ref = torch.randn(1, 32), torch.randn(1, 120, 80)
    for kw, msg in ((dict(first_chunk_blocks=0), "first_chunk_blocks must be an integer >= 1"),
                    (dict(chunk_blocks=1.5), "chunk_blocks must be an integer >= 1"),
                    (dict(past_blocks=-1), "past_blocks must be an integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            m.session(cond, ref, **kw)


def test_bad_codes():
    m = _model(0.1)
    cond, ref = torch.randn(1, 32), torch.randn(1, 120, 80)
    with pytest.raises(ValueError, match="codes is empty"):
        m(torch.zeros(1, 0, dtype=torch.long), cond, ref)
    with pytest.raises(ValueError, match="no codes arrived"):
        list(m.stream([torch.zeros(1, 0, dtype=torch.long)], cond, ref))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 257\]"):
        m(torch.tensor([[1, 300]]), cond, ref)
    with pytest.raises(TypeError, match="integer ids"):
        m(torch.tensor([[1.0, 2.0]]), cond, ref)
    with pytest.raises(ValueError, match=r"codes must be a \(1, N\) tensor"):
        m(torch.tensor([1, 2]), cond, ref)

"""Processor and the full Thinker: conversations with every modality -> logits equal to transformers'."""
import numpy as np
import pytest
import torch

from nano_omni.attention import use_backend
from nano_omni.audio_enc import AudioEncoder
from nano_omni.checkpoint import load_weights
from nano_omni.config import get_config
from nano_omni.processor import Processor, load_video
from nano_omni.thinker import Thinker
from nano_omni.tmrope import audio_token_count
from nano_omni.tokenizer import ByteTokenizer
from nano_omni.vision_enc import VisionEncoder
from reference import hf_thinker

CFG = get_config("tiny")
TK = CFG.tokens
TOK = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
RNG = np.random.default_rng(0)


def tone(seconds, sr=16000, f=300.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def image(h, w):
    return (RNG.random((h, w, 3)) * 255).astype(np.uint8)


def video(frames, h, w):
    return (RNG.random((frames, h, w, 3)) * 255).astype(np.uint8)


CONVS = [
    [{"role": "user", "content": [{"type": "audio", "audio": (tone(1.3), 16000)},
                                  {"type": "image", "image": image(60, 90)}, "What do you hear and see?"]}],
    [{"role": "user", "content": [{"type": "video", "video": video(6, 56, 84), "fps": 2.0,
                                   "audio": (tone(3.2, 22050), 22050)}, "When?"]},
     {"role": "assistant", "content": "Now."},
     {"role": "user", "content": [{"type": "image", "image": image(40, 40)}, {"type": "audio", "audio": (tone(0.5), 16000)}]}],
    [{"role": "user", "content": "Just text, a short row."}],
]


@pytest.fixture(scope="module")
def models():
    hf = hf_thinker(CFG, seed=11)
    ours = Thinker(CFG, audio_tower=AudioEncoder(CFG.audio), visual=VisionEncoder(CFG.vision)).eval()
    load_weights(ours, {"thinker." + k: v for k, v in hf.state_dict().items()}, prefix="thinker.",
                 source="transformers thinker")
    return hf, ours


def _hf_kwargs(x):
    kw = dict(input_ids=x.input_ids, attention_mask=x.attention_mask, use_audio_in_video=x.use_audio_in_video,
              pixel_values=x.pixel_values, image_grid_thw=x.image_grid_thw, pixel_values_videos=x.pixel_values_videos,
              video_grid_thw=x.video_grid_thw, video_second_per_grid=x.second_per_grid)
    if x.audio_features is not None:
        lens = x.audio_lengths.tolist()
        feats = torch.zeros(len(lens), x.audio_features.shape[0], max(lens))
        fmask = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, piece in enumerate(x.audio_features.split(lens, dim=1)):
            feats[i, :, : piece.shape[1]] = piece
            fmask[i, : piece.shape[1]] = 1
        kw.update(input_features=feats, feature_attention_mask=fmask)
    return kw


@pytest.mark.parametrize("aiv", [False, True])
@pytest.mark.parametrize("backend", ["manual", "fused"])
def test_full_thinker_matches_transformers(models, aiv, backend):
    hf, ours = models
    x = Processor(CFG, TOK)(CONVS, use_audio_in_video=aiv)
    with torch.no_grad():
        ref = hf(**_hf_kwargs(x)).logits
        with use_backend(backend):
            out = ours(**x.model_kwargs()).logits
    valid = x.attention_mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-4)


def test_placeholders_are_expanded_to_the_encoder_outputs(models):
    _, ours = models
    x = Processor(CFG, TOK)(CONVS, use_audio_in_video=True)
    ids = x.input_ids
    with torch.no_grad():
        enc = ours.encode_media(**{k: v for k, v in x.model_kwargs().items()
                                   if k not in ("input_ids", "attention_mask", "positions")})
    assert int((ids == TK.audio_pad).sum()) == enc["audio_embeds"].shape[0] == \
        sum(audio_token_count(L) for L in x.audio_lengths.tolist())
    assert int((ids == TK.image_pad).sum()) == enc["image_embeds"].shape[0]
    assert int((ids == TK.video_pad).sum()) == enc["video_embeds"].shape[0]
    # audio-in-video: the two bos and the two eos tokens sit together around the interleaved chunks
    row = ids[1].tolist()
    i = row.index(TK.video_pad)
    assert row[i - 2: i] == [TK.vision_bos, TK.audio_bos]
    assert x.attention_mask[2].sum() < x.attention_mask.shape[1] and x.attention_mask[2, 0] == 0   # left padding


def test_generate_from_a_multimodal_prompt(models):
    _, ours = models
    x = Processor(CFG, TOK)(CONVS[:1])
    out = ours.generate_from(x, max_new_tokens=5, stop_ids=[-1])
    with torch.no_grad():
        full = ours(**x.model_kwargs()).logits[:, -1].argmax(-1)
    assert out.tokens.shape == (1, 5) and int(out.tokens[0, 0]) == int(full[0])


def test_video_from_a_folder_of_frames_with_audio(tmp_path):
    from PIL import Image
    import soundfile as sf

    for i in range(5):
        Image.fromarray(image(56, 56)).save(tmp_path / f"frame_{i:03d}.png")
    sf.write(tmp_path / "audio.wav", tone(2.5), 16000)
    frames, fps, wav = load_video(tmp_path, fps=2.0)
    assert len(frames) == 5 and fps == 2.0 and wav.shape[0] == 40000
    x = Processor(CFG, TOK)([{"role": "user", "content": [{"type": "video", "video": str(tmp_path), "fps": 2.0}]}],
                            use_audio_in_video=True)
    assert int(x.video_grid_thw[0, 0]) == 2                                     # 5 frames at 2 fps -> 4 -> 2 pairs
    assert int((x.input_ids == TK.video_pad).sum()) == int(x.video_grid_thw.prod()) // 4
    assert int((x.input_ids == TK.audio_pad).sum()) == audio_token_count(250)


def test_bad_conversations(tmp_path):
    proc = Processor(CFG, TOK)
    with pytest.raises(ValueError, match="1 image placeholder.s. but 0 image item"):
        proc([{"role": "user", "content": "look: <|IMAGE|>"}])
    with pytest.raises(ValueError, match="has no audio track"):
        proc([{"role": "user", "content": [{"type": "video", "video": video(4, 28, 28), "fps": 2.0}]}],
             use_audio_in_video=True)
    with pytest.raises(ValueError, match="shorter than one audio token"):
        proc([{"role": "user", "content": [{"type": "audio", "audio": (tone(0.02), 16000)}]}])
    with pytest.raises(ValueError, match="longer than the configured maximum 1.0 s"):
        Processor(CFG, TOK, max_audio_seconds=1.0)([{"role": "user", "content": [{"type": "audio", "audio": (tone(1.5), 16000)}]}])
    with pytest.raises(ValueError, match="needs its frame rate"):
        proc([{"role": "user", "content": [{"type": "video", "video": video(4, 28, 28)}]}])
    with pytest.raises(ValueError, match="holds no image frames"):
        load_video(tmp_path, fps=2.0)
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    pytest.importorskip("av")
    with pytest.raises(ValueError, match="cannot read video file .*clip.mp4"):
        load_video(mp4)


def test_missing_pyav_is_named(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_av(name, *a, **k):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_av)
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    with pytest.raises(ImportError, match="needs the optional package PyAV: pip install av"):
        load_video(tmp_path / "clip.mp4")


def test_mp4_with_sound_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as box:
        vs = box.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = box.add_stream("aac", rate=16000)
        aus.layout = "mono"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            for pkt in vs.encode(frame):
                box.mux(pkt)
        for pkt in vs.encode():
            box.mux(pkt)
        pcm = tone(2.0)
        for k in range(0, len(pcm), 1024):
            af = av.AudioFrame.from_ndarray(pcm[None, k: k + 1024], format="fltp", layout="mono")
            af.sample_rate = 16000
            for pkt in aus.encode(af):
                box.mux(pkt)
        for pkt in aus.encode():
            box.mux(pkt)
    frames, fps, wav = load_video(path)
    assert frames.shape == (20, 48, 64, 3) and fps == 10.0
    assert wav is not None and 1.9 * 16000 < wav.shape[0] < 2.3 * 16000 and 0.3 < float(wav.abs().max()) < 0.6   # tone peak 0.45
    x = Processor(CFG, TOK)([{"role": "user", "content": [{"type": "video", "video": str(path)}]}],
                            use_audio_in_video=True)
    assert int(x.video_grid_thw[0, 0]) == 2 and x.audio_lengths.numel() == 1


@pytest.mark.parametrize("audio_s, want", [
    (1.0, [("video", 2), ("audio", 25), ("video", 1)]),                    # audio ends early
    (6.0, [("video", 2), ("audio", 50), ("video", 1), ("audio", 100)]),    # audio runs on past the frames
])
def test_audio_track_shorter_or_longer_than_the_frames(audio_s, want):
    """Documented normalisation: the track is kept as it is; 2-s chunks interleave while both last, then the
    longer one continues alone (TMRoPE still places every token at its own time). 6 frames at 2 fps are three
    frame pairs at t = 0, 1, 2 s: two fall in the first 2-s chunk, one in the second. Video counts are in pairs."""
    x = Processor(CFG, TOK)([{"role": "user", "content": [{"type": "video", "video": video(6, 28, 56), "fps": 2.0,
                                                           "audio": (tone(audio_s), 16000)}]}], use_audio_in_video=True)
    per_pair = int(x.video_grid_thw[0, 1] * x.video_grid_thw[0, 2]) // 4
    runs, prev = [], None
    for t in x.input_ids[0].tolist():
        kind = {TK.video_pad: "video", TK.audio_pad: "audio"}.get(t)
        if kind and kind == prev:
            runs[-1][1] += 1
        elif kind:
            runs.append([kind, 1])
        prev = kind
    assert [(k, n // per_pair if k == "video" else n) for k, n in runs] == want

"""Omni: Thinker -> Talker -> Token2Wav wired offline and streaming; voices files (never unpickled with code)."""
import os
import pickle

import pytest
import torch

from nano_omni.config import get_config
from nano_omni.omni import Omni, Voice, load_voices, save_voices
from nano_omni.processor import Processor
from nano_omni.talker import reply_text_track
from nano_omni.tmrope import get_rope_index
from nano_omni.tokenizer import ByteTokenizer
from test_token2wav import unclamp_

CFG = get_config("tiny")
TK, TC = CFG.tokens, CFG.talker
TOK = ByteTokenizer(CFG.tokens, CFG.thinker.vocab_size)
GREEDY_TALKER = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40)
FAST_T2W = dict(steps=2, solver="euler")          # one velocity evaluation: streaming is exact (test_token2wav)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Omni(CFG).eval()
    with torch.no_grad():                          # wake up the zero-initialised DiT so the speech is not silence
        for p in m.token2wav.code2wav_dit_model.parameters():
            if p.ndim > 1:
                p.add_(torch.randn_like(p) * 0.3 / p.shape[1] ** 0.5)
        unclamp_(m.token2wav)
    g = torch.Generator().manual_seed(1)
    m.voices = {"amy": Voice(300, torch.randn(1, CFG.dit.enc_emb_dim, generator=g), torch.randn(1, 100, 80, generator=g))}
    return m


def _inputs(texts):
    return Processor(CFG, TOK)([[{"role": "user", "content": t}] for t in texts])


def _reference_codes(m, x, stop_ids, n_text):
    """The offline construction of the reference implementation: the whole reply first, then the Talker."""
    out = m.thinker.generate_from(x, max_new_tokens=n_text, stop_ids=stop_ids)
    T, B = x.input_ids.shape[1], x.input_ids.shape[0]
    media = (x.input_ids == TK.audio_pad) | (x.input_ids == TK.image_pad) | (x.input_ids == TK.video_pad)
    embeds = out.embeds.clone()
    embeds[:, :T] = embeds[:, :T].masked_fill(media[..., None], 0.0)
    rows = out.hidden + embeds                                        # H + E of every fed position
    reply = rows[:, T:]                                               # R_0 .. R_{N-2}
    N = out.tokens.shape[1]
    is_end = torch.isin(out.tokens, torch.tensor(stop_ids))
    first_end = torch.where(is_end, torch.arange(N), N).min(1).values.clamp(1, N - 1)
    spk = m.thinker.model.embed_tokens(torch.full((B, 1), 300))
    text_ids = torch.cat([x.input_ids, torch.full((B, 1), 300), out.tokens[:, :1]], 1)
    pos, deltas = get_rope_index(text_ids, TK, attention_mask=torch.cat([x.attention_mask, torch.ones(B, 2, dtype=torch.long)], 1))
    prompt = m.talker.prompt(out.hidden[:, :T], embeds[:, :T], spk, reply[:, :1], pos, deltas, x.attention_mask)
    eos_pad = m.thinker.model.embed_tokens(torch.tensor([TK.tts_text_eos, TK.tts_text_pad]))
    track = reply_text_track(reply, first_end, eos_pad[0], eos_pad[1])
    return out.tokens, m.talker.generate(prompt, track, **GREEDY_TALKER)


def test_streaming_talker_reads_the_reply_as_it_arrives_and_matches_offline(model):
    x = _inputs(["Say something short.", "A longer question, so this row is padded less."])
    probe = model.thinker.generate_from(x, max_new_tokens=10, stop_ids=[-1]).tokens
    stop_ids = [int(probe[0, 3])]                    # row 0 ends at (or before) its 4th token, row 1 differently
    tokens, codes = _reference_codes(model, x, stop_ids, 10)
    text, stream_codes = [], []
    for kind, v in model._events(x, "amy", dict(max_new_tokens=10, stop_ids=stop_ids), GREEDY_TALKER, {}, 0):
        (text if kind == "text" else stream_codes).append(v)
    assert torch.equal(torch.stack(text, 1), tokens)
    assert torch.equal(torch.stack(stream_codes, 1), codes)


def test_generate_and_stream_give_the_same_text_and_speech(model):
    x = _inputs(["Hello there!"])
    kw = dict(thinker_kw=dict(max_new_tokens=6), talker_kw=GREEDY_TALKER, t2w_kw=FAST_T2W, seed=2)
    out = model.generate(x, "amy", **kw)
    events = list(model.stream(x, "amy", **kw))
    text = torch.stack([v for k, v in events if k == "text"], 1)
    pcm = torch.cat([v for k, v in events if k == "audio"])
    assert torch.equal(text, out.tokens)
    n_codes = int(((out.codes[0] == TC.codec_pad) | (out.codes[0] == TC.codec_eos)).long().argmax()) or out.codes.shape[1]
    assert out.wav[0].shape[0] == n_codes * CFG.dit.repeats * CFG.vocoder.hop_length
    assert float(out.wav[0].std()) > 1e-3                   # a waveform that moves, not a clamped constant
    torch.testing.assert_close(pcm, out.wav[0], rtol=0, atol=1e-5)
    kinds = [k for k, _ in events]
    assert kinds.index("audio") > kinds.index("text")          # text first, then speech, as it is produced


@pytest.mark.parametrize("pad", ["image_pad", "video_pad", "audio_pad"])
def test_a_reply_that_begins_with_a_media_placeholder_is_spoken_as_text(model, monkeypatch, pad):
    """An untrained Thinker can say a media placeholder first (the README's random model did, 1 seed in 100). The
    Talker's positions read it as text: the speech equals that of the same reply beginning with a plain token,
    where it used to stop with "the prompt holds image placeholders but no image_grid_thw was given"."""
    x = _inputs(["Hello there!"])
    real = model.thinker.stream

    def saying(first_id):
        def stream(*a, **kw):
            steps = real(*a, **kw)
            step = next(steps)
            yield type(step)(torch.full_like(step.token, first_id), step.hidden, step.embeds)
            yield from steps
        return stream

    codes = {}
    for name, first_id in ((pad, getattr(TK, pad)), ("text", TK.im_end)):
        monkeypatch.setattr(model.thinker, "stream", saying(first_id))
        events = list(model._events(x, "amy", dict(max_new_tokens=4, stop_ids=[-1]), GREEDY_TALKER, {}, 0))
        assert int(events[0][1][0]) == first_id
        codes[name] = torch.stack([v for k, v in events if k == "codes"], 1)
    assert codes[pad].shape[1] > 0 and torch.equal(codes[pad], codes["text"])


def test_text_only_generation_skips_the_speech_half():
    cfg = get_config("tiny", enable_audio_output=False)
    m = Omni(cfg).eval()
    assert not hasattr(m, "talker") and not hasattr(m, "token2wav")
    out = m.generate(_inputs(["hi"]), thinker_kw=dict(max_new_tokens=3))
    assert out.wav is None and out.tokens.shape == (1, 3)


def test_voices_round_trip_and_official_format(tmp_path, model):
    v = model.voices["amy"]
    save_voices(tmp_path / "voices.safetensors", {"amy": v, "bob": Voice(301, v.cond * 2, v.ref_mel[:, :50])})
    back = load_voices(tmp_path / "voices.safetensors", CFG)
    assert sorted(back) == ["amy", "bob"] and back["bob"].bos_id == 301
    torch.testing.assert_close(back["bob"].ref_mel, v.ref_mel[:, :50])
    # the official spk_dict.pt layout: {"Chelsie": {"bos_token": ..., "cond": (1, 192), "ref_mel": (1, 400, 80)}}
    torch.save({"Chelsie": {"bos_token": 301, "cond": v.cond, "ref_mel": v.ref_mel}}, tmp_path / "spk_dict.pt")
    assert load_voices(tmp_path / "spk_dict.pt", CFG)["Chelsie"].bos_id == 301


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_voices_file_with_code_is_refused_and_never_run(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "spk_dict.pt", "wb") as f:
        pickle.dump({"Chelsie": {"bos_token": 1, "cond": _Evil(), "ref_mel": torch.zeros(1, 4, 80)}}, f)
    with pytest.raises(ValueError, match="holds objects other than tensors .refused, nothing was run."):
        load_voices(tmp_path / "spk_dict.pt", CFG)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("entry, msg", [
    ({"cond": torch.zeros(1, 32), "ref_mel": torch.zeros(1, 10, 80)}, r"lacks \['bos_token'\]"),
    ({"bos_token": 1, "cond": torch.zeros(1, 32), "ref_mel": torch.zeros(1, 10, 79)}, "ref_mel must have shape"),
    ({"bos_token": 1, "cond": torch.zeros(1, 31), "ref_mel": torch.zeros(1, 10, 80)}, r"cond must have shape \(1, 32\)"),
    ({"bos_token": 99999, "cond": torch.zeros(1, 32), "ref_mel": torch.zeros(1, 10, 80)}, "bos_id must be a token id"),
    ({"bos_token": 1, "cond": torch.full((1, 32), float("nan")), "ref_mel": torch.zeros(1, 10, 80)}, "NaN"),
])
def test_malformed_voice_entries(tmp_path, entry, msg):
    torch.save({"v": entry}, tmp_path / "spk.pt")
    with pytest.raises(ValueError, match=msg):
        load_voices(tmp_path / "spk.pt", CFG)


def test_unknown_voice_and_missing_file(tmp_path, model):
    with pytest.raises(ValueError, match=r"unknown voice 'zed'; available: \['amy'\]"):
        model.voice("zed")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_voices(tmp_path / "nope.safetensors", CFG)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid nano_omni voices file"):
        load_voices(tmp_path / "bad.safetensors", CFG)

"""Talker: parity with transformers (logits and greedy codes), KV cache, incremental text track, bad input."""
import pytest
import torch

from nano_omni.attention import use_backend
from nano_omni.checkpoint import load_weights
from nano_omni.config import get_config
from nano_omni.decoder import KVCache
from nano_omni.talker import Talker, reply_text_track
from nano_omni.tmrope import get_rope_index
from reference import hf_talker

CFG = get_config("tiny")
TC, TK = CFG.talker, CFG.tokens
D = TC.embed_dim
SPEAKER = 300          # a speaker-bos id inside the tiny vocabulary


@pytest.fixture(scope="module")
def pair():
    hf = hf_talker(CFG, seed=5)
    ours = Talker(CFG).eval()
    load_weights(ours, {"talker." + k: v for k, v in hf.state_dict().items()}, prefix="talker.",
                 source="transformers talker")
    return hf, ours


def _inputs(B=2, T=9, seed=0, pad_row=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_row and B > 1:
        mask[1, :3] = 0                                   # left padding in row 1
        ids[1, :3] = TK.pad
    hidden, embeds = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    spk, r0 = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    reply0 = torch.randint(0, 256, (B, 1), generator=g)
    text_ids = torch.cat([ids, torch.full((B, 1), SPEAKER), reply0], 1)
    full_mask = torch.cat([mask, torch.ones(B, 2, dtype=torch.long)], 1)
    pos, deltas = get_rope_index(text_ids, TK, attention_mask=full_mask)
    return dict(ids=ids, mask=mask, hidden=hidden, embeds=embeds, spk=spk, r0=r0, text_ids=text_ids,
                full_mask=full_mask, pos=pos, deltas=deltas)


def _prompt(m, x):
    return m.prompt(x["hidden"], x["embeds"], x["spk"], x["r0"], x["pos"], x["deltas"], x["mask"])


@pytest.mark.parametrize("backend", ["manual", "fused"])
def test_prefill_logits_match_transformers(pair, backend):
    hf, ours = pair
    x = _inputs()
    raw = torch.cat([x["hidden"] + x["embeds"], x["spk"], x["r0"]], 1)
    hf.rope_deltas = None
    with torch.no_grad(), use_backend(backend):
        ref = hf(inputs_embeds=raw.clone(), attention_mask=x["full_mask"], input_text_ids=x["text_ids"]).logits
        p = _prompt(ours, x)
        out = ours(p.embeds, p.positions, p.key_valid)
    valid = x["full_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)


def test_greedy_codes_match_transformers_generate(pair):
    hf, ours = pair
    x = _inputs(B=2, T=7, seed=1)
    N = 6
    g = torch.Generator().manual_seed(9)
    reply = torch.randn(2, N, D, generator=g)                      # R_0 .. R_5
    eos_e, pad_e = torch.randn(D, generator=g), torch.randn(D, generator=g)
    reply_len = torch.tensor([5, 3])                               # row 1's reply ends earlier
    x["r0"] = reply[:, :1]
    # the reference's reply stream: R_1.., then eos, then pad, rewritten per row
    ref_part = torch.cat([reply[:, 1:5], eos_e.expand(2, 1, D), pad_e.expand(2, 1, D)], 1)
    pos = torch.arange(ref_part.shape[1])[None, :, None]
    ref_part = torch.where(pos >= reply_len[:, None, None], pad_e, ref_part)
    ref_part = torch.where(pos == reply_len[:, None, None] - 1, eos_e, ref_part)
    raw = torch.cat([x["hidden"] + x["embeds"], x["spk"], x["r0"]], 1)
    talker_ids = torch.cat([torch.full_like(x["ids"], TC.codec_mask), torch.full((2, 1), TC.codec_pad),
                            torch.full((2, 1), TC.codec_bos)], 1)
    hf.rope_deltas = None
    with torch.no_grad():
        ref = hf.generate(input_ids=talker_ids, input_text_ids=x["text_ids"], thinker_reply_part=ref_part,
                          inputs_embeds=raw, attention_mask=x["full_mask"], suppress_tokens=[TC.codec_bos],
                          do_sample=False, max_new_tokens=12, eos_token_id=[TC.codec_pad, TC.codec_eos],
                          pad_token_id=TC.codec_pad, repetition_penalty=1.05)[:, talker_ids.shape[1]:]
    codes = ours.generate(_prompt(ours, x), reply_text_track(reply, reply_len, eos_e, pad_e),
                          do_sample=False, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)
    assert ref.shape[1] == 12 and torch.equal(codes, ref)             # 12 codes, no early stop


def test_cached_decode_equals_full_forward(pair):
    _, m = pair
    x = _inputs(B=2, T=6, seed=2)
    p = _prompt(m, x)
    g = torch.Generator().manual_seed(3)
    steps = [torch.randn(2, 1, D, generator=g) for _ in range(4)]
    with torch.no_grad():
        cache = KVCache(TC.n_layer)
        cache.deltas = p.deltas
        outs = [m(p.embeds, p.positions, p.key_valid, cache)]
        pos_all = [p.positions]
        for s in steps:
            pos = cache.n_seen.view(1, -1, 1) + p.deltas.view(1, -1, 1)
            pos = pos.expand(3, -1, 1)
            outs.append(m(s, pos, None, cache))
            pos_all.append(pos)
        full = m(torch.cat([p.embeds] + steps, 1), torch.cat(pos_all, 2),
                 torch.cat([p.key_valid, torch.ones(2, 4, dtype=torch.bool)], 1))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


def test_incremental_text_track_gives_the_same_codes(pair):
    """Reply rows pulled one at a time (as a streaming Thinker produces them) give the codes of the whole reply."""
    _, m = pair
    x = _inputs(B=1, T=5, seed=4, pad_row=False)
    g = torch.Generator().manual_seed(4)
    reply = torch.randn(1, 8, D, generator=g)
    eos_e, pad_e = torch.randn(D, generator=g), torch.randn(D, generator=g)
    x["r0"] = reply[:, :1]
    whole = list(reply_text_track(reply, torch.tensor([8]), eos_e, pad_e))
    pulled = []

    def lazy():
        for k, item in enumerate(reply_text_track(reply, torch.tensor([8]), eos_e, pad_e)):
            pulled.append(k)
            yield item

    kw = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, stop_ids=[-1])
    a = m.generate(_prompt(m, x), whole, **kw)
    steps = m.stream(_prompt(m, x), lazy(), **kw)
    b = []
    for i, c in enumerate(steps):
        b.append(c)
        assert len(pulled) <= i, "the talker read text-track items ahead of the step that needs them"
    assert torch.equal(a, torch.stack(b, 1))


def test_seeded_sampling_is_reproducible_and_stops(pair):
    _, m = pair
    x = _inputs(B=2, T=5, seed=6)
    track = lambda: reply_text_track(torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1)),
                                     torch.tensor([2, 2]), torch.zeros(D), torch.zeros(D))
    a = m.generate(_prompt(m, x), track(), seed=3, max_new_tokens=30)
    b = m.generate(_prompt(m, x), track(), seed=3, max_new_tokens=30)
    assert torch.equal(a, b)
    assert not (a == TC.codec_bos).any()                     # codec_bos is suppressed
    for row in a:                                            # after a stop code only codec_pad follows
        stops = ((row == TC.codec_pad) | (row == TC.codec_eos)).nonzero()
        if len(stops):
            assert (row[int(stops[0]) + 1:] == TC.codec_pad).all()


def test_bad_input(pair):
    _, m = pair
    x = _inputs()
    with pytest.raises(ValueError, match="x must have last dimension 64"):
        m(torch.zeros(1, 3, 5), torch.zeros(3, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"speaker_embed must have shape \(2, 1, 64\)"):
        m.prompt(x["hidden"], x["embeds"], x["spk"][:, :0], x["r0"], x["pos"], x["deltas"], x["mask"])
    with pytest.raises(ValueError, match="positions must have shape"):
        m.prompt(x["hidden"], x["embeds"], x["spk"], x["r0"], x["pos"][:, :, :-1], x["deltas"], x["mask"])
    bad = x["hidden"].clone()
    bad[0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="prompt_hidden contains NaN or infinite values"):
        m.prompt(bad, x["embeds"], x["spk"], x["r0"], x["pos"], x["deltas"], x["mask"])
    with pytest.raises(ValueError, match=r"codes holds id 9999, outside the vocabulary"):
        m.codec_embed(torch.tensor([[1, 9999]]))

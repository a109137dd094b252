"""Thinker LM: parity with transformers through our loader, KV cache, padding, generation, bad input."""
import pytest
import torch

from nano_omni.attention import use_backend
from nano_omni.checkpoint import CheckpointError, canonical_key, load_weights
from nano_omni.config import get_config
from nano_omni.decoder import KVCache
from nano_omni.sampling import SamplingConfig, process_logits
from nano_omni.thinker import Thinker
from reference import hf_thinker

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def pair():
    hf = hf_thinker(CFG, seed=3)
    ours = Thinker(CFG).eval()
    load_weights(ours, {"thinker." + k: v for k, v in hf.state_dict().items()}, prefix="thinker.",
                 skip_prefixes=("thinker.audio_tower.", "thinker.visual."), source="transformers thinker")
    return hf, ours


def _ids(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["manual", "fused"])
def test_logits_match_transformers_with_padding(pair, backend):
    hf, ours = pair
    ids = _ids(3, 19)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, :6] = 0          # left padding
    mask[2, 15:] = 0         # right padding
    with torch.no_grad(), use_backend(backend):
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)


def test_loader_reports_every_problem_at_once(pair):
    hf, _ = pair
    sd = {"thinker." + k: v for k, v in hf.state_dict().items()}
    sd.pop("thinker.model.language_model.norm.weight")
    sd["thinker.model.language_model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    sd["thinker.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(Thinker(CFG), sd, prefix="thinker.", skip_prefixes=("thinker.audio_tower.", "thinker.visual."))
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "thinker.model.norm.weight" in msg
    assert "1 unexpected key(s)" in msg and "thinker.extra.weight" in msg
    assert "1 mis-shaped key(s)" in msg and "checkpoint (3, 3) vs model (128, 64)" in msg



def test_stacked_weights_keep_their_checkpoint_names(pair):
    """q/k/v and gate/up are one matmul each (StackedLinear), yet state_dict(), load_state_dict() and the loader
    speak the checkpoint's names, part by part, also into a model built on the meta device."""
    hf, ours = pair
    sd = ours.state_dict()
    assert not [k for k in sd if "qkv_proj" in k or "gate_up_proj" in k]
    ref = {canonical_key("thinker." + k)[len("thinker."):]: v for k, v in hf.state_dict().items()}
    for part in ("self_attn.q_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        assert torch.equal(sd[f"model.layers.1.{part}"], ref[f"model.layers.1.{part}"]), part
    fresh = Thinker(CFG)
    fresh.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())
    with torch.device("meta"):
        meta = Thinker(CFG)
    load_weights(meta, {"thinker." + k: v for k, v in sd.items()}, prefix="thinker.",
                 skip_prefixes=("thinker.audio_tower.", "thinker.visual."))
    got = meta.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith(("audio_tower.", "visual.")))

def test_cached_decode_equals_full_forward(pair):
    _, m = pair
    ids = _ids(2, 14, seed=1)
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(CFG.thinker.n_layer)
        parts = [m(ids[:, :5], cache=cache).logits]
        for t in range(5, 14):
            parts.append(m(ids[:, t:t + 1], cache=cache).logits)
        chunked = torch.cat(parts, 1)
        cache2 = KVCache(CFG.thinker.n_layer)
        two = torch.cat([m(ids[:, :9], cache=cache2).logits, m(ids[:, 9:], cache=cache2).logits], 1)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(two, full, rtol=0, atol=1e-5)


def test_padding_does_not_change_valid_positions(pair):
    _, m = pair
    ids = _ids(1, 10, seed=2)
    pad = CFG.tokens.pad
    left = torch.cat([torch.full((1, 4), pad), ids], 1)
    right = torch.cat([ids, torch.full((1, 4), pad)], 1)
    mask_l = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1).long()
    mask_r = mask_l.flip(1)
    with torch.no_grad():
        alone = m(ids).logits
        torch.testing.assert_close(m(left, mask_l).logits[:, 4:], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(m(right, mask_r).logits[:, :10], alone, rtol=0, atol=1e-5)


def test_greedy_generate_matches_step_by_step_argmax_and_batches_with_padding(pair):
    _, m = pair
    ids = _ids(1, 7, seed=4)
    out = m.generate(ids, max_new_tokens=6, stop_ids=[-1])
    seq = ids
    for _ in range(6):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out.tokens, seq[:, 7:])
    assert out.hidden.shape == (1, 7 + 5, CFG.thinker.d_model) and out.embeds.shape == out.hidden.shape
    with torch.no_grad():
        torch.testing.assert_close(out.hidden, m(seq[:, :-1]).hidden, rtol=0, atol=1e-5)
    # the same prompt left-padded inside a batch gives the same tokens
    other = _ids(1, 10, seed=5)
    batch = torch.cat([torch.cat([torch.full((1, 3), CFG.tokens.pad), ids], 1), other])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    out2 = m.generate(batch, mask, max_new_tokens=6, stop_ids=[-1])
    assert torch.equal(out2.tokens[0], out.tokens[0])


def test_stop_ids_and_seeded_sampling(pair):
    _, m = pair
    ids = _ids(2, 5, seed=6)
    a = m.generate(ids, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11, max_new_tokens=8, stop_ids=[-1])
    b = m.generate(ids, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11, max_new_tokens=8, stop_ids=[-1])
    assert torch.equal(a.tokens, b.tokens)
    first = int(a.tokens[0, 2])
    k = a.tokens[0].tolist().index(first)
    c = m.generate(ids, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11, max_new_tokens=8,
                   stop_ids=[first])
    assert torch.equal(c.tokens[0, : k + 1], a.tokens[0, : k + 1])
    assert (c.tokens[0, k + 1:] == CFG.tokens.pad).all()


def test_sampling_knobs_match_transformers_processors():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    hist = torch.randint(0, 50, (3, 12), generator=g)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(hist, logits.clone())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = proc(hist, ref)
    ours = process_logits(logits, hist, cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


@pytest.mark.parametrize("call, err, msg", [
    (lambda m: m(torch.tensor([[1, 2, 999]])), ValueError, r"input_ids holds id 999, outside the vocabulary \[0, 320\)"),
    (lambda m: m(torch.tensor([1, 2, 3])), ValueError, "input_ids must have 2 dimensions"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must hold integer token ids"),
    (lambda m: m(torch.zeros(1, 5000, dtype=torch.long)), ValueError, r"exceeds the configured maximum max_seq_len \(4096\)"),
    (lambda m: m(torch.tensor([[1, 2]]), torch.tensor([[1, 2]])), ValueError, "only 0 .padding. and 1"),
    (lambda m: m(torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]])), ValueError, "attention_mask must be a"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 3, 7)), ValueError, "inputs_embeds must have last dimension 64"),
    (lambda m: m(torch.tensor([[CFG.tokens.image_pad] * 3]), image_embeds=torch.zeros(2, 64)), ValueError,
     "3 image placeholder tokens but 2 image feature rows"),
    (lambda m: m.generate(torch.tensor([[1]]), temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda m: m.generate(torch.tensor([[1]]), top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
])
def test_bad_input_is_named(pair, call, err, msg):
    with pytest.raises(err, match=msg):
        call(pair[1])

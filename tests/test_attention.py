"""Every attention path equals the hand-written one, on outputs and on gradients (fp32, <= 1e-5)."""
import pytest
import torch

from nano_omni.attention import (attention, attention_manual, block_attention, block_pattern, causal_mask,
                                 padding_mask, use_backend)

TOL = dict(rtol=0, atol=1e-5)


def _qkv(B, H, Hkv, T, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, generator=g, requires_grad=True)
    return mk(H), mk(Hkv), mk(Hkv)


def _grads(fn, q, k, v):
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))  # randn_like would follow strides
    gq, gk, gv = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out.detach(), gq, gk, gv


def _assert_same(fn_a, fn_b, q, k, v):
    for a, b in zip(_grads(fn_a, q, k, v), _grads(fn_b, q, k, v)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b, a, **TOL)


# -- dense patterns: hand-written vs fused ------------------------------------------------------------------------
DENSE = {
    "causal": dict(B=2, H=4, Hkv=4, T=23, causal=True, pad=None),
    "causal_gqa": dict(B=2, H=4, Hkv=2, T=23, causal=True, pad=None),
    "key_padding_left": dict(B=3, H=4, Hkv=1, T=17, causal=True, pad="left"),
    "key_padding_right_noncausal": dict(B=2, H=2, Hkv=2, T=9, causal=False, pad="right"),
}


@pytest.mark.parametrize("name", DENSE)
def test_dense_paths_agree(name):
    c = DENSE[name]
    q, k, v = _qkv(c["B"], c["H"], c["Hkv"], c["T"])
    mask = None
    if c["pad"]:
        valid = torch.ones(c["B"], c["T"], dtype=torch.bool)
        valid[1, : 5] = False if c["pad"] == "left" else True
        valid[-1, -4:] = False if c["pad"] == "right" else True
        if c["pad"] == "left":
            valid[-1, :3] = False
        mask = padding_mask(valid)
    ref = lambda q, k, v: attention(q, k, v, mask, causal=c["causal"], impl="manual")
    fused = lambda q, k, v: attention(q, k, v, mask, causal=c["causal"], impl="fused")
    _assert_same(ref, fused, q, k, v)


def test_causal_with_cache_offset_is_bottom_right():
    q, k, v = _qkv(1, 2, 2, 6)
    # the last 2 queries of 6 positions: query i may see keys 0 .. 4 + i
    out = attention(q[:, :, -2:], k, v, causal=True, impl="manual")
    full = attention(q, k, v, causal=True, impl="manual")
    torch.testing.assert_close(out, full[:, :, -2:], **TOL)
    assert causal_mask(2, 6).sum().item() == 5 + 6


def test_manual_is_plain_softmax_attention():
    q, k, v = _qkv(1, 1, 1, 5, D=4)
    want = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    torch.testing.assert_close(attention_manual(q, k, v), want, **TOL)


# -- block patterns: hand-written dense mask vs fused dense mask vs the block path -----------------------------
BLOCK = {
    "chunked_packed": dict(B=1, T=45, block_size=None, back=0, ahead=0, seqlens=[20, 20, 5]),      # audio chunks
    "windowed": dict(B=2, T=40, block_size=None, back=0, ahead=0, seqlens=[16, 8, 16]),             # ViT windows
    "sliding_1_1": dict(B=2, T=50, block_size=8, back=1, ahead=1),
    "sliding_2_1": dict(B=2, T=50, block_size=8, back=2, ahead=1),
    "odd_T_not_multiple": dict(B=1, T=37, block_size=6, back=1, ahead=0),
    "T_shorter_than_block": dict(B=2, T=5, block_size=24, back=1, ahead=1),
    "segments_and_blocks": dict(B=1, T=31, block_size=4, back=1, ahead=1, seqlens=[13, 18]),
    "padding_batch": dict(B=3, T=30, block_size=6, back=2, ahead=1, pad=True),
    "gqa_sliding": dict(B=2, T=33, block_size=5, back=1, ahead=1, Hkv=2),
}


@pytest.mark.parametrize("name", BLOCK)
@pytest.mark.parametrize("impl", ["sdpa", "block"])
def test_block_paths_agree(name, impl):
    c = dict(BLOCK[name])
    B, T = c.pop("B"), c.pop("T")
    Hkv = c.pop("Hkv", 4)
    key_valid = None
    if c.pop("pad", False):
        key_valid = torch.ones(B, T, dtype=torch.bool)
        key_valid[1, 17:] = False          # a row ending mid-block
        key_valid[2, 6:] = False           # a row whose later blocks hold only padding
    p = block_pattern(B, T, key_valid=key_valid, **c)
    q, k, v = _qkv(B, 4, Hkv, T)
    ref = lambda q, k, v: block_attention(q, k, v, p, impl="manual")
    other = lambda q, k, v: block_attention(q, k, v, p, impl=impl)
    _assert_same(ref, other, q, k, v)


def test_block_pattern_matches_its_definition():
    p = block_pattern(1, 10, block_size=3, back=1, ahead=0)
    m = p.dense_mask()[0, 0]
    for i in range(10):
        for j in range(10):
            assert bool(m[i, j]) == (-1 <= j // 3 - i // 3 <= 0)


def test_backend_switch_selects_path(monkeypatch):
    import nano_omni.attention as A

    calls = []
    monkeypatch.setattr(A, "attention_manual", lambda *a, **k: calls.append("manual") or a[0])
    q, k, v = _qkv(1, 2, 2, 4)
    with use_backend("manual"):
        A.attention(q, k, v)
    assert calls == ["manual"]
    with pytest.raises(ValueError, match="'manual' or 'fused'"):
        with use_backend("flash"):
            pass


def test_block_path_never_builds_a_TxT_mask(monkeypatch):
    from nano_omni.attention import BlockPattern

    def boom(self):
        raise AssertionError("dense mask built")

    monkeypatch.setattr(BlockPattern, "dense_mask", boom)
    p = block_pattern(1, 200, block_size=24, back=2, ahead=1)
    q, k, v = _qkv(1, 2, 2, 200)
    out = block_attention(q, k, v, p, impl="block")
    assert out.shape == q.shape
    # the largest key set one block sees is (back + 1 + ahead) blocks
    assert p.gather.k_idx.shape == (9, 4 * 24)


@pytest.mark.parametrize("bad, msg", [
    (lambda q, k, v: attention(q[0], k, v), "must have shape"),
    (lambda q, k, v: attention(q.long(), k, v), "floating-point"),
    (lambda q, k, v: attention(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), "must divide"),
    (lambda q, k, v: attention(q, k, v, impl="flash"), "impl must be"),
    (lambda q, k, v: block_pattern(1, 4, block_size=0), "block_size must be"),
    (lambda q, k, v: block_pattern(1, 4, seqlens=[2, 3]), "sum to the sequence length"),
])
def test_bad_input_is_named(bad, msg):
    q, k, v = _qkv(1, 4, 2, 4)
    with pytest.raises((ValueError, TypeError), match=msg):
        bad(q, k, v)


def test_one_query_per_head_gqa_matches_the_manual_path():
    """A decoding step (Tq = 1, grouped kv heads, no mask) takes the fused path's shortcut: query heads that share
    a kv head are attended as that head's queries. Outputs and gradients equal the hand-written path's."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    outs, grads = [], []
    for impl in ("manual", "fused"):
        y = attention(q, k, v, impl=impl)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad((y * w).sum(), (q, k, v)))
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

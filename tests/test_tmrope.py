"""TMRoPE: the M-RoPE frequency split and the 3-D position ids, checked against transformers."""
import random

import pytest
import torch

from nano_omni.config import get_config
from nano_omni.layers import rope_inv_freq
from nano_omni.tmrope import decode_positions, get_rope_index, mrope_cos_sin
from reference import hf_thinker, random_layout

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def hf():
    return hf_thinker(CFG)


def _batch(rng, aiv, allow_vision):
    rows = [random_layout(rng, CFG, use_audio_in_video=aiv, allow_vision=allow_vision) for _ in range(rng.randint(1, 3))]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), CFG.tokens.pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    left = rng.random() < 0.5
    images, videos, spgs, audios = [], [], [], []
    for b, (row, im, vi, sp, au) in enumerate(rows):
        sl = slice(T - len(row), T) if left else slice(0, len(row))
        ids[b, sl] = torch.tensor(row)
        mask[b, sl] = 1
        images += im; videos += vi; spgs += sp; audios += au
    grid = lambda g: torch.tensor(g, dtype=torch.long).view(-1, 3) if g else None
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=grid(images), video_grid_thw=grid(videos),
                second_per_grid=torch.tensor(spgs) if spgs else None,
                audio_lengths=torch.tensor(audios) if audios else None, use_audio_in_video=aiv)


def test_rope_index_matches_transformers_on_random_layouts(hf):
    rng = random.Random(1234)
    n_checked = 0
    for trial in range(240):
        b = _batch(rng, aiv=trial % 3 == 0, allow_vision=trial % 7 != 0)
        if b["image_grid_thw"] is None and b["video_grid_thw"] is None and trial % 7 != 0:
            continue
        ref_pos, ref_delta = hf.get_rope_index(b["input_ids"], b["image_grid_thw"], b["video_grid_thw"],
                                               b["attention_mask"], b["use_audio_in_video"], b["audio_lengths"],
                                               b["second_per_grid"])
        pos, delta = get_rope_index(b["input_ids"], CFG.tokens, attention_mask=b["attention_mask"],
                                    image_grid_thw=b["image_grid_thw"], video_grid_thw=b["video_grid_thw"],
                                    audio_lengths=b["audio_lengths"], second_per_grid=b["second_per_grid"],
                                    use_audio_in_video=b["use_audio_in_video"])
        assert torch.equal(pos, ref_pos), f"trial {trial}"
        assert torch.equal(delta.view(-1), ref_delta.view(-1)), f"trial {trial}"
        n_checked += 1
    assert n_checked >= 200


def test_mrope_split_matches_transformers():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

    hfc = hf_thinker_text_config()
    rot = Qwen2_5OmniRotaryEmbedding(hfc)
    pos = torch.randint(0, 500, (3, 2, 11))
    cos_ref, sin_ref = rot(torch.zeros(1, dtype=torch.float32), pos)
    th = CFG.thinker
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(th.head_dim, th.rope_theta), th.mrope_section)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)


def hf_thinker_text_config():
    from reference import hf_thinker_config
    return hf_thinker_config(CFG).text_config


def test_text_positions_reduce_to_1d_rope():
    th = CFG.thinker
    pos = torch.arange(9).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(th.head_dim, th.rope_theta), th.mrope_section)
    f = torch.arange(9).float()[:, None] * rope_inv_freq(th.head_dim, th.rope_theta)
    torch.testing.assert_close(cos[0], torch.cat([f, f], -1).cos())


def test_decode_positions_continue_after_padding():
    tk = CFG.tokens
    ids = torch.tensor([[tk.pad, tk.pad, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, tk, attention_mask=mask)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2]
    nxt = decode_positions(delta, mask.sum(1), 1)
    assert nxt[0, :, 0].tolist() == [3, 5]


def test_placeholder_count_mismatch_is_named():
    tk = CFG.tokens
    ids = torch.tensor([[tk.vision_bos] + [tk.image_pad] * 3 + [tk.vision_eos]])
    with pytest.raises(ValueError, match="image placeholder run has 3 tokens but its grid/length needs 4"):
        get_rope_index(ids, tk, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="holds image placeholders but no image_grid_thw"):
        get_rope_index(ids, tk, video_grid_thw=torch.tensor([[1, 4, 4]]))
    two = torch.tensor([([tk.vision_bos] + [tk.image_pad] * 4 + [tk.vision_eos]) * 2])
    with pytest.raises(ValueError, match="more image placeholders than image_grid_thw"):
        get_rope_index(two, tk, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="3 image grids were given but the prompt holds 2 image items"):
        get_rope_index(two, tk, image_grid_thw=torch.tensor([[1, 4, 4]] * 3))

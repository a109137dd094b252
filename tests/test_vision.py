"""Vision: pre-processing and encoder parity with transformers, window/frame locality, bad input.

Oracles: transformers' Qwen2-VL image processor (PIL backend: its default torchvision backend cannot be installed
beside our torch build, and neither can the Qwen2-VL video processor, so the video path is checked against the image
processor applied frame by frame plus our own frame pairing), `smart_resize`, vision_utils' index tables and
`Qwen2_5OmniVisionEncoder`, whose weights reach ours through load_weights with the official prefix.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from nano_omni.attention import use_backend
from nano_omni.checkpoint import load_weights
from nano_omni.config import get_config
from nano_omni.vision_enc import VisionEncoder, frame_seqlens, vision_position_ids, window_index
from nano_omni.vision_io import (load_image, preprocess_image, preprocess_images, preprocess_video, sample_frames,
                                 smart_resize)
from reference import hf_image_processor, hf_vision

CFG = get_config("tiny").vision
IMG_MIN, IMG_MAX = 4 * 28 * 28, 16384 * 28 * 28
VID_MIN = 128 * 28 * 28


def _rgb(h, w, seed=0, c=3):
    return np.random.RandomState(seed).randint(0, 256, (h, w, c)).astype(np.uint8)


def _hf_pixels(images, min_pixels=IMG_MIN, max_pixels=IMG_MAX):
    out = hf_image_processor(min_pixels, max_pixels)(images=images, return_tensors="np")
    return torch.from_numpy(out["pixel_values"]), torch.from_numpy(out["image_grid_thw"])


# ----------------------------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.RandomState(0)
    for _ in range(2000):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(5000), 2)).round().clip(1))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([4, 16, 128])) * 784
        hi = int(rng.choice([64, 768, 16384])) * 784
        if lo > hi:
            continue
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_refuses_extreme_aspect_ratio_and_bad_sizes():
    with pytest.raises(ValueError, match=r"1x201 pixels .* aspect ratio 201.0, above the limit of 200"):
        smart_resize(1, 201)
    assert smart_resize(1, 200) == (28, 812)                      # ratio 200 itself is allowed
    with pytest.raises(ValueError, match="height must be a positive integer"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        smart_resize(10, 10, min_pixels=100, max_pixels=50)
    with pytest.raises(ValueError, match="4x1000 pixels"):          # the image path reports the image's size
        preprocess_image(_rgb(4, 1000), CFG)


@pytest.mark.parametrize("hw, max_tokens", [((1, 1), 16384), ((20, 1500), 16384), ((300, 200), 16384),
                                            ((123, 457), 16384), ((1000, 800), 64)],
                         ids=["1x1", "elongated", "portrait", "landscape", "above-budget"])
def test_image_pixels_equal_transformers(hw, max_tokens):
    a = _rgb(*hw, seed=hw[0])
    ref_pv, ref_grid = _hf_pixels([Image.fromarray(a)], max_pixels=max_tokens * 784)
    pv, grid = preprocess_image(a, CFG, max_pixels=max_tokens * 784)
    assert grid.tolist() == ref_grid.tolist()
    assert pv.dtype == torch.float32 and pv.shape == (int(grid.prod()), CFG.patch_dim)
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=0)          # bit-exact: same resize, same float steps
    t, gh, gw = grid[0].tolist()
    assert gh * gw * 14 * 14 <= max_tokens * 784 and gh * gw * 14 * 14 >= IMG_MIN
    if hw == (1000, 800):
        assert gh * gw * 196 < 1000 * 800                           # really shrunk


def _modes():
    a = _rgb(57, 91, seed=1, c=4)
    rgba = Image.fromarray(a, "RGBA")
    pal = Image.fromarray(np.random.RandomState(2).randint(0, 4, (40, 50)).astype(np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1                                  # palette entry 1 is transparent
    return {"RGBA": rgba, "LA": rgba.convert("LA"), "PA": rgba.convert("PA"), "P": pal, "P+transparency": pal_t,
            "CMYK": rgba.convert("RGB").convert("CMYK"), "L": rgba.convert("L"), "1": rgba.convert("1"),
            "RGBA array": a}


@pytest.mark.parametrize("mode", list(_modes()))
def test_image_modes_equal_transformers(mode):
    im = _modes()[mode]
    ref_pv, ref_grid = _hf_pixels([im])
    pv, grid = preprocess_image(im, CFG)
    assert grid.tolist() == ref_grid.tolist()
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=0)
    assert load_image(im).mode == "RGB"


def test_transparent_pixels_become_white():
    a = _rgb(8, 8, c=4)
    a[..., 3] = 0
    assert (np.asarray(load_image(a)) == 255).all()
    assert (np.asarray(load_image(Image.fromarray(a, "RGBA"))) == 255).all()


def test_16_bit_images_are_scaled_not_clipped():
    v = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)        # black, mid-grey, white in 16 bit
    for im in (v, Image.fromarray(v), Image.fromarray(v.astype(np.int32))):   # uint16 array, I;16, I
        assert np.asarray(load_image(im))[0, :, 0].tolist() == [0, 128, 255]
    assert Image.fromarray(v).convert("RGB").getpixel((1, 0))[0] == 255   # what PIL's convert (and transformers) do


def test_grey_and_float_arrays():
    g = _rgb(30, 40)[..., 0]
    rgb = np.repeat(g[..., None], 3, -1)
    assert (np.asarray(load_image(g)) == rgb).all() and (np.asarray(load_image(g[..., None])) == rgb).all()
    f = g.astype(np.float32) / 255
    assert (np.asarray(load_image(f)) == rgb).all()                # float in [0, 1] -> round(255 x)
    assert (np.asarray(load_image(torch.from_numpy(rgb))) == rgb).all()
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        load_image(f * 255)
    with pytest.raises(TypeError, match="pixel dtype must be uint8.*got int64"):
        load_image(g.astype(np.int64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*got shape \(30, 40, 2\)"):
        load_image(np.zeros((30, 40, 2), np.uint8))
    with pytest.raises(ValueError, match="empty side"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="must be a path, a PIL.Image"):
        load_image(3.5)


def test_files_good_truncated_corrupt_missing(tmp_path):
    a = _rgb(64, 48, seed=3)
    good = tmp_path / "good.png"
    Image.fromarray(a).save(good)
    assert (np.asarray(load_image(good)) == a).all() and (np.asarray(load_image(str(good))) == a).all()
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read image file .*cut.png"):
        load_image(cut)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*notes.jpg"):
        preprocess_image(text, CFG)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_image(tmp_path)


def test_preprocess_images_concatenates_in_order():
    ims = [_rgb(60, 90, 1), _rgb(200, 30, 2), _rgb(5, 5, 3)]
    pv, grid = preprocess_images(ims, CFG)
    ref_pv, ref_grid = _hf_pixels([Image.fromarray(a) for a in ims])
    assert grid.shape == (3, 3) and grid.tolist() == ref_grid.tolist()
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=0)
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess_images([], CFG)


# ----------------------------------------------------------------------------------------------------------------
# Video.
# ----------------------------------------------------------------------------------------------------------------
def test_sample_frames_properties():
    for n in range(1, 400, 7):
        for src in (1.0, 2.0, 24.0, 29.97, 60.0):
            idx = sample_frames(n, src)
            assert len(idx) % 2 == 0 and len(idx) >= 2 and idx == sorted(idx)
            assert idx[0] == 0 and idx[-1] == n - 1 and all(0 <= i < n for i in idx)
            want = min(max(n / src * 2.0, 4), min(768, n) // 2 * 2, n) // 2 * 2
            assert len(idx) == max(want, 2), (n, src)
    assert len(sample_frames(100000, 30.0)) == 768                 # max_frames caps long videos
    with pytest.raises(ValueError, match="no frames"):
        sample_frames(0, 30.0)
    with pytest.raises(ValueError, match="src_fps and fps must be positive"):
        sample_frames(10, 0.0)


def _frame_pairs_reference(frames, size_tokens_max):
    """Expected video rows from the image processor: each frame alone (its first temporal slot), then paired."""
    per_frame = []
    for f in frames:
        pv, grid = _hf_pixels([Image.fromarray(f)], min_pixels=VID_MIN, max_pixels=size_tokens_max)
        per_frame.append(pv.view(-1, 3, 2, 14, 14)[:, :, 0])          # (N, C, P, P): the two slots are equal
    if len(per_frame) % 2:
        per_frame.append(per_frame[-1])
    pairs = [torch.stack(per_frame[i:i + 2], dim=2) for i in range(0, len(per_frame), 2)]  # (N, C, 2, P, P)
    return torch.cat([p.flatten(1) for p in pairs]), len(pairs), grid


@pytest.mark.parametrize("n_frames, src_fps, fps", [(6, 2.0, None), (5, 2.0, None), (9, 3.0, 2.0)],
                         ids=["6-frames", "odd-5-frames", "sampled-9-at-3fps"])
def test_video_equals_image_processor_on_frame_pairs(n_frames, src_fps, fps):
    frames = np.stack([_rgb(150, 230, seed=10 + i) for i in range(n_frames)])       # (T, H, W, 3)
    pv, grid, spg = preprocess_video(frames, CFG, src_fps, fps)
    keep = list(range(n_frames)) if fps is None else sample_frames(n_frames, src_fps, fps)
    ref, t, ref_grid = _frame_pairs_reference([frames[i] for i in keep], 768 * 784)
    assert grid.tolist() == [[t, *ref_grid[0, 1:].tolist()]] and grid[0, 0] == -(-len(keep) // 2)
    torch.testing.assert_close(pv, ref, rtol=0, atol=0)
    assert spg == 2 / (src_fps if fps is None else fps)


def test_video_one_frame_odd_count_and_inputs():
    f = [_rgb(100, 140, seed=i) for i in range(3)]
    one, g1, _ = preprocess_video([f[0]], CFG, 30.0)                # one frame: paired with itself
    two, g2, _ = preprocess_video([f[0], f[0]], CFG, 30.0, None)
    assert g1.tolist() == g2.tolist() and g1[0, 0] == 1
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    odd, go, _ = preprocess_video(f, CFG, 2.0, None)                 # 3 frames -> pairs (0, 1), (2, 2)
    even, ge, _ = preprocess_video(f + [f[2]], CFG, 2.0, None)
    assert go.tolist() == ge.tolist() and go[0, 0] == 2
    torch.testing.assert_close(odd, even, rtol=0, atol=0)
    pil, _, _ = preprocess_video([Image.fromarray(x) for x in f], CFG, 2.0, None)   # PIL list == array input
    torch.testing.assert_close(pil, odd, rtol=0, atol=0)


def test_video_frames_of_different_sizes_follow_the_first(tmp_path):
    a, b = _rgb(150, 230, seed=1), _rgb(90, 400, seed=2)
    pv, grid, _ = preprocess_video([a, b], CFG, 2.0, None)
    h, w = smart_resize(150, 230, 28, VID_MIN, 768 * 784)
    assert grid.tolist() == [[1, h // 14, w // 14]]
    b_fit = np.asarray(Image.fromarray(b).resize((w, h), Image.BICUBIC))   # frame b stretched to a's size
    ref, _, _ = preprocess_video([a, b_fit], CFG, 2.0, None)
    torch.testing.assert_close(pv, ref, rtol=0, atol=0)
    paths = []
    for i, x in enumerate((a, b_fit)):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(x).save(paths[-1])
    torch.testing.assert_close(preprocess_video(paths, CFG, 2.0, None)[0], ref, rtol=0, atol=0)


def test_video_pixel_budget_shrinks_with_many_frames():
    frames = np.zeros((100, 448, 448, 3), np.uint8)                # 50 frame pairs of 256 tokens each
    _, grid, _ = preprocess_video(frames, CFG, 2.0, None, total_pixels=50 * 128 * 784)
    assert grid[0, 0] == 50 and grid[0, 1] * grid[0, 2] * 196 <= int(VID_MIN * 1.05)


def test_video_bad_input():
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video(np.zeros((0, 28, 28, 3), np.uint8), CFG, 2.0)
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video([], CFG, 2.0)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) array \(channels last\), got shape \(2, 3, 28, 28\)"):
        preprocess_video(np.zeros((2, 3, 28, 28), np.uint8), CFG, 2.0)
    with pytest.raises(TypeError, match="got a single image"):
        preprocess_video(Image.new("RGB", (28, 28)), CFG, 2.0)
    with pytest.raises(ValueError, match="src_fps must be positive"):
        preprocess_video([_rgb(28, 28)], CFG, -1.0)


# ----------------------------------------------------------------------------------------------------------------
# Encoder.
# ----------------------------------------------------------------------------------------------------------------
GRIDS = {  # (t, h, w) in patches; 112-px windows are 8 x 8 patches, so these tile into full and partial windows
    "one image": [[1, 20, 18]],
    "two images": [[1, 20, 18], [1, 6, 26]],
    "video": [[3, 10, 12]],
    "image+video": [[1, 16, 16], [2, 18, 10]],
}


@pytest.fixture(scope="module")
def pair():
    hf = hf_vision(CFG, seed=5)
    ours = VisionEncoder(CFG).eval()
    load_weights(ours, {"thinker.visual." + k: v for k, v in hf.state_dict().items()}, prefix="thinker.visual.",
                 source="transformers vision encoder")
    return hf, ours


@pytest.mark.parametrize("case", list(GRIDS))
@pytest.mark.parametrize("backend", ["manual", "fused"])
def test_encoder_matches_transformers(pair, case, backend):
    hf, ours = pair
    grid = torch.tensor(GRIDS[case])
    x = torch.randn(int(grid.prod(1).sum()), CFG.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_backend(backend):
        ref = hf(x, grid).pooler_output
        out = ours(x, grid)
    assert out.shape == (int(grid.prod(1).sum()) // 4, CFG.out_dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_index_tables_match_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    for grid in ([[1, 20, 18]], [[1, 16, 16], [2, 18, 10]], [[2, 2, 2], [1, 34, 4], [1, 8, 40]]):
        g = torch.tensor(grid)
        perm, sizes = window_index(g, 2, 4)
        ref_perm, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
        assert perm.tolist() == ref_perm.tolist()
        assert [4 * s for s in sizes] == torch.diff(ref_cu).tolist()
        assert vision_position_ids(g, 2).tolist() == get_vision_position_ids(g, 2).tolist()


def test_backends_agree_on_gradients(pair):
    _, ours = pair
    grid = torch.tensor(GRIDS["image+video"])
    x = torch.randn(int(grid.prod(1).sum()), CFG.patch_dim, generator=torch.Generator().manual_seed(1))
    grads = []
    for backend in ("manual", "fused"):
        xi = x.clone().requires_grad_()
        ours.zero_grad()
        with use_backend(backend):
            ours(xi, grid).square().sum().backward()
        grads.append((xi.grad, ours.blocks[0].attn.q.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _changed_tokens(model, grid, patch_row):
    """Which output tokens change when one input patch row changes."""
    x = torch.randn(int(grid.prod(1).sum()), CFG.patch_dim, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[patch_row] += 1.0
    with torch.no_grad():
        return ((model(x, grid) - model(y, grid)).abs().amax(-1) > 0).nonzero().squeeze(1).tolist()


def test_window_attention_is_local_and_full_attention_stays_in_its_frame_pair():
    torch.manual_seed(0)
    windows_only = VisionEncoder(get_config("tiny", **{"vision.fullatt_block_indexes": []}).vision).eval()
    grid = torch.tensor([[1, 12, 12]])                               # 6 x 6 units -> windows of 4x4, 4x2, 2x4, 2x2
    perm, sizes = window_index(grid, 2, 4)
    assert sizes == [16, 8, 8, 4]
    # patch row 0 is unit 0 (top-left): only the 16 units of the first window may change
    assert _changed_tokens(windows_only, grid, 0) == sorted(perm[:16].tolist())
    torch.manual_seed(0)
    full = VisionEncoder(CFG).eval()                                 # layer 1 is full attention
    video = torch.tensor([[3, 4, 4]])                                # 3 frame pairs of 4 units each
    assert _changed_tokens(full, video, 16 + 3) == [4, 5, 6, 7]      # a patch of pair 1 moves only pair 1's tokens


def test_encoder_bad_input(pair):
    _, ours = pair
    x = torch.randn(16, CFG.patch_dim)
    with pytest.raises(ValueError, match=r"describes 32 patch rows, but pixel_values has 16 rows"):
        ours(x, torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="pixel_values must have 2 dimensions"):
        ours(x[None], torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="last dimension 1176"):
        ours(x[:, :100], torch.tensor([[1, 4, 4]]))
    with pytest.raises(TypeError, match="floating-point"):
        ours(x.long(), torch.tensor([[1, 4, 4]]))
    with pytest.raises(TypeError, match="grid_thw must hold integers"):
        ours(x, torch.tensor([[1.0, 4.0, 4.0]]))
    with pytest.raises(ValueError, match=r"shape \(n_items, 3\)"):
        ours(x, torch.tensor([1, 4, 4]))
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(torch.randn(15, CFG.patch_dim), torch.tensor([[1, 3, 5]]))


def test_end_to_end_token_count():
    torch.manual_seed(0)
    enc = VisionEncoder(CFG).eval()
    pv_i, g_i = preprocess_image(_rgb(100, 150), CFG)
    pv_v, g_v, _ = preprocess_video(np.stack([_rgb(60, 80, seed=i) for i in range(4)]), CFG, 2.0, None)
    with torch.no_grad():
        out = enc(torch.cat([pv_i, pv_v]), torch.cat([g_i, g_v]))
    assert out.shape[0] == sum(t * h * w // 4 for t, h, w in torch.cat([g_i, g_v]).tolist())
    assert frame_seqlens(g_v) == [g_v[0, 1].item() * g_v[0, 2].item()] * 2

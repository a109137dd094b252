"""Vision pre-processing: images and video frames -> the flat patch rows the vision encoder reads.

Reference: notes 1.8 and 3c; the oracle is transformers' Qwen2-VL image processor (its PIL backend,
`Qwen2VLImageProcessorPil`) and qwen-omni-utils `vision_process.py` (frame sampling and the video pixel budget).

    image/frame --load_image--> RGB --smart_resize + bicubic--> (h, w) multiples of 28 --/255, CLIP mean/std-->
        (3, h, w) float32 --pair frames in time--> (T, 3, h, w) --patchify--> pixel_values (N, 3*2*14*14)

Shapes:  P patch side (14), m spatial merge (2), tp temporal patch (2), factor = P*m = 28 pixels per token side.
         grid_thw = (t, gh, gw) counts patches: t = frames / tp, gh = h / P, gw = w / P, N = t * gh * gw rows.
         Rows are block-major over m x m merge units, (t, gh/m, gw/m, m, m): the m*m patches of one LLM token are
         consecutive, which is what lets the encoder's merger view them as one vector. One row is a patch flattened
         in (C, tp, P, P) order.

Input normalisation (every image ends as 8-bit RGB before resizing; each rule is tested):
  * transparency (RGBA, LA, PA, P with a transparent colour): composited onto white, as the transformers
    processor does (PIL alpha_composite for PIL images; round(a*rgb + (1-a)*255) for (H, W, 4) arrays).
  * P (palette), 1 (bilevel), L (grey), CMYK, YCbCr: PIL's own convert("RGB") (CMYK without colour management),
    again as transformers does. Grey arrays (H, W) or (H, W, 1) are repeated over the three channels.
  * 16 bit (PIL I;16*, I, uint16 arrays): scaled to 8 bit by round(v / 257). transformers calls convert("RGB"),
    which CLIPS 16-bit values at 255 (a mid-grey 16-bit image turns white); we deliberately differ.
  * float arrays must lie in [0, 1] and become round(255 x). (transformers multiplies a float image by 1/255 twice
    and warns; there is no parity to keep there.) Other dtypes are refused with a TypeError.
  * only the first frame of an animated file is read; EXIF orientation is not applied (neither does the reference).

Video: `sample_frames` picks an even number of frame indices at `fps` (qwen-omni-utils `smart_nframes`), every frame is
resized to the smart size of the FIRST frame (frames of other sizes are stretched to it), each frame gets the
qwen-omni-utils per-frame budget, and an odd count repeats its last frame so frames pair up in time.

Simplification: one resize per image with PIL bicubic. With torchvision installed, transformers' default ("fast")
processor resizes with torch's antialiased bicubic instead, which differs from PIL by about one 8-bit level on some
pixels; qwen-omni-utils resizes images with PIL first, which makes that later resize an identity.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import VisionConfig

# CLIP's pixel statistics (the Qwen2-VL processor uses OpenAI CLIP's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Pixel budgets, counted in LLM tokens of factor x factor pixels (qwen-omni-utils; 28 px per token side).
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768
VIDEO_TOTAL_TOKENS = 128000 * 0.9    # a whole video: 90% of a 128k context (the VIDEO_MAX_PIXELS env default)
FPS, MIN_FRAMES, MAX_FRAMES = 2.0, 4, 768


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_TOKENS * 28 * 28,
                 max_pixels: int = IMAGE_MAX_TOKENS * 28 * 28) -> tuple[int, int]:
    """The (h, w) an image is resized to: multiples of `factor`, h*w inside [min_pixels, max_pixels], aspect kept.

    Round each side to the nearest multiple; if the area leaves the budget, scale both sides by the same beta and
    round down (too big) or up (too small).

    >>> smart_resize(1, 1)                                   # tiny: scaled up to the minimum of 4 tokens
    (56, 56)
    >>> smart_resize(480, 640)                               # inside the budget: nearest multiples of 28
    (476, 644)
    >>> smart_resize(2000, 3000, max_pixels=64 * 28 * 28)    # too big: both sides shrink by the same factor
    (168, 252)
    """
    for name, v in (("height", height), ("width", width), ("factor", factor)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"smart_resize: {name} must be a positive integer, got {v!r}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"smart_resize: need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} pixels (height x width) has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f}, above the limit of {MAX_ASPECT_RATIO}; "
                         f"crop or pad it first")
    # A side under factor/2 rounds to 0 here; the area is then below min_pixels (> 0), so the ceil branch below
    # lifts it. (qwen-omni-utils clamps such a side to `factor` first and keeps the other; transformers does not.)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ----------------------------------------------------------------------------------------------------------------
# Loading: anything image-like -> an 8-bit RGB PIL image.
# ----------------------------------------------------------------------------------------------------------------
def _to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.round(a / 257.0).astype(np.uint8)          # 65535 / 257 = 255 exactly
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0):
            raise ValueError(f"{what}: a float image must hold values in [0, 1], got range "
                             f"[{np.nanmin(a)}, {np.nanmax(a)}]")
        return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(f"{what}: pixel dtype must be uint8, uint16, bool or float in [0, 1], got {a.dtype} "
                    f"(cast 8-bit integers with .astype(np.uint8))")


def _array_to_rgb(a: np.ndarray, what: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"{what}: an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"{what}: image array has an empty side, shape {a.shape}")
    a = _to_uint8(a, what)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)              # grey -> RGB
    elif a.shape[-1] == 4:                                   # composite onto white, as transformers does for arrays
        alpha = a[..., 3:] / 255.0
        a = np.round(alpha * a[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def _pil_to_rgb(im: Image.Image, what: str) -> Image.Image:
    if im.mode.startswith("I"):                              # 16-bit (I;16, I;16B, ...) or 32-bit integer grey
        a = np.asarray(im).astype(np.int64).clip(0, 65535).astype(np.uint16)
        return _array_to_rgb(a, what)
    if im.mode == "F":
        return _array_to_rgb(np.asarray(im), what)
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(image) -> Image.Image:
    """A path, a PIL image or an (H, W[, C]) array/tensor -> an 8-bit RGB PIL image (rules in the file header).

    A missing file raises FileNotFoundError; a truncated, corrupt or non-image file raises ValueError; both name it.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} " + ("is a folder" if path.is_dir() else "does not exist"))
        try:
            with Image.open(path) as im:
                im.load()                                    # decode now, so truncation shows up here
                return _pil_to_rgb(im, f"image file {str(path)!r}")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise ValueError(f"cannot read image file {str(path)!r}: {e} (truncated, corrupt or not an image?)") from None
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, "image")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "image")
    raise TypeError(f"image must be a path, a PIL.Image or an (H, W, 3) array, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Normalise and patchify.
# ----------------------------------------------------------------------------------------------------------------
def _resize_normalize(im: Image.Image, h: int, w: int) -> torch.Tensor:
    """RGB image -> (3, h, w) float32: PIL bicubic, then x/255 (in float64, like the reference) and CLIP mean/std."""
    if im.size != (w, h):
        im = im.resize((w, h), resample=Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)    # (3, h, w)
    x = (x.double() * (1.0 / 255.0)).float()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) normalised frames, T a multiple of tp -> (pixel_values (N, C*tp*P*P), (t, gh, gw)).

    >>> cfg = VisionConfig()
    >>> pv, grid = patchify(torch.zeros(2, 3, 56, 84), cfg)
    >>> tuple(pv.shape), grid                                # 4 x 6 patches of 14 px, one frame pair
    ((24, 1176), (1, 4, 6))
    """
    T, C, H, W = frames.shape
    P, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if T % tp or H % (P * m) or W % (P * m):
        raise ValueError(f"patchify: frames {tuple(frames.shape)} need T % {tp} == 0 and H, W multiples of {P * m}")
    t, gh, gw = T // tp, H // P, W // P
    x = frames.reshape(t, tp, C, gh // m, m, P, gw // m, m, P)    # (t, tp, C, bh, mh, P, bw, mw, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                      # (t, bh, bw, mh, mw, C, tp, P, P)
    return x.reshape(t * gh * gw, C * tp * P * P), (t, gh, gw)    # (N, patch_dim)


def _budget(cfg: VisionConfig, tokens: float) -> int:
    return int(tokens * cfg.factor ** 2)


def preprocess_image(image, cfg: VisionConfig, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values (gh*gw, patch_dim) float32, grid_thw (1, 3) long). The frame is used twice in
    time (t = 1). Budget defaults: 4 to 16384 tokens (qwen-omni-utils; the processor config allows the same)."""
    if cfg.in_channels != 3:
        raise ValueError(f"pre-processing makes RGB images, but cfg.in_channels is {cfg.in_channels}")
    min_pixels = _budget(cfg, IMAGE_MIN_TOKENS) if min_pixels is None else min_pixels
    max_pixels = _budget(cfg, IMAGE_MAX_TOKENS) if max_pixels is None else max_pixels
    im = load_image(image)
    h, w = smart_resize(im.height, im.width, cfg.factor, min_pixels, max_pixels)
    x = _resize_normalize(im, h, w)                                                  # (3, h, w)
    frames = x[None].expand(cfg.temporal_patch_size, -1, -1, -1)                     # (tp, 3, h, w)
    pv, grid = patchify(frames, cfg)
    return pv, torch.tensor([grid], dtype=torch.long)


def preprocess_images(images, cfg: VisionConfig, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of images -> (pixel_values concatenated over images, grid_thw (n, 3)); rows follow list order."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)) or not len(images):
        raise ValueError("preprocess_images: images must be a non-empty list (use preprocess_image for one image)")
    out = [preprocess_image(im, cfg, min_pixels, max_pixels) for im in images]
    return torch.cat([pv for pv, _ in out]), torch.cat([g for _, g in out])


# ----------------------------------------------------------------------------------------------------------------
# Video.
# ----------------------------------------------------------------------------------------------------------------
def sample_frames(n_frames: int, src_fps: float, fps: float = FPS, min_frames: int = MIN_FRAMES,
                  max_frames: int = MAX_FRAMES, *, frame_factor: int = 2) -> list[int]:
    """Indices of the frames to keep from a clip of `n_frames` at `src_fps`, sampled at about `fps` (qwen-omni-utils).

    count = duration * fps, clamped to [min_frames, max_frames] and to the clip, then rounded DOWN to an even number
    (frame_factor); the indices are spread evenly over the clip, first and last frame included. A 1-frame clip
    gives [0, 0] (qwen-omni-utils raises there instead).

    >>> sample_frames(300, 30.0)                    # 10 s at 30 fps -> 20 frames at 2 fps
    [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299]
    >>> sample_frames(10, 30.0)                     # 1/3 s: the 4-frame minimum wins
    [0, 3, 6, 9]
    >>> sample_frames(3, 30.0), sample_frames(1, 30.0)
    ([0, 2], [0, 0])
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 0:
        raise ValueError(f"n_frames must be a non-negative integer, got {n_frames!r}")
    if n_frames == 0:
        raise ValueError("the video has no frames (n_frames = 0)")
    if not (src_fps > 0 and fps > 0 and math.isfinite(src_fps) and math.isfinite(fps)):
        raise ValueError(f"src_fps and fps must be positive and finite, got src_fps={src_fps}, fps={fps}")
    if min_frames < 1 or max_frames < frame_factor:
        raise ValueError(f"need min_frames >= 1 and max_frames >= {frame_factor}, got {min_frames} and {max_frames}")
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = math.floor(min(max_frames, n_frames) / frame_factor) * frame_factor
    n = min(max(n_frames / src_fps * fps, lo), hi, n_frames)
    n = max(frame_factor, math.floor(n / frame_factor) * frame_factor)
    # torch's float32 linspace + round-half-even, as the reference, so the indices agree exactly
    return torch.linspace(0, n_frames - 1, n).round().long().tolist()


def _frame_list(frames) -> list:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"frames must be a (T, H, W, 3) array (channels last), got shape {frames.shape}")
        return list(frames)
    if isinstance(frames, (str, os.PathLike, Image.Image)):
        raise TypeError("frames must be a (T, H, W, 3) array or a list of images, got a single image")
    try:
        return list(frames)
    except TypeError:
        raise TypeError(f"frames must be a (T, H, W, 3) array or a list of images, got {type(frames).__name__}") from None


def preprocess_video(frames, cfg: VisionConfig, src_fps: float, fps: float | None = FPS, *,
                     min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES, min_pixels: int | None = None,
                     max_pixels: int | None = None,
                     total_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Video frames -> (pixel_values (t*gh*gw, patch_dim), grid_thw (1, 3), second_per_grid).

    frames: a (T, H, W, 3) array or a list of PIL images / paths / arrays, decoded at `src_fps`.
    fps:    sample at this rate with `sample_frames`; None keeps every frame (they are already sampled, at src_fps).
    Size:   the smart size of the first kept frame, with the qwen-omni-utils per-frame budget: at least
            min_pixels (128 tokens), at most min(max_pixels (768 tokens), total_pixels * 2 / frames) but never
            below 1.05 * min_pixels. Every frame is resized to it.
    second_per_grid = temporal_patch_size / fps: the seconds one temporal grid step spans (TMRoPE reads it).
    """
    if cfg.in_channels != 3:
        raise ValueError(f"pre-processing makes RGB images, but cfg.in_channels is {cfg.in_channels}")
    frames = _frame_list(frames)
    if not frames:
        raise ValueError("the video has no frames")
    if not (src_fps > 0 and math.isfinite(src_fps)):
        raise ValueError(f"src_fps must be positive and finite, got {src_fps}")
    tp = cfg.temporal_patch_size
    if fps is None:
        fps, keep = src_fps, list(range(len(frames)))
    else:
        keep = sample_frames(len(frames), src_fps, fps, min_frames, max_frames, frame_factor=tp)
    keep += [keep[-1]] * (-len(keep) % tp)               # odd count: repeat the last frame so frames pair up
    images = {i: load_image(frames[i]) for i in sorted(set(keep))}
    min_pixels = _budget(cfg, VIDEO_MIN_TOKENS) if min_pixels is None else min_pixels
    max_pixels = _budget(cfg, VIDEO_MAX_TOKENS) if max_pixels is None else max_pixels
    total_pixels = _budget(cfg, VIDEO_TOTAL_TOKENS) if total_pixels is None else total_pixels
    max_pixels = max(min(max_pixels, total_pixels / len(keep) * tp), int(min_pixels * 1.05))
    first = images[keep[0]]
    h, w = smart_resize(first.height, first.width, cfg.factor, min_pixels, max_pixels)
    resized = {i: _resize_normalize(im, h, w) for i, im in images.items()}           # each (3, h, w)
    x = torch.stack([resized[i] for i in keep])                                      # (T, 3, h, w)
    pv, grid = patchify(x, cfg)
    return pv, torch.tensor([grid], dtype=torch.long), tp / fps


__all__ = ["CLIP_MEAN", "CLIP_STD", "smart_resize", "load_image", "patchify", "preprocess_image", "preprocess_images",
           "sample_frames", "preprocess_video"]

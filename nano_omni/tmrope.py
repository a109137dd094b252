"""TMRoPE: time-aligned multimodal rotary positions (Qwen2.5-Omni section 2.2, reference 3a).

Every token gets three position ids (t, h, w):
  text, audio  t = h = w, counting up by one per token; one audio token is 40 ms, so audio ids are also time;
  image        t fixed, h / w = the row / column of the merged 2x2 patch, all offset by the running cursor;
  video        t = cursor + floor(frame_pair * seconds_per_grid * 25): 25 ids per second, the same clock as audio;
  audio-in-video  the frames and the audio share a start, and are laid out interleaved in 2-s chunks
                  (video chunk, then audio chunk); the two bos tokens share an id, and so do the two eos tokens.
The rotary frequencies are then split three ways (`mrope_section`, [16, 24, 24] of 64 for the 7B model): the
first group turns with t, the second with h, the third with w. For text all three are equal: plain 1-D RoPE.

Shapes: positions (3, B, T) long; cos/sin (B, T, head_dim); deltas (B, 1).
`delta = max position + 1 - number of tokens`: while decoding, the next token of a row that has seen n real
tokens sits at n + delta on all three axes.

Where the notes and the implementation disagree, this file follows the transformers implementation, which
the tests compare against on random layouts:
  * after an audio-in-video group the cursor is the maximum of the *last chunk* + 1, not of the whole group;
  * a video's chunk boundary moves by one chunk per token that crosses it, so a frame gap longer than 2 s
    closes a single chunk, not one per 2 s (matters only when seconds_per_grid > 2);
  * padded slots get position 1; in a batch with no image or video at all the delta of a row counts those
    fills (it differs only for rows with a single real token).
"""
from __future__ import annotations

import numpy as np
import torch

from .config import SpecialTokens


def mrope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int]) -> torch.Tensor:
    """positions (3, B, T) -> rotary angles (B, T, len(inv_freq)), in fp32.

    Frequency k turns with axis 0 (t) for the first section[0] frequencies, then with h, then with w.
    >>> mrope_angles(torch.tensor([[[5]], [[7]], [[9]]]), torch.ones(4), [1, 1, 2])[0, 0].tolist()
    [5.0, 7.0, 9.0, 9.0]
    """
    freqs = positions[..., None].float() * inv_freq.float()                         # (3, B, T, D/2)
    t, h = section[0], section[0] + section[1]
    # one slice per axis (no index tensor to build, gather or move between devices)
    return torch.cat([freqs[0, ..., :t], freqs[1, ..., t:h], freqs[2, ..., h:]], dim=-1)  # (B, T, D/2)


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int]):
    """positions (3, B, T) -> cos, sin (B, T, 2 * len(inv_freq)), in fp32 (each angle twice: half-split pairs).

    >>> pos = torch.tensor([[[5]], [[7]], [[9]]])            # one token at t=5, h=7, w=9
    >>> cos, sin = mrope_cos_sin(pos, torch.ones(4), [1, 1, 2])
    >>> torch.allclose(cos[0, 0], torch.tensor([5., 7, 9, 9, 5, 7, 9, 9]).cos())
    True
    """
    emb = mrope_angles(positions, inv_freq, section).repeat(1, 1, 2)               # (B, T, D)
    return emb.cos(), emb.sin()


def mrope_axis(section: list[int]) -> torch.Tensor:
    """Which axis (0 = t, 1 = h, 2 = w) drives each rotary frequency slot.

    >>> mrope_axis([2, 3, 3]).tolist()
    [0, 0, 1, 1, 1, 2, 2, 2]
    """
    return torch.repeat_interleave(torch.arange(3), torch.tensor(section))


def audio_token_count(mel_frames: int) -> int:
    """LLM tokens for an audio of `mel_frames` 10-ms frames: conv stride 2, then average-pool stride 2.

    >>> [audio_token_count(n) for n in (100, 200, 300, 1, 3)]
    [25, 50, 75, 0, 1]
    """
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def vision_positions(grid_thw, t_ids: torch.Tensor, start: int, merge: int) -> torch.Tensor:
    """(3, t*h*w/merge^2) ids of one image/video in row-major merged order, offset by `start` on every axis."""
    _, gh, gw = (int(x) for x in grid_thw)
    h, w = gh // merge, gw // merge
    t = t_ids.view(-1, 1).expand(-1, h * w).reshape(-1)
    hh = torch.arange(h).view(1, -1, 1).expand(len(t_ids), -1, w).reshape(-1)
    ww = torch.arange(w).view(1, 1, -1).expand(len(t_ids), h, -1).reshape(-1)
    return torch.stack([t, hh, ww]) + start


def chunk_bounds(t_rel: torch.Tensor, per_chunk: int) -> list[tuple[int, int]]:
    """Split increasing relative times into chunks [0, per_chunk), [per_chunk, 2*per_chunk), ... (see the header
    for how a long gap is handled). Returns (start, end) index pairs.

    >>> chunk_bounds(torch.tensor([0, 0, 25, 25, 50, 50]), 50)
    [(0, 4), (4, 6)]
    """
    bounds, start, edge = [], 0, per_chunk
    for i, t in enumerate(t_rel.tolist()):
        if t >= edge:
            bounds.append((start, i))
            start, edge = i, edge + per_chunk
    bounds.append((start, len(t_rel)))
    return bounds


def get_rope_index(input_ids: torch.Tensor, tokens: SpecialTokens, *, attention_mask=None, image_grid_thw=None,
                   video_grid_thw=None, audio_lengths=None, second_per_grid=None, use_audio_in_video=False,
                   spatial_merge_size: int = 2, position_id_per_seconds: int = 25, seconds_per_chunk: int = 2):
    """3-D positions and rope deltas for a batch of prompts.

    input_ids (B, T); attention_mask (B, T) (1 = real token; left or right padding);
    image_grid_thw / video_grid_thw (N, 3) in patches, in order of appearance over the whole batch;
    audio_lengths (N,) mel frames of each audio (standalone and in-video, in order); second_per_grid (N_video,).
    Returns positions (3, B, T) long and deltas (B, 1) long.

    Worked example (reference 3a): text, an image of 1x4x4 patches, text, one second of audio, text.
    >>> tk = SpecialTokens()
    >>> ids = [1, 2, tk.vision_bos] + [tk.image_pad] * 4 + [tk.vision_eos, 3, tk.audio_bos] + [tk.audio_pad] * 25
    >>> ids += [tk.audio_eos, 4, 5]
    >>> pos, delta = get_rope_index(torch.tensor([ids]), tk, image_grid_thw=torch.tensor([[1, 4, 4]]),
    ...                             audio_lengths=torch.tensor([100]))
    >>> pos[0, 0, :9].tolist(), pos[1, 0, :9].tolist(), pos[2, 0, :9].tolist()
    ([0, 1, 2, 3, 3, 3, 3, 5, 6], [0, 1, 2, 3, 3, 4, 4, 5, 6], [0, 1, 2, 3, 4, 3, 4, 5, 6])
    >>> pos[0, 0, -5:].tolist(), delta.tolist()
    ([31, 32, 33, 34, 35], [[-2]])

    Audio in video: 6 frames at 2 fps (grid 3x4x4, one second per grid) with 3 s of audio (75 tokens).
    >>> v, a = [tk.video_pad] * 4, [tk.audio_pad] * 50
    >>> ids = [1, tk.vision_bos, tk.audio_bos] + v + v + a + v + [tk.audio_pad] * 25 + [tk.audio_eos, tk.vision_eos, 2]
    >>> pos, delta = get_rope_index(torch.tensor([ids]), tk, video_grid_thw=torch.tensor([[3, 4, 4]]),
    ...     audio_lengths=torch.tensor([300]), second_per_grid=torch.tensor([1.0]), use_audio_in_video=True)
    >>> t = pos[0, 0].tolist()
    >>> t[:4], t[7], t[11], t[12:14], t[60], t[61], t[-3:], delta.item()
    ([0, 1, 1, 2], 27, 2, [3, 4], 51, 52, [77, 77, 78], -14)
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a (B, T) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    B, T = input_ids.shape
    mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 1
    ids_cpu = input_ids.cpu()
    positions = torch.ones(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)

    present = {k: bool((ids_cpu[mask] == pad).any()) for k, pad in (("image", tokens.image_pad), ("video", tokens.video_pad))}
    for kind, grid in (("image", image_grid_thw), ("video", video_grid_thw)):
        if present[kind] and grid is None:
            raise ValueError(f"the prompt holds {kind} placeholders but no {kind}_grid_thw was given")
    if image_grid_thw is None and video_grid_thw is None:
        # text and audio only: every id is sequential, so positions are a running count of real tokens
        positions, deltas = text_positions(mask)
        return positions.to(input_ids.device), deltas.to(input_ids.device)

    counters = {"image": 0, "video": 0, "audio": 0}
    for b in range(B):
        row = ids_cpu[b][mask[b]]
        pos = _row_positions(row, tokens, counters, image_grid_thw, video_grid_thw, audio_lengths, second_per_grid,
                             use_audio_in_video, spatial_merge_size, position_id_per_seconds, seconds_per_chunk)
        positions[:, b, mask[b]] = pos
        deltas[b, 0] = (int(pos.max()) + 1 if pos.numel() else 0) - len(row)
    for kind, table in (("image", image_grid_thw), ("video", video_grid_thw)):
        if table is not None and counters[kind] != len(table):
            raise ValueError(f"{len(table)} {kind} grids were given but the prompt holds {counters[kind]} {kind} items")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def text_positions(attention_mask: torch.Tensor):
    """Positions (3, B, T) and deltas (B, 1) when every token counts up by one (text, or text and audio).

    >>> text_positions(torch.tensor([[0, 1, 1]]))[0][0].tolist(), text_positions(torch.tensor([[0, 1, 1]]))[1].tolist()
    ([[1, 0, 1]], [[0]])
    """
    mask = attention_mask.bool()
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(~mask, 1)                                   # padded slots: 1, as the reference
    deltas = pos.max(-1, keepdim=True).values + 1 - mask.sum(-1, keepdim=True)
    return pos.unsqueeze(0).expand(3, -1, -1).clone(), deltas


def _row_positions(row, tk, counters, image_grid, video_grid, audio_lengths, spg, aiv, merge, pps, spc):
    """Walk one row of real tokens left to right, appending position blocks. `nxt` is the next free id:
    the maximum of the last block + 1."""
    ids = row.numpy()
    n = len(ids)
    blocks: list[torch.Tensor] = []
    nxt = 0

    def add(block: torch.Tensor):
        nonlocal nxt
        blocks.append(block)
        nxt = int(block.max()) + 1

    def seq(k: int) -> torch.Tensor:  # k sequential ids on all three axes
        return (torch.arange(k) + nxt).view(1, -1).expand(3, -1)

    def take(kind, table, what):
        i = counters[kind]
        if table is None or i >= len(table):
            raise ValueError(f"the prompt holds more {kind} placeholders than {what} entries were given")
        counters[kind] += 1
        return table[i]

    pads = np.isin(ids, tk.media_pads)
    i = 0
    while i < n:
        # text run up to the next placeholder (bos/eos tokens are text here: they count up by one)
        nxt_pad = i + int(np.argmax(pads[i:])) if pads[i:].any() else n
        stop = nxt_pad - 2 if (aiv and nxt_pad < n and ids[nxt_pad] == tk.video_pad) else nxt_pad
        if stop > i:
            add(seq(stop - i))
            i = stop
        if i >= n:
            break
        tok = ids[i]
        if aiv and tok != tk.video_pad and not pads[i]:
            # the <vision_bos><audio_bos> pair of an audio-in-video group: one shared id
            add(seq(1).repeat(1, 2))
            grid = take("video", video_grid, "video_grid_thw")
            s = spg[counters["video"] - 1] if spg is not None else 1.0
            n_aud = _audio_tokens(take("audio", audio_lengths, "audio_lengths"))
            vpos = vision_positions(grid, _video_t_ids(grid, s, pps), nxt, merge)
            apos = seq(n_aud)
            taken = {"video": 0, "audio": 0}
            for kind, k in _interleave(vpos[0] - nxt, apos[0] - nxt, pps * spc):
                src = vpos if kind == "video" else apos
                add(src[:, taken[kind]: taken[kind] + k])
                taken[kind] += k
            add(seq(1).repeat(1, 2))                    # <audio_eos><vision_eos>: one shared id
            i += 2 + vpos.shape[1] + apos.shape[1] + 2
        elif tok == tk.image_pad:
            grid = take("image", image_grid, "image_grid_thw")
            t_ids = torch.arange(int(grid[0])) * pps            # an image's frame pairs are 1 s apart
            block = vision_positions(grid, t_ids, nxt, merge)
            _expect_run(ids, i, tk.image_pad, block.shape[1], "image")
            add(block)
            i += block.shape[1]
        elif tok == tk.video_pad:
            grid = take("video", video_grid, "video_grid_thw")
            s = spg[counters["video"] - 1] if spg is not None else 1.0
            block = vision_positions(grid, _video_t_ids(grid, s, pps), nxt, merge)
            _expect_run(ids, i, tk.video_pad, block.shape[1], "video")
            add(block)
            i += block.shape[1]
        else:  # audio
            k = _audio_tokens(take("audio", audio_lengths, "audio_lengths"))
            _expect_run(ids, i, tk.audio_pad, k, "audio")
            add(seq(k))
            i += k
    return torch.cat(blocks, dim=1) if blocks else torch.zeros(3, 0, dtype=torch.long)


def _video_t_ids(grid, seconds_per_grid, pps) -> torch.Tensor:
    """Temporal ids of a video's frame pairs: floor(k * seconds_per_grid * 25), computed in fp32 like the
    reference (0.5 s per grid gives 0, 12, 25, 37 ...)."""
    return (torch.arange(int(grid[0])) * torch.as_tensor(seconds_per_grid).cpu().float() * pps).long()


def _interleave(video_t: torch.Tensor, audio_t: torch.Tensor, per_chunk: int) -> list[tuple[str, int]]:
    """Order of an audio-in-video group: video chunk 0, audio chunk 0, video chunk 1, ... as (kind, count)."""
    vch, ach = chunk_bounds(video_t, per_chunk), chunk_bounds(audio_t, per_chunk)
    out = []
    for j in range(max(len(vch), len(ach))):
        for kind, ch in (("video", vch), ("audio", ach)):
            if j < len(ch) and ch[j][1] > ch[j][0]:
                out.append((kind, ch[j][1] - ch[j][0]))
    return out


def audio_in_video_layout(grid_thw, second_per_grid: float, n_audio_tokens: int, merge: int = 2,
                          position_id_per_seconds: int = 25, seconds_per_chunk: int = 2) -> list[tuple[str, int]]:
    """How the processor lays out a video with its own audio: [(kind, n_tokens), ...] in 2-s chunks.

    >>> audio_in_video_layout((3, 4, 4), 1.0, 75)      # 6 frames at 2 fps with 3 s of audio
    [('video', 8), ('audio', 50), ('video', 4), ('audio', 25)]
    """
    vpos = vision_positions(grid_thw, _video_t_ids(grid_thw, second_per_grid, position_id_per_seconds), 0, merge)
    return _interleave(vpos[0], torch.arange(n_audio_tokens), position_id_per_seconds * seconds_per_chunk)


def _audio_tokens(mel_frames) -> int:
    return audio_token_count(int(mel_frames))


def _expect_run(ids, i, pad, k, kind):
    run = ids[i: i + k]
    if len(run) < k or not (run == pad).all() or (i + k < len(ids) and ids[i + k] == pad):
        have = int(np.argmin(np.append(ids[i:] == pad, False)))
        raise ValueError(f"an {kind} placeholder run has {have} tokens but its grid/length needs {k}")


def decode_positions(deltas: torch.Tensor, n_seen: torch.Tensor, n_new: int = 1) -> torch.Tensor:
    """Positions (3, B, n_new) for the next tokens of rows that have seen `n_seen` (B,) real tokens.

    >>> decode_positions(torch.tensor([[-2]]), torch.tensor([38]), 2)[:, 0].tolist()
    [[36, 37], [36, 37], [36, 37]]
    """
    p = n_seen.view(-1, 1) + deltas.view(-1, 1)                                       # (B, 1)
    if n_new > 1:
        p = p + torch.arange(n_new, device=n_seen.device)                             # (B, n_new)
    return p.unsqueeze(0).expand(3, -1, -1)

"""The vision encoder: a ViT with 2-D rotary positions, window attention and a 2x2 patch merger.

Paper: Qwen2.5-Omni section 2.2 (the Qwen2.5-VL vision encoder). Reference notes 1.3 and 3c; the oracle is
`Qwen2_5OmniVisionEncoder` in transformers' modeling_qwen2_5_omni.py (with vision_utils.py for the index tables).

    pixel_values (N, C*tp*P*P) --Conv3d patch embed--> (N, d) --window order--> 2-D rope, n_layer blocks
        (window attention, full attention per frame pair at fullatt_block_indexes) --merger: RMSNorm, m*m patches
        -> one vector, MLP--> (N/m^2, out_dim) --back to raster order--> one row per LLM token

Shapes:  N patch rows of all items (images and videos packed), grid_thw (n, 3) = (t, gh, gw) in patches per item,
         d = d_model, H heads of D = head_dim, m = spatial_merge_size, a "unit" = the m x m patches of one LLM token,
         U = N / m^2 units. pixel_values rows come from vision_io: block-major over units, so the m^2 patches of a
         unit are consecutive rows.

Windows. A window is window_size / (P*m) units square (112 px = 4 x 4 units = 8 x 8 patches); each frame pair is
tiled from its top-left corner, so windows at the bottom and right edges may be smaller. Window attention needs each
window's tokens to be contiguous, so the encoder reorders the units window by window (`window_index`), runs all
blocks in that order (full-attention blocks are indifferent to the order inside a frame pair, which stays contiguous)
and puts the merged tokens back in raster order with the inverse permutation at the end.

Simplifications: none in the arithmetic; dropout is not modelled. Module names equal the checkpoint keys under
`thinker.visual.` (separate q/k/v with bias, not a fused qkv).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import block_attention, block_pattern
from .config import VisionConfig
from .layers import RMSNorm, SwiGLU, apply_rotary, check_tensor, rope_inv_freq


# ----------------------------------------------------------------------------------------------------------------
# Index arithmetic: positions, windows, frame segments. Grids are (t, gh, gw) in patches.
# ----------------------------------------------------------------------------------------------------------------
def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(N, 2) (row, col) of every patch, in the block-major row order of pixel_values; repeated for each of t.

    >>> vision_position_ids(torch.tensor([[1, 2, 4]]), 2).T.tolist()   # two 2x2 units side by side
    [[0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 2, 3, 2, 3]]
    """
    out = []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)  # (bh, mh, bw, mw)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        rc = torch.stack([r.transpose(1, 2).reshape(-1), c.transpose(1, 2).reshape(-1)], dim=-1)  # (h*w, 2)
        out.append(rc.repeat(t, 1))                                                          # (t*h*w, 2)
    return torch.cat(out)


def window_index(grid_thw: torch.Tensor, merge: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """The window order of the units: (perm (U,), window sizes in units).

    perm[k] is the raster index of the unit that goes to place k. Units are visited item by item, frame pair by
    frame pair, window by window (row-major over windows), and row-major inside a window.

    Worked example: one frame of 3 x 3 units (6 x 6 patches) and windows of 2 x 2 units:

        raster units      windows           window order
        0 1 2             A A B             A: 0 1 3 4
        3 4 5             A A B             B: 2 5
        6 7 8             C C D             C: 6 7      D: 8

    >>> perm, sizes = window_index(torch.tensor([[1, 6, 6]]), merge=2, window_units=2)
    >>> perm.tolist(), sizes
    ([0, 1, 3, 4, 2, 5, 6, 7, 8], [4, 2, 2, 1])
    >>> perm.argsort().tolist()          # the inverse: where each raster unit sits in window order
    [0, 1, 4, 2, 3, 5, 6, 7, 8]
    """
    perms, sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        uh, uw = h // merge, w // merge
        nwh, nww = -(-uh // window_units), -(-uw // window_units)                  # windows per column / row (ceil)
        r = torch.arange(uh)[:, None].expand(uh, uw)
        c = torch.arange(uw)[None, :].expand(uh, uw)
        win = ((r // window_units) * nww + c // window_units).reshape(-1)          # (uh*uw,) window of each unit
        order = torch.argsort(win, stable=True)                                   # stable: row-major inside a window
        counts = torch.bincount(win, minlength=nwh * nww).tolist()
        for f in range(t):
            perms.append(order + offset + f * uh * uw)
            sizes += counts
        offset += t * uh * uw
    return torch.cat(perms), sizes


def frame_seqlens(grid_thw: torch.Tensor) -> list[int]:
    """Patches per frame pair, item by item: the segments of full attention (it never crosses a frame pair).

    >>> frame_seqlens(torch.tensor([[1, 4, 4], [3, 2, 4]]))
    [16, 8, 8, 8]
    """
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


# ----------------------------------------------------------------------------------------------------------------
# Modules (names = checkpoint keys).
# ----------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride: a linear map of each flattened (C, tp, P, P) patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.d_model, kernel_size=self.shape[1:], stride=self.shape[1:],
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C*tp*P*P) @ (C*tp*P*P, d): the convolution's own arithmetic as one matmul (on CPU a Conv3d over N
        # single-window inputs is several times slower, forward and backward)
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1))                     # (N, d)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, cos, sin, pattern):
        N = x.shape[0]

        def heads(t):
            return t.view(N, self.n_head, self.head_dim).transpose(0, 1)[None]   # (1, H, N, D)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # rotate in fp32 (the angles are fp32), then back to the working dtype
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        y = block_attention(q, k, v, pattern)                                     # (1, H, N, D)
        return self.proj(y[0].transpose(0, 1).reshape(N, -1))                  # (N, d)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, bias=True)

    def forward(self, x, cos, sin, pattern):
        x = x + self.attn(self.norm1(x), cos, sin, pattern)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the m^2 patches of a unit, then Linear -> GELU -> Linear to out_dim."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.d_model * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))                       # (U, out_dim)


# ----------------------------------------------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layer))
        self.merger = PatchMerger(cfg)
        # 2-D rope: the first half of the angles follow the row, the second the column, head_dim/4 freqs each
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict:
        """Buffers computed from the config, never stored in a checkpoint (rebuilt after a meta-device load)."""
        return {"inv_freq": rope_inv_freq(self.cfg.head_dim // 2, self.cfg.rope_theta)}

    def check_inputs(self, pixel_values, grid_thw) -> torch.Tensor:
        """Validate at the boundary; returns grid_thw as a CPU long tensor."""
        cfg = self.cfg
        check_tensor("pixel_values", pixel_values, 2, last=cfg.patch_dim)
        if not isinstance(grid_thw, torch.Tensor):
            grid_thw = torch.as_tensor(grid_thw)
        if grid_thw.is_floating_point() or grid_thw.dtype == torch.bool:
            raise TypeError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw must have shape (n_items, 3), got {tuple(grid_thw.shape)}")
        grid = grid_thw.detach().long().cpu()
        m = cfg.spatial_merge_size
        if (grid <= 0).any() or (grid[:, 1:] % m).any():
            raise ValueError(f"grid_thw entries must be positive with h and w multiples of {m}, got {grid.tolist()}")
        n_rows = int(grid.prod(dim=1).sum())
        if n_rows != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grid.tolist()} describes {n_rows} patch rows, but pixel_values has "
                             f"{pixel_values.shape[0]} rows")
        return grid

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (N, 2) (row, col) -> cos, sin (N, head_dim) in fp32: [rows | cols | rows | cols] angles."""
        ang = pos.float()[:, :, None] * self.inv_freq                            # (N, 2, D/4)
        ang = ang.flatten(1)                                                     # (N, D/2) rows then cols
        ang = torch.cat([ang, ang], dim=-1)                                      # (N, D) half-split pairs
        return ang.cos(), ang.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values (N, patch_dim), grid_thw (n, 3) -> (sum t*h*w / m^2, out_dim), items in order."""
        grid = self.check_inputs(pixel_values, grid_thw)
        cfg, dev = self.cfg, pixel_values.device
        mu = cfg.merge_unit
        perm, win_units = window_index(grid, cfg.spatial_merge_size, cfg.window_size // cfg.factor)
        rows = (perm[:, None] * mu + torch.arange(mu)).reshape(-1).to(dev)     # (N,) unit order -> patch rows
        x = self.patch_embed(pixel_values)[rows]                                 # (N, d) in window order
        cos, sin = self.rope(vision_position_ids(grid, cfg.spatial_merge_size).to(dev)[rows])
        N = x.shape[0]
        windows = block_pattern(1, N, seqlens=[u * mu for u in win_units], device=dev)
        frames = block_pattern(1, N, seqlens=frame_seqlens(grid), device=dev)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, frames if i in cfg.fullatt_block_indexes else windows)
        y = self.merger(x)                                                       # (U, out_dim) in window order
        return y[perm.argsort().to(dev)]                                         # (U, out_dim) in raster order


__all__ = ["VisionEncoder", "vision_position_ids", "window_index", "frame_seqlens"]

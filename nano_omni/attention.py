"""Attention: masks, the hand-written and fused paths, and block attention.

Paper: Qwen2.5-Omni section 2.4 (block-wise audio encoder, windowed ViT, sliding-window DiT).

Shapes:  B batch, H query heads, Hkv key/value heads, Tq/Tk query/key length, D head width.
         q (B, H, Tq, D), k and v (B, Hkv, Tk, D); a mask is bool, **True = may attend**, and broadcasts to
         (B, H, Tq, Tk).

Two paths are always available and always agree (tests/test_attention.py checks outputs and gradients):
  * "manual": what a learner reads: repeat kv heads, q @ k^T * scale, mask, softmax in fp32, @ v.
  * "fused":  PyTorch's scaled_dot_product_attention for dense patterns, and for block patterns the block path
              below, which never builds a T x T mask or score matrix.
Choose one with `use_backend("manual")` (a context manager) or the `impl=` argument.

A query row with no allowed key (e.g. a padded query whose whole block is padding) outputs zeros on every path.

Block attention is the pattern Qwen2.5-Omni uses three times:
  audio encoder: each 2-s chunk attends only to itself        -> segments = chunks, back = ahead = 0
  vision encoder: each 112-px window attends only to itself    -> segments = windows, back = ahead = 0
  DiT: blocks of 24 mel frames see `back` blocks before and `ahead` blocks after their own block.
Query i may attend key j when both lie in the same segment and -back <= block(j) - block(i) <= ahead, where
blocks are counted from the start of each segment.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_BACKEND = "fused"


@contextlib.contextmanager
def use_backend(name: str):
    """Switch every attention call inside the block: "manual" (hand-written) or "fused"."""
    global _BACKEND
    if name not in ("manual", "fused"):
        raise ValueError(f"attention backend must be 'manual' or 'fused', got {name!r}")
    old, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = old


def get_backend() -> str:
    return _BACKEND


# ----------------------------------------------------------------------------------------------------------------
# Mask helpers (bool, True = may attend).
# ----------------------------------------------------------------------------------------------------------------
def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(tq, tk): query i sits at absolute position tk - tq + i (the last tq of tk positions), as in decoding.

    >>> causal_mask(2, 3).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    return torch.arange(tk, device=device)[None, :] <= qpos


def padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """(B, Tk) bool of real keys -> (B, 1, 1, Tk)."""
    return key_valid[:, None, None, :]


def segment_ids(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Packed lengths -> segment id per token.

    >>> segment_ids([2, 3]).tolist()
    [0, 0, 1, 1, 1]
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


# ----------------------------------------------------------------------------------------------------------------
# Dense attention: the two paths.
# ----------------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"attention: {name} must have shape (B, heads, T, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")


def attention_manual(q, k, v, mask=None, scale=None):
    """The hand-written path. GQA by repeating each kv head n_rep times."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)                              # (B, H, Tk, D)
    v = v.repeat_interleave(n_rep, dim=1)                              # (B, H, Tk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale                            # (B, H, Tq, Tk)
    if mask is not None:
        # a large finite negative (not -inf) keeps fully masked rows finite, so their gradients stay finite too
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
    att = att.softmax(dim=-1, dtype=torch.promote_types(att.dtype, torch.float32)).to(q.dtype)  # fp32 at least
    if mask is not None:
        att = att * mask.any(dim=-1, keepdim=True)                     # rows with no allowed key -> 0
    return att @ v                                                     # (B, H, Tq, D)


def attention_sdpa(q, k, v, mask=None, scale=None, causal=False):
    """The fused path: torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""
    B, H, tq, D = q.shape
    gqa = H != k.shape[1]
    if mask is None and gqa and tq == 1 and not causal:
        # one query per head (a decoding step): the query heads that share a kv head become that kv head's
        # queries, (B, Hkv, n_rep, D), so the kernel attends without repeating the keys
        return F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], D), k, v,
                                              scale=scale).reshape(B, H, 1, D)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    empty = ~mask.any(dim=-1, keepdim=True)                            # (B|1, H|1, Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


def attention(q, k, v, mask=None, *, causal=False, scale=None, impl=None):
    """Dense attention. `causal` is bottom-right aligned (the queries are the last Tq of Tk positions).

    impl: "manual" or "fused"/"sdpa"; default: the current backend (see `use_backend`).
    """
    _check_qkv(q, k, v)
    return attend(q, k, v, mask, causal=causal, scale=scale, impl=impl)


def attend(q, k, v, mask=None, *, causal=False, scale=None, impl=None):
    """`attention` without the argument checks, for the model's own layers (their shapes hold by construction;
    a decoding step is a chain of tiny ops, where the checks cost as much as the kernel)."""
    impl = impl or _BACKEND
    tq, tk = q.shape[2], k.shape[2]
    if causal:
        if impl in ("fused", "sdpa") and mask is None and tq == tk:
            return attention_sdpa(q, k, v, None, scale, causal=True)              # the kernel masks by itself
        cm = causal_mask(tq, tk, q.device)
        mask = cm if mask is None else (mask & cm)
    if impl == "manual":
        return attention_manual(q, k, v, mask, scale)
    if impl in ("fused", "sdpa"):
        return attention_sdpa(q, k, v, mask, scale)
    raise ValueError(f"attention: impl must be 'manual', 'fused' or 'sdpa', got {impl!r}")


# ----------------------------------------------------------------------------------------------------------------
# Block attention.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BlockPattern:
    """Which keys each query may see, described per token instead of per (query, key) pair.

    seg (B, T)       segment id of each token; a segment is a contiguous run of tokens
    block (B, T)     block index of each token, counted from the start of its segment
    back, ahead      how many blocks before / after its own block a query may see
    key_valid (B, T) False for padding keys (or None)
    """
    seg: torch.Tensor
    block: torch.Tensor
    back: int = 0
    ahead: int = 0
    key_valid: torch.Tensor | None = None

    def dense_mask(self) -> torch.Tensor:
        """The reference: a (B, 1, T, T) bool mask. Costs T^2 memory; the block path never builds it."""
        same_seg = self.seg[:, :, None] == self.seg[:, None, :]                       # (B, T, T)
        diff = self.block[:, None, :] - self.block[:, :, None]                        # (B, T, T) block(j) - block(i)
        m = same_seg & (diff >= -self.back) & (diff <= self.ahead)
        if self.key_valid is not None:
            m = m & self.key_valid[:, None, :]
        return m[:, None]                                                             # (B, 1, T, T)

    @property
    def gather(self) -> "_BlockGather":
        if not hasattr(self, "_gather"):
            self._gather = _BlockGather.build(self)
        return self._gather


def block_pattern(batch: int, length: int, *, block_size: int | None = None, back: int = 0, ahead: int = 0,
                  seqlens=None, key_valid=None, device=None) -> BlockPattern:
    """Build a BlockPattern.

    batch, length  the (B, T) of the tokens
    block_size     tokens per block inside a segment (None: a whole segment is one block)
    seqlens        packed segment lengths shared by every row (e.g. the audio chunks or ViT windows); they must
                   sum to `length`. None: each row is one segment.
    key_valid      (B, T) bool, False for padding.

    >>> p = block_pattern(1, 5, block_size=2, back=1)
    >>> p.block.tolist(), p.dense_mask()[0, 0].int().tolist()[4]
    ([[0, 0, 1, 1, 2]], [0, 0, 1, 1, 1])
    """
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    if back < 0 or ahead < 0:
        raise ValueError(f"back and ahead must be >= 0, got back={back}, ahead={ahead}")
    if seqlens is None:
        seg = torch.zeros(length, dtype=torch.long, device=device)
        pos = torch.arange(length, device=device)
    else:
        seqlens = torch.as_tensor(seqlens, dtype=torch.long, device=device)
        if int(seqlens.sum()) != length or bool((seqlens <= 0).any()):
            raise ValueError(f"seqlens must be positive and sum to the sequence length {length}, got {seqlens.tolist()}")
        seg = segment_ids(seqlens, device)
        starts = torch.cumsum(seqlens, 0) - seqlens
        pos = torch.arange(length, device=device) - starts[seg]
    block = pos // block_size if block_size else torch.zeros_like(pos)
    if key_valid is not None:
        if key_valid.shape != (batch, length) or key_valid.dtype != torch.bool:
            raise ValueError(f"key_valid must be a bool tensor of shape {(batch, length)}, got "
                             f"{key_valid.dtype} {tuple(key_valid.shape)}")
    return BlockPattern(seg.expand(batch, length), block.expand(batch, length), back, ahead, key_valid)


@dataclass
class _BlockGather:
    """Index tables for the block path: every block of queries and the keys of its allowed neighbour blocks.

    q_idx (NB, L)       flat token index (b * T + t) of each query slot, L = longest block
    q_ok (NB, L)        slot holds a real token
    k_idx (NB, W * L)   flat index of each key slot, W = back + 1 + ahead neighbour blocks
    k_ok (NB, W * L)    slot holds an allowed key
    """
    q_idx: torch.Tensor
    q_ok: torch.Tensor
    k_idx: torch.Tensor
    k_ok: torch.Tensor

    @staticmethod
    def build(p: BlockPattern) -> "_BlockGather":
        B, T = p.seg.shape
        dev = p.seg.device
        flat_seg = (p.seg + torch.arange(B, device=dev)[:, None] * (int(p.seg.max()) + 1)).reshape(-1)  # unique per row
        flat_blk = p.block.reshape(-1)
        # a new block starts where the (segment, block) pair changes
        new = torch.ones(B * T, dtype=torch.bool, device=dev)
        new[1:] = (flat_seg[1:] != flat_seg[:-1]) | (flat_blk[1:] != flat_blk[:-1])
        starts = new.nonzero().squeeze(1)                                             # (NB,)
        lens = torch.diff(starts, append=torch.tensor([B * T], device=dev))            # (NB,)
        L = int(lens.max())
        ar = torch.arange(L, device=dev)
        q_ok = ar[None, :] < lens[:, None]                                            # (NB, L)
        q_idx = (starts[:, None] + ar[None, :]).clamp(max=B * T - 1)                  # (NB, L)
        # neighbours: the blocks of one segment are consecutive in this enumeration
        nb = len(starts)
        blk_seg, blk_id = flat_seg[starts], flat_blk[starts]
        offs = torch.arange(-p.back, p.ahead + 1, device=dev)                         # (W,)
        nbr = torch.arange(nb, device=dev)[:, None] + offs[None, :]                   # (NB, W)
        inside = (nbr >= 0) & (nbr < nb)
        nbr_c = nbr.clamp(0, nb - 1)
        nbr_ok = inside & (blk_seg[nbr_c] == blk_seg[:, None]) & (blk_id[nbr_c] - blk_id[:, None] == offs[None, :])
        k_idx = q_idx[nbr_c].reshape(nb, -1)                                          # (NB, W * L)
        k_ok = (q_ok[nbr_c] & nbr_ok[:, :, None]).reshape(nb, -1)                     # (NB, W * L)
        if p.key_valid is not None:
            k_ok = k_ok & p.key_valid.reshape(-1)[k_idx]
        return _BlockGather(q_idx, q_ok, k_idx, k_ok)


def block_attention(q, k, v, pattern: BlockPattern, *, scale=None, impl=None):
    """Attention restricted to a BlockPattern.

    impl: "manual" (dense mask, hand-written), "sdpa" (dense mask, fused kernel) or "block" (the block path,
    memory ~ T * window). The default follows the backend: manual -> "manual", fused -> "block".
    """
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    if pattern.seg.shape != (B, T):
        raise ValueError(f"block_attention: pattern is for (B, T) = {tuple(pattern.seg.shape)}, got q with {(B, T)}")
    impl = impl or ("manual" if _BACKEND == "manual" else "block")
    if impl == "manual":
        return attention_manual(q, k, v, pattern.dense_mask(), scale)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, pattern.dense_mask(), scale)
    if impl != "block":
        raise ValueError(f"block_attention: impl must be 'manual', 'sdpa' or 'block', got {impl!r}")

    g = pattern.gather
    nb, L = g.q_idx.shape
    Hkv = k.shape[1]
    qf = q.transpose(0, 1).reshape(H, B * T, D)                                       # (H, B*T, D)
    kf = k.transpose(0, 1).reshape(Hkv, B * T, D)                                     # (Hkv, B*T, D)
    vf = v.transpose(0, 1).reshape(Hkv, B * T, D)
    qb = qf[:, g.q_idx].transpose(0, 1)                                               # (NB, H, L, D)
    kb = kf[:, g.k_idx].transpose(0, 1)                                               # (NB, Hkv, W*L, D)
    vb = vf[:, g.k_idx].transpose(0, 1)                                               # (NB, Hkv, W*L, D)
    mask = g.k_ok[:, None, None, :]                                                   # (NB, 1, 1, W*L)
    ob = attention_sdpa(qb, kb, vb, mask, scale)                                      # (NB, H, L, D)
    ob = ob.transpose(0, 1).reshape(H, nb * L, D)                                     # (H, NB*L, D)
    keep = g.q_ok.reshape(-1)
    out = qf.new_zeros(H, B * T, D).index_copy(1, g.q_idx.reshape(-1)[keep], ob[:, keep])
    return out.reshape(H, B, T, D).transpose(0, 1)                                    # (B, H, T, D)


__all__ = ["use_backend", "get_backend", "causal_mask", "padding_mask", "segment_ids", "attention",
           "attention_manual", "attention_sdpa", "BlockPattern", "block_pattern", "block_attention"]

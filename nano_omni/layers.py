"""Small shared layers: RMSNorm, stacked linear maps, the SwiGLU MLP, rotary helpers, and a few input checks.

Shapes: x (B, T, d_model); rotary cos/sin (B, T, head_dim) broadcast over heads.
Norms and rotary angles are computed in fp32 (STYLE.md), then cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistic in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic as below in one library call (fewer small ops: matters when decoding)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class StackedLinear(nn.Linear):
    """Several linear maps of the same input, their weights stacked by rows: one matmul instead of one per part.

    parts: {checkpoint name: output size}, in row order, e.g. {"q_proj": 512, "k_proj": 128, "v_proj": 128}.
    The checkpoint keeps each part under its own name, a sibling of this module (`self_attn.q_proj.weight`, not
    `self_attn.qkv_proj.weight`): `state_dict()` splits the stack into the parts; the module that owns the stack
    registers `join_stacks` so that its `load_state_dict()` stacks them back; `checkpoint.load_weights` fills each
    part's rows (`part_rows`). Why stack: at batch 1 a decoding step is a chain of tiny ops, and three small
    matmuls cost three times the overhead of one.
    >>> lin = StackedLinear(4, {"a": 2, "b": 3}, bias=False)
    >>> {k: tuple(v.shape) for k, v in lin.state_dict(prefix="mlp.ab.").items()}
    {'mlp.a.weight': (2, 4), 'mlp.b.weight': (3, 4)}
    """

    def __init__(self, d_in: int, parts: dict[str, int], bias: bool):
        super().__init__(d_in, sum(parts.values()), bias=bias)
        self.parts = dict(parts)
        self.register_state_dict_post_hook(_split_stack)

    def part_rows(self) -> dict[str, tuple[int, int]]:
        """{part: (first row, end row)} of the stacked weight."""
        rows, start = {}, 0
        for name, n in self.parts.items():
            rows[name], start = (start, start + n), start + n
        return rows


def sibling_prefix(prefix: str) -> str:
    """'a.b.qkv_proj.' -> 'a.b.' (the prefix of the module that owns the stack)."""
    head = prefix[:-1].rpartition(".")[0]
    return head + "." if head else ""


def _split_stack(module: StackedLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    parent = sibling_prefix(prefix)
    for attr in ("weight", "bias"):
        if prefix + attr not in state_dict:
            continue
        t = state_dict.pop(prefix + attr)
        if hasattr(t, "full_tensor"):           # an FSDP shard (DTensor): rows are split on the whole tensor
            t = t.full_tensor()
        for name, (a, b) in module.part_rows().items():
            state_dict[f"{parent}{name}.{attr}"] = t[a:b]


def join_stacks(owner: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook for a module that owns StackedLinear children: stack each child's parts (checkpoint names)
    into the child's own keys. The owner does it, not the child, because the owner's load would refuse the part
    names as unexpected keys before the child ever saw them."""
    for child_name, child in owner.named_children():
        if not isinstance(child, StackedLinear):
            continue
        for attr in ("weight", "bias"):
            keys = [f"{prefix}{name}.{attr}" for name in child.parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{child_name}.{attr}"] = torch.cat([state_dict.pop(k) for k in keys])


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the MLP of the Qwen2 decoder, the ViT (with bias) and the talker.

    gate and up are one StackedLinear (checkpoint names `gate_proj`, `up_proj`)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = StackedLinear(d_model, {"gate_proj": d_ff, "up_proj": d_ff}, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.register_load_state_dict_pre_hook(join_stacks)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding.
# ----------------------------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq[k] = theta^(-2k / head_dim), k = 0 .. head_dim/2 - 1 (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Half-split pairing: (x1, x2) -> (-x2, x1), pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (B, T, D) or (T, D). Rotates each (i, i + D/2) pair by its angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]                          # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


def rotary_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """angles (B, T, D/2) fp32 -> cos and *signed* sin (B, 1, T, D) in `dtype`, for `apply_rotary_rolled`.

    Built once per forward and shared by every layer: cos = [cos | cos], sin = [-sin | sin].
    """
    c, s = angles.cos(), angles.sin()
    cos = torch.cat((c, c), dim=-1)[:, None].to(dtype)                 # (B, 1, T, D)
    sin = torch.cat((-s, s), dim=-1)[:, None].to(dtype)                # (B, 1, T, D)
    return cos, sin


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rotary with the sign folded into the table: rotate_half(x) * sin == roll(x, D/2) * [-sin | sin].

    Bit-for-bit the same result (a sign flip is exact) in three ops instead of six.
    >>> x, a = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 4)
    >>> cos, sin = torch.cat((a, a), -1).cos(), torch.cat((a, a), -1).sin()
    >>> torch.equal(apply_rotary_rolled(x, *rotary_tables(a, x.dtype)), apply_rotary(x, cos, sin))
    True
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks shared by the model entry points.
# ----------------------------------------------------------------------------------------------------------------
def check_ids(name: str, ids, vocab_size: int, ndim: int = 2) -> None:
    """Token ids must be an integer tensor of rank `ndim` with every value in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {vocab_size})")


def check_tensor(name: str, x, ndim: int | tuple[int, ...], last: int | None = None, floating: bool = True) -> None:
    """A float tensor of the given rank (and last-dimension size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if last is not None and x.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {tuple(x.shape)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")

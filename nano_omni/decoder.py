"""The Qwen2 decoder stack shared by the Thinker and the Talker: pre-RMSNorm blocks with GQA attention
(q/k/v bias, no o_proj bias), SwiGLU, M-RoPE, a final norm, and a KV cache.

Paper: Qwen2.5-Omni section 2.1 (both are Transformer decoders). Reference 1.1 / 1.4.

Shapes: x (B, T, d_model); positions (3, B, T); q (B, n_head, T, head_dim); k, v (B, n_kv_head, T, head_dim);
rotary tables cos, sin (B, 1, T, head_dim).
Module names follow the checkpoint (`embed_tokens`, `layers.N.self_attn.o_proj`, `mlp.down_proj`, `norm`), so
the loader's key map stays short; q/k/v and gate/up are each one stacked matmul whose parts keep their
checkpoint names (`q_proj`, `gate_proj`: see layers.StackedLinear). `embed_tokens` lives here for the key
layout, but the forward takes embeddings: the Thinker scatters media features into them and the Talker adds its
two tracks first.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attend, causal_mask
from .layers import (RMSNorm, StackedLinear, SwiGLU, apply_rotary_rolled, join_stacks, rope_inv_freq,
                     rotary_tables)
from .tmrope import mrope_angles


class KVCache:
    """Keys and values of every layer, in buffers that grow by doubling (inference only).

    Also remembers which cached slots are real tokens (`key_valid`) and the M-RoPE state of each row:
    `n_seen` real tokens so far and the rope `deltas`, so the next position is n_seen + delta.
    """

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.all_valid = True                        # no padding slot so far: causal attention needs no mask
        self.n_seen: torch.Tensor | None = None      # (B,) long
        self.deltas: torch.Tensor | None = None      # (B, 1) long
        self._valid: torch.Tensor | None = None      # (B, capacity) bool, grown like the k/v buffers

    @property
    def key_valid(self) -> torch.Tensor | None:
        """(B, length) bool: False at padding slots."""
        return None if self._valid is None else self._valid[:, : self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, t, D) after the cached ones; return all keys and values so far."""
        B, Hkv, t, D = k.shape
        end = self.length + t
        buf = self.k[layer]
        if buf is None or buf.shape[2] < end:
            cap = max(end, 2 * (buf.shape[2] if buf is not None else 16))
            for store in (self.k, self.v):
                new = k.new_empty(B, Hkv, cap, D)
                if store[layer] is not None:
                    new[:, :, : self.length] = store[layer][:, :, : self.length]
                store[layer] = new
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf.narrow(2, self.length, t).copy_(k)           # narrow: a view without building slice objects
        v_buf.narrow(2, self.length, t).copy_(v)
        return k_buf.narrow(2, 0, end), v_buf.narrow(2, 0, end)

    def advance(self, key_valid: torch.Tensor | None, batch: int, t: int, device) -> None:
        """Called once per forward, after every layer wrote: t new slots with validity key_valid (B, t), None when
        all are real tokens."""
        end = self.length + t
        if self._valid is None or self._valid.shape[1] < end:
            old = self._valid
            self._valid = torch.ones(batch, max(end, 2 * (old.shape[1] if old is not None else 16)), dtype=torch.bool,
                                     device=device)
            if old is not None:
                self._valid[:, : self.length] = old[:, : self.length]
        if key_valid is None:      # slots past `length` are always True already
            new = t if self.n_seen is not None else torch.full((batch,), t, dtype=torch.long, device=device)
        else:
            self._valid[:, self.length: end] = key_valid
            self.all_valid = self.all_valid and bool(key_valid.all())
            new = key_valid.sum(1)
        self.n_seen = new if self.n_seen is None else self.n_seen + new
        self.length = end


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v in one matmul; the checkpoint keeps q_proj, k_proj, v_proj (see StackedLinear)
        self.qkv_proj = StackedLinear(cfg.d_model, {"q_proj": cfg.n_head * cfg.head_dim,
                                                    "k_proj": cfg.n_kv_head * cfg.head_dim,
                                                    "v_proj": cfg.n_kv_head * cfg.head_dim}, bias=True)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.register_load_state_dict_pre_hook(join_stacks)

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        qk = apply_rotary_rolled(qkv[:, : H + Hkv], cos, sin)                           # q and k heads rotated at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]                                # (B, H|Hkv|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                            # (B, Hkv, past+T, D)
        y = attend(q, k, v, mask, causal=mask is None and T > 1)                        # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                         # (B, T, d_model)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, mask, layer, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """cfg: a ThinkerConfig or TalkerConfig (vocab_size, embed_dim, d_model, n_layer, n_head, n_kv_head,
    head_dim, d_ff, rms_eps, rope_theta, mrope_section, max_seq_len)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict:
        """Buffers computed from the config, never stored in a checkpoint (rebuilt after a meta-device load)."""
        return {"inv_freq": rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)}

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> final-normed hidden states (B, T, d_model).

        positions (3, B, T) M-RoPE ids; key_valid (B, T) bool, False at padding (None: all real).
        With a cache, x holds the new tokens only and attends to everything cached before them.
        """
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds the configured maximum max_seq_len "
                             f"({self.cfg.max_seq_len})")
        # angles in fp32, then the tables cast to the input dtype once for every layer; sin carries the sign of
        # rotate_half (see layers.apply_rotary_rolled)
        cos, sin = rotary_tables(mrope_angles(positions, self.inv_freq, self.cfg.mrope_section), x.dtype)  # (B, 1, T, D)
        mask = None
        if key_valid is not None or (cache is not None and not cache.all_valid):
            # padding may be present: unless every key turns out to be real, an explicit (B, 1, T, past+T) mask,
            # causal and without padding keys
            valid_new = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            valid_all = valid_new if past == 0 else torch.cat([cache.key_valid, valid_new], 1)  # (B, past+T)
            if not bool(valid_all.all()):
                mask = causal_mask(T, past + T, x.device)[None, None] & valid_all[:, None, None, :]
        # with every key real, attention is plain causal (bottom-right aligned when past > 0): no mask at all
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, i, cache)
        if cache is not None:
            cache.advance(key_valid, B, T, x.device)
        return self.norm(x)

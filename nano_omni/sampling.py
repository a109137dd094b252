"""Choosing the next token from logits, shared by the Thinker and the Talker.

The order follows the transformers logits processors, so greedy and seeded sampling can be compared:
repetition penalty -> suppressed ids -> temperature -> top-k -> top-p -> sample (or argmax when greedy).

Shapes: logits (B, V); history (B, T) ids already in the context (prompt and generated).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    do_sample: bool = False        # False: greedy
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    repetition_penalty: float = 1.0
    suppress_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 64
    stop_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_k or self.top_p != 1.0):
            raise ValueError("temperature, top_k and top_p only act when sampling: pass do_sample=True "
                             "(greedy decoding ignores them)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")


def process_logits(logits: torch.Tensor, history: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """Return the adjusted logits (fp32); -inf marks tokens that can no longer be picked.

    Never writes into `logits`; when no knob changes anything (greedy fp32) it returns `logits` itself."""
    x = logits.float()
    if cfg.repetition_penalty != 1.0 and history is not None and history.numel():
        # a token already in the context gets less likely: divide a positive logit, multiply a negative one
        seen = x.gather(1, history)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        x = x.scatter(1, history, seen)
    if cfg.suppress_ids:
        x = x.index_fill(1, torch.tensor(cfg.suppress_ids, device=x.device), float("-inf"))   # a copy: logits stay
    if not cfg.do_sample:
        return x
    x = x / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(x, min(cfg.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        probs = srt.softmax(-1)
        above = probs.cumsum(-1) - probs            # probability mass strictly above each token
        drop = above >= cfg.top_p
        drop[:, 0] = False                          # always keep the best token
        x = x.scatter(1, idx, srt.masked_fill(drop, float("-inf")))
    return x


def sample_next(logits, history, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids."""
    x = process_logits(logits, history, cfg)
    if not cfg.do_sample:
        return x.argmax(-1)
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g

"""Sample from nano_omni.

Today this runs the tiny Thinker: a ChatML prompt in, greedy text out. With no trained checkpoint (none is
shipped yet) the weights are random, so the reply is noise; the point is the plumbing: tokenizer -> TMRoPE ids
-> Thinker with KV cache -> tokens, with shapes printed.

    python sample.py --prompt "What is 2 + 3?" --max-new-tokens 16 --seed 0
"""
import argparse

import torch

from nano_omni.config import get_config
from nano_omni.thinker import Thinker
from nano_omni.tokenizer import ByteTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="What is 2 + 3?")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.prompt.strip():
        raise SystemExit("--prompt must not be empty")
    cfg = get_config("tiny")
    torch.manual_seed(a.seed)
    model = Thinker(cfg).eval()
    tok = ByteTokenizer(cfg.tokens, cfg.thinker.vocab_size)
    ids = torch.tensor([tok.chat([{"role": "user", "content": a.prompt}])])
    out = model.generate(ids, max_new_tokens=a.max_new_tokens)
    print(f"prompt ids {tuple(ids.shape)}, reply ids {tuple(out.tokens.shape)}, hidden {tuple(out.hidden.shape)}")
    print("reply (random weights, untrained):", repr(tok.decode(out.tokens[0], skip_special=True)))


if __name__ == "__main__":
    main()

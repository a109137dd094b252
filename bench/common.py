"""Helpers shared by the benchmarks."""
from __future__ import annotations


def few_layers(cfg, layers: int):
    """A preset's shapes with `layers` decoder layers in the Thinker and Talker, 1 audio and 1 vision layer and a
    3-layer DiT (look-back on layers 0 and 2, look-ahead on 1): the real widths at a fraction of the memory."""
    return cfg.replace(**{"thinker.n_layer": layers, "talker.n_layer": layers, "audio.n_layer": 1, "vision.n_layer": 1,
                          "vision.fullatt_block_indexes": [0], "dit.n_layer": max(3, min(cfg.dit.n_layer, layers)),
                          "dit.look_ahead_layers": [1], "dit.look_backward_layers": [0, 2]})


def no_stop_ids(cfg) -> list[int]:
    """Codec ids a benchmark's Talker may not pick: its stop codes and bos, and the ids the DiT cannot read. With
    these suppressed every request runs exactly the requested number of codes, so runs compare."""
    tc = cfg.talker
    return sorted({tc.codec_pad, tc.codec_eos, tc.codec_bos, *range(cfg.dit.num_embeds + 1, tc.vocab_size)})

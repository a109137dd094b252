"""Helpers shared by the benchmarks."""
from __future__ import annotations


def few_layers(cfg, layers: int):
    """A preset's shapes with `layers` decoder layers in the Thinker and Talker, 1 audio and 1 vision layer and a
    3-layer DiT (look-back on layers 0 and 2, look-ahead on 1): the real widths at a fraction of the memory."""
    return cfg.replace(**{"thinker.n_layer": layers, "talker.n_layer": layers, "audio.n_layer": 1, "vision.n_layer": 1,
                          "vision.fullatt_block_indexes": [0], "dit.n_layer": max(3, min(cfg.dit.n_layer, layers)),
                          "dit.look_ahead_layers": [1], "dit.look_backward_layers": [0, 2]})

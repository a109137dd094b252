"""Reading an official Qwen2.5-Omni `config.json` (transformers' layout) into an OmniConfig.

Field names differ between transformers versions (e.g. the DiT's legacy `dim`/`depth`/`heads` and the newer
`hidden_size`/`num_hidden_layers`/`num_attention_heads`); every spelling we know of is accepted. Special token ids
that config.json does not name come from the tokenizer's files, else the official ids (reference 1.7).
"""
from __future__ import annotations

import dataclasses

from .config import (AudioConfig, DiTConfig, OmniConfig, SpecialTokens, TalkerConfig, ThinkerConfig, VisionConfig,
                     VocoderConfig)


# ----------------------------------------------------------------------------------------------------------------
def _pick(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _rope(d: dict) -> tuple[float, list[int] | None]:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = _pick(d, "rope_theta", default=None) or rp.get("rope_theta") or 1_000_000.0
    return float(theta), rp.get("mrope_section")


def omni_config_from_hf(hf: dict, enable_audio_output=None, tokens=None) -> OmniConfig:
    if not isinstance(hf, dict):
        raise TypeError(f"from_hf_config expects the parsed config.json (a dict), got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt != "qwen2_5_omni":
        raise ValueError(f"config.json has model_type {mt!r}; nano_omni reads 'qwen2_5_omni' configs only")
    th = hf.get("thinker_config") or {}
    text, aud, vis = th.get("text_config") or {}, th.get("audio_config") or {}, th.get("vision_config") or {}
    if not text:
        raise ValueError("config.json has no thinker_config.text_config")
    theta, msec = _rope(text)
    thinker = ThinkerConfig(
        vocab_size=text["vocab_size"], d_model=text["hidden_size"], n_layer=text["num_hidden_layers"],
        n_head=text["num_attention_heads"], n_kv_head=_pick(text, "num_key_value_heads", "num_attention_heads"),
        d_ff=text["intermediate_size"], rope_theta=theta, mrope_section=list(msec or [16, 24, 24]),
        rms_eps=float(text.get("rms_norm_eps", 1e-6)), max_seq_len=text.get("max_position_embeddings", 32768),
        tie_embeddings=bool(th.get("tie_word_embeddings", False)),
    )
    audio = AudioConfig(
        n_mels=aud.get("num_mel_bins", 128), d_model=_pick(aud, "d_model", "hidden_size", default=1280),
        n_layer=_pick(aud, "encoder_layers", "num_hidden_layers", default=32),
        n_head=_pick(aud, "encoder_attention_heads", "num_attention_heads", default=20),
        d_ff=_pick(aud, "encoder_ffn_dim", "intermediate_size", default=5120), n_window=aud.get("n_window", 100),
        max_source_positions=aud.get("max_source_positions", 1500), output_dim=aud.get("output_dim", thinker.d_model),
    )
    vision = VisionConfig(
        d_model=_pick(vis, "hidden_size", "embed_dim", default=1280), n_layer=_pick(vis, "depth", "num_hidden_layers", default=32),
        n_head=_pick(vis, "num_heads", "num_attention_heads", default=16), d_ff=vis.get("intermediate_size", 3420),
        in_channels=_pick(vis, "in_channels", "in_chans", default=3), patch_size=vis.get("patch_size", 14),
        temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
        window_size=vis.get("window_size", 112), fullatt_block_indexes=list(vis.get("fullatt_block_indexes", [7, 15, 23, 31])),
        out_dim=_pick(vis, "out_hidden_size", default=thinker.d_model),
    )
    tk = hf.get("talker_config") or {}
    t2w = hf.get("token2wav_config") or {}
    dd, bv = t2w.get("dit_config") or {}, t2w.get("bigvgan_config") or {}
    talker, dit, vocoder = TalkerConfig(embed_dim=thinker.d_model), DiTConfig(), VocoderConfig()
    if tk:
        ttheta, tsec = _rope(tk)
        talker = TalkerConfig(
            vocab_size=tk.get("vocab_size", 8448), embed_dim=_pick(tk, "embedding_size", default=thinker.d_model),
            d_model=tk["hidden_size"], n_layer=tk["num_hidden_layers"], n_head=tk["num_attention_heads"],
            n_kv_head=_pick(tk, "num_key_value_heads", "num_attention_heads"),
            head_dim=_pick(tk, "head_dim", default=tk["hidden_size"] // tk["num_attention_heads"]),
            d_ff=tk["intermediate_size"], rope_theta=ttheta, mrope_section=list(tsec or [16, 24, 24]),
            rms_eps=float(tk.get("rms_norm_eps", 1e-6)), max_seq_len=tk.get("max_position_embeddings", 32768),
            codec_pad=tk.get("tts_codec_pad_token_id", 8292), codec_bos=tk.get("tts_codec_start_token_id", 8293),
            codec_eos=tk.get("tts_codec_end_token_id", 8294), codec_mask=tk.get("tts_codec_mask_token_id", 8296),
        )
    if dd:
        # The hub file may use the legacy names dim/depth/heads (reference 1.5); accept both spellings.
        drope = (dd.get("rope_parameters") or {}).get("rope_theta") or dd.get("rope_theta") or 10000.0
        dit = DiTConfig(
            d_model=_pick(dd, "hidden_size", "dim", default=1024), n_layer=_pick(dd, "num_hidden_layers", "depth", default=22),
            n_head=_pick(dd, "num_attention_heads", "heads", default=16), head_dim=dd.get("head_dim", 64),
            ff_mult=dd.get("ff_mult", 2), emb_dim=dd.get("emb_dim", 512), num_embeds=dd.get("num_embeds", 8193),
            repeats=dd.get("repeats", 2), mel_dim=dd.get("mel_dim", 80), block_size=dd.get("block_size", 24),
            look_ahead_layers=list(dd.get("look_ahead_layers", [10])),
            look_backward_layers=list(dd.get("look_backward_layers", [0, 20])), rope_theta=float(drope),
            max_mel_len=dd.get("max_position_embeddings", 32768), dropout=float(dd.get("dropout", 0.1)),
            enc_emb_dim=dd.get("enc_emb_dim", 192), enc_dim=dd.get("enc_dim", 128),
            enc_channels=list(dd.get("enc_channels", [256, 256, 256, 256, 768])),
            enc_kernel_sizes=list(dd.get("enc_kernel_sizes", [5, 3, 3, 3, 1])),
            enc_dilations=list(dd.get("enc_dilations", [1, 2, 3, 4, 1])),
            enc_attention_channels=dd.get("enc_attention_channels", 64), enc_res2net_scale=dd.get("enc_res2net_scale", 2),
            enc_se_channels=dd.get("enc_se_channels", 64),
        )
    if bv:
        vocoder = VocoderConfig(
            mel_dim=bv.get("mel_dim", 80), upsample_initial_channel=bv.get("upsample_initial_channel", 1536),
            upsample_rates=list(bv.get("upsample_rates", [5, 3, 2, 2, 2, 2])),
            upsample_kernel_sizes=list(bv.get("upsample_kernel_sizes", [11, 7, 4, 4, 4, 4])),
            resblock_kernel_sizes=list(bv.get("resblock_kernel_sizes", [3, 7, 11])),
            resblock_dilation_sizes=[list(x) for x in bv.get("resblock_dilation_sizes", [[1, 3, 5]] * 3)],
        )
    # ids written in config.json win; the others come from `tokens` (e.g. read from the tokenizer files) or
    # default to the official ones
    found = {
        "audio_pad": _pick(th, "audio_token_index", "audio_token_id"),
        "image_pad": _pick(th, "image_token_index", "image_token_id"),
        "video_pad": _pick(th, "video_token_index", "video_token_id"),
        "audio_bos": _pick(th, "audio_start_token_id"), "audio_eos": _pick(th, "audio_end_token_id"),
        "vision_bos": _pick(th, "vision_start_token_id") or _pick(tk, "vision_start_token_id"),
        "vision_eos": _pick(th, "vision_end_token_id") or _pick(tk, "vision_end_token_id"),
        "tts_text_pad": _pick(tk, "tts_text_pad_token_id"), "tts_text_bos": _pick(tk, "tts_text_start_token_id"),
        "tts_text_eos": _pick(tk, "tts_text_end_token_id"),
    }
    base = dataclasses.asdict(tokens) if tokens is not None else dataclasses.asdict(SpecialTokens())
    tokens = SpecialTokens(**{**base, **{k: v for k, v in found.items() if v is not None}})
    if enable_audio_output is None:
        enable_audio_output = bool(hf.get("enable_audio_output", True)) and bool(tk)
    return OmniConfig(thinker=thinker, audio=audio, vision=vision, talker=talker, dit=dit, vocoder=vocoder, tokens=tokens,
               position_id_per_seconds=th.get("position_id_per_seconds", 25),
               seconds_per_chunk=th.get("seconds_per_chunk", 2), enable_audio_output=enable_audio_output,
               name=str(hf.get("_name_or_path") or "hf"))

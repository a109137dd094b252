"""Helpers shared by the tests: tiny transformers reference models built from a nano_omni config, and random
prompt layouts. transformers is imported here and only here (it is the oracle, never a dependency)."""
from __future__ import annotations

import random

import torch

from nano_omni.config import OmniConfig
from nano_omni.tmrope import audio_token_count, audio_in_video_layout


def hf_thinker_config(cfg: OmniConfig, audio_layers: int = 1, vision_layers: int = 1):
    from transformers import Qwen2_5OmniThinkerConfig

    th, au, vi, tk = cfg.thinker, cfg.audio, cfg.vision, cfg.tokens
    c = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=th.vocab_size, hidden_size=th.d_model, intermediate_size=th.d_ff,
                         num_hidden_layers=th.n_layer, num_attention_heads=th.n_head, num_key_value_heads=th.n_kv_head,
                         rope_parameters=dict(rope_type="default", rope_theta=th.rope_theta,
                                              mrope_section=list(th.mrope_section)),
                         rms_norm_eps=th.rms_eps, max_position_embeddings=th.max_seq_len),
        audio_config=dict(num_mel_bins=au.n_mels, d_model=au.d_model, encoder_layers=au.n_layer,
                          encoder_attention_heads=au.n_head, encoder_ffn_dim=au.d_ff, n_window=au.n_window,
                          max_source_positions=au.max_source_positions, output_dim=au.output_dim),
        vision_config=dict(hidden_size=vi.d_model, depth=vi.n_layer, num_heads=vi.n_head, intermediate_size=vi.d_ff,
                           patch_size=vi.patch_size, temporal_patch_size=vi.temporal_patch_size,
                           spatial_merge_size=vi.spatial_merge_size, window_size=vi.window_size,
                           fullatt_block_indexes=list(vi.fullatt_block_indexes), out_hidden_size=vi.out_dim),
        audio_token_index=tk.audio_pad, image_token_index=tk.image_pad, video_token_index=tk.video_pad,
        audio_start_token_id=tk.audio_bos, audio_end_token_id=tk.audio_eos,
        position_id_per_seconds=cfg.position_id_per_seconds, seconds_per_chunk=cfg.seconds_per_chunk)
    c.vision_start_token_id = tk.vision_bos
    c.vision_end_token_id = tk.vision_eos
    c._attn_implementation = "eager"
    for sub in (c.text_config, c.audio_config, c.vision_config):
        sub._attn_implementation = "eager"
    return c


def hf_thinker(cfg: OmniConfig, seed: int = 0):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    return randomize_(Qwen2_5OmniThinkerForConditionalGeneration(hf_thinker_config(cfg)).eval(), seed)


def random_layout(rng: random.Random, cfg: OmniConfig, *, use_audio_in_video: bool, allow_vision: bool = True):
    """One prompt row with random text spans and media items. Returns (ids, images, videos, spgs, audios) where
    images/videos are grids (t, h, w) in patches, spgs the seconds per grid of each video and audios the mel
    lengths of each audio (in-video audio included, in order)."""
    tk, m = cfg.tokens, cfg.vision.spatial_merge_size
    ids, images, videos, spgs, audios = [], [], [], [], []

    def text(k):
        ids.extend(rng.randrange(0, 256) for _ in range(k))

    for _ in range(rng.randint(0, 4)):
        text(rng.randint(0, 4))
        kind = rng.choice(["audio", "image", "video"] if allow_vision else ["audio"])
        if kind == "audio":
            L = rng.randint(3, 700)
            audios.append(L)
            ids += [tk.audio_bos] + [tk.audio_pad] * audio_token_count(L) + [tk.audio_eos]
        elif kind == "image":
            g = (1, m * rng.randint(1, 4), m * rng.randint(1, 4))
            images.append(g)
            ids += [tk.vision_bos] + [tk.image_pad] * (g[1] * g[2] // m ** 2) + [tk.vision_eos]
        else:
            g = (rng.randint(1, 5), m * rng.randint(1, 3), m * rng.randint(1, 3))
            spg = rng.choice([0.4, 0.5, 1.0, 1.5, 2.0, 3.0])
            videos.append(g)
            spgs.append(spg)
            n_video = g[0] * g[1] * g[2] // m ** 2
            if use_audio_in_video:
                L = rng.randint(3, 900)
                audios.append(L)
                ids += [tk.vision_bos, tk.audio_bos]
                for kind2, n in audio_in_video_layout(g, spg, audio_token_count(L), m,
                                                      cfg.position_id_per_seconds, cfg.seconds_per_chunk):
                    ids += [tk.video_pad if kind2 == "video" else tk.audio_pad] * n
                ids += [tk.audio_eos, tk.vision_eos]
            else:
                ids += [tk.vision_bos] + [tk.video_pad] * n_video + [tk.vision_eos]
    text(rng.randint(1, 5))
    return ids, images, videos, spgs, audios


def hf_audio_encoder(cfg: OmniConfig, seed: int = 0):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    c = hf_thinker_config(cfg).audio_config
    c._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(Qwen2_5OmniAudioEncoder(c).eval(), seed)


# ----------------------------------------------------------------------------------------------------------------
# Token2Wav DiT (tests/test_dit.py).
# ----------------------------------------------------------------------------------------------------------------
def hf_dit_config(dc):
    """transformers' Qwen2_5OmniDiTConfig with the numbers of our DiTConfig (an OmniConfig is accepted too)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniDiTConfig

    dc = getattr(dc, "dit", dc)
    c = Qwen2_5OmniDiTConfig(
        hidden_size=dc.d_model, num_hidden_layers=dc.n_layer, num_attention_heads=dc.n_head, head_dim=dc.head_dim,
        ff_mult=dc.ff_mult, emb_dim=dc.emb_dim, rope_parameters=dict(rope_type="default", rope_theta=dc.rope_theta),
        max_position_embeddings=dc.max_mel_len, block_size=dc.block_size,
        look_ahead_layers=list(dc.look_ahead_layers), look_backward_layers=list(dc.look_backward_layers),
        repeats=dc.repeats, num_embeds=dc.num_embeds, mel_dim=dc.mel_dim, dropout=dc.dropout,
        enc_emb_dim=dc.enc_emb_dim, enc_dim=dc.enc_dim, enc_channels=list(dc.enc_channels),
        enc_kernel_sizes=list(dc.enc_kernel_sizes), enc_dilations=list(dc.enc_dilations),
        enc_attention_channels=dc.enc_attention_channels, enc_res2net_scale=dc.enc_res2net_scale,
        enc_se_channels=dc.enc_se_channels)
    c._attn_implementation = "sdpa"  # the reference DiT runs on SDPA only (its eager path is not wired up)
    return c


def hf_dit(cfg, seed: int = 0):
    """A tiny random transformers DiT. Every parameter is redrawn at unit-variance-preserving scale: the stock init
    (std 0.02, zero biases) leaves activations so small that a 1e-5 parity check would prove little."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel

    torch.manual_seed(seed)
    model = Qwen2_5OmniToken2WavDiTModel(hf_dit_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("codec_embed.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Vision (tests/test_vision.py).
# ----------------------------------------------------------------------------------------------------------------
def hf_vision_config(vi):
    """transformers' Qwen2_5OmniVisionEncoderConfig for a nano_omni VisionConfig (eager attention)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig

    c = Qwen2_5OmniVisionEncoderConfig(
        hidden_size=vi.d_model, depth=vi.n_layer, num_heads=vi.n_head, intermediate_size=vi.d_ff,
        in_channels=vi.in_channels, patch_size=vi.patch_size, temporal_patch_size=vi.temporal_patch_size,
        spatial_merge_size=vi.spatial_merge_size, window_size=vi.window_size,
        fullatt_block_indexes=list(vi.fullatt_block_indexes), out_hidden_size=vi.out_dim,
        rope_parameters=dict(rope_type="axial", rope_theta=vi.rope_theta))
    c._attn_implementation = "eager"
    return c


def hf_vision(vi, seed: int = 0):
    """A transformers Qwen2_5OmniVisionEncoder with every parameter random (norm gains near 1, biases non-zero),
    so a parity test also checks the gains and biases are read from the right keys."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    torch.manual_seed(seed)
    m = Qwen2_5OmniVisionEncoder(hf_vision_config(vi)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.05 * noise)
    return m


def hf_image_processor(min_pixels: int, max_pixels: int):
    """transformers' Qwen2-VL image processor, PIL backend (the default torchvision backend is not installable
    beside our torch build)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_bigvgan(cfg, seed: int = 0):
    """transformers' Qwen2_5OmniToken2WavBigVGANModel built from our VocoderConfig, with weights redrawn.

    The reference's own init is useless for a parity test: convs get std 0.02 (the waveform comes out near 1e-7,
    so any atol passes) and every SnakeBeta log-alpha / log-beta is 0. Here convs get PyTorch's fan-in init,
    biases small random values and log-alpha / log-beta are drawn from N(0, 0.5^2).
    """
    import torch.nn as nn
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavBigVGANModel

    c = Qwen2_5OmniBigVGANConfig(
        mel_dim=cfg.mel_dim, upsample_initial_channel=cfg.upsample_initial_channel,
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        upsample_rates=list(cfg.upsample_rates), upsample_kernel_sizes=list(cfg.upsample_kernel_sizes))
    torch.manual_seed(seed)
    model = Qwen2_5OmniToken2WavBigVGANModel(c).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                m.reset_parameters()
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.normal_(0.0, 0.5)
    return model


def randomize_(model, seed: int = 0, scale: float = 0.05):
    """Give every parameter of a reference model random values (norm gains near 1, biases non-zero), so a parity
    test also checks that gains and biases are read from the right keys."""
    gens = {}   # one generator per device: a model built on a GPU is filled there (the CPU values are the tests')
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=g, device=p.device)
            is_gain = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_gain else scale * noise)
    return model


def hf_talker_config(cfg: OmniConfig):
    from transformers import Qwen2_5OmniTalkerConfig

    tc, tk = cfg.talker, cfg.tokens
    c = Qwen2_5OmniTalkerConfig(
        vocab_size=tc.vocab_size, embedding_size=tc.embed_dim, hidden_size=tc.d_model, num_hidden_layers=tc.n_layer,
        num_attention_heads=tc.n_head, num_key_value_heads=tc.n_kv_head, head_dim=tc.head_dim,
        intermediate_size=tc.d_ff, rms_norm_eps=tc.rms_eps, max_position_embeddings=tc.max_seq_len,
        rope_parameters=dict(rope_type="default", rope_theta=tc.rope_theta, mrope_section=list(tc.mrope_section)),
        tts_codec_pad_token_id=tc.codec_pad, tts_codec_start_token_id=tc.codec_bos,
        tts_codec_end_token_id=tc.codec_eos, tts_codec_mask_token_id=tc.codec_mask,
        tts_text_pad_token_id=tk.tts_text_pad, tts_text_start_token_id=tk.tts_text_bos,
        tts_text_end_token_id=tk.tts_text_eos, audio_token_index=tk.audio_pad, image_token_index=tk.image_pad,
        video_token_index=tk.video_pad, vision_start_token_id=tk.vision_bos, vision_end_token_id=tk.vision_eos,
        audio_start_token_id=tk.audio_bos, audio_end_token_id=tk.audio_eos,
        position_id_per_seconds=cfg.position_id_per_seconds, seconds_per_chunk=cfg.seconds_per_chunk,
        spatial_merge_size=cfg.vision.spatial_merge_size)
    c._attn_implementation = "eager"
    return c


def hf_talker(cfg: OmniConfig, seed: int = 0):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniTalkerForConditionalGeneration

    torch.manual_seed(seed)
    return randomize_(Qwen2_5OmniTalkerForConditionalGeneration(hf_talker_config(cfg)).eval(), seed)


def hf_omni_config(cfg: OmniConfig):
    """transformers' Qwen2_5OmniConfig (Thinker, Talker, Token2Wav) with the numbers of a nano_omni OmniConfig."""
    from transformers import Qwen2_5OmniConfig

    bv = cfg.vocoder
    return Qwen2_5OmniConfig(
        thinker_config=hf_thinker_config(cfg).to_dict(), talker_config=hf_talker_config(cfg).to_dict(),
        token2wav_config=dict(dit_config=hf_dit_config(cfg).to_dict(), bigvgan_config=dict(
            mel_dim=bv.mel_dim, upsample_initial_channel=bv.upsample_initial_channel,
            resblock_kernel_sizes=list(bv.resblock_kernel_sizes),
            resblock_dilation_sizes=[list(d) for d in bv.resblock_dilation_sizes],
            upsample_rates=list(bv.upsample_rates), upsample_kernel_sizes=list(bv.upsample_kernel_sizes))))


def hf_omni(cfg: OmniConfig, seed: int = 0):
    """A whole tiny transformers Qwen2.5-Omni (Thinker, Talker, Token2Wav) with every parameter random."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    return randomize_(Qwen2_5OmniForConditionalGeneration(hf_omni_config(cfg)).eval(), seed)

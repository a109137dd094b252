"""Config: presets, validation in sentences, JSON round trip, overrides, official config.json, 7B sizes."""
import json

import pytest
import torch

from nano_omni.config import OmniConfig, PRESETS, get_config, parse_override
from nano_omni.decoder import Decoder


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_config(name)
    again = OmniConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == cfg.to_dict()


def test_7b_thinker_llm_has_the_official_parameter_count():
    cfg = get_config("qwen2_5_omni_7b")
    with torch.device("meta"):
        body = Decoder(cfg.thinker)
        head = torch.nn.Linear(cfg.thinker.d_model, cfg.thinker.vocab_size, bias=False)
    assert sum(p.numel() for p in body.parameters()) == 7_070_619_136
    assert sum(p.numel() for p in head.parameters()) == 544_997_376


def test_3b_thinker_llm_matches_the_reference():
    cfg = get_config("qwen2_5_omni_3b")
    with torch.device("meta"):
        body = Decoder(cfg.thinker)
    assert sum(p.numel() for p in body.parameters()) == 3_085_938_688


def test_derived_sizes_follow_overrides():
    cfg = get_config("tiny", **{"thinker.d_model": 96, "thinker.n_head": 6, "audio.output_dim": 96,
                                "vision.out_dim": 96, "talker.embed_dim": 96})
    assert cfg.thinker.head_dim == 16
    assert get_config("qwen2_5_omni_7b").dit.receptive_blocks == (2, 1)
    assert get_config("qwen2_5_omni_7b").vocoder.hop_length == 240


@pytest.mark.parametrize("overrides, msg", [
    ({"thinker.n_head": 5}, r"n_head \(5\) must divide d_model \(64\)"),
    ({"thinker.n_kv_head": 3}, r"n_kv_head \(3\) must divide n_head \(4\)"),
    ({"audio.n_head": 7}, r"n_head \(7\) must divide d_model \(64\)"),
    ({"thinker.mrope_section": [2, 2, 2]}, "must sum to head_dim / 2 = 8"),
    ({"thinker.n_layer": 0}, "n_layer must be a positive integer"),
    ({"audio.output_dim": 32}, r"audio.output_dim \(32\) must equal thinker.d_model \(64\)"),
    ({"dit.look_ahead_layers": [9]}, "not a layer index below n_layer"),
    ({"thinker.vocab_size": 100}, "does not fit thinker.vocab_size"),
])
def test_invalid_values_fail_with_a_sentence(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        get_config("tiny", **overrides)


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown config key 'thinker.n_layers'"):
        get_config("tiny", **{"thinker.n_layers": 3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        OmniConfig.from_dict({"colour": "blue"})
    with pytest.raises(TypeError, match="config.thinker.n_layer must be an integer"):
        OmniConfig.from_dict({"thinker": {"n_layer": "two"}})


def test_overrides_are_typed():
    assert parse_override("--thinker.n_layer=4") == ("thinker.n_layer", 4)
    assert parse_override("--dit.dropout=0.2") == ("dit.dropout", 0.2)
    assert parse_override("--enable_audio_output=false") == ("enable_audio_output", False)
    assert parse_override("--thinker.mrope_section=[2,3,3]") == ("thinker.mrope_section", [2, 3, 3])
    with pytest.raises(ValueError, match="cannot read 'four' as int"):
        parse_override("--thinker.n_layer=four")
    with pytest.raises(TypeError, match="must be an integer"):
        parse_override("--thinker.n_layer=4.5")
    with pytest.raises(ValueError, match="unknown config key 'thinker.layers'"):
        parse_override("--thinker.layers=4")
    with pytest.raises(ValueError, match="names a whole section"):
        parse_override("--thinker=4")
    with pytest.raises(ValueError, match="must look like"):
        parse_override("--thinker.n_layer")


def _official_7b_json(legacy_dit: bool) -> dict:
    """The fields of the official 7B config.json that we read (numbers from the reference, section 1)."""
    dit = {"dim": 1024, "depth": 22, "heads": 16} if legacy_dit else \
          {"hidden_size": 1024, "num_hidden_layers": 22, "num_attention_heads": 16}
    dit.update({"head_dim": 64, "ff_mult": 2, "emb_dim": 512, "num_embeds": 8193, "repeats": 2, "mel_dim": 80,
                "block_size": 24, "look_ahead_layers": [10], "look_backward_layers": [0, 20], "dropout": 0.1})
    return {
        "model_type": "qwen2_5_omni", "enable_audio_output": True,
        "thinker_config": {
            "audio_token_index": 151646, "image_token_index": 151655, "video_token_index": 151656,
            "position_id_per_seconds": 25, "seconds_per_chunk": 2, "audio_start_token_id": 151647,
            "audio_end_token_id": 151648, "tie_word_embeddings": False,
            "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                            "rope_theta": 1000000.0, "rope_scaling": {"mrope_section": [16, 24, 24], "type": "mrope"},
                            "rms_norm_eps": 1e-06, "max_position_embeddings": 32768},
            "audio_config": {"num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                             "encoder_ffn_dim": 5120, "n_window": 100, "max_source_positions": 1500, "output_dim": 3584},
            "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                              "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584, "in_chans": 3},
        },
        "talker_config": {"vocab_size": 8448, "embedding_size": 3584, "hidden_size": 896, "num_hidden_layers": 24,
                          "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 18944,
                          "rope_theta": 1000000.0, "rope_scaling": {"mrope_section": [16, 24, 24]}, "rms_norm_eps": 1e-06,
                          "max_position_embeddings": 32768, "tts_codec_pad_token_id": 8292,
                          "tts_codec_start_token_id": 8293, "tts_codec_end_token_id": 8294,
                          "tts_codec_mask_token_id": 8296, "tts_text_pad_token_id": 151859,
                          "tts_text_start_token_id": 151860, "tts_text_end_token_id": 151861,
                          "vision_start_token_id": 151652, "vision_end_token_id": 151653},
        "token2wav_config": {"dit_config": dit, "bigvgan_config": {
            "mel_dim": 80, "upsample_initial_channel": 1536, "upsample_rates": [5, 3, 2, 2, 2, 2],
            "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4], "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]}},
    }


@pytest.mark.parametrize("legacy_dit", [True, False])
def test_official_config_json_gives_the_7b_preset(legacy_dit):
    cfg = OmniConfig.from_hf_config(_official_7b_json(legacy_dit))
    want = get_config("qwen2_5_omni_7b")
    for part in ("thinker", "audio", "vision", "talker", "dit", "vocoder", "tokens"):
        assert getattr(cfg, part) == getattr(want, part), part


def test_transformers_config_dict_is_read():
    """A config written by transformers itself (class defaults, newer field spellings) is understood."""
    from transformers import Qwen2_5OmniConfig

    hf = Qwen2_5OmniConfig().to_dict()
    cfg = OmniConfig.from_hf_config(hf)
    assert cfg.thinker.n_layer == 28 and cfg.thinker.mrope_section == [16, 24, 24]
    assert cfg.dit.n_layer == hf["token2wav_config"]["dit_config"]["num_hidden_layers"]
    assert cfg.talker.head_dim == hf["talker_config"]["head_dim"]


def test_other_model_families_are_refused():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        OmniConfig.from_hf_config({"model_type": "llama"})


def test_atomic_write_replaces_whole_and_keeps_the_usual_mode(tmp_path):
    """atomic_write_bytes: the new content replaces the old at once, no temporary file is left, and the file gets
    the permissions a plain open() would give (not the temporary file's private 0600)."""
    import os

    from nano_omni.checkpoint import atomic_write_bytes
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """A rename is durable only once the folder holding it is synced: atomic_write_bytes syncs the new file's data
    before the rename and the folder after it (so a crash leaves the old file or the new one on disk)."""
    import os
    import stat

    from nano_omni.checkpoint import atomic_write_bytes
    synced, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(a, b):
        synced.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert synced == ["file", "rename", "folder"]


def test_a_run_checkpoint_is_on_disk_before_the_old_one_goes(tmp_path, monkeypatch):
    """save_run_checkpoint carries files of the previous checkpoint over by copying them; every file and folder of
    the new checkpoint, copies included, is synced before the swap deletes the old one."""
    import os

    import torch.nn as nn

    from nano_omni.training import save_run_checkpoint
    save_run_checkpoint(tmp_path, nn.Linear(2, 2), {"a": 1}, {"codec.bin": b"codes", "logs/x.csv": b"1,2"})
    synced, real_fsync = set(), os.fsync

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    save_run_checkpoint(tmp_path, nn.Linear(2, 2), {"a": 2})          # codec.bin and logs/ carried over
    ck = tmp_path / "checkpoint"
    assert (ck / "codec.bin").read_bytes() == b"codes" and (ck / "logs" / "x.csv").read_bytes() == b"1,2"
    on_disk = [ck, *ck.rglob("*")]
    assert {p.stat().st_ino for p in on_disk} <= synced, [str(p) for p in on_disk if p.stat().st_ino not in synced]

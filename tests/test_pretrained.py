"""from_pretrained: official directory layouts, key coverage of the 3B/7B checkpoints, end-to-end parity with
transformers' generate (text, codes, waveform), and every broken-directory case named."""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nano_omni.checkpoint import CheckpointError, canonical_key
from nano_omni.config import get_config, tiny_tokens
from nano_omni.omni import Omni, Voice
from nano_omni.pretrained import from_pretrained
from nano_omni.processor import Processor
from reference import hf_omni

CFG = get_config("tiny")
REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REF.is_dir():
    REF = Path(os.environ.get("NANO_OMNI_REFERENCE", "/work/shared/reference"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = hf_omni(CFG, seed=0)   # a seed whose random Talker only picks codes its DiT can read
    d = tmp_path_factory.mktemp("hf_omni")
    hf.save_pretrained(d, max_shard_size="2MB")          # several shards plus the index, as on the Hub
    return hf, d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_end_to_end_parity_with_transformers_generate(saved):
    """A padded batch of two conversations (text + audio): same text ids, same codec codes, same waveforms.

    The batch is padded on purpose: transformers 5.24's generate drops an all-ones attention mask, and its Talker
    then skips the codec pad/bos embeddings and the TMRoPE positions of its first step. With padding it takes the
    path its own Talker.forward defines, which is the one nano_omni always takes."""
    hf, d = saved
    ours, tok = from_pretrained(d, dtype=torch.float32, tokens=tiny_tokens())   # raises on any missing/unexpected key
    g = torch.Generator().manual_seed(5)
    cond, ref = torch.randn(1, CFG.dit.enc_emb_dim, generator=g), torch.randn(1, 60, CFG.dit.mel_dim, generator=g)
    hf.speaker_map = {"Chelsie": {"bos_token": 300, "cond": cond, "ref_mel": ref}}
    ours.voices = {"Chelsie": Voice(300, cond, ref)}
    sounds = [(np.sin(np.arange(n) * f) * 0.3).astype(np.float32) for n, f in ((16000, 0.05), (9000, 0.11))]
    x = Processor(ours.cfg, tok)([[{"role": "user", "content": [{"type": "audio", "audio": (sounds[0], 16000)},
                                                                 "What is it?"]}],
                                  [{"role": "user", "content": [{"type": "audio", "audio": (sounds[1], 16000)},
                                                                 "And this one, a longer question?"]}]])
    assert not bool(x.attention_mask.all())
    lens = x.audio_lengths.tolist()
    feats = torch.zeros(2, x.audio_features.shape[0], max(lens))
    fmask = torch.zeros(2, max(lens), dtype=torch.long)
    for i, piece in enumerate(x.audio_features.split(lens, dim=1)):
        feats[i, :, : piece.shape[1]], fmask[i, : piece.shape[1]] = piece, 1
    # transformers draws the DiT's starting noise with torch.randn: seed it there, and record the codes of each row
    seen = []
    dit_sample, t2w_forward = hf.token2wav.code2wav_dit_model.sample, hf.token2wav.forward

    def seeded_sample(*a, **k):
        torch.manual_seed(42)
        return dit_sample(*a, **k)

    def spy(code, *a, **k):
        seen.append(code.clone())
        return t2w_forward(code, *a, **k)

    hf.token2wav.code2wav_dit_model.sample, hf.token2wav.forward = seeded_sample, spy
    stops = [CFG.talker.codec_pad, CFG.talker.codec_eos]
    with torch.no_grad():
        seq, wavs = hf.generate(input_ids=x.input_ids, attention_mask=x.attention_mask, input_features=feats,
                                feature_attention_mask=fmask, speaker="Chelsie", thinker_max_new_tokens=8,
                                thinker_eos_token_id=[-1], talker_max_new_tokens=30, talker_do_sample=False,
                                talker_eos_token_id=stops)
    out = ours.generate(x, "Chelsie", thinker_kw=dict(max_new_tokens=8, stop_ids=[-1]),
                        talker_kw=dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30,
                                       suppress_ids=[CFG.talker.codec_bos]))
    assert torch.equal(out.tokens, seq[:, x.input_ids.shape[1]:])
    for row, (codes, wav) in enumerate(zip(seen, wavs)):
        n = codes.shape[1]
        assert n > 5 and torch.equal(out.codes[row, :n], codes[0])
        torch.manual_seed(42)
        noise = torch.randn(1, n * CFG.dit.repeats, CFG.dit.mel_dim)
        ours_wav = ours.token2wav(codes, cond, ref, noise=noise, solver="rk4", steps=10)[0]
        assert ours_wav.shape == wav.shape and float(wav.abs().max()) > 1e-3
        torch.testing.assert_close(ours_wav, wav, rtol=0, atol=1e-4)


def test_dtypes_and_the_text_only_mode(saved):
    _, d = saved
    m, _ = from_pretrained(d, tokens=tiny_tokens())
    assert m.thinker.lm_head.weight.dtype == torch.bfloat16 and m.talker.codec_head.weight.dtype == torch.bfloat16
    assert m.token2wav.code2wav_dit_model.proj_out.weight.dtype == torch.float32
    assert m.thinker.model.inv_freq.device.type == "cpu" and torch.isfinite(m.thinker.model.inv_freq).all()
    t, _ = from_pretrained(d, enable_audio_output=False, tokens=tiny_tokens())
    assert not hasattr(t, "talker") and not hasattr(t, "token2wav")


def test_nested_layout_of_newer_transformers(saved, tmp_path):
    """transformers >= 5 may nest the Thinker's parts under thinker.model.{language_model,audio_tower,visual}."""
    from safetensors.torch import load_file, save_file

    _, d = saved
    tensors = {}
    for f in sorted(d.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    nested = {}
    for k, v in tensors.items():
        k = re.sub(r"^thinker\.model\.", "thinker.model.language_model.", k)
        k = re.sub(r"^thinker\.(audio_tower|visual)\.", r"thinker.model.\1.", k)
        nested[k] = v
    out = tmp_path / "nested"
    out.mkdir()
    save_file(nested, out / "model.safetensors")
    shutil.copy(d / "config.json", out / "config.json")
    m, _ = from_pretrained(out, dtype=torch.float32, tokens=tiny_tokens())
    own = m.state_dict()
    for key in ("thinker.model.layers.0.self_attn.q_proj.bias", "thinker.model.layers.0.self_attn.v_proj.weight",
                "talker.model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(own[key], tensors[key])


def _listed_keys(path: Path) -> dict[str, tuple]:
    keys = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, shape = line.split("\t")
            keys[canonical_key(k)] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return keys


@pytest.mark.parametrize("preset, listing, total", [
    ("qwen2_5_omni_7b", "qwen_omni_7B_state_dict_keys.txt", 10_732_225_408),
    ("qwen2_5_omni_3b", "qwen_omni_3B_state_dict_keys.txt", 5_537_120_640),
])
def test_every_official_key_maps_with_its_shape(preset, listing, total):
    if not (REF / listing).is_file():
        pytest.skip(f"{REF / listing} is not available")
    with torch.device("meta"):
        m = Omni(get_config(preset))
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    listed = _listed_keys(REF / listing)
    assert sorted(set(listed) - set(own)) == [] and sorted(set(own) - set(listed)) == []
    assert [k for k in listed if listed[k] != own[k]] == []
    assert sum(p.numel() for p in m.parameters()) == total
    if preset == "qwen2_5_omni_7b":
        count = lambda p: sum(x.numel() for n, x in m.named_parameters() if n.startswith(p))
        assert count("thinker.") == 8_931_813_888 and count("talker.") == 1_351_360_256
        assert count("token2wav.code2wav_dit_model.") == 333_607_760
        assert count("token2wav.code2wav_bigvgan_model.") == 115_443_504


# -- broken directories ----------------------------------------------------------------------------------------
def test_missing_shard_names_the_file_and_a_key(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard .*{shard.name} is missing; .* e\.g\. \S+"):
        from_pretrained(d, tokens=tiny_tokens())


def test_truncated_shard_names_the_file(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read shard .*{shard.name}"):
        from_pretrained(d, tokens=tiny_tokens())


def test_config_of_another_model_family(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*model_type 'llama'"):
        from_pretrained(d)


def test_config_missing_a_field_or_of_no_kind_is_named(saved, tmp_path):
    """An official config.json without a field it always has names the field; a config.json that is neither an
    official nor a nano_omni one (here `{}`) is refused instead of building the default model."""
    d = _copy(saved[1], tmp_path / "m")
    hf = json.loads((d / "config.json").read_text())
    del hf["thinker_config"]["text_config"]["vocab_size"]
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"config\.json: the field 'vocab_size' is missing"):
        from_pretrained(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"config\.json: it is neither an official config"):
        from_pretrained(d)


def test_tokenizer_file_with_bad_json(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    (d / "tokenizer.json").write_text('{"added_tokens": [ {"id": 1,, }')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not valid JSON \(line 1, column"):
        from_pretrained(d)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_voices_file_with_code_is_never_run(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    _Evil.marker = str(tmp_path / "pwned")
    with open(d / "spk_dict.pt", "wb") as f:
        pickle.dump({"Chelsie": {"bos_token": 300, "cond": _Evil(), "ref_mel": torch.zeros(1, 4, 80)}}, f)
    with pytest.raises(ValueError, match="spk_dict.pt holds objects other than tensors"):
        from_pretrained(d, tokens=tiny_tokens())
    assert not (tmp_path / "pwned").exists()


def test_missing_and_misshaped_keys_are_listed_together(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(saved[1], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    t = load_file(shard)
    dropped = sorted(t)[0]
    t.pop(dropped)
    bent = sorted(t)[0]
    t[bent] = torch.zeros(3, 3)
    save_file(t, shard)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d, tokens=tiny_tokens())
    msg = str(e.value)
    assert "1 missing key(s)" in msg and canonical_key(dropped) in msg
    assert "1 mis-shaped key(s)" in msg and canonical_key(bent) in msg
